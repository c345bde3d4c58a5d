"""The OpenAI-compatible routes: admit, validate, resolve the model, forward to vLLM, analyse the decision.

Request rules (docs/gateway.md): 429 when overloaded; only the public fields (:mod:`schemas`), no
pre-filled assistant turn, budgets (``max_tokens``, ``n``, prompt count); only the alias and the public
model names (a caller with the admin token reaches every served model).

Streams are forwarded event by event as they arrive (nothing is buffered beyond an incomplete SSE
event, a partial ``</think>`` tag or whitespace); each ``data:`` event is parsed to feed the decision
tracker, and chat events are rewritten to carry the reasoning in ``reasoning_content``/``reasoning`` and
the answer alone in ``content`` (``PRESAFE_SPLIT_REASONING=false``: forwarded unchanged). One extra
chunk with the ``presafe`` field goes out just before ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from service.core.cot import THINK_CLOSE
from service.core.decision import DecisionTracker, prompt_starts_in_think
from service.core.errors import APIError, json_response, validation_error
from service.core.http import bearer_matches, read_limited_body
from service.gateway.schemas import ChatCompletionRequest, CompletionRequest, forbidden_field, openapi_body
from service.gateway.upstream import TRANSPORT_ERRORS, send, transport_error, upstream_status_error

if TYPE_CHECKING:
    from service.gateway.app import Gateway

log = logging.getLogger("presafe.gateway")
router = APIRouter(tags=["openai"])

CHAT, COMPLETIONS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/models"
_ERROR_RESPONSES = {s: {"description": d} for s, d in [
    (400, "Invalid request"), (404, "Unknown model"), (408, "Request body too slow"), (413, "Request too large"),
    (429, "Overloaded: retry after Retry-After seconds"), (502, "Bad upstream reply"),
    (503, "Model server unavailable, or no aligned adapter promoted yet"), (504, "Model server timeout")]}
LARGE_REPLY = 1 << 20  # non-streamed replies above this are parsed and rebuilt off the event loop


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
        return json_response(await gw.catalog.listing(privileged=is_admin(request, gw)))
    except APIError as exc:
        status = exc.status
        return exc.response()
    finally:
        gw.metrics.requests.labels(MODELS, "", str(status)).inc()


class DirectRoutes:
    """Pure ASGI in front of FastAPI's router: ``POST`` on the two generation routes goes straight to its handler
    (FastAPI's routing and dependency resolution cost ~0.2 ms a request); anything else goes through FastAPI.
    An exception gets the response the app's handlers give it (``install_error_handlers``) as FastAPI would."""

    def __init__(self, app):
        self.app = app
        self.routes = {CHAT: chat_completions, COMPLETIONS: completions}

    async def __call__(self, scope, receive, send) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            return await self.app(scope, receive, send)
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except Exception as exc:  # mapped by the app's handlers; the rest re-raised (502 there)
            handlers = request.app.exception_handlers
            on_error = next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers and cls is not Exception),
                            None)
            if on_error is None:
                raise
            response = await on_error(request, exc)
        await response(scope, receive, send)


# --------------------------------------------------------------------------- helpers


