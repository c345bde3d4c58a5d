"""Test support for the gateway: run an ASGI app under uvicorn in a thread, and a fake upstream.

The fake upstream stands in for vLLM only on fault paths and for crafted completions (a random-weight
model never emits ``</think>`` or refusals). Its behaviour is picked by the request's ``model``:

- ``crafted``: answers with the request's ``fake_text`` (and ``fake_reasoning`` in the reasoning field
  ``fake_reasoning_field``, ``reasoning`` by default), streamed ``fake_chunk`` characters per event,
  ``fake_finish`` as the finish reason, ``n`` choices (streamed interleaved); ``fake_text``,
  ``fake_reasoning`` and ``fake_finish`` may be lists, one item per choice;
- ``slow``: sleeps ``fake_sleep`` seconds first (default 30); a client that leaves during a non-streamed
  sleep is counted in ``cancelled``;
- ``malformed``: 200 with a body that is not JSON (or a stream event that is not);
- ``broken``: 500; ``context``: vLLM's 400 for a prompt over the context limit;
- ``cut``: streams two events then closes without ``[DONE]``;
- ``endless``: streams an event every 50 ms until the client goes away (counted in ``cancelled``);
- ``lingering``: streams like ``crafted``, then keeps the body open ``fake_sleep`` seconds after ``[DONE]``.

Its ``/metrics`` reports ``vllm:num_requests_waiting`` = ``waiting`` (settable). The gateway in front of it
needs the fake model names public and the ``fake_*`` fields allowed: :func:`fake_settings`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from fake_upstream import ServerThread  # noqa: F401  (the one uvicorn-in-a-thread runner; tests import it from here)

FAKE_MODELS = ("crafted", "slow", "malformed", "broken", "context", "cut", "endless", "lingering")
FAKE_FIELDS = ("fake_text", "fake_reasoning", "fake_reasoning_field", "fake_chunk", "fake_finish", "fake_sleep")


def fake_settings(home, **overrides):
    """Gateway settings for the fake upstream: its models public, its ``fake_*`` request fields allowed."""
    from service.core.settings import Settings

    return Settings(home=home, public_models=list(FAKE_MODELS), extra_request_fields=list(FAKE_FIELDS),
                    **overrides)


def assert_openai_error(resp, status: int, param: str | None = None) -> dict:
    """The response is ``status`` with an OpenAI-format error (no traceback); returns the ``error`` object."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in resp.text
    if param is not None:
        assert err["param"] == param, err
    return err


