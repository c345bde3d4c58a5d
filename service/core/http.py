"""HTTP helpers the gateway and the admin API share: the size- and time-limited request body, the bearer check."""

from __future__ import annotations

import asyncio
import hmac

from starlette.requests import Request

from service.core.errors import APIError


async def read_limited_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The request body, or a 413 as soon as it (declared or streamed) exceeds ``limit`` bytes, or a 408 when
    it has not fully arrived within ``timeout`` seconds (a slow client holds no slot for ever)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s",
                       code="request_timeout") from None
    return b"".join(chunks)


def bearer_matches(request: Request, token: str) -> bool:
    """Whether the request's ``Authorization: Bearer`` value is ``token`` (compared in constant time)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
