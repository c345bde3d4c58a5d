"""Drift from the base model: how likely each model finds the base model's own benign answers.

For each answer, one prefill of ``prompt + answer`` with vLLM's ``prompt_logprobs`` (no generation) gives the
model's negative log-likelihood of every answer token. The per-token NLL gap of a model over the base, on text
the base produced, estimates KL(base ‖ model) per token (exactly so in expectation when the answers are samples
of the base; greedy answers make it an approximation). 0 means the adapter left the base's benign behaviour as
it was; a refusal-happy adapter shows up as a large gap.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.core.cot import THINK_CLOSE
from training.data import BENIGN
from training.evaluate.served import ServedLogprobs, ServedScoringError, score_each


@dataclass(frozen=True)
class AnswerNLL:
    nll: float  # sum over the answer's tokens of -log p(token | everything before it)
    tokens: int


def completion_text(text: str | None, reasoning: str | None, think_closed: bool | None = True) -> str:
    """The completion as the model wrote it after a CoT-ON prompt (which opens ``<think>``): the reasoning,
    ``</think>``, the answer (the reasoning alone when cut before ``</think>``); a reply without separate
    reasoning is its text as it came."""
    if reasoning is None:
        return text or ""
    if think_closed is False:
        return reasoning
    return f"{reasoning}\n{THINK_CLOSE}\n\n{text or ''}"


async def served_answer_nll(client, model: str, items: Sequence[tuple[str, str]], *, max_answer_tokens: int = 256,
                            on_done: Callable[[], None] | None = None, concurrency: int = 1
                            ) -> list[AnswerNLL | None]:
    """The NLL of each ``(prompt, completion)`` under ``model`` as a vLLM server serves it (CoT-ON template).

    ``client`` is an ``httpx.AsyncClient`` on the server's root URL. At most ``concurrency`` requests at once
    (1 on a LoRA-enabled engine, see :mod:`.served`). A
    failed item is ``None``; a server that scores none raises :class:`ServedScoringError`."""
    served = ServedLogprobs(client, model)

    async def score(item: tuple[str, str]) -> AnswerNLL:
        prompt, completion = item
        answer = (await served.tokens(completion))[:max_answer_tokens]
        if not answer:
            raise ServedScoringError("empty answer")
        entries = await served.continuation(await served.chat_prompt(prompt), answer)
        return AnswerNLL(-sum(float(entry[str(token)]["logprob"]) for token, entry in zip(answer, entries, strict=True)),
                         len(answer))

    return await score_each(items, score, model=model, on_done=on_done, concurrency=concurrency)


def pick_answers(rows: Sequence, n: int, seed: int = 0) -> list:
    """Up to ``n`` of the base model's benign rows with an answer (a seeded sample, in id order)."""
    usable = sorted((r for r in rows if r.error is None and r.label == BENIGN and (r.text or r.reasoning)),
                    key=lambda r: r.id)
    if len(usable) > n:
        usable = sorted(random.Random(seed).sample(usable, n), key=lambda r: r.id)
    return usable


def drift_summary(scores: dict[str, Sequence[AnswerNLL | None]], reference: str, *, resamples: int = 2000,
                  seed: int = 0) -> dict:
    """Per model: the per-token NLL of the reference's answers (pooled over answers) and, against the
    reference, the per-token gap with a 95% bootstrap interval over answers. Only answers every model
    scored count."""
    keep = [i for i in range(len(scores[reference])) if all(s[i] is not None for s in scores.values())]
    tokens = sum(scores[reference][i].tokens for i in keep)
    out: dict = {"reference": reference, "n": len(keep), "tokens": tokens, "models": {}}
    if not keep:
        return out
    rng = random.Random(seed)
    ref = [scores[reference][i] for i in keep]
    for model, values in scores.items():
        mine = [values[i] for i in keep]
        per_token = sum(a.nll for a in mine) / tokens
        gaps = [(a.nll - b.nll, b.tokens) for a, b in zip(mine, ref, strict=True)]
        gap = sum(d for d, _ in gaps) / tokens
        boots = []
        for _ in range(resamples if model != reference else 0):
            draw = [gaps[rng.randrange(len(gaps))] for _ in gaps]
            boots.append(sum(d for d, _ in draw) / max(1, sum(t for _, t in draw)))
        boots.sort()
        ci = [round(boots[int(0.025 * len(boots))], 4), round(boots[int(0.975 * len(boots)) - 1], 4)] if boots \
            else [0.0, 0.0]
        out["models"][model] = {"nll_per_token": round(per_token, 4), "gap_per_token": round(gap, 4),
                                "gap_ci95": ci, "perplexity": round(math.exp(per_token), 3)}
    return out
