"""The audit log on a real PostgreSQL: the hash chain, append-only in the database, verify catching
what a superuser changes behind its back, concurrent writers, the JSONL sink, `audit verify`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr

from backend.audit import (
    CLIENT_DISCONNECTED,
    AuditLog,
    AuditRecord,
    AuditTrail,
    Outcome,
    VerifyResult,
    chain_hash,
    verify,
)
from backend.cli import main
from backend.db import migrate, open_pool
from backend.errors import DatabaseUnavailable, EngineTimeout, RateLimited, TimeoutPhase
from backend.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
KEY = SecretStr("test-audit-key")
PROMPT = "请把我的身份证号码 110101199003074518 记下来"


@pytest.fixture
async def pool(database: str) -> AsyncIterator[AsyncConnectionPool]:
    await migrate(database)
    pool = await open_pool(database, min_size=1, max_size=6)
    try:
        yield pool
    finally:
        await pool.close()


def record(n: int = 0, *, outcome: Outcome = Outcome.ANSWERED) -> AuditRecord:
    return AuditRecord(
        user="alice", thread_id=f"thread-{n}", request_id=f"req-{n}", prompt_hmac="ab" * 32,
        replica="http://engine:8000/v1", tier="normal", retrieved_chunk_ids=(3, 1),
        cited_chunk_ids=(3,), verdicts={"input": (), "output": ("赌博",)}, prompt_tokens=12 + n,
        completion_tokens=7, ttft_ms=150, latency_ms=900, outcome=outcome,
    )  # fmt: skip


async def fill(log: AuditLog, count: int) -> list[int]:
    return [(await log.append(record(n))).id for n in range(count)]


async def tamper(url: str, statement: str) -> None:
    """Run `statement` with the append-only triggers disabled, as the table's owner may."""
    connect = psycopg.AsyncConnection.connect(url, autocommit=True)
    async with await connect as conn, conn.transaction():
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
        await conn.execute(statement.encode())
        await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER USER")


async def all_rows_text(url: str) -> str:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT row_to_json(a)::text FROM audit_log a ORDER BY id")
        return "\n".join(row[0] for row in await cur.fetchall())


async def test_empty_chain_verifies(pool: AsyncConnectionPool) -> None:
    assert await verify(pool) == VerifyResult(ok=True, checked=0)


async def test_clean_chain_verifies(pool: AsyncConnectionPool) -> None:
    await fill(AuditLog(pool, hmac_key=KEY), 5)
    result = await verify(pool)
    assert (result.ok, result.checked, result.first_bad_id) == (True, 5, None)


async def test_records_link_to_their_predecessor(pool: AsyncConnectionPool) -> None:
    log = AuditLog(pool, hmac_key=KEY)
    first, second = await log.append(record(0)), await log.append(record(1))
    assert first.prev_hash == "0" * 64 and second.prev_hash == first.hash
    assert second.hash == chain_hash(first.hash, second.fields())


async def test_verify_batches_across_pages(pool: AsyncConnectionPool) -> None:
    await fill(AuditLog(pool, hmac_key=KEY), 7)
    assert (await verify(pool, batch=3)).checked == 7


async def test_update_is_refused(pool: AsyncConnectionPool, database: str) -> None:
    await fill(AuditLog(pool, hmac_key=KEY), 1)
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            await conn.execute("UPDATE audit_log SET outcome = 'answered'")


async def test_delete_is_refused(pool: AsyncConnectionPool, database: str) -> None:
    await fill(AuditLog(pool, hmac_key=KEY), 1)
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            await conn.execute("DELETE FROM audit_log")


async def test_truncate_is_refused(pool: AsyncConnectionPool, database: str) -> None:
    await fill(AuditLog(pool, hmac_key=KEY), 1)
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            await conn.execute("TRUNCATE audit_log")


async def test_head_cannot_move_back(pool: AsyncConnectionPool, database: str) -> None:
    await fill(AuditLog(pool, hmac_key=KEY), 2)
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.RaiseException, match="forward"):
            await conn.execute("UPDATE audit_chain_head SET last_id = last_id - 1")


async def test_verify_catches_changed_row(pool: AsyncConnectionPool, database: str) -> None:
    ids = await fill(AuditLog(pool, hmac_key=KEY), 5)
    await tamper(database, f"UPDATE audit_log SET user_identifier = 'mallory' WHERE id = {ids[2]}")
    result = await verify(pool)
    assert (result.ok, result.first_bad_id, result.checked) == (False, ids[2], 2)


