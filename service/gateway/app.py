"""The gateway application: :func:`create_gateway_app` builds the FastAPI app around one :class:`Gateway`.

The app state (``app.state.gateway``) holds the settings, the pooled upstream clients, the
metrics, the model catalog (public names and the alias), the prompt classifier, the in-flight count and
vLLM's queue length (for 429s); each concern is an ``APIRouter`` (OpenAI
routes, ops routes; more, e.g. ``/admin`` from :mod:`service.app`, through ``routers=``). The gateway
is the admin's :class:`service.core.serving.ServingGateway`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Protocol

import aiohttp
import httpx
from fastapi import APIRouter, FastAPI
from yarl import URL

from service.adapters.view import RegistryView
from service.core.errors import install_error_handlers
from service.core.judge import RefusalJudge, get_judge
from service.core.settings import Settings, get_settings
from service.engines import MergedEngines
from service.gateway import ops, proxy
from service.gateway.classifier import PromptClassifier, locate_classifier
from service.gateway.logs import RequestIdMiddleware
from service.gateway.metrics import Metrics
from service.gateway.replicas import Replica, ReplicaPool, split_urls
from service.gateway.upstream import ModelCatalog, QueueWatch, generation_session


def _version() -> str:
    try:
        return metadata.version("presafe")
    except metadata.PackageNotFoundError:
        return "0"


class Supervised(Protocol):
    """What the gateway needs to know about an embedded model server."""

    @property
    def running(self) -> bool: ...


def _pids(supervisor: Supervised | None) -> list[int]:
    proc = getattr(supervisor, "proc", None)
    return [proc.pid] if proc is not None and proc.poll() is None else []


class Gateway:
    """Everything a request handler needs (``request.app.state.gateway``)."""

    def __init__(self, settings: Settings, upstream_url: str, *, think_open: bool | None = None,
                 supervisor: Supervised | None = None, judge: RefusalJudge | None = None,
                 metrics: Metrics | None = None):
        self.settings = settings
        urls = split_urls(upstream_url)
        self.upstream_url = urls[0]  # the first replica (requests go to :attr:`replicas`' choice)
        self.metrics = metrics or Metrics()
        key = settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None
        self.auth_header = {"authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.AsyncClient(
            base_url=self.upstream_url,
            headers=self.auth_header,  # every upstream call (model list, metrics, tokenize) carries the key
            timeout=httpx.Timeout(settings.upstream_timeout_s, connect=5.0, pool=30.0),
            # Idle connections expire before vLLM's own keep-alive timeout (5 s) closes them under us.
            limits=httpx.Limits(max_connections=2048, max_keepalive_connections=512, keepalive_expiry=3.0),
        )
        self.replicas = ReplicaPool(urls, self.metrics, interval=settings.replica_health_s,
                                    discovery=settings.vllm_discovery, headers=self.auth_header)
        # The promoted adapter merged on replicas of their own (a Deployment the admin rolls on promote): a request
        # for a name one of them serves goes there, any other (and that name while none is ready) to the LoRA ones.
        merged_urls = split_urls(settings.merged_url) if settings.merged_url else []
        self.merged_replicas = ReplicaPool(merged_urls, self.metrics, interval=settings.replica_health_s,
                                           discovery=settings.vllm_discovery, headers=self.auth_header,
                                           fallback=False) if merged_urls else None
        self.registry = RegistryView(settings.adapters_dir)
        self.catalog = ModelCatalog(self.client, self.metrics, self.registry, settings.model_alias,
                                    source=self.any_replica,
                                    ttl=settings.models_ttl_s, public=frozenset(settings.public_models),
                                    jobs_db=settings.root / "jobs" / "jobs.sqlite",
                                    served_elsewhere=self._served_elsewhere)
        self.classifier: PromptClassifier | None = PromptClassifier(
            lambda: locate_classifier(settings, self.registry.promoted))
        self.judge = judge or get_judge()
        self.think_open = settings.think_open if think_open is None else think_open
        self.extra_fields = frozenset(settings.extra_request_fields)
        self.in_flight = 0  # generation requests being handled (429 past settings.max_in_flight)
        self.queue = QueueWatch(self.client, self.auth_header, settings.queue_poll_s, urls=self.queue_urls)
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None
        self.supervisor = supervisor
        merged = settings.serve_merged if settings.serve_merged is not None else supervisor is not None
        self.engines: MergedEngines | None = MergedEngines(settings, other_pids=lambda: _pids(supervisor)) \
            if merged else None
        self._think_probe = asyncio.Lock()
        self._think_probed = -1e9

    async def detect_think_open(self, model: str) -> None:
        """Ask vLLM whether its chat template opens ``<think>`` (render a probe: /tokenize → /detokenize).

        Only when not given (external mode); retried at most once a minute until it answers.
        """
        async with self._think_probe:
            if self.think_open is not None or time.monotonic() - self._think_probed < 60:
                return
            self._think_probed = time.monotonic()
            from service.core.decision import prompt_starts_in_think

            base = self.any_replica()
            try:
                tokens = (await self.client.post(f"{base}/tokenize", headers=self.auth_header, timeout=5.0, json={
                    "model": model, "messages": [{"role": "user", "content": "Hi"}],
                    "add_generation_prompt": True})).json()["tokens"]
                prompt = (await self.client.post(f"{base}/detokenize", headers=self.auth_header, timeout=5.0,
                                                 json={"model": model, "tokens": tokens})).json()["prompt"]
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                return
            if isinstance(prompt, str):
                self.think_open = prompt_starts_in_think(prompt)

    def any_replica(self) -> str:
        """The URL of an admitted replica for calls any replica answers: the least busy of those holding the
        promoted adapter (a replica that just joined may not hold it yet)."""
        replica = self.replicas.pick(self.registry.promoted())
        return replica.url if replica is not None else self.upstream_url

    def _served_elsewhere(self, name: str) -> bool:
        """Served though the model list at hand lacks it: by a merged engine or replica, or by another admitted
        replica."""
        return ((self.engines is not None and self.engines.serves(name)) or self.replicas.holds(name)
                or (self.merged_replicas is not None and self.merged_replicas.holds(name)))

    def route(self, model: str, exclude: Iterable[Replica] = ()) -> tuple[ReplicaPool, Replica | None]:
        """The pool and replica for a request on ``model``: the least busy admitted merged replica serving it,
        else the LoRA replicas' choice (:meth:`ReplicaPool.pick`)."""
        if self.merged_replicas is not None:
            replica = self.merged_replicas.pick(model, exclude)
            if replica is not None:
                return self.merged_replicas, replica
        return self.replicas, self.replicas.pick(model, exclude)

    def merged_replica_view(self) -> list[dict]:
        """The merged replicas as of their last health check: url, admitted, the names they serve."""
        pool = self.merged_replicas.replicas if self.merged_replicas is not None else []
        return [{"url": r.url, "admitted": r.healthy, "models": sorted(r.models) if r.healthy else []} for r in pool]

    def replica_urls(self) -> list[str]:
        """The admitted replicas (all of them when none is): where the admin loads adapters."""
        return self.replicas.admitted_urls()

    def queue_urls(self) -> list[str]:
        """Every server a generation can go to (whose queues :attr:`queue` reads): the LoRA replicas, the admitted
        merged ones, the running embedded merged engines."""
        urls = self.replicas.admitted_urls()
        if self.merged_replicas is not None:
            urls += [r.url for r in self.merged_replicas.replicas if r.healthy]
        if self.engines is not None:
            urls += self.engines.urls()
        return urls

    async def replica_status(self) -> list[dict]:
        """Each vLLM replica, checked now: url, admitted, the models it serves (none when ejected), why not."""
        await self.replicas.check_all()
        return [{"url": r.url, "admitted": r.healthy, "models": sorted(r.models) if r.healthy else [],
                 "error": r.error} for r in self.replicas.replicas]

    async def served_models(self, *, fresh: bool = False) -> list[dict]:
        """vLLM's model objects (:meth:`ModelCatalog.models`)."""
        return await self.catalog.models(fresh=fresh)

    def record_jobs(self, counts: dict[str, int], last_success: float | None) -> None:
        """The retrain job gauges: jobs by state, the time of the last successful one."""
        for state, count in counts.items():
            self.metrics.jobs.labels(state).set(count)
        if last_success is not None:
            self.metrics.last_successful_retrain.set(last_success)

    def record_served(self, adapter: str | None) -> None:
        """The served-adapter gauge: the alias now serves ``adapter``."""
        self.metrics.set_served_adapter(self.settings.model_alias, adapter,
                                        self.registry.version(adapter) if adapter else "")

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled client of generation requests (:func:`generation_session`; made in the running loop)."""
        if self._session is None:
            self._session = generation_session(self.settings.upstream_timeout_s)
        return self._session

    def url(self, path: str, base: str | None = None) -> URL:
        """The absolute URL of ``path`` on the upstream (or on ``base``: a replica, a merged engine), parsed
        once."""
        key = path if base is None else base + path
        url = self._urls.get(key)
        if url is None:
            url = self._urls[key] = URL((base or self.upstream_url) + path)
        return url

    async def aclose(self) -> None:
        if self.engines is not None:
            await self.engines.close()
        await self.queue.stop()
        await self.replicas.stop()
        if self.merged_replicas is not None:
            await self.merged_replicas.stop()
        await self.client.aclose()
        if self._session is not None:
            await self._session.close()
        if self.classifier is not None:
            self.classifier.close()


def create_gateway_app(settings: Settings | None = None, *, upstream_url: str | None = None,
                       think_open: bool | None = None, supervisor: Supervised | None = None,
                       judge: RefusalJudge | None = None, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The gateway app in front of ``upstream_url`` (default: ``settings.vllm_url``), with ``routers`` after
    its own (the whole service, /admin included, is :func:`service.app.create_app`)."""
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
        for pool in (gateway.replicas, gateway.merged_replicas):
            if pool is not None:
                await pool.check_all()
                pool.start()
        if settings.max_queue_waiting is not None:
            gateway.queue.start()
        if gateway.engines is not None:
            gateway.engines.start(gateway.registry.promoted)
        try:
            yield
        finally:
            await gateway.aclose()

    app = FastAPI(title="PreSafe gateway", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible gateway in front of vLLM that reports each response's "
                              "safety decision (extension field `presafe`).")
    app.add_middleware(proxy.DirectRoutes)
    app.add_middleware(RequestIdMiddleware)  # added last: the outermost
    install_error_handlers(app)
    for router in (proxy.router, ops.router, *routers):
        app.include_router(router)
    return app
