"""The admin API under ``/admin``: HTTP only (routes, request and response models, errors).

Every route needs ``Authorization: Bearer $PRESAFE_ADMIN_TOKEN`` (compared in constant time);
without a configured token every admin route answers 403 ``admin disabled``, with a missing or
wrong one 401. Errors use the OpenAI format. The work behind the routes (retrain jobs, publishing,
promote and rollback) is :class:`service.jobs.lifecycle.Lifecycle`, started by the router's lifespan on
the app's gateway (``app.state.gateway``, a :class:`service.core.serving.ServingGateway`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from service.adapters.store import AdapterInfo
from service.core.errors import APIError, validation_error
from service.core.formats import NAME_RE
from service.core.http import bearer_matches, read_limited_body
from service.core.settings import Settings
from service.jobs.lifecycle import AdminSettings, Lifecycle, RetrainRequest, Swap
from service.jobs.runners import Runner
from service.jobs.store import Job, JobState, tail_lines

log = logging.getLogger("presafe.admin")

PREFIX = "/admin"


# --------------------------------------------------------------------------- API models


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI error format."""

    error: ErrorDetail


class PromoteRequest(BaseModel):
    """``POST /admin/adapters/{name}/promote`` (optional body)."""

    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, strict=True, description="Promote even if the gate fails (recorded in the promotion "
                        "history); only a JSON true.")


class GateOut(BaseModel):
    passed: bool
    reasons: list[str]
    values: dict[str, float | None]
    reference: dict[str, float | None] = Field(default_factory=dict, description="The figures compared with.")
    reference_from: str | None = Field(None, description="Whose figures: the promoted adapter or the base model.")
    margins: dict[str, float] = Field(default_factory=dict)
    min: dict[str, float]
    max: dict[str, float]
    forced: bool = Field(False, description="Promoted by force although the gate failed.")


class JobOut(BaseModel):
    """A retrain job."""

    object: Literal["admin.job"] = "admin.job"
    id: str
    state: JobState
    stage: str | None
    progress: float = Field(description="Overall fraction done, 0..1 (from the trainer's progress lines).")
    metrics: dict[str, Any]
    request: dict[str, Any]
    runner: str
    runner_ref: str | None = Field(description="Trainer pid (local) or Kubernetes Job name.")
    adapter: str | None = Field(description="The published adapter, once stored.")
    promoted: bool
    gate: GateOut | None
    error: str | None
    exit_code: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    log_tail: list[str] | None = Field(None, description="Last lines of the trainer's output.")

    @classmethod
    def of(cls, job: Job, log_lines: int | None = None) -> JobOut:
        data = {k: getattr(job, k) for k in cls.model_fields if k not in ("object", "log_tail")}
        if log_lines is not None:
            data["log_tail"] = tail_lines(job.log_path, log_lines)
        return cls(**data)


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]


class AdapterOut(AdapterInfo):
    """A stored adapter."""

    object: Literal["admin.adapter"] = "admin.adapter"
    loaded: bool | None = Field(None, description="Loaded in vLLM now (null: vLLM did not answer).")


class ReplicaOut(BaseModel):
    """One vLLM replica as the gateway sees it (health-checked when listed)."""

    url: str
    admitted: bool = Field(description="Receiving requests: its last health check (GET /v1/models) passed.")
    error: str | None = Field(None, description="Why it was ejected.")
    adapters: list[str] = Field(description="The stored adapters it serves now (none while ejected).")
    holds_promoted: bool | None = Field(description="It serves the promoted adapter (null: none is promoted).")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    alias: str
    promoted: str | None
    history: list[str]
    promotions: list[dict[str, Any]] = Field(default_factory=list, description="Promotions and rollbacks, oldest "
                                             "first (forced ones marked).")
    data: list[AdapterOut]
    serving: dict[str, Any] = Field(default_factory=dict, description="How the alias is served: mode `merged` (the "
                                    "promoted adapter folded into the base, on a vLLM of its own), `lora` (runtime "
                                    "LoRA, with the reason) or `none`; the merged engines and the last blue/green "
                                    "swap (its peak resident memory, the requests drained).")
    replicas: list[ReplicaOut] = Field(default_factory=list, description="Every vLLM replica: admitted or why "
                                       "not, the adapters it holds; a promotion is complete when every admitted "
                                       "replica holds the promoted adapter.")


class SwapResult(BaseModel):
    """The alias after a promote or rollback."""

    alias: str
    promoted: str
    previous: str | None
    gate: GateOut | None = Field(None, description="The promotion gate's verdict (promote only).")


def _swap_out(swap: Swap) -> SwapResult:
    return SwapResult(alias=swap.alias, promoted=swap.promoted, previous=swap.previous,
                      gate=GateOut(**swap.gate) if swap.gate is not None else None)


# --------------------------------------------------------------------------- auth, limits, errors

bearer = HTTPBearer(auto_error=False, scheme_name="AdminBearer",
                    description="PRESAFE_ADMIN_TOKEN. Without a configured token every admin route is 403.")


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "Invalid JSON", 401: "Missing or wrong bearer token", 403: "Admin disabled (no token configured)",
            404: "Unknown job or adapter", 409: "Conflict with the current state", 413: "Body too large",
            422: "Invalid request or config", 502: "vLLM refused or could not be reached",
            503: "Admin not ready"}
    return {c: {"model": ErrorResponse, "description": text[c]} for c in sorted({401, 403, 422, *codes})}


