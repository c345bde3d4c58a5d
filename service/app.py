"""The served application: the gateway's routes plus the ``/admin`` router, composed here.

The gateway (:mod:`service.gateway`) and the admin API (:mod:`service.admin`) do not import each other;
the admin reaches the gateway only through ``app.state.gateway`` (:class:`service.core.serving.ServingGateway`).
``uvicorn --factory service.app:create_app`` serves it.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, FastAPI

from service.admin.routes import create_admin_router
from service.core.judge import RefusalJudge
from service.core.settings import Settings
from service.gateway.app import Supervised, create_gateway_app


def create_app(settings: Settings | None = None, *, upstream_url: str | None = None,
               think_open: bool | None = None, supervisor: Supervised | None = None,
               judge: RefusalJudge | None = None, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The gateway in front of ``upstream_url`` (default: ``settings.vllm_url``) with ``/admin`` (retrain jobs,
    adapters; 403 without a token) and any further ``routers``."""
    return create_gateway_app(settings, upstream_url=upstream_url, think_open=think_open, supervisor=supervisor,
                              judge=judge, routers=(create_admin_router(), *routers))
