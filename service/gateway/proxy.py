"""The OpenAI-compatible routes: validate, resolve the model, forward to vLLM, analyse the decision.

Streams are forwarded event by event as they arrive (nothing is buffered beyond an incomplete SSE
event); each ``data:`` event is parsed only to feed the decision tracker, and one extra chunk with
the ``presafe`` field goes out just before ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

import httpx
from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from service.decision import DecisionTracker
from service.gateway.errors import APIError, json_response
from service.gateway.schemas import ChatCompletionRequest, CompletionRequest, openapi_body
from service.gateway.upstream import send, transport_error, upstream_status_error

if TYPE_CHECKING:
    from service.gateway.app import Gateway

log = logging.getLogger("presafe.gateway")
router = APIRouter(tags=["openai"])

CHAT, COMPLETIONS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/models"
_ERROR_RESPONSES = {s: {"description": d} for s, d in [
    (400, "Invalid request"), (404, "Unknown model"), (413, "Request too large"),
    (502, "Bad upstream reply"), (503, "Model server unavailable"), (504, "Model server timeout")]}


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


@router.post(CHAT, openapi_extra=openapi_body(ChatCompletionRequest), responses=_ERROR_RESPONSES)
async def chat_completions(request: Request) -> Response:
    """Chat completion (streaming or not), with the decision in the ``presafe`` field."""
    return await _generate(request, CHAT, ChatCompletionRequest)


@router.post(COMPLETIONS, openapi_extra=openapi_body(CompletionRequest), responses=_ERROR_RESPONSES)
async def completions(request: Request) -> Response:
    """Text completion (streaming or not), with the decision in the ``presafe`` field."""
    return await _generate(request, COMPLETIONS, CompletionRequest)


@router.get(MODELS, responses=_ERROR_RESPONSES)
async def list_models(request: Request) -> Response:
    """The served models: base, loaded adapters, and the alias for the promoted adapter."""
    gw: Gateway = request.app.state.gateway
    status = 200
    try:
        return json_response(await gw.catalog.listing())
    except APIError as exc:
        status = exc.status
        return exc.response()
    finally:
        gw.metrics.requests.labels(MODELS, "", str(status)).inc()


# --------------------------------------------------------------------------- helpers


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it (declared or streamed) exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_error(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors[:5])
    return APIError(400, msg or "invalid request", param=param, code="invalid_request")


def _starts_in_think(gw: Gateway, req: BaseModel) -> bool | None:
    if isinstance(req, ChatCompletionRequest):
        kwargs = req.chat_template_kwargs or {}
        if kwargs.get("enable_thinking") is False:
            return False
        return gw.think_open
    prompt = req.prompt_text()
    if prompt.rfind("<think>") > prompt.rfind("</think>"):
        return True
    return False if "</think>" in prompt else None


async def _until_disconnect(request: Request, coro):
    """Await ``coro`` unless the client disconnects first (then cancel it: the upstream request aborts)."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone
    return task.result()


class _Call:
    """Book-keeping of one generation request (metrics and the access log line at the end)."""

    __slots__ = ("classifier", "decisions", "error", "gw", "model", "request_id", "route", "status", "stream", "t0")

    def __init__(self, gw: Gateway, route: str, t0: float, request_id: str):
        self.gw, self.route, self.t0, self.request_id = gw, route, t0, request_id
        self.model, self.status, self.stream = "", 500, False
        self.error: str | None = None
        self.decisions: list = []
        self.classifier: dict | None = None

    def done(self) -> None:
        m = self.gw.metrics
        elapsed = time.monotonic() - self.t0
        m.requests.labels(self.route, self.model, str(self.status)).inc()
        m.request_duration.labels(self.route, self.model).observe(elapsed)
        m.active_requests.dec()
        extra = {"route": self.route, "model": self.model, "status": self.status, "stream": self.stream,
                 "duration_s": round(elapsed, 4), "request_id": self.request_id}
        if self.decisions:
            extra["path"] = str(self.decisions[0].path)
            extra["think_tokens"] = self.decisions[0].think_tokens
        if self.classifier:
            extra["classifier"] = self.classifier.get("verdict")
        if self.error:
            extra["error"] = self.error
        log.info("request", extra=extra)

    def record(self, decisions: list, verdict) -> dict:
        """Count the decisions (and classifier verdict) and build the ``presafe`` field."""
        m, model = self.gw.metrics, self.model
        self.decisions = decisions
        for d in decisions:
            path = str(d.path)
            m.decisions.labels(path, model).inc()
            m.think_tokens.labels(path, model).observe(d.think_tokens)
            if d.time_to_decision_s is not None:
                m.time_to_decision.labels(model).observe(d.time_to_decision_s)
        field = decisions[0].to_dict() if decisions else {}
        if verdict is not None:
            m.classifier_verdicts.labels(verdict.verdict, model).inc()
            self.classifier = verdict.to_dict()
            if decisions:
                agrees = (verdict.verdict == "refuse") == decisions[0].refused
                self.classifier["agrees"] = agrees
                if not agrees:
                    m.classifier_disagreements.labels(model).inc()
            field["classifier"] = self.classifier
        if len(decisions) > 1:
            field["choices"] = [d.to_dict() for d in decisions]
        return field