def _authorize(request: Request, settings: Settings) -> None:
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not token:
        raise APIError(403, "admin disabled: no PRESAFE_ADMIN_TOKEN is configured", code="admin_disabled")
    if not bearer_matches(request, token):
        raise APIError(401, "missing or invalid admin bearer token", code="invalid_admin_token")


async def _read_limited(request: Request, limit: int) -> None:
    request._body = await read_limited_body(request, limit)  # FastAPI reads the cached body


class AdminRoute(APIRoute):
    """Admin route: token check first, then the body size limit, then FastAPI; errors as OpenAI bodies."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                gateway = getattr(request.app.state, "gateway", None)
                if gateway is None:
                    raise APIError(503, "the gateway is not started", code="admin_unavailable")
                _authorize(request, gateway.settings)
                admin: Lifecycle | None = getattr(request.app.state, "admin", None)
                if admin is None:
                    reason = getattr(request.app.state, "admin_error", None) or "not started"
                    raise APIError(503, f"the admin API is unavailable: {reason}", code="admin_unavailable")
                if request.method in ("POST", "PUT", "PATCH"):
                    await _read_limited(request, admin.options.admin_max_body_bytes)
                return await handler(request)
            except RequestValidationError as exc:
                return validation_error(exc, status=422, limit=10, unknown_key=True).response()
            except APIError as exc:
                headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
                return exc.response(headers)

        return route


# --------------------------------------------------------------------------- config handling


# --------------------------------------------------------------------------- routes


def _admin(request: Request) -> Lifecycle:
    return request.app.state.admin


def create_admin_router(options: AdminSettings | None = None, runner: Runner | None = None) -> APIRouter:
    """The ``/admin`` router; its lifespan starts a :class:`Lifecycle` on the app's gateway."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        """Start the admin only where a token is configured (the public gateway touches no state);
        if it cannot start, /admin answers 503 and the OpenAI API stays up."""
        app.state.admin, app.state.admin_error = None, None
        gateway = app.state.gateway
        admin = None
        token = gateway.settings.admin_token and gateway.settings.admin_token.get_secret_value()
        # without a token the routes stay 403; the admin still runs when it must train the first adapter
        if token or (options or AdminSettings()).bootstrap_train:
            try:
                admin = Lifecycle(gateway, options, runner)
                await admin.start()
                app.state.admin = admin
            except Exception as exc:
                log.exception("the admin API could not start")
                app.state.admin_error = f"{type(exc).__name__}: {exc}"
                admin = None
        try:
            yield
        finally:
            if admin is not None:
                await admin.stop()

    router = APIRouter(prefix=PREFIX, tags=["admin"], route_class=AdminRoute, lifespan=lifespan,
                       dependencies=[Security(bearer)])

    @router.post("/retrain", status_code=202, response_model=JobOut, responses=_error_responses(400, 409, 413, 503))
    async def retrain(request: Request, body: RetrainRequest | None = None) -> JobOut:
        """Start a retrain job (one at a time); answers 202 with the job, polled at ``/admin/jobs/{id}``."""
        job = await _admin(request).retrain(body or RetrainRequest())
        return JobOut.of(job)

    @router.get("/jobs", response_model=JobList, responses=_error_responses())
    async def list_jobs(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                        state: JobState | None = None) -> JobList:
        """Jobs, newest first."""
        return JobList(data=[JobOut.of(j) for j in _admin(request).jobs.list(limit=limit, state=state)])

    @router.get("/jobs/{job_id}", response_model=JobOut, responses=_error_responses(404))
    async def get_job(request: Request, job_id: str,
                      log_lines: Annotated[int, Query(ge=0, le=1000, description="Lines of log tail.")] = 50) -> JobOut:
        """One job: state, stage, progress, metrics, gate, error and the tail of its log."""
        return JobOut.of(_admin(request)._job(job_id), log_lines)

    @router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=_error_responses(404, 409))
    async def cancel_job(request: Request, job_id: str) -> JobOut:
        """Cancel a queued or running job (its trainer is terminated); 409 once it is finished or publishing."""
        return JobOut.of(await _admin(request).cancel(job_id), 20)

    @router.get("/adapters", response_model=AdapterList, responses=_error_responses())
    async def list_adapters(request: Request) -> AdapterList:
        """Stored adapters (oldest first), the promoted one and the promotion history."""
        admin = _admin(request)
        registry, infos, loaded = await admin.adapters()
        data = [AdapterOut(**info.as_dict(), loaded=None if loaded is None else info.name in loaded)
                for info in infos]
        replicas = [ReplicaOut(**r) for r in await admin.replicas([info.name for info in infos])]
        return AdapterList(alias=admin.alias, promoted=registry.promoted, history=registry.history,
                           promotions=registry.promotions, data=data, serving=admin.serving_status(),
                           replicas=replicas)

    @router.post("/adapters/rollback", response_model=SwapResult, responses=_error_responses(409, 502))
    async def rollback(request: Request) -> SwapResult:
        """Serve the previously promoted adapter again."""
        return _swap_out(await _admin(request).rollback())

    @router.post("/adapters/{name}/promote", response_model=SwapResult, responses=_error_responses(404, 409, 502))
    async def promote(request: Request, name: str, body: PromoteRequest | None = None) -> SwapResult:
        """Gate ``name`` against the promoted adapter (409 ``gate_failed`` unless ``force``), load it into
        vLLM, then point the alias at it (no request is dropped)."""
        if not NAME_RE.match(name):
            raise APIError(404, f"adapter {name!r} not found", param="name", code="adapter_not_found")
        return _swap_out(await _admin(request).promote(name, force=(body or PromoteRequest()).force))

    return router


__all__ = ["create_admin_router"]