def parse_json_object(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 (invalid JSON, nested too deeply, not an object)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_request")
    return obj


def is_admin(request: Request, gw: Gateway) -> bool:
    """Whether the request carries the admin bearer token (it then reaches every served model)."""
    token = gw.settings.admin_token.get_secret_value() if gw.settings.admin_token else ""
    return bool(token) and bearer_matches(request, token)


def admit(gw: Gateway) -> None:
    """429 with Retry-After when too many requests are in flight here."""
    s = gw.settings
    if gw.in_flight > s.max_in_flight:
        raise _overloaded(gw, f"{s.max_in_flight} requests are in flight")


def admit_queue(gw: Gateway, call: _Call, pool) -> None:
    """429 with Retry-After when every server the request may go to (its merged engine, else ``pool``'s admitted
    replicas) has more requests waiting than ``max_queue_waiting`` (the shortest queue counts: it goes to the least
    busy one)."""
    limit = gw.settings.max_queue_waiting
    if limit is None:
        return
    waiting = gw.queue.shortest([call.engine.url] if call.engine is not None else pool.admitted_urls())
    if waiting is not None and waiting > limit:
        raise _overloaded(gw, f"the model server has {waiting:.0f} requests waiting")


def _overloaded(gw: Gateway, reason: str) -> APIError:
    after = gw.settings.retry_after_s
    return APIError(429, f"the service is overloaded ({reason}); retry after {after} s", code="overloaded",
                    headers={"retry-after": str(after)})


def check_request(gw: Gateway, obj: dict, schema: type[BaseModel]) -> BaseModel:
    """The validated request, or a 400: a field outside the allowlist, a schema error, a pre-filled answer,
    ``n`` or the prompt count over their caps."""
    bad = forbidden_field(obj, schema, gw.extra_fields)
    if bad is not None:
        raise APIError(400, f"the field {bad!r} is not accepted by this API (it can switch off or pre-fill the "
                       "safety reasoning, or defeat the budgets)", param=bad, code="unsupported_field")
    try:
        req = schema.model_validate(obj)
    except ValidationError as exc:
        raise validation_error(exc) from None
    s = gw.settings
    if isinstance(req, ChatCompletionRequest) and (idx := req.prefill_index()) is not None:
        raise APIError(400, "the last message must not be an assistant turn: the model writes the answer (a "
                       "pre-filled answer is not accepted)", param=f"messages.{idx}.role", code="assistant_prefill")
    if req.n is not None and req.n > s.max_n:
        raise APIError(400, f"n must be at most {s.max_n}", param="n", code="over_limit")
    if isinstance(req, CompletionRequest) and req.prompt_count() > s.max_prompts:
        raise APIError(400, f"at most {s.max_prompts} prompts per request", param="prompt", code="over_limit")
    return req


def check_output_budget(gw: Gateway, req: BaseModel, target: str) -> None:
    """400 when ``max_tokens``/``max_completion_tokens`` exceeds the cap (default: the served context length)."""
    cap = gw.settings.max_output_tokens or gw.catalog.context_length(target)
    if cap is None:
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, field, None)
        if value is not None and value > cap:
            raise APIError(400, f"{field} must be at most {cap}", param=field, code="over_limit")


def _starts_in_think(gw: Gateway, req: BaseModel) -> bool | None:
    if isinstance(req, ChatCompletionRequest):
        if req.chat_template_kwargs is not None and req.chat_template_kwargs.enable_thinking is False:
            return False
        return gw.think_open
    prompt = req.prompt_text()
    if prompt_starts_in_think(prompt):
        return True
    return False if THINK_CLOSE in prompt else None


class _DisconnectWatch:
    """A watcher task that cancels the request's own task when the client disconnects: cheaper than running the
    work in a task of its own and waiting for the first of two. :meth:`absorbed` after a ``CancelledError`` says
    whether the watcher sent it (the cancel is then undone); :meth:`stop` when done."""

    def __init__(self, receive):
        self.task = asyncio.current_task()
        self.gone = False
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self.task.cancel()

    def absorbed(self) -> bool:
        if self.gone:
            self.task.uncancel()
        return self.gone

    def stop(self) -> None:
        self._watcher.cancel()


async def _until_disconnect(request: Request, coro):
    """Await ``coro`` unless the client disconnects first (then cancel it: the upstream request aborts)."""
    watch = _DisconnectWatch(request.receive)
    try:
        return await coro
    except asyncio.CancelledError:
        if watch.absorbed():
            raise ClientGone from None
        raise
    finally:
        watch.stop()