async def _classifier_result(task: asyncio.Task | None, timeout: float):
    if task is None:
        return None
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout)
    except (TimeoutError, asyncio.CancelledError):
        return None


# --------------------------------------------------------------------------- the generation path


async def _generate(request: Request, route: str, schema: type[BaseModel]) -> Response:
    gw: Gateway = request.app.state.gateway
    state = request.scope.get("state", {})
    t0 = state.get("t0") or time.monotonic()
    call = _Call(gw, route, t0, state.get("request_id", ""))
    gw.metrics.active_requests.inc()
    streaming = False
    classify: asyncio.Task | None = None
    try:
        raw = await read_limited_body(request, gw.settings.max_body_bytes)
        try:
            obj = json.loads(raw)
        except ValueError:
            raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_request")
        try:
            req = schema.model_validate(obj)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        target = await gw.catalog.resolve(req.model)
        call.model = target
        if target != req.model:
            obj["model"] = target
            raw = json.dumps(obj).encode()
        if gw.classifier is not None and gw.classifier.available():
            classify = asyncio.create_task(gw.classifier.verdict(req.prompt_text()))
        tracker_args = {"judge": gw.judge, "starts_in_think": _starts_in_think(gw, req), "t0": t0}
        headers = {"content-type": "application/json", "x-request-id": call.request_id, **gw.auth_header}
        call.stream = bool(req.stream)
        if req.stream:
            response = await _stream(gw, call, request, route, raw, headers, tracker_args, classify)
            streaming = isinstance(response, StreamingResponse)
            return response
        return await _complete(gw, call, request, route, raw, headers, tracker_args, classify)
    except APIError as exc:
        call.status, call.error = exc.status, exc.message
        return exc.response()
    except (ClientGone, ClientDisconnect):
        call.status = 499
        return Response(status_code=499)
    finally:
        if not streaming:
            if classify is not None and not classify.done():
                classify.cancel()
            call.done()


async def _complete(gw: Gateway, call: _Call, request: Request, route: str, raw: bytes, headers: dict,
                    tracker_args: dict, classify: asyncio.Task | None) -> Response:
    try:
        upstream = gw.client.build_request("POST", gw.url(route), content=raw, headers=headers)
        resp = await _until_disconnect(request, send(gw.client, upstream, gw.metrics))
    except httpx.HTTPError as exc:
        raise transport_error(exc, gw.metrics) from None
    content = resp.content
    if resp.status_code != 200:
        out = upstream_status_error(resp, content, gw.metrics)
        if isinstance(out, APIError):
            raise out
        call.status = out[0]
        return Response(out[1], out[0], media_type="application/json")
    try:
        body = json.loads(content)
        choices = body["choices"]
        decisions = []
        completion_tokens = (body.get("usage") or {}).get("completion_tokens") if len(choices) == 1 else None
        for choice in choices:
            tracker = DecisionTracker(streaming=False, **tracker_args)
            if route == CHAT:
                msg = choice.get("message") or {}
                tracker.feed(msg.get("content"), msg.get("reasoning") or msg.get("reasoning_content"))
            else:
                tracker.feed(choice.get("text"))
            decisions.append(tracker.finish(choice.get("finish_reason"), completion_tokens=completion_tokens))
    except (ValueError, KeyError, TypeError, AttributeError):
        gw.metrics.upstream_errors.labels("malformed").inc()
        raise APIError(502, "the model server returned a malformed response", code="upstream_error") from None
    verdict = await _classifier_result(classify, gw.settings.classifier_timeout_s)
    body["presafe"] = call.record(decisions, verdict)
    call.status = 200
    hdrs = {}
    if decisions:
        hdrs["x-presafe-decision"] = str(decisions[0].path)
        hdrs["x-presafe-think-tokens"] = str(decisions[0].think_tokens)
    return json_response(body, 200, hdrs)


_DONE = b"data: [DONE]"


async def _stream(gw: Gateway, call: _Call, request: Request, route: str, raw: bytes, headers: dict,
                  tracker_args: dict, classify: asyncio.Task | None) -> Response:
    upstream = gw.client.build_request("POST", gw.url(route), content=raw, headers=headers)
    try:
        resp = await send(gw.client, upstream, gw.metrics, stream=True)  # headers come at once: no watch
    except httpx.HTTPError as exc:
        raise transport_error(exc, gw.metrics) from None
    if resp.status_code != 200 or not resp.headers.get("content-type", "").startswith("text/event-stream"):
        try:
            content = await resp.aread()
        except httpx.HTTPError as exc:
            raise transport_error(exc, gw.metrics) from None
        finally:
            await resp.aclose()
        if resp.status_code == 200:
            gw.metrics.upstream_errors.labels("malformed").inc()
            raise APIError(502, "the model server did not stream", code="upstream_error")
        out = upstream_status_error(resp, content, gw.metrics)
        if isinstance(out, APIError):
            raise out
        call.status = out[0]
        return Response(out[1], out[0], media_type="application/json")
    call.status = 200
    started = [False]

    async def cleanup_unstarted() -> None:
        if not started[0]:  # the client left before the first chunk: the relay never ran its clean-up
            call.status = 499
            await resp.aclose()
            if classify is not None and not classify.done():
                classify.cancel()
            call.done()

    return _SSEResponse(_relay(gw, call, resp, route, tracker_args, classify, started), cleanup_unstarted)


