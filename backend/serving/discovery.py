"""Engine replicas found through DNS: one name whose A/AAAA records are the replicas.

On Kubernetes the name is a headless Service (`clusterIP: None`) over the engine pods: its records
are the IPs of the pods that are ready now, so each chat_ui process sees every pod and can pin a
conversation to one of them (a normal Service would balance each request across pods instead).
No Kubernetes API access is needed.

Contract of `ReplicaDiscovery.replicas()`:

- The replicas are `http://<ip>:<port>/v1` (an IPv6 address in brackets), one per distinct
  address, sorted by address (IPv4 before IPv6, numerically), so every process lists them in the
  same order.
- A failed resolution (`OSError`: `socket.gaierror`, or no answer within `timeout_s`) or one
  with no address does not change the answer: the last set resolved is returned again (empty before the first success)
  and a warning is logged. An empty pool would turn every conversation away, while replicas that
  really went away fail their health probes anyway.
- The resolver is called once per call, with no caching of its own (the system resolver and the
  cluster DNS have their own TTLs). Not thread-safe; used from one event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""`(host, port)` -> the IP addresses of `host` (strings, an IPv6 one may carry a `%zone`).
Raises OSError when the name cannot be resolved."""

_TARGET = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d{1,5})")


def parse_target(target: str) -> tuple[str, int]:
    """`host:port` (or `[ipv6]:port`) as (host, port). Raises ValueError, saying what is wrong."""
    match = _TARGET.fullmatch(target.strip())
    if match is None:
        raise ValueError(
            f"{target!r} is not host:port (a DNS name and a port, e.g. "
            "qwen-engine-pods.qwen.svc.cluster.local:8080)"
        )
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"port {port} of {target!r} is not between 1 and 65535")
    host = match["v6"] or match["host"]
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {target!r} is not an IPv6 address") from None
    elif host.startswith(".") or ".." in host or host.startswith("-"):
        raise ValueError(f"{host!r} in {target!r} is not a DNS name")
    return host, port


async def resolve_addresses(host: str, port: int) -> list[str]:
    """The system resolver (`getaddrinfo`, run off the event loop). Raises OSError."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(sockaddr[0]) for _, _, _, _, sockaddr in infos]


def replica_urls(addresses: Iterable[str], *, port: int) -> list[str]:
    """Base URLs of the replicas at `addresses` on `port`: de-duplicated, sorted by address.

    Raises ValueError for a string that is not an IP address."""
    parsed: dict[tuple[int, int, str], str] = {}
    for address in addresses:
        ip_text, _, zone = address.partition("%")
        ip = ipaddress.ip_address(ip_text)
        if ip.version == 6:
            # RFC 6874: a zone id in a URL is written after an escaped percent sign
            host = f"[{ip.compressed}{'%25' + zone if zone else ''}]"
        else:
            host = ip.compressed
        parsed[(ip.version, int(ip), zone)] = f"http://{host}:{port}/v1"
    return [parsed[key] for key in sorted(parsed)]


class ReplicaDiscovery:
    """Re-resolves `target` (`host:port`) into engine replica URLs on each `replicas()` call."""

    def __init__(
        self, target: str, *, resolver: Resolver = resolve_addresses, timeout_s: float = 5.0
    ) -> None:
        """`timeout_s`: how long one resolution may take (a stuck resolver must not hold up the
        health probes that follow it). Raises ValueError when `target` is not `host:port`."""
        self._host, self._port = parse_target(target)
        self._target = target
        self._resolver = resolver
        self._timeout_s = timeout_s
        self._last: list[str] = []

    @property
    def target(self) -> str:
        return self._target

    async def replicas(self) -> list[str]:
        """The replica URLs now; on failure the last known ones (see the module docstring)."""
        try:
            async with asyncio.timeout(self._timeout_s):  # TimeoutError is an OSError
                addresses = await self._resolver(self._host, self._port)
            urls = replica_urls(addresses, port=self._port)
        except (OSError, ValueError) as exc:
            logger.warning(
                "engine discovery: %s did not resolve (%s); keeping %d known replica(s)",
                self._target, exc, len(self._last),
            )  # fmt: skip
            return list(self._last)
        if not urls:
            logger.warning(
                "engine discovery: %s has no address; keeping %d known replica(s)",
                self._target, len(self._last),
            )  # fmt: skip
            return list(self._last)
        if urls != self._last:
            logger.info("engine discovery: %s is now %s", self._target, ", ".join(urls))
        self._last = urls
        return list(urls)
