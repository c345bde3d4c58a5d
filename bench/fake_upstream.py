"""A minimal in-process stand-in for vLLM's OpenAI server that answers at once (for overhead benches).

Serves one model, ``fake``: ``/v1/chat/completions`` (streamed or not) generates ``max_tokens`` tokens
(`` tok`` each; 16 by default) with no delay, and reports ``usage`` as vLLM does (in streams when
``stream_options.include_usage`` is set). Also ``/health``, ``/v1/models``, ``/metrics`` (an empty queue)
and ``/tokenize`` / ``/detokenize`` (a chat prompt that does not open ``<think>``), the parts of vLLM
the gateway calls. Runs under uvicorn in a daemon thread (``with FakeVLLM() as fake: fake.url``), or in a process
of its own as vLLM does (``python bench/fake_upstream.py --port 8000``: what ``gateway_overhead.py`` measures
against, since a fake sharing the client's interpreter lock delays the client's reads).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from service.vllm_server import free_port

MODEL = "fake"
PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


async def _models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "fake",
                                                     "root": MODEL, "parent": None, "max_model_len": 4096}]})


async def _chat(request: Request) -> Response:
    body = await request.json()
    tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
    usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
    base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": body.get("model", MODEL)}
    if not body.get("stream"):
        message = {"role": "assistant", "content": " tok" * tokens}
        return JSONResponse({**base, "object": "chat.completion", "usage": usage,
                             "choices": [{"index": 0, "message": message, "finish_reason": "length"}]})

    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else []
        return b"data: " + json.dumps({**base, "object": "chat.completion.chunk", "choices": choices,
                                       **extra}).encode() + b"\n\n"

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        for i in range(tokens):
            yield chunk({"content": " tok"}, "length" if i == tokens - 1 else None)
        if (body.get("stream_options") or {}).get("include_usage"):
            yield chunk(None, usage=usage)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def _tokenize(request: Request) -> Response:
    return JSONResponse({"tokens": [1, 2, 3], "count": 3, "max_model_len": 4096})


async def _detokenize(request: Request) -> Response:
    return JSONResponse({"prompt": PROMPT})


def app() -> Starlette:
    return Starlette(routes=[
        Route("/health", lambda r: PlainTextResponse("")),
        Route("/v1/models", _models),
        Route("/metrics", lambda r: PlainTextResponse(f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 0.0\n')),
        Route("/tokenize", _tokenize, methods=["POST"]),
        Route("/detokenize", _detokenize, methods=["POST"]),
        Route("/v1/chat/completions", _chat, methods=["POST"]),
    ])


class ServerThread:
    """``uvicorn`` serving ``app`` on a free loopback port in a daemon thread (benches and tests)."""

    def __init__(self, app, port: int | None = None, lifespan: str = "on"):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
                                lifespan=lifespan, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server thread did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class FakeVLLM(ServerThread):
    """:func:`app` under uvicorn on a free loopback port, in a daemon thread."""

    def __init__(self) -> None:
        super().__init__(app(), lifespan="off")


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake vLLM that answers at once (bench/fake_upstream.py).")
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    uvicorn.run(app(), host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
