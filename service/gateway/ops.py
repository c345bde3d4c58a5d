"""Operational routes: liveness, readiness (the upstream answers), Prometheus metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
from fastapi import APIRouter, Request
from starlette.responses import Response

from service.core.errors import json_response

if TYPE_CHECKING:
    from service.gateway.app import Gateway

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health() -> Response:
    """Liveness: the gateway process answers."""
    return json_response({"status": "ok"})


@router.get("/ready", responses={503: {"description": "The model server is not ready"}})
async def ready(request: Request) -> Response:
    """Readiness: the model server answers its health check (and, embedded, is running)."""
    gw: Gateway = request.app.state.gateway
    if gw.supervisor is not None and not gw.supervisor.running:
        return json_response({"status": "unavailable", "reason": "the embedded vLLM server is not running"}, 503)
    try:
        resp = await gw.client.get(f"{gw.any_replica()}/health", timeout=3.0)  # one admitted replica is enough
    except httpx.HTTPError as exc:
        return json_response({"status": "unavailable", "reason": f"model server: {type(exc).__name__}"}, 503)
    if resp.status_code != 200:
        return json_response({"status": "unavailable", "reason": f"model server health {resp.status_code}"}, 503)
    return json_response({"status": "ready"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus exposition of the gateway's own registry."""
    gw: Gateway = request.app.state.gateway
    return Response(gw.metrics.render(), media_type=gw.metrics.content_type)
