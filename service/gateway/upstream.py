"""The upstream vLLM server: transport-error mapping, the cached model list and the alias registry."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path

import httpx

from service.adapters import REGISTRY as REGISTRY_FILE  # the adapter store owns the registry format
from service.gateway.errors import APIError
from service.metrics import Metrics

log = logging.getLogger("presafe.gateway")

_VERSIONED = re.compile(r"^.*-v([0-9]+)$")


def transport_error(exc: httpx.HTTPError, metrics: Metrics) -> APIError:
    """Map an httpx failure talking to vLLM to 503 (unreachable), 504 (timeout) or 502 (broken reply)."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        metrics.upstream_errors.labels("connect").inc()
        return APIError(503, "the model server is unavailable", code="upstream_unavailable")
    if isinstance(exc, httpx.TimeoutException):
        metrics.upstream_errors.labels("timeout").inc()
        return APIError(504, "the model server timed out", code="upstream_timeout")
    metrics.upstream_errors.labels("protocol").inc()
    log.warning("upstream connection failed", extra={"error": f"{type(exc).__name__}: {exc}"})
    return APIError(502, f"the model server connection failed: {type(exc).__name__}", code="upstream_error")


# A pooled keep-alive connection the server closed just before we reused it fails like this, before
# any response byte: the request is sent again, once, on a fresh connection.
STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


async def send(client: httpx.AsyncClient, request: httpx.Request, metrics: Metrics, *,
               stream: bool = False) -> httpx.Response:
    """``client.send`` with one retry when a reused connection turns out to be closed."""
    try:
        return await client.send(request, stream=stream)
    except STALE_CONNECTION:
        metrics.upstream_errors.labels("stale_connection").inc()
        return await client.send(request, stream=stream)


def upstream_status_error(resp: httpx.Response, content: bytes, metrics: Metrics) -> APIError | tuple[int, bytes]:
    """A non-200 upstream answer: 4xx passes through (as an OpenAI error body); 5xx becomes 502."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    message = None
    if isinstance(body, dict):
        err = body.get("error")
        message = err.get("message") if isinstance(err, dict) else body.get("message") or body.get("detail")
    if 400 <= resp.status_code < 500:
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return resp.status_code, content
        return APIError(resp.status_code, str(message or content[:500].decode("utf-8", "replace")))
    metrics.upstream_errors.labels("status_5xx").inc()
    return APIError(502, f"the model server failed ({resp.status_code}): {message or 'no detail'}",
                    code="upstream_error")


class AdapterRegistry:
    """``$PRESAFE_HOME/adapters/registry.json``: ``{"promoted": "<adapter name>", ...}`` (written by /admin).

    Re-read whenever its modification time changes (one ``stat`` per call).
    """

    def __init__(self, adapters_dir: Path):
        self.path = adapters_dir / REGISTRY_FILE
        self._stamp: tuple[int, int] | None = None
        self._data: dict = {}

    def data(self) -> dict:
        try:
            st = self.path.stat()
        except OSError:
            self._stamp, self._data = None, {}
            return self._data
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                data = json.loads(self.path.read_text())
                self._data = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                log.warning("unreadable adapter registry", extra={"path": str(self.path)})
                self._data = {}
            self._stamp = stamp
        return self._data

    def promoted(self) -> str | None:
        name = self.data().get("promoted")
        return name if isinstance(name, str) and name else None

    def version(self, adapter: str) -> str:
        """The adapter's version: the registry's ``versions`` map, else the ``-v<N>`` name suffix."""
        versions = self.data().get("versions")
        if isinstance(versions, dict) and adapter in versions:
            return str(versions[adapter])
        match = _VERSIONED.match(adapter)
        return match.group(1) if match else ""


class ModelCatalog:
    """The upstream's ``/v1/models`` (cached ``ttl`` seconds, refreshed in the background) plus the alias."""

    def __init__(self, client: httpx.AsyncClient, metrics: Metrics, registry: AdapterRegistry, alias: str,
                 ttl: float = 5.0):
        self.client, self.metrics, self.registry, self.alias, self.ttl = client, metrics, registry, alias, ttl
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
                resp = await self.client.get("/v1/models", timeout=10.0)
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

    @staticmethod
    def base_of(models: list[dict]) -> str | None:
        for m in models:
            if not m.get("parent"):
                return m["id"]
        return models[0]["id"] if models else None

    def alias_target(self, models: list[dict]) -> str | None:
        """The model the alias serves: the promoted adapter, else the base model."""
        promoted = self.registry.promoted()
        target = promoted or self.base_of(models)
        if promoted != self._served:
            self.metrics.set_served_adapter(self.alias, promoted, self.registry.version(promoted) if promoted else "")
            self._served = promoted
        return target

    async def resolve(self, name: str) -> str:
        """The upstream model name for a requested model (404 when neither served nor the alias)."""
        models = await self.models()
        if name == self.alias:
            target = self.alias_target(models)
            if target is None:
                raise APIError(503, "the model server serves no model yet", code="upstream_unavailable")
        else:
            target = name
        if target not in self._ids:
            models = await self.models(fresh=True)  # an adapter may have just been loaded
            if target not in self._ids:
                if name == self.alias:
                    raise APIError(404, f"model {name!r} maps to adapter {target!r}, which the model server "
                                   "has not loaded", param="model", code="model_not_found")
                raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return target

    async def listing(self) -> dict:
        """``/v1/models`` body: the upstream's models plus the alias (refetched once older than the TTL)."""
        models = await self.models(fresh=time.monotonic() - self._fetched > self.ttl)
        target = self.alias_target(models)
        data = list(models)
        if target is not None and self.alias not in self._ids:
            entry = next((m for m in models if m["id"] == target), {})
            data.append({"id": self.alias, "object": "model", "created": entry.get("created", int(time.time())),
                         "owned_by": "presafe", "root": target, "parent": entry.get("parent") or target,
                         "max_model_len": entry.get("max_model_len")})
        return {"object": "list", "data": data}