async def test_verify_catches_unknown_outcome(pool: AsyncConnectionPool, database: str) -> None:
    ids = await fill(AuditLog(pool, hmac_key=KEY), 3)
    await tamper(database, f"UPDATE audit_log SET outcome = 'fine' WHERE id = {ids[1]}")
    result = await verify(pool)
    assert (result.ok, result.first_bad_id) == (False, ids[1])


async def test_verify_catches_rehashed_row(pool: AsyncConnectionPool, database: str) -> None:
    """A forger who recomputes the changed record's hash still breaks the next record's link."""
    log = AuditLog(pool, hmac_key=KEY)
    first, second, _ = [await log.append(record(n)) for n in range(3)]
    forged = record(1, outcome=Outcome.BLOCKED_INPUT)
    fields = {**second.fields(), "outcome": forged.outcome.value}
    new_hash = chain_hash(first.hash, fields)
    await tamper(
        database,
        f"UPDATE audit_log SET outcome = 'blocked_input', hash = '{new_hash}' WHERE id = {second.id}",
    )
    result = await verify(pool)
    assert (result.ok, result.first_bad_id) == (False, second.id + 1)


async def test_verify_catches_deleted_row(pool: AsyncConnectionPool, database: str) -> None:
    ids = await fill(AuditLog(pool, hmac_key=KEY), 5)
    await tamper(database, f"DELETE FROM audit_log WHERE id = {ids[2]}")
    result = await verify(pool)
    assert (result.ok, result.first_bad_id) == (False, ids[3])


async def test_verify_catches_deleted_newest(pool: AsyncConnectionPool, database: str) -> None:
    ids = await fill(AuditLog(pool, hmac_key=KEY), 4)
    await tamper(database, f"DELETE FROM audit_log WHERE id = {ids[3]}")
    result = await verify(pool)
    assert (result.ok, result.first_bad_id, result.checked) == (False, ids[3], 3)


async def test_concurrent_appends_keep_one_chain(pool: AsyncConnectionPool) -> None:
    logs = [AuditLog(pool, hmac_key=KEY) for _ in range(4)]
    written = await asyncio.gather(*(logs[n % 4].append(record(n)) for n in range(40)))
    result = await verify(pool)
    assert (result.ok, result.checked) == (True, 40)
    assert len({chained.prev_hash for chained in written}) == 40  # nobody shared a predecessor


async def test_concurrent_appends_from_processes(database: str, pool: AsyncConnectionPool) -> None:
    """Two OS processes, each with its own connections, append at once: still one chain."""
    script = (
        "import asyncio, sys\n"
        "from pydantic import SecretStr\n"
        "from backend.audit import AuditLog\n"
        "from backend.db import open_pool\n"
        "from tests.backend.test_audit import record\n"
        "async def run():\n"
        "    pool = await open_pool(sys.argv[1], min_size=3, max_size=3)\n"
        "    log = AuditLog(pool, hmac_key=SecretStr('k'))\n"
        "    await asyncio.gather(*(log.append(record(n)) for n in range(25)))\n"
        "    await pool.close()\n"
        "asyncio.run(run())\n"
    )
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", script, database, cwd=REPO)
        for _ in range(2)
    ]
    assert [await p.wait() for p in procs] == [0, 0]
    result = await verify(pool)
    assert (result.ok, result.checked) == (True, 50)


async def test_prompt_is_stored_only_as_hmac(pool: AsyncConnectionPool, database: str) -> None:
    log = AuditLog(pool, hmac_key=KEY)
    trail = AuditTrail(user="alice", thread_id="t", request_id="r", started=0.0)
    chained = await log.record(trail, prompt=PROMPT, error=None, ended=1.0)
    expected = hmac.new(b"test-audit-key", PROMPT.encode(), hashlib.sha256).hexdigest()
    assert chained is not None and chained.record.prompt_hmac == expected
    stored = await all_rows_text(database)
    assert expected in stored and PROMPT not in stored and "110101199003074518" not in stored


async def test_jsonl_sink_gets_each_record(pool: AsyncConnectionPool, tmp_path: Path) -> None:
    sink = tmp_path / "audit.jsonl"
    log = AuditLog(pool, hmac_key=KEY, jsonl_path=sink)
    written = [await log.append(record(n)) for n in range(3)]
    lines = [json.loads(line) for line in sink.read_text("utf-8").splitlines()]
    assert [line["hash"] for line in lines] == [chained.hash for chained in written]
    assert lines[1]["hash"] == chain_hash(
        lines[0]["hash"], {k: v for k, v in lines[1].items() if k not in ("prev_hash", "hash")}
    )


