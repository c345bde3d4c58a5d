"""The gateway application: :func:`create_app` builds the FastAPI app around one :class:`Gateway`.

The app state (``app.state.gateway``) holds the settings, the one pooled upstream client, the
metrics, the model catalog and the prompt classifier; each concern is an ``APIRouter`` (OpenAI
routes, ops routes; more, e.g. ``/admin``, through ``routers=``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Protocol

import httpx
from fastapi import APIRouter, FastAPI

from service.gateway import ops, proxy
from service.gateway.classifier import PromptClassifier, locate_classifier
from service.gateway.errors import install_error_handlers
from service.gateway.logs import RequestIdMiddleware
from service.gateway.upstream import AdapterRegistry, ModelCatalog
from service.judge import RefusalJudge, get_judge
from service.metrics import Metrics
from service.settings import Settings, get_settings


def _version() -> str:
    try:
        return metadata.version("presafe")
    except metadata.PackageNotFoundError:
        return "0"


class Supervised(Protocol):
    """What the gateway needs to know about an embedded model server."""

    @property
    def running(self) -> bool: ...


class Gateway:
    """Everything a request handler needs (``request.app.state.gateway``)."""

    def __init__(self, settings: Settings, upstream_url: str, *, think_open: bool | None = None,
                 supervisor: Supervised | None = None, judge: RefusalJudge | None = None,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.upstream_url = upstream_url.rstrip("/")
        self.metrics = metrics or Metrics()
        self.client = httpx.AsyncClient(
            base_url=self.upstream_url,
            timeout=httpx.Timeout(settings.upstream_timeout_s, connect=5.0, pool=30.0),
            # Idle connections expire before vLLM's own keep-alive timeout (5 s) closes them under us.
            limits=httpx.Limits(max_connections=2048, max_keepalive_connections=512, keepalive_expiry=3.0),
        )
        self.registry = AdapterRegistry(settings.adapters_dir)
        self.catalog = ModelCatalog(self.client, self.metrics, self.registry, settings.model_alias,
                                    ttl=settings.models_ttl_s)
        self.classifier: PromptClassifier | None = PromptClassifier(
            lambda: locate_classifier(settings, self.registry.promoted))
        self.judge = judge or get_judge()
        self.think_open = settings.think_open if think_open is None else think_open
        key = settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None
        self.auth_header = {"authorization": f"Bearer {key}"} if key else {}
        self._urls: dict[str, httpx.URL] = {}
        self.supervisor = supervisor

    def url(self, path: str) -> httpx.URL:
        """The absolute upstream URL of ``path`` (parsed once: httpx's URL merging is slow per request)."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.upstream_url + path)
        return url

    async def aclose(self) -> None:
        await self.client.aclose()
        if self.classifier is not None:
            self.classifier.close()


def create_app(settings: Settings | None = None, *, upstream_url: str | None = None,
               think_open: bool | None = None, supervisor: Supervised | None = None,
               judge: RefusalJudge | None = None, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The gateway app in front of ``upstream_url`` (default: ``settings.vllm_url``)."""
    settings = settings or get_settings()
    url = upstream_url or settings.vllm_url
    if not url:
        raise ValueError("no upstream: pass upstream_url or set PRESAFE_VLLM_URL")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gateway = Gateway(settings, url, think_open=think_open, supervisor=supervisor, judge=judge)
        app.state.gateway = gateway
        if gateway.classifier is not None:
            gateway.classifier.warm_up()
        try:
            yield
        finally:
            await gateway.aclose()

    app = FastAPI(title="PreSafe gateway", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible gateway in front of vLLM that reports each response's "
                              "safety decision (extension field `presafe`).")
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    from service.admin import create_admin_router  # /admin: retrain jobs, adapters (403 without a token)

    for router in (proxy.router, ops.router, create_admin_router(), *routers):
        app.include_router(router)
    return app