class _SSEResponse(StreamingResponse):
    """An event stream whose clean-up runs even when the client leaves before the first chunk."""

    def __init__(self, content, on_exit):
        super().__init__(content, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._on_exit = on_exit

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_exit()


def _error_event(message: str, type: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class _Malformed(Exception):
    def __init__(self, offset: int):
        self.offset = offset


class _StreamAnalysis:
    """Decision trackers for the choices of one stream, fed from parsed SSE events."""

    __slots__ = ("chat", "finish", "meta", "metrics", "tracker_args", "trackers")

    def __init__(self, chat: bool, tracker_args: dict, metrics):
        self.trackers: dict[int, DecisionTracker] = {}
        self.finish: dict[int, str | None] = {}
        self.meta: dict = {}
        self.chat, self.tracker_args, self.metrics = chat, tracker_args, metrics

    def feed(self, obj: dict) -> None:
        if not self.meta:
            self.meta = {k: obj.get(k) for k in ("id", "object", "created", "model")}
        if "error" in obj:
            self.metrics.upstream_errors.labels("stream_error").inc()
        for choice in obj.get("choices") or ():
            idx = choice.get("index", 0)
            tracker = self.trackers.get(idx)
            if tracker is None:
                tracker = self.trackers[idx] = DecisionTracker(**self.tracker_args)
            if self.chat:
                delta = choice.get("delta") or {}
                tracker.feed(delta.get("content"), delta.get("reasoning") or delta.get("reasoning_content"))
            else:
                tracker.feed(choice.get("text"))
            if choice.get("finish_reason") is not None:
                self.finish[idx] = choice["finish_reason"]

    def decisions(self) -> list:
        return [self.trackers[i].finish(self.finish.get(i)) for i in sorted(self.trackers)]

    def final_chunk(self, presafe: dict) -> bytes:
        meta = self.meta
        final = {"id": meta.get("id"), "object": meta.get("object"), "created": meta.get("created"),
                 "model": meta.get("model"), "choices": [], "presafe": presafe}
        return b"data: " + json.dumps(final).encode() + b"\n\n"


async def _relay(gw: Gateway, call: _Call, resp: httpx.Response, route: str, tracker_args: dict,
                 classify: asyncio.Task | None, started: list[bool]):
    """Forward upstream SSE bytes as they arrive, feeding the decision trackers on the side."""
    started[0] = True
    analysis = _StreamAnalysis(route == CHAT, tracker_args, gw.metrics)
    buf = b""
    done = False
    try:
        async for chunk in resp.aiter_raw():
            if done:  # drain to the end of the body: the connection then goes back to the pool
                continue
            buf += chunk
            end = buf.rfind(b"\n\n")
            if end < 0:
                continue
            ready, buf = buf[:end + 2], buf[end + 2:]
            out, pos = ready, 0
            for event in ready.split(b"\n\n"):
                start, pos = pos, pos + len(event) + 2
                if not event.startswith(b"data:"):
                    continue
                payload = event[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    verdict = await _classifier_result(classify, gw.settings.classifier_timeout_s)
                    presafe = call.record(analysis.decisions(), verdict)
                    out = ready[:start] + analysis.final_chunk(presafe) + _DONE + b"\n\n"
                    break
                try:
                    analysis.feed(json.loads(payload))
                except (ValueError, TypeError, AttributeError):
                    raise _Malformed(start) from None
            yield out
        if not done:
            gw.metrics.upstream_errors.labels("stream_interrupted").inc()
            call.status, call.error = 502, "the model server ended the stream early"
            yield _error_event("the model server ended the stream early", "bad_gateway", "upstream_error")
    except _Malformed as exc:
        gw.metrics.upstream_errors.labels("malformed").inc()
        call.status, call.error = 502, "the model server sent a malformed event"
        yield ready[:exc.offset] + _error_event("the model server sent a malformed event", "bad_gateway",
                                                "upstream_error")
    except httpx.HTTPError as exc:
        err = transport_error(exc, gw.metrics)
        call.status, call.error = err.status, err.message
        yield _error_event(err.message, err.type, str(err.code))
    except (asyncio.CancelledError, GeneratorExit):
        call.status = 499  # the client went away: closing the upstream response aborts generation
        raise
    finally:
        await resp.aclose()
        if classify is not None and not classify.done():
            classify.cancel()
        call.done()
