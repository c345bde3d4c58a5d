"""Decision analysis on crafted texts and streams (a random-weight model never emits these)."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

import pytest

from service.core.decision import DecisionPath, DecisionTracker, analyze, prompt_starts_in_think, split_think

REFUSAL = "I'm sorry, but I can't help with that request."
ANSWER = "Sure! The capital of France is Paris, a city on the Seine."
REASONING = "The user asks about geography. France's capital is well known.\nLet me answer."

P = DecisionPath


@pytest.mark.parametrize(
    ("text", "starts_in_think", "path", "reasoning_chars"),
    [
        # the served SmolLM2 template opens <think>: the completion starts inside the block
        (f"\n\n</think>\n\n{REFUSAL}", True, P.REFUSE_PRE_COT, 2),
        (f"{REASONING}</think>\n\n{REFUSAL}", True, P.REFUSE_AFTER_COT, len(REASONING)),
        (f"{REASONING}</think>\n\n{ANSWER}", True, P.ANSWER_WITH_COT, len(REASONING)),
        (f"</think>{ANSWER}", True, P.ANSWER_WITHOUT_COT, 0),
        # the model writes its own <think>
        (f"<think>\n{REASONING}\n</think>\n{REFUSAL}", None, P.REFUSE_AFTER_COT, len(REASONING) + 2),
        (f"  <think> </think>{REFUSAL}", None, P.REFUSE_PRE_COT, 1),
        # no think block at all
        (REFUSAL, None, P.REFUSE_PRE_COT, 0),
        (ANSWER, None, P.ANSWER_WITHOUT_COT, 0),
        # an implicit block (template opened it, hint unknown) closed by </think>
        (f"{REASONING}</think>{ANSWER}", None, P.ANSWER_WITH_COT, len(REASONING)),
        # enable_thinking=false: the template pre-filled an empty block, everything is answer
        (f"{REASONING}</think>{ANSWER}", False, P.ANSWER_WITHOUT_COT, 0),
        # the model stopped inside the block it never closed: that text is its answer
        (REFUSAL, True, P.REFUSE_PRE_COT, 0),
        ("", True, P.ANSWER_WITHOUT_COT, 0),
        ("   \n", None, P.ANSWER_WITHOUT_COT, 0),
    ],
)
def test_whole_text_paths(text, starts_in_think, path, reasoning_chars):
    decision = analyze(text, starts_in_think=starts_in_think, finish_reason="stop")
    assert decision.path == path
    assert decision.refused == path.startswith("refuse")
    assert decision.reasoning_chars == reasoning_chars
    assert decision.think_closed


def test_truncated_reasoning_is_unfinished_cot():
    decision = analyze(REASONING, starts_in_think=True, finish_reason="length", completion_tokens=20)
    assert decision.path == P.ANSWER_WITH_COT
    assert not decision.think_closed
    assert decision.think_tokens == 20 and decision.think_tokens_method == "usage_ratio"
    # without a hint that a block was open, truncated text is a (cut) answer
    assert analyze(REFUSAL, finish_reason="length").path == P.REFUSE_PRE_COT


def test_reasoning_field_is_used_when_present():
    assert analyze(REFUSAL, reasoning=REASONING).path == P.REFUSE_AFTER_COT
    assert analyze(ANSWER, reasoning="\n").path == P.ANSWER_WITHOUT_COT
    # the field mode never splits the content on tags
    assert analyze(f"x</think>{REFUSAL}", reasoning=REASONING).reasoning_chars == len(REASONING)


def test_think_token_methods():
    text = f"{REASONING}</think>{ANSWER}"
    by_usage = analyze(text, starts_in_think=True, completion_tokens=100)
    assert by_usage.think_tokens_method == "usage_ratio"
    assert by_usage.think_tokens == round(100 * len(REASONING) / (len(REASONING) + len(ANSWER)))
    assert analyze(text, starts_in_think=True).think_tokens == -(-len(REASONING) // 4)
    exact = analyze(text, starts_in_think=True, count_tokens=lambda s: len(s.split()))
    assert (exact.think_tokens, exact.think_tokens_method) == (len(REASONING.split()), "tokenizer")
    assert analyze(f"  </think>{REFUSAL}", starts_in_think=True, completion_tokens=50).think_tokens == 0


def _chunks(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 4)
        out.append(text[i:i + n])
        i += n
    return out


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize(
    ("text", "starts_in_think", "path"),
    [
        (f"\n\n</think>\n\n{REFUSAL}", True, P.REFUSE_PRE_COT),
        (f"{REASONING}</think>\n\n{REFUSAL}", True, P.REFUSE_AFTER_COT),
        (f"<think>{REASONING}</think>{ANSWER}", None, P.ANSWER_WITH_COT),
        (f"<thinking is fun> {ANSWER}", None, P.ANSWER_WITHOUT_COT),
        (f"{REASONING} a </thin b </think>{ANSWER}", True, P.ANSWER_WITH_COT),
    ],
)
def test_stream_matches_whole_text_for_any_chunking(seed, text, starts_in_think, path):
    """Tags split across chunks at any point give the same split as the whole text."""
    tracker = DecisionTracker(starts_in_think=starts_in_think)
    for piece in _chunks(text, random.Random(seed)):
        tracker.feed(piece)
    decision = tracker.finish("stop")
    whole = analyze(text, starts_in_think=starts_in_think)
    assert decision.path == whole.path == path
    assert decision.reasoning_chars == whole.reasoning_chars
    assert decision.answer_chars == whole.answer_chars
    assert decision.think_tokens_method == "stream_chunks"
    assert tracker.reasoning_text == split_think(text, starts_in_think=starts_in_think)[0]


def test_stream_counts_reasoning_chunks_and_time_to_decision():
    clock = itertools.count(start=10.0, step=1.0)
    tracker = DecisionTracker(starts_in_think=True, t0=10.0, clock=lambda: next(clock))
    for token in ["Let", " me", " think", ".", "</", "think", ">", "\n\n", "I", " can't", " help", " with",
                  " that", "."]:
        tracker.feed(token)
    decision = tracker.finish("stop")
    assert decision.path == P.REFUSE_AFTER_COT
    assert decision.think_tokens == 4  # the closing tag's pieces are not reasoning
    # clock ticks: "Let" → 10, then "I" (first answer text) is the 2nd clock read → 11
    assert decision.time_to_decision_s == 1.0


def test_stream_reasoning_field_chunks():
    tracker = DecisionTracker()
    for piece in ["a", "b", "c"]:
        tracker.feed(reasoning=piece)
    tracker.feed(content="I cannot help with that.")
    decision = tracker.finish("stop")
    assert (decision.path, decision.think_tokens) == (P.REFUSE_AFTER_COT, 3)


def test_unfinished_stream_has_no_decision_time():
    tracker = DecisionTracker(starts_in_think=True)
    tracker.feed("still thinking about")
    decision = tracker.finish("length")
    assert decision.path == P.ANSWER_WITH_COT and not decision.think_closed
    assert decision.time_to_decision_s is None


def test_judge_reads_only_the_answer_head():
    late_refusal = "x " * 1000 + REFUSAL
    assert analyze(late_refusal).path == P.ANSWER_WITHOUT_COT
    assert analyze(late_refusal).answer_chars == len(late_refusal)


def test_prompt_starts_in_think():
    assert prompt_starts_in_think("<|im_start|>assistant\n<think>\n")
    assert not prompt_starts_in_think("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_starts_in_think("Hello")


def test_decision_to_dict_is_json_ready():
    out = analyze(f"</think>{REFUSAL}", starts_in_think=True).to_dict()
    assert out["path"] == "refuse_pre_cot" and isinstance(out["path"], str) and out["refused"] is True


def test_import_does_not_pull_torch():
    code = "import sys, service.core.decision; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