class FakeUpstream:
    """A tiny OpenAI-ish server with scripted behaviours (see the module docstring)."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.waiting = 0
        self.request_ids: list[str | None] = []
        self.client_ports: set[int] = set()  # upstream connections the gateway opened for generations
        routes = [
            Route("/health", lambda r: PlainTextResponse("")),
            Route("/v1/models", self.models),
            Route("/metrics", lambda r: PlainTextResponse(
                f'vllm:num_requests_waiting{{model_name="crafted"}} {self.waiting}.0\n')),
            Route("/v1/chat/completions", self.generate, methods=["POST"]),
            Route("/v1/completions", self.generate, methods=["POST"]),
        ]
        self.app = Starlette(routes=routes)

    async def models(self, request: Request) -> Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake", "root": m, "parent": None,
                 "max_model_len": 1024} for m in FAKE_MODELS]
        data.append({"id": "lora", "object": "model", "created": 0, "owned_by": "fake", "root": "/a/lora",
                     "parent": "crafted"})  # an adapter: vLLM gives no max_model_len there
        return JSONResponse({"object": "list", "data": data})

    async def generate(self, request: Request) -> Response:
        body = await request.json()
        self.request_ids.append(request.headers.get("x-request-id"))
        self.client_ports.add(request.client.port)
        chat = request.url.path.endswith("chat/completions")
        model, stream = body.get("model"), bool(body.get("stream"))
        if model == "slow":
            if stream:
                await asyncio.sleep(float(body.get("fake_sleep", 30)))
            elif await self._left_while_sleeping(request, float(body.get("fake_sleep", 30))):
                self.cancelled += 1
                return Response(status_code=499)
        if model == "broken":
            return JSONResponse({"error": {"message": "engine died", "type": "InternalServerError"}}, 500)
        if model == "context":
            return JSONResponse({"error": {"message": "This model's maximum context length is 1024 tokens.",
                                           "type": "BadRequestError", "param": None, "code": 400}}, 400)
        if model == "malformed" and not stream:
            return PlainTextResponse("<html>oops</html>", 200, media_type="application/json")
        n = int(body.get("n") or 1)

        def per_choice(key, default):
            value = body.get(key, default)
            return list(value) if isinstance(value, list) else [value] * n

        texts, reasonings = per_choice("fake_text", "Hello there."), per_choice("fake_reasoning", None)
        finishes, field = per_choice("fake_finish", "stop"), body.get("fake_reasoning_field", "reasoning")
        base = {"id": "fake-1", "created": 1, "model": model,
                "object": "chat.completion.chunk" if chat else "text_completion"}
        if not stream:
            choices = []
            for i in range(n):
                if chat:
                    message = {"role": "assistant", "content": texts[i]}
                    if reasonings[i] is not None:
                        message[field] = reasonings[i]
                    choices.append({"index": i, "message": message, "finish_reason": finishes[i]})
                else:
                    choices.append({"index": i, "text": texts[i], "finish_reason": finishes[i]})
            tokens = max(1, sum(len(t) for t in texts) // 4)
            return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion",
                                 "choices": choices,
                                 "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}})
        if model in ("malformed", "cut", "endless"):
            return StreamingResponse(self._faulty(base, model, chat), media_type="text/event-stream")
        size = int(body.get("fake_chunk", 3))
        per = [self._deltas(chat, texts[i], reasonings[i], finishes[i], size) for i in range(n)]
        linger = float(body.get("fake_sleep", 30)) if model == "lingering" else 0.0
        return StreamingResponse(self._events(base, chat, field, per, linger), media_type="text/event-stream")

    @staticmethod
    async def _left_while_sleeping(request: Request, seconds: float) -> bool:
        """Sleep ``seconds``; True as soon as the client (the gateway) closes the connection."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                return True
            await asyncio.sleep(0.02)
        return False

    @staticmethod
    def _deltas(chat, text, reasoning, finish, size) -> list[tuple]:
        """One choice's stream as (content, reasoning, finish_reason) deltas."""
        out = []
        if chat:
            out.append(("", None, None) if reasoning is None else (None, "", None))
        out += [(None, reasoning[i:i + size], None) for i in range(0, len(reasoning or ""), size)]
        out += [(text[i:i + size], None, None) for i in range(0, len(text), size)]
        out.append((None, None, finish))
        return out

    @staticmethod
    def _event(base, chat, field, index, content=None, reasoning=None, finish_reason=None) -> bytes:
        if chat:
            delta = {}
            if content is not None:
                delta["content"] = content
            if reasoning is not None:
                delta[field] = reasoning
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": content or "", "finish_reason": finish_reason}
        return b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n"

    async def _events(self, base, chat, field, per_choice: list[list[tuple]], linger: float = 0.0):
        """The choices' deltas interleaved (one event each, round robin), then ``[DONE]`` (then ``linger`` s)."""
        for step in range(max(len(d) for d in per_choice)):
            out = b""
            for index, deltas in enumerate(per_choice):
                if step < len(deltas):
                    out += self._event(base, chat, field, index, *deltas[step])
            yield out
        yield b"data: [DONE]\n\n"
        if linger:
            await asyncio.sleep(linger)

    async def _faulty(self, base, model, chat):
        def event(content):
            return self._event(base, chat, "reasoning", 0, content)

        if model == "malformed":
            yield event("ok")
            yield b"data: {not json\n\n"
            return
        if model == "cut":
            yield event("a")
            yield event("b")
            return
        try:  # endless
            while True:
                yield event("tick ")
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def scrape(url: str, settle: float = 5.0) -> dict:
    """``/metrics`` parsed with prometheus_client's parser: {sample name: [(labels, value), ...]}.

    A stream is recorded just after its last byte reaches the client, so this waits (up to ``settle``
    seconds) for a gateway with no request in flight; vLLM's metrics are returned as they are.
    """
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + settle
    while True:
        out: dict[str, list[tuple[dict, float]]] = {}
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
        active = out.get("presafe_active_requests")
        if not active or active[0][1] == 0 or time.monotonic() > deadline:
            return out
        time.sleep(0.02)


def sample(metrics: dict, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(v for lab, v in metrics.get(name, []) if all(lab.get(k) == str(x) for k, x in labels.items()))


def wait_for_sample(url: str, expected: float, name: str, timeout: float = 10.0, **labels) -> dict:
    """Scrape until ``sample(name, **labels)`` equals ``expected`` (asserting it does within ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape(url)
        if sample(metrics, name, **labels) == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sample(metrics, name, **labels) == expected, (name, labels, sample(metrics, name, **labels))
    return metrics