async def test_jsonl_never_holds_the_prompt(pool: AsyncConnectionPool, tmp_path: Path) -> None:
    sink = tmp_path / "audit.jsonl"
    log = AuditLog(pool, hmac_key=KEY, jsonl_path=sink)
    trail = AuditTrail(user="alice", thread_id="t", request_id="r", started=0.0)
    await log.record(trail, prompt=PROMPT, error=None, ended=1.0)
    assert PROMPT not in sink.read_text("utf-8") and log.prompt_hmac(PROMPT) in sink.read_text()


async def test_jsonl_failure_is_counted_not_raised(
    pool: AsyncConnectionPool, tmp_path: Path
) -> None:
    metrics = Metrics()
    log = AuditLog(pool, hmac_key=KEY, jsonl_path=tmp_path, metrics=metrics)  # a directory
    await log.append(record())
    assert (await verify(pool)).checked == 1
    assert metrics.registry.get_sample_value("qwen_audit_write_failures_total", {"sink": "jsonl"})


async def test_append_without_schema_raises(database: str) -> None:
    pool = await open_pool(database, min_size=1, max_size=1)  # not migrated: no audit tables
    try:
        with pytest.raises(DatabaseUnavailable):
            await AuditLog(pool, hmac_key=KEY).append(record())
    finally:
        await pool.close()


async def test_failed_write_is_counted_not_raised(database: str) -> None:
    metrics = Metrics()
    pool = await open_pool(database, min_size=1, max_size=1)
    try:
        log = AuditLog(pool, hmac_key=KEY, metrics=metrics)
        trail = AuditTrail(user="alice", thread_id="t", request_id="r", started=0.0)
        assert await log.record(trail, prompt="你好", error=None) is None
    finally:
        await pool.close()
    labels = {"sink": "database"}
    assert metrics.registry.get_sample_value("qwen_audit_write_failures_total", labels) == 1


def trail() -> AuditTrail:
    return AuditTrail(user="u", thread_id="t", request_id="r", started=0.0)


def test_explicit_outcome_wins() -> None:
    t = trail()
    t.outcome, t.finished = Outcome.BLOCKED_OUTPUT, True
    assert t.conclude(None) is Outcome.BLOCKED_OUTPUT


def test_finished_answer_is_answered() -> None:
    t = trail()
    t.finished = True
    assert t.conclude(GeneratorExit()) is Outcome.ANSWERED


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (RateLimited(3.0), Outcome.RATE_LIMITED),
        (EngineTimeout(TimeoutPhase.FIRST_TOKEN, 2.0), Outcome.ENGINE_TIMEOUT),
        (asyncio.CancelledError(), Outcome.STOPPED),
        (asyncio.CancelledError(CLIENT_DISCONNECTED), Outcome.DISCONNECTED),
        (GeneratorExit(), Outcome.STOPPED),
        (RuntimeError("boom"), Outcome.ERROR),
    ],
)
def test_outcome_from_error(error: BaseException, outcome: Outcome) -> None:
    assert trail().conclude(error) is outcome


def test_seal_measures_in_milliseconds() -> None:
    t = AuditTrail(user="u", thread_id="t", request_id="r", started=10.0, first_token_at=10.25)
    sealed = t.seal(prompt_hmac="h", ended=11.5, error=None)
    assert (sealed.ttft_ms, sealed.latency_ms) == (250, 1500)


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database: str, redis_url: str) -> None:
    monkeypatch.setenv("QWEN_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("QWEN_DATABASE__URL", database)
    monkeypatch.setenv("QWEN_REDIS__URL", redis_url)


async def test_cli_verify_ok(
    cli_env: None, pool: AsyncConnectionPool, capsys: pytest.CaptureFixture[str]
) -> None:
    await fill(AuditLog(pool, hmac_key=KEY), 3)
    assert await asyncio.to_thread(main, ["audit", "verify"]) == 0
    assert capsys.readouterr().out == "ok: 3 records\n"


async def test_cli_verify_names_bad_record(
    cli_env: None, pool: AsyncConnectionPool, database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await fill(AuditLog(pool, hmac_key=KEY), 3)
    await tamper(database, f"UPDATE audit_log SET latency_ms = 1 WHERE id = {ids[1]}")
    assert await asyncio.to_thread(main, ["audit", "verify"]) == 1
    assert capsys.readouterr().out.startswith(f"bad: record {ids[1]}: ")
