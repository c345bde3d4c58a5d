"""Several vLLM replicas behind one gateway: per-request routing to the least busy one, health checks that
eject a failing replica and readmit it when it answers again, and the list of replicas (static, or a headless
Service's DNS records refreshed in the background).

A replica is healthy while its ``/v1/models`` answers; that answer is also its adapter inventory, so a request
for an adapter goes to a replica that holds it when one does. With every replica ejected the pool tries them
all anyway (a single upstream behaves as before: it is never skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from service.core.periodic import Periodic
from service.gateway.metrics import Metrics

log = logging.getLogger("presafe.gateway")


def split_urls(value: str) -> list[str]:
    """``PRESAFE_VLLM_URL``: one URL or a comma list, trailing slashes dropped, duplicates once."""
    urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
    return list(dict.fromkeys(urls))


@dataclass(eq=False)
class Replica:
    """One vLLM server: where it is, whether it is admitted, what it holds and how busy it is."""

    url: str
    healthy: bool = True  # admitted until a check or a request fails
    outstanding: int = 0  # requests the gateway has sent there and not finished
    routed: int = 0  # requests sent there in all (ties go to the one that got fewer)
    models: frozenset[str] = frozenset()  # served names, from its last good /v1/models
    error: str | None = None  # why it was ejected


async def resolve_all(urls: Iterable[str]) -> list[str]:
    """Each URL once per address its host name resolves to (a headless Service lists every ready pod)."""
    loop = asyncio.get_running_loop()
    out: list[str] = []
    for url in urls:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("replica discovery: cannot resolve", extra={"host": host, "error": str(exc)})
            continue
        for address in sorted({info[4][0] for info in infos}):
            netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            out.append(urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/"))
    return list(dict.fromkeys(out))


class ReplicaPool:
    """The replicas of one gateway and the choice of one per request (:meth:`pick`)."""

    def __init__(self, urls: list[str], metrics: Metrics, *, interval: float = 2.0, discovery: str = "static",
                 headers: dict[str, str] | None = None, fallback: bool = True):
        if not urls:
            raise ValueError("no vLLM replica")
        self.seeds, self.metrics, self.interval = urls, metrics, interval
        self.fallback = fallback  # False: only an admitted replica serving the model is ever picked
        # Health checks on a pool of their own: a check never holds the connection a generation would reuse.
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=16, keepalive_expiry=3.0))
        self.discovery, self.headers = discovery, headers or {}
        self.replicas: list[Replica] = [Replica(u) for u in urls]
        self._checks = Periodic(self.check_all, interval, name="replica health checks", at_once=False)
        for replica in self.replicas:
            self._gauge(replica)

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def _live(self, exclude: Iterable[Replica] = ()) -> list[Replica]:
        skip = set(map(id, exclude))
        candidates = [r for r in self.replicas if id(r) not in skip]
        return [r for r in candidates if r.healthy] or candidates  # all ejected: try them anyway

    def pick(self, model: str | None = None, exclude: Iterable[Replica] = ()) -> Replica | None:
        """The replica for a request on ``model``: admitted, holding ``model`` if any does, with the fewest
        requests outstanding (then the fewest routed); None when ``exclude`` leaves none. Without ``fallback``
        only an admitted replica holding ``model`` is picked."""
        live = self._live(exclude)
        holding = [r for r in live if model in r.models] if model else []
        candidates = (holding or live) if self.fallback else [r for r in holding if r.healthy]
        return min(candidates, key=lambda r: (r.outstanding, r.routed)) if candidates else None

    def holds(self, model: str) -> bool:
        """Whether an admitted replica serves ``model`` (as of its last health check)."""
        return any(r.healthy and model in r.models for r in self.replicas)

    def begin(self, replica: Replica) -> None:
        replica.outstanding += 1
        replica.routed += 1
        self.metrics.replica_requests.labels(replica.url).inc()

    @staticmethod
    def end(replica: Replica) -> None:
        replica.outstanding -= 1

    def eject(self, replica: Replica, why: str) -> None:
        """Stop routing to ``replica`` until a health check passes (a request to it failed, or a check did)."""
        if replica.healthy and len(self.replicas) > 1:
            log.warning("replica ejected", extra={"replica": replica.url, "reason": why})
        replica.healthy, replica.error = False, why
        self._gauge(replica)

    def _admit(self, replica: Replica, models: frozenset[str]) -> None:
        if not replica.healthy:
            log.info("replica admitted", extra={"replica": replica.url, "models": len(models)})
        replica.healthy, replica.error, replica.models = True, None, models
        self._gauge(replica)

    def admitted_urls(self) -> list[str]:
        """The admitted replicas' URLs (all of them when none is)."""
        return [r.url for r in self.replicas if r.healthy] or self.urls

    def _gauge(self, replica: Replica) -> None:
        self.metrics.replica_healthy.labels(replica.url).set(1 if replica.healthy else 0)

    async def check(self, replica: Replica) -> None:
        """One health check: ``/v1/models`` answers 200 with a model list (admit, note its models) or not (eject)."""
        try:
            resp = await self.client.get(f"{replica.url}/v1/models", headers=self.headers,
                                         timeout=max(1.0, self.interval))
            models = frozenset(m["id"] for m in resp.json()["data"]) if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            self.eject(replica, f"health check: {type(exc).__name__}")
            return
        if models is None:
            self.eject(replica, f"health check: status {resp.status_code}")
        else:
            self._admit(replica, models)

    async def check_all(self) -> None:
        if self.discovery == "dns":
            await self.discover()
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def discover(self) -> None:
        """Re-read the replica list from DNS: new addresses join (checked before use), gone ones leave."""
        urls = await resolve_all(self.seeds)
        if not urls:
            return  # DNS down or no ready pod: keep what we had
        known = {r.url: r for r in self.replicas}
        fresh = [known.get(u) or Replica(u, healthy=False, error="not checked yet") for u in urls]
        for gone in set(known) - set(urls):
            with contextlib.suppress(KeyError):
                self.metrics.replica_healthy.remove(gone)
            log.info("replica left", extra={"replica": gone})
        self.replicas = fresh

    def start(self) -> None:
        self._checks.start()

    async def stop(self) -> None:
        await self._checks.stop()
        await self.client.aclose()