class _Call:
    """Book-keeping of one generation request (metrics and the access log line at the end)."""

    __slots__ = ("classifier", "decisions", "engine", "error", "gw", "model", "replica", "request_id", "route",
                 "status", "stream", "t0")

    def __init__(self, gw: Gateway, route: str, t0: float, request_id: str):
        self.gw, self.route, self.t0, self.request_id = gw, route, t0, request_id
        self.model, self.status, self.stream = "", 500, False
        self.error: str | None = None
        self.decisions: list = []
        self.classifier: dict | None = None
        self.engine = None  # the merged engine serving it (service.engines), if any
        self.replica = None  # else the vLLM replica it went to (service.gateway.replicas)

    @property
    def base(self) -> str | None:
        """Where the request goes: its merged engine, else its replica (None: the first upstream)."""
        if self.engine is not None:
            return self.engine.url
        return self.replica.url if self.replica is not None else None

    def route_to(self, replica) -> None:
        """Send it to ``replica`` (counted outstanding there until :meth:`done` or the next choice)."""
        self.leave_replica()
        self.replica = replica
        self.gw.replicas.begin(replica)

    def leave_replica(self) -> None:
        if self.replica is not None:
            self.gw.replicas.end(self.replica)
            self.replica = None

    def done(self) -> None:
        if self.engine is not None:
            self.gw.engines.release(self.engine)
            self.engine = None
        self.leave_replica()
        m = self.gw.metrics
        elapsed = time.monotonic() - self.t0
        m.requests.labels(self.route, self.model, str(self.status)).inc()
        m.request_duration.labels(self.route, self.model).observe(elapsed)
        m.active_requests.dec()
        self.gw.in_flight -= 1
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
    gw.in_flight += 1
    streaming = False
    classify: asyncio.Task | None = None
    try:
        admit(gw)
        raw = await read_limited_body(request, gw.settings.max_body_bytes, gw.settings.body_timeout_s)
        obj = parse_json_object(raw)
        req = check_request(gw, obj, schema)
        privileged = is_admin(request, gw)
        target = await gw.catalog.resolve(req.model, privileged=privileged)
        call.model = target
        check_output_budget(gw, req, target)
        if route == COMPLETIONS and req.model == gw.settings.model_alias and not privileged \
                and not gw.settings.alias_completions:
            raise APIError(404, f"{req.model!r} is a chat model and not supported in the v1/completions endpoint "
                           "(a raw prompt would skip its serving template). Did you mean to use "
                           "v1/chat/completions?", param="model", code="chat_model_only")
        if target != req.model:
            obj["model"] = target
            raw = json.dumps(obj).encode()
        if gw.engines is not None:
            call.engine = gw.engines.acquire(target)
        if gw.classifier is not None and gw.classifier.available():
            classify = asyncio.create_task(gw.classifier.verdict(req.prompt_text()))
        if route == CHAT and gw.think_open is None:
            await gw.detect_think_open(target)
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


# Failures after which a request goes to another replica: the connection could not be made or died before the
# reply (for a stream: before its first chunk; nothing had gone to the client yet). A read timeout is not
# retried: the replica is busy, not gone.
REPLICA_GONE = (aiohttp.ClientOSError, aiohttp.ConnectionTimeoutError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientPayloadError)


class _Reply:
    """An upstream reply: its status, and the whole body (``content``) or, for a 200 event stream, the body's
    chunks from the first on (``chunks``; :meth:`close` when done with them)."""

    __slots__ = ("chunks", "content", "response", "status")

    def __init__(self, response: aiohttp.ClientResponse, content: bytes = b"",
                 chunks: AsyncIterator[bytes] | None = None):
        self.response, self.status, self.content, self.chunks = response, response.status, content, chunks

    def close(self, *, whole: bool) -> None:
        """Let the connection go: back to the pool when the body was read to its end (``whole``), closed
        otherwise (vLLM then aborts the generation)."""
        if whole:
            self.response.release()
        else:
            self.response.close()


async def _open(gw: Gateway, url, raw: bytes, headers: dict, stream: bool) -> _Reply:
    """Send the request and read the reply: whole, or for an event stream its first chunk, so that a replica
    dying between its headers and its first token fails here, before anything went to the client."""
    resp = await send(gw.session, url, raw, headers, gw.metrics)
    try:
        if stream and resp.status == 200 and resp.headers.get("content-type", "").startswith("text/event-stream"):
            chunks = resp.content.iter_any()
            first = await anext(chunks, b"")
            return _Reply(resp, chunks=_body(first, chunks))
        return _Reply(resp, content=await resp.read())
    except BaseException:
        resp.close()
        raise


