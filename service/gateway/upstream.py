"""The upstream vLLM server: transport-error mapping, the cached model list and the alias (from the registry)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import aiohttp
import httpx
from yarl import URL

from service.adapters.view import RegistryView
from service.core.errors import APIError
from service.core.periodic import Periodic
from service.gateway.metrics import Metrics

log = logging.getLogger("presafe.gateway")

# Generation requests, the hot path, go through aiohttp (its C HTTP parser): about 0.6 ms of the gateway's CPU
# per streamed 32-event reply, where httpx (pure-Python h11) took 2-3 ms. The gateway's other upstream calls
# (model list, health, metrics, tokenize) keep httpx. Either client's failures are these:
TRANSPORT_ERRORS = (httpx.HTTPError, aiohttp.ClientError, TimeoutError)


def generation_session(timeout_s: float) -> aiohttp.ClientSession:
    """The pooled client for generation requests (POSTs to vLLM's OpenAI routes)."""
    return aiohttp.ClientSession(
        # Idle connections expire before vLLM's own keep-alive timeout (5 s) closes them under us.
        connector=aiohttp.TCPConnector(limit=2048, limit_per_host=0, keepalive_timeout=3.0),
        # connect: waiting for a pooled connection or making one; sock_read: the wait for each chunk
        timeout=aiohttp.ClientTimeout(total=None, connect=30.0, sock_connect=5.0, sock_read=timeout_s),
    )


def transport_error(exc: BaseException, metrics: Metrics) -> APIError:
    """Map a failure talking to vLLM (one of :data:`TRANSPORT_ERRORS`) to 503 (unreachable), 504 (timeout) or
    502 (broken reply)."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, aiohttp.ClientConnectorError,
                        aiohttp.ConnectionTimeoutError)):
        metrics.upstream_errors.labels("connect").inc()
        return APIError(503, "the model server is unavailable", code="upstream_unavailable")
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        metrics.upstream_errors.labels("timeout").inc()
        return APIError(504, "the model server timed out", code="upstream_timeout")
    metrics.upstream_errors.labels("protocol").inc()
    log.warning("upstream connection failed", extra={"error": f"{type(exc).__name__}: {exc}"})
    return APIError(502, f"the model server connection failed: {type(exc).__name__}", code="upstream_error")


async def send(session: aiohttp.ClientSession, url: URL, body: bytes, headers: dict,
               metrics: Metrics) -> aiohttp.ClientResponse:
    """POST ``body`` (the reply's headers are in; the caller reads and releases it), sent again once when a
    pooled keep-alive connection the server had just closed fails before any reply byte."""
    try:
        return await session.post(url, data=body, headers=headers)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        if isinstance(exc, aiohttp.ClientConnectorError):  # no connection was made: not a stale one
            raise
        metrics.upstream_errors.labels("stale_connection").inc()
        return await session.post(url, data=body, headers=headers)


def upstream_status_error(status: int, content: bytes, metrics: Metrics) -> APIError | tuple[int, bytes]:
    """A non-200 upstream answer: 4xx passes through (as an OpenAI error body); 5xx becomes 502."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    message = None
    if isinstance(body, dict):
        err = body.get("error")
        message = err.get("message") if isinstance(err, dict) else body.get("message") or body.get("detail")
    if 400 <= status < 500:
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return status, content
        return APIError(status, str(message or content[:500].decode("utf-8", "replace")))
    metrics.upstream_errors.labels("status_5xx").inc()
    return APIError(502, f"the model server failed ({status}): {message or 'no detail'}",
                    code="upstream_error")


def no_aligned_model(message: str, retry_after: int) -> APIError:
    """The alias cannot serve: no adapter is promoted yet, or the promoted one is not loaded (503)."""
    return APIError(503, message, code="no_aligned_model", headers={"retry-after": str(retry_after)})


def training_progress(jobs_db: Path) -> str | None:
    """A short line on the active training job (read-only from the admin's job store), or None."""
    if not jobs_db.is_file():
        return None
    try:
        conn = sqlite3.connect(f"file:{jobs_db}?mode=ro", uri=True, timeout=0.2)
        try:
            row = conn.execute("SELECT id, state, stage, progress FROM jobs WHERE state IN "
                               "('queued', 'running', 'publishing') LIMIT 1").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    job_id, state, stage, progress = row
    parts = [f"stage {stage}"] if stage else []
    parts.append(f"{100 * float(progress or 0):.0f}% done")
    return f"job {job_id} is {state} ({', '.join(parts)})"


class ModelCatalog:
    """The upstream's ``/v1/models`` (cached ``ttl`` seconds, refreshed in the background) plus the alias.

    The public API sees only the alias and the ``public`` names; a privileged caller (the admin) sees all.
    """

    def __init__(self, client: httpx.AsyncClient, metrics: Metrics, registry: RegistryView, alias: str,
                 ttl: float = 5.0, public: frozenset[str] = frozenset(), jobs_db: Path | None = None,
                 retry_after: int = 30, served_elsewhere: Callable[[str], bool] = lambda name: False,
                 source: Callable[[], str] | None = None):
        self.client, self.metrics, self.registry, self.alias, self.ttl = client, metrics, registry, alias, ttl
        self.source = source or (lambda: "")  # the replica to ask (its URL; "": the client's base URL)
        self.served_elsewhere = served_elsewhere  # a name a merged engine serves (service.engines)
        self.public, self.jobs_db, self.retry_after = public, jobs_db, retry_after
        self._models: list[dict] | None = None
        self._ids: frozenset[str] = frozenset()
        self._fetched = 0.0
        self._lock = asyncio.Lock()
        self._refresh: asyncio.Task | None = None
        self._served: str | None = None

    async def _fetch(self) -> None:
        asked = time.monotonic()
        async with self._lock:
            if self._models is not None and self._fetched >= asked:
                return  # a refresh that started after we asked has completed meanwhile
            started = time.monotonic()
            try:
                resp = await self.client.get(f"{self.source()}/v1/models", timeout=10.0)
            except httpx.HTTPError as exc:
                raise transport_error(exc, self.metrics) from None
            try:
                data = resp.json()["data"] if resp.status_code == 200 else None
                models = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
            except (ValueError, KeyError, TypeError):
                models = None
            if models is None:
                self.metrics.upstream_errors.labels("malformed").inc()
                raise APIError(502, "the model server returned an invalid model list", code="upstream_error")
            self._models, self._ids, self._fetched = models, frozenset(m["id"] for m in models), started

    async def models(self, *, fresh: bool = False) -> list[dict]:
        """The upstream's model objects (base first, then loaded adapters)."""
        age = time.monotonic() - self._fetched
        if self._models is None or fresh:
            await self._fetch()
        elif age > self.ttl and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._quiet_fetch())
        return self._models or []

    async def _quiet_fetch(self) -> None:
        try:
            await self._fetch()
        except APIError:
            pass

    def alias_target(self) -> str | None:
        """The adapter the alias serves: the promoted one (None while none is: the alias never serves the base)."""
        promoted = self.registry.promoted()
        if promoted != self._served:
            self.metrics.set_served_adapter(self.alias, promoted, self.registry.version(promoted) if promoted else "")
            self._served = promoted
        return promoted

    def _not_promoted(self) -> APIError:
        progress = training_progress(self.jobs_db) if self.jobs_db is not None else None
        message = (f"model {self.alias!r} has no aligned adapter promoted yet, so it does not answer (it never "
                   "falls back to the unaligned base model); ")
        message += (f"training is under way: {progress}" if progress else
                    "training is under way or has to be started (presafe train run / POST /admin/retrain)")
        return no_aligned_model(message, self.retry_after)

    async def resolve(self, name: str, *, privileged: bool = False) -> str:
        """The upstream model name for a requested model.

        The alias → the promoted adapter (503 while none is promoted or loaded); a public name (or, for a
        privileged caller, any served name) → itself; anything else → 404, whether it is served or not.
        """
        await self.models()
        if name == self.alias:
            target = self.alias_target()
            if target is None:
                raise self._not_promoted()
        elif privileged or name in self.public:
            target = name
        else:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        if target not in self._ids and not self.served_elsewhere(target):
            await self.models(fresh=True)  # an adapter may have just been loaded
            if target not in self._ids:
                if name == self.alias:
                    raise no_aligned_model(f"model {name!r} maps to adapter {target!r}, which the model server "
                                           "has not loaded (yet)", self.retry_after)
                raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return target

    def entry(self, name: str) -> dict:
        """The upstream's model object for a served name (empty when unknown)."""
        return next((m for m in self._models or () if m["id"] == name), {})

    def context_length(self, name: str) -> int | None:
        """The served context length of ``name`` (an adapter's is its base model's; vLLM lists it there only)."""
        entry = self.entry(name)
        for candidate in (entry, self.entry(entry.get("parent") or ""), *(self._models or ())):
            value = candidate.get("max_model_len")
            if isinstance(value, int) and value > 0:
                return value
        return None

    async def listing(self, *, privileged: bool = False) -> dict:
        """``/v1/models`` body: the alias (while it can serve) and the public names (privileged: every model)."""
        models = await self.models(fresh=time.monotonic() - self._fetched > self.ttl)
        target = self.alias_target()
        if target is not None and target not in self._ids:
            models = await self.models(fresh=True)  # just promoted and loaded: list it at once
        data = [m for m in models if privileged or m["id"] in self.public]
        if target is not None and (target in self._ids or self.served_elsewhere(target)) \
                and self.alias not in self._ids:
            entry = self.entry(target)
            data.append({"id": self.alias, "object": "model", "created": entry.get("created", int(time.time())),
                         "owned_by": "presafe", "root": target, "parent": entry.get("parent") or target,
                         "max_model_len": entry.get("max_model_len")})
        return {"object": "list", "data": data}


_WAITING = re.compile(rb"^vllm:num_requests_waiting(?:\{[^}]*\})? ([0-9.eE+-]+)", re.MULTILINE)


class QueueWatch:
    """vLLM's queue lengths (``vllm:num_requests_waiting``, summed per server), read from every server a request
    can go to (``urls``: the LoRA replicas, the merged ones, the embedded merged engines) every ``interval`` s in
    the background. :meth:`shortest` is what counts for a request: the shortest queue of the servers it may go to
    (requests go to the least busy one); ``None`` while unknown (no metrics, unreachable)."""

    def __init__(self, client: httpx.AsyncClient, headers: dict[str, str], interval: float = 1.0,
                 urls: Callable[[], list[str]] = lambda: [""]):
        self.client, self.headers, self.interval, self.urls = client, headers, interval, urls
        self.queues: dict[str, float] = {}  # server URL -> requests waiting there, at the last poll
        self._polls = Periodic(self.poll, interval, name="queue polls")

    async def _waiting(self, base: str) -> float | None:
        try:
            resp = await self.client.get(f"{base}/metrics", headers=self.headers, timeout=max(1.0, self.interval))
        except httpx.HTTPError:
            return None
        found = _WAITING.findall(resp.content) if resp.status_code == 200 else []
        try:
            return sum(float(v) for v in found) if found else None
        except ValueError:  # a malformed sample: as unknown as no metrics at all
            return None

    async def poll(self) -> None:
        urls = list(dict.fromkeys(self.urls()))
        queues = await asyncio.gather(*(self._waiting(u) for u in urls))
        self.queues = {u: q for u, q in zip(urls, queues, strict=True) if q is not None}

    def shortest(self, urls: Iterable[str]) -> float | None:
        """The shortest known queue among ``urls``."""
        known = [self.queues[u] for u in urls if u in self.queues]
        return min(known) if known else None

    def start(self) -> None:
        self._polls.start()

    async def stop(self) -> None:
        await self._polls.stop()
