"""OpenAI-format errors: ``{"error": {"message", "type", "param", "code"}}``, never a 500 or a traceback."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("presafe.gateway")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
          413: "request_too_large",
          422: "invalid_request_error", 429: "rate_limit_error", 502: "bad_gateway",
          503: "service_unavailable", 504: "gateway_timeout"}


class APIError(Exception):
    """An error answered to the client with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type or _TYPES.get(status, "api_error")
        self.code = code if code is not None else self.status
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self, headers: dict[str, str] | None = None) -> Response:
        return json_response(self.body(), self.status, {**(self.headers or {}), **(headers or {})} or None)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def json_response(obj: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status, headers, media_type="application/json")


def error_location(loc: Sequence[Any]) -> str:
    """A pydantic error location as a dotted key (FastAPI's ``body`` marker left out; empty at the top)."""
    return ".".join(str(p) for p in loc if p != "body")


def validation_messages(errors: Sequence[Mapping[str, Any]], *, limit: int | None = None, prefix: str = "",
                        top: str = "body", unknown_key: bool = True) -> list[str]:
    """``<prefix><dotted key>: <problem>`` per pydantic error (``top`` names the empty key; an extra field is
    ``unknown key`` when ``unknown_key``). The one formatter of validation errors, for HTTP and config files."""
    lines = []
    for err in errors[:limit]:
        what = "unknown key" if unknown_key and err.get("type") == "extra_forbidden" else err.get("msg")
        lines.append(f"{prefix}{error_location(err.get('loc', ())) or top}: {what}")
    return lines


def validation_error(exc: ValidationError | RequestValidationError, *, status: int = 400, limit: int = 5,
                     unknown_key: bool = False) -> APIError:
    """A request that failed validation as an :class:`APIError`: 400 ``invalid_json`` for a body that does not
    parse, else ``status`` naming the first bad key in ``param`` and up to ``limit`` problems in the message."""
    errors = exc.errors(include_url=False) if isinstance(exc, ValidationError) else exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        return APIError(400, "request body is not valid JSON", code="invalid_json")
    first = error_location(errors[0].get("loc", ())) if errors else ""
    message = "; ".join(validation_messages(errors, limit=limit, unknown_key=unknown_key))
    return APIError(status, message or "invalid request", param=first or None, code="invalid_request")


def install_error_handlers(app: FastAPI) -> None:
    """Turn every failure into an OpenAI error body with a meaningful status."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code if exc.status_code != 500 else 502
        return APIError(status, str(exc.detail)).response(getattr(exc, "headers", None))

    @app.exception_handler(RecursionError)
    async def _too_deep(_: Request, exc: RecursionError) -> Response:
        return APIError(400, "the request body is nested too deeply", code="invalid_json").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error", exc_info=exc, extra={"path": request.url.path})
        # answered outside the request-id middleware (Starlette's outermost ServerErrorMiddleware): the id it set
        request_id = request.scope.get("state", {}).get("request_id")
        return APIError(502, "the gateway could not complete the request", code="gateway_error").response(
            {"x-request-id": request_id} if request_id else None)
