"""ReplicaDiscovery: DNS answers as sorted replica URLs, the system resolver on a real name, and the
last known set kept through failures."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from backend.serving.discovery import ReplicaDiscovery, parse_target
from tests.fixtures.engines import ScriptedResolver, free_port


async def test_localhost_resolves_with_the_system_resolver() -> None:
    port = free_port()
    urls = await ReplicaDiscovery(f"localhost:{port}").replicas()
    assert f"http://127.0.0.1:{port}/v1" in urls
    assert set(urls) <= {f"http://127.0.0.1:{port}/v1", f"http://[::1]:{port}/v1"}


async def test_addresses_become_sorted_unique_urls() -> None:
    resolver = ScriptedResolver(["10.0.0.10", "10.0.0.9", "10.0.0.10", "10.0.1.2"])
    urls = await ReplicaDiscovery("engines.test:8080", resolver=resolver).replicas()
    assert urls == [
        "http://10.0.0.9:8080/v1",
        "http://10.0.0.10:8080/v1",
        "http://10.0.1.2:8080/v1",
    ]


async def test_ipv6_addresses_are_bracketed() -> None:
    resolver = ScriptedResolver(["fd00::2", "10.0.0.1", "fe80::1%eth0", "fd00:0::1"])
    urls = await ReplicaDiscovery("engines.test:8080", resolver=resolver).replicas()
    assert urls == [
        "http://10.0.0.1:8080/v1",
        "http://[fd00::1]:8080/v1",
        "http://[fd00::2]:8080/v1",
        "http://[fe80::1%25eth0]:8080/v1",
    ]


async def test_resolver_gets_host_and_port() -> None:
    seen: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[str]:
        seen.append((host, port))
        return ["10.0.0.1"]

    await ReplicaDiscovery("qwen-engine-pods.qwen.svc:8080", resolver=resolver).replicas()
    assert seen == [("qwen-engine-pods.qwen.svc", 8080)]


async def test_a_changed_answer_replaces_the_set() -> None:
    resolver = ScriptedResolver(["10.0.0.1", "10.0.0.2"])
    discovery = ReplicaDiscovery("engines.test:8080", resolver=resolver)
    await discovery.replicas()
    resolver.addresses = ["10.0.0.2", "10.0.0.3"]
    assert await discovery.replicas() == ["http://10.0.0.2:8080/v1", "http://10.0.0.3:8080/v1"]


async def test_failed_resolution_keeps_the_last_set(caplog: pytest.LogCaptureFixture) -> None:
    resolver = ScriptedResolver(["10.0.0.1", "10.0.0.2"])
    discovery = ReplicaDiscovery("engines.test:8080", resolver=resolver)
    known = await discovery.replicas()
    resolver.failure = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with caplog.at_level(logging.WARNING, logger="backend.serving.discovery"):
        assert await discovery.replicas() == known
    assert "did not resolve" in caplog.text


async def test_empty_answer_keeps_the_last_set() -> None:
    resolver = ScriptedResolver(["10.0.0.1"])
    discovery = ReplicaDiscovery("engines.test:8080", resolver=resolver)
    known = await discovery.replicas()
    resolver.addresses = []
    assert await discovery.replicas() == known == ["http://10.0.0.1:8080/v1"]


async def test_failure_before_any_answer_is_empty() -> None:
    resolver = ScriptedResolver()
    resolver.failure = OSError("network unreachable")
    assert await ReplicaDiscovery("engines.test:8080", resolver=resolver).replicas() == []


async def test_stuck_resolver_times_out_and_keeps_the_last_set() -> None:
    never = asyncio.Event()
    calls = 0

    async def resolver(host: str, port: int) -> list[str]:
        nonlocal calls
        calls += 1
        if calls > 1:  # the first answer comes at once, the next never
            await never.wait()
        return ["10.0.0.1"]

    discovery = ReplicaDiscovery("engines.test:8080", resolver=resolver, timeout_s=0.05)
    known = await discovery.replicas()
    assert await discovery.replicas() == known == ["http://10.0.0.1:8080/v1"]
    assert calls == 2


@pytest.mark.parametrize(
    "target",
    ["engines.test", "http://engines.test:8080", "engines.test:0", "engines.test:70000",
     "engines..test:8080", ":8080", "[not-v6]:8080", "[1.2.3.4]:8080", "engines.test:80:80"],
)  # fmt: skip
def test_malformed_target_is_refused(target: str) -> None:
    with pytest.raises(ValueError, match="is not"):
        ReplicaDiscovery(target)


def test_target_with_ipv6_literal() -> None:
    assert parse_target("[fd00::1]:8080") == ("fd00::1", 8080)