async def _body(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


async def _send_routed(gw: Gateway, call: _Call, route: str, raw: bytes, headers: dict, *, stream: bool,
                       request: Request) -> _Reply:
    """Send to the least busy replica holding the model (a merged one first: :meth:`Gateway.route`), or to the
    call's merged engine; when a replica fails before replying (for a stream: before its first chunk), eject it
    and send to the next one, until none is left."""
    tried = []
    pool = gw.replicas
    while True:
        if call.engine is None:
            pool, replica = gw.route(call.model, exclude=tried)
            call.route_to(replica)
        if not tried:  # the first choice: 429 when every server it could go to has a long queue
            admit_queue(gw, call, pool)
        try:
            return await _until_disconnect(request, _open(gw, gw.url(route, call.base), raw, headers, stream))
        except REPLICA_GONE as exc:
            if call.engine is not None or call.replica is None:
                raise
            pool.eject(call.replica, f"request failed: {type(exc).__name__}")
            tried.append(call.replica)
            if gw.route(call.model, exclude=tried)[1] is None:
                raise
            gw.metrics.upstream_errors.labels("replica_retry").inc()
            log.info("request sent to another replica", extra={"replica": call.replica.url,
                                                                "error": type(exc).__name__,
                                                                "request_id": call.request_id})


async def _complete(gw: Gateway, call: _Call, request: Request, route: str, raw: bytes, headers: dict,
                    tracker_args: dict, classify: asyncio.Task | None) -> Response:
    try:
        reply = await _send_routed(gw, call, route, raw, headers, stream=False, request=request)
    except TRANSPORT_ERRORS as exc:
        raise transport_error(exc, gw.metrics) from None
    content = reply.content
    if reply.status != 200:
        out = upstream_status_error(reply.status, content, gw.metrics)
        if isinstance(out, APIError):
            raise out
        call.status = out[0]
        return Response(out[1], out[0], media_type="application/json")
    split = gw.settings.split_reasoning and route == CHAT
    try:
        if len(content) > LARGE_REPLY:
            body, decisions = await asyncio.to_thread(_analyse_whole, content, route, tracker_args, split)
        else:
            body, decisions = _analyse_whole(content, route, tracker_args, split)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        gw.metrics.upstream_errors.labels("malformed").inc()
        raise APIError(502, "the model server returned a malformed response", code="upstream_error") from None
    verdict = await _classifier_result(classify, gw.settings.classifier_timeout_s)
    body["presafe"] = call.record(decisions, verdict)
    call.status = 200
    hdrs = {}
    if decisions:
        hdrs["x-presafe-decision"] = str(decisions[0].path)
        hdrs["x-presafe-think-tokens"] = str(decisions[0].think_tokens)
    if len(content) > LARGE_REPLY:
        return Response(await asyncio.to_thread(json.dumps, body, separators=(",", ":")), 200, hdrs,
                        media_type="application/json")
    return json_response(body, 200, hdrs)


def _set_split(message: dict, reasoning: str, content: str) -> None:
    """Write a routed message/delta: the answer alone in ``content``, the reasoning in both reasoning fields."""
    message["content"] = content or None
    message["reasoning_content"] = message["reasoning"] = reasoning or None


def _analyse_whole(content: bytes, route: str, tracker_args: dict, split: bool) -> tuple[dict, list]:
    """Parse a whole reply, decide each choice and (``split``) route its text into answer and reasoning."""
    body = json.loads(content)
    choices = body["choices"]
    decisions = []
    completion_tokens = (body.get("usage") or {}).get("completion_tokens") if len(choices) == 1 else None
    for choice in choices:
        tracker = DecisionTracker(streaming=False, **tracker_args)
        if route == CHAT:
            msg = choice.get("message") or {}
            r1, c1 = tracker.feed(msg.get("content"), msg.get("reasoning") or msg.get("reasoning_content"))
            r2, c2 = tracker.flush()
            decision = tracker.finish(choice.get("finish_reason"), completion_tokens=completion_tokens)
            reasoning, answer = r1 + r2, c1 + c2
            if decision.reasoning_chars == 0 and not answer:  # it stopped in a block it never closed: the answer
                reasoning, answer = "", reasoning
            if split:
                _set_split(msg, reasoning, answer)
        else:
            tracker.feed(choice.get("text"))
            decision = tracker.finish(choice.get("finish_reason"), completion_tokens=completion_tokens)
        decisions.append(decision)
    return body, decisions


_DONE = b"data: [DONE]"


async def _stream(gw: Gateway, call: _Call, request: Request, route: str, raw: bytes, headers: dict,
                  tracker_args: dict, classify: asyncio.Task | None) -> Response:
    try:
        reply = await _send_routed(gw, call, route, raw, headers, stream=True, request=request)
    except TRANSPORT_ERRORS as exc:
        raise transport_error(exc, gw.metrics) from None
    if reply.chunks is None:
        if reply.status == 200:
            gw.metrics.upstream_errors.labels("malformed").inc()
            raise APIError(502, "the model server did not stream", code="upstream_error")
        out = upstream_status_error(reply.status, reply.content, gw.metrics)
        if isinstance(out, APIError):
            raise out
        call.status = out[0]
        return Response(out[1], out[0], media_type="application/json")
    call.status = 200
    started = [False]

    async def cleanup_unstarted() -> None:
        if not started[0]:  # the client left before the first chunk: the relay never ran its clean-up
            call.status = 499
            reply.close(whole=False)
            if classify is not None and not classify.done():
                classify.cancel()
            call.done()

    return _SSEResponse(_relay(gw, call, reply, route, tracker_args, classify, started), cleanup_unstarted)


class _SSEResponse(StreamingResponse):
    """An event stream relayed in the request's own task, with one watcher task that stops it when the client
    disconnects (Starlette's task group of two costs ~0.25 ms per stream under uvicorn's ASGI 2.3); its clean-up
    (``on_exit``) runs however it ends, the client leaving before the first chunk included."""

    def __init__(self, content, on_exit):
        super().__init__(content, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._on_exit = on_exit

    async def __call__(self, scope, receive, send) -> None:
        watch = _DisconnectWatch(receive)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.absorbed():
                raise
        finally:
            watch.stop()
            await self.body_iterator.aclose()  # the relay's clean-up, if it stopped at a chunk (else a no-op)
            await self._on_exit()


def _error_event(message: str, type: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class _Malformed(Exception):
    def __init__(self, before: bytes):
        self.before = before  # the events of the batch that were fine


class _StreamAnalysis:
    """Decision trackers for the choices of one stream, fed from parsed SSE events (chat events are routed:
    :meth:`feed` rewrites them in place and says so when ``split``)."""

    __slots__ = ("chat", "finish", "meta", "metrics", "split", "text_seen", "tracker_args", "trackers")

    def __init__(self, chat: bool, tracker_args: dict, metrics, split: bool = False):
        self.trackers: dict[int, DecisionTracker] = {}
        self.finish: dict[int, str | None] = {}
        self.meta: dict = {}
        self.text_seen = False  # an event with generated text went by (the first token)
        self.chat, self.tracker_args, self.metrics, self.split = chat, tracker_args, metrics, split and chat

    def feed(self, obj: dict) -> bool:
        """Feed one event; True when it was rewritten (routed differently from how it came)."""
        changed = False
        if not self.meta:
            self.meta = {k: obj.get(k) for k in ("id", "object", "created", "model")}
        if "error" in obj:
            self.metrics.upstream_errors.labels("stream_error").inc()
        for choice in obj.get("choices") or ():
            idx = choice.get("index", 0)
            tracker = self.trackers.get(idx)
            if tracker is None:
                tracker = self.trackers[idx] = DecisionTracker(**self.tracker_args)
            ended = choice.get("finish_reason") is not None
            if self.chat:
                delta = choice.get("delta") or {}
                given, given_r = delta.get("content"), delta.get("reasoning") or delta.get("reasoning_content")
                self.text_seen = self.text_seen or bool(given or given_r)
                reasoning, content = tracker.feed(given, given_r)
                if ended:
                    more_r, more_c = tracker.flush()
                    reasoning, content = reasoning + more_r, content + more_c
                if self.split and (reasoning or given_r or content != (given or "")):
                    for key in ("content", "reasoning_content", "reasoning"):
                        delta.pop(key, None)
                    if content or not reasoning:
                        delta["content"] = content  # "" (text held back) keeps the shape of a text delta
                    if reasoning:
                        delta["reasoning_content"] = delta["reasoning"] = reasoning
                    choice["delta"] = delta
                    changed = True
            else:
                text = choice.get("text")
                self.text_seen = self.text_seen or bool(text)
                tracker.feed(text)
            if ended:
                self.finish[idx] = choice["finish_reason"]
        return changed

    def decisions(self) -> list:
        return [self.trackers[i].finish(self.finish.get(i)) for i in sorted(self.trackers)]

    def final_chunk(self, presafe: dict) -> bytes:
        meta = self.meta
        final = {"id": meta.get("id"), "object": meta.get("object"), "created": meta.get("created"),
                 "model": meta.get("model"), "choices": [], "presafe": presafe}
        return b"data: " + json.dumps(final).encode() + b"\n\n"


async def _relay(gw: Gateway, call: _Call, reply: _Reply, route: str, tracker_args: dict,
                 classify: asyncio.Task | None, started: list[bool]):
    """Forward upstream SSE bytes as they arrive, feeding the decision trackers on the side."""
    started[0] = True
    analysis = _StreamAnalysis(route == CHAT, tracker_args, gw.metrics, gw.settings.split_reasoning)
    buf = b""
    done = drained = first_sent = False
    try:
        async for chunk in reply.chunks:
            if done:  # drain to the end of the body: the connection then goes back to the pool
                continue
            buf += chunk
            end = buf.rfind(b"\n\n")
            if end < 0:
                continue
            ready, buf = buf[:end + 2], buf[end + 2:]
            parts: list[bytes] = []
            for event in ready[:-2].split(b"\n\n"):
                if not event.startswith(b"data:"):
                    parts.append(event + b"\n\n")
                    continue
                payload = event[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    verdict = await _classifier_result(classify, gw.settings.classifier_timeout_s)
                    presafe = call.record(analysis.decisions(), verdict)
                    parts.append(analysis.final_chunk(presafe) + _DONE + b"\n\n")
                    break
                try:
                    obj = json.loads(payload)
                    changed = analysis.feed(obj)
                except (ValueError, TypeError, AttributeError, RecursionError):
                    raise _Malformed(b"".join(parts)) from None
                parts.append(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n" if changed
                             else event + b"\n\n")
                if not first_sent and analysis.text_seen:  # the first token goes out before the rest of its batch
                    first_sent = True
                    yield b"".join(parts)
                    parts = []
            if parts:
                yield b"".join(parts)
        drained = True
        if not done:
            gw.metrics.upstream_errors.labels("stream_interrupted").inc()
            call.status, call.error = 502, "the model server ended the stream early"
            yield _error_event("the model server ended the stream early", "bad_gateway", "upstream_error")
    except _Malformed as exc:
        gw.metrics.upstream_errors.labels("malformed").inc()
        call.status, call.error = 502, "the model server sent a malformed event"
        yield exc.before + _error_event("the model server sent a malformed event", "bad_gateway",
                                                "upstream_error")
    except TRANSPORT_ERRORS as exc:
        err = transport_error(exc, gw.metrics)
        call.status, call.error = err.status, err.message
        yield _error_event(err.message, err.type, str(err.code))
    except (asyncio.CancelledError, GeneratorExit):
        if not done:  # past [DONE] the stream was whole: a client closing while the body drains is a 200
            call.status = 499  # the client went away: closing the upstream response aborts generation
        raise
    finally:
        reply.close(whole=drained)
        if classify is not None and not classify.done():
            classify.cancel()
        call.done()
