"""Decision analysis: where a response's reasoning ends, whether its answer refuses, and which path it took.

The one home for decision parsing; the gateway runs it on every response (incrementally on streams)
and training's evaluation reuses it on generated texts.

A response is a *reasoning part* (vLLM's ``reasoning``/``reasoning_content`` field when a reasoning
parser is on, else the text before ``</think>``) and an *answer part*. The refusal judge reads the
start of the answer. The path is one of:

- ``refuse_pre_cot``: refusal with no reasoning (no think block, or an empty/whitespace one);
- ``refuse_after_cot``: refusal after non-empty reasoning;
- ``answer_with_cot`` / ``answer_without_cot``: no refusal, with / without non-empty reasoning.

Where the text starts: a served template may open ``<think>`` itself (the SmolLM2 default), so the
completion starts *inside* the think block (``starts_in_think=True``); with ``enable_thinking=false``
it pre-fills an empty block and the completion is all answer (``False``); ``None`` means unknown: an
explicit leading ``<think>`` opens a block, and any ``</think>`` closes an implicit one.

A block that never closes: when generation was cut by the length limit inside an opened block, the
text is unfinished reasoning (no decision yet: ``answer_with_cot``, ``think_closed=False``); when the
model stopped on its own without closing, it answered inside the block: the text is the answer.

The same pass routes the text for the client (:meth:`DecisionTracker.feed` returns each delta's
``(reasoning, content)``, :meth:`DecisionTracker.flush` what was held back at the end): inside the think
block → reasoning, after ``</think>`` → content, the tags removed, the leading whitespace of both parts
and the reasoning's trailing whitespace dropped (a partial tag or trailing whitespace is held back until
the next delta decides it). A block the model never closed is routed as reasoning (as vLLM's reasoning
parsers do; the gateway shows a whole response that stopped in it as the answer, as :meth:`finish` reads it). With an unknown start and no explicit ``<think>``, the text is passed through as content unchanged
(it cannot be routed before it ends). Streamed and whole responses are routed identically.

Think tokens (reasoning tokens before the decision), by ``think_tokens_method``:
``tokenizer`` (a ``count_tokens`` callable was given: exact), ``stream_chunks`` (streams: the number
of streamed chunks that carried reasoning text; vLLM sends one token per chunk unless it merges
several for a slow reader, so this is a lower bound), ``usage_ratio`` (whole responses:
``completion_tokens`` times the reasoning's share of the generated characters), ``chars_div_4``
(no usage either: characters / 4). Zero whenever the reasoning is empty or whitespace.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum

from service.core.cot import THINK_CLOSE, THINK_OPEN
from service.core.judge import PatternJudge, RefusalJudge


class DecisionPath(StrEnum):
    REFUSE_PRE_COT = "refuse_pre_cot"
    REFUSE_AFTER_COT = "refuse_after_cot"
    ANSWER_WITH_COT = "answer_with_cot"
    ANSWER_WITHOUT_COT = "answer_without_cot"

    @classmethod
    def of(cls, refused: bool, cot: bool) -> DecisionPath:
        if refused:
            return cls.REFUSE_AFTER_COT if cot else cls.REFUSE_PRE_COT
        return cls.ANSWER_WITH_COT if cot else cls.ANSWER_WITHOUT_COT


@dataclass(frozen=True)
class Decision:
    """The analysis of one generated response (one choice)."""

    path: DecisionPath
    refused: bool
    think_tokens: int
    think_tokens_method: str
    reasoning_chars: int
    answer_chars: int
    think_closed: bool  # False: generation ended inside an unfinished think block
    time_to_decision_s: float | None  # request start → first answer text; None when no decision was reached

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        if self.time_to_decision_s is not None:
            out["time_to_decision_s"] = round(self.time_to_decision_s, 6)
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of ``tag`` that ``text`` ends with (0 if none)."""
    start = max(0, len(text) - len(tag) + 1)
    pos = text.find(tag[0], start)
    while pos != -1:
        if tag.startswith(text[pos:]):
            return len(text) - pos
        pos = text.find(tag[0], pos + 1)
    return 0


_START, _THINK, _ANSWER = 0, 1, 2


class DecisionTracker:
    """Incremental decision analysis: feed text deltas as they arrive, then :meth:`finish`.

    Costs a few string operations per delta; the judge runs once, at :meth:`finish`, on the answer's
    first ``head_chars`` characters (the judge's ``window``; the rest is only counted).
    """

    def __init__(
        self,
        judge: RefusalJudge | None = None,
        *,
        starts_in_think: bool | None = None,
        streaming: bool = True,
        t0: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        head_chars: int | None = None,
    ):
        self.judge = judge or PatternJudge()
        self.hint = starts_in_think
        self.streaming = streaming
        self.clock = clock
        self.t0 = clock() if t0 is None else t0
        self.head_chars = head_chars or getattr(self.judge, "window", 2000)
        self._phase = _THINK if starts_in_think else _START
        self._explicit_open = False
        self._pending = ""  # text held back: a possible partial tag
        self._reasoning: list[str] = []
        self._field_mode = False  # reasoning arrives in its own field
        self._head = ""  # the answer's first head_chars characters
        self._answer_chars = 0
        self._think_chunks = 0
        self._t_first_text: float | None = None
        self._t_answer: float | None = None
        self.reasoning_text = ""  # set by finish()
        self.answer_head = ""
        # Routing for the client (feed's return value).
        self._implicit = False  # unknown start, no explicit <think>: content passes through unchanged
        self._out_r: list[str] = []
        self._out_c: list[str] = []
        self._r_started = self._c_started = False
        self._r_ws = ""  # the reasoning's trailing whitespace, held back

    # ------------------------------------------------------------------ feeding

    def feed(self, content: str | None = None, reasoning: str | None = None) -> tuple[str, str]:
        """Add one delta: ``content`` (completion text) and/or ``reasoning`` (a reasoning field).

        Returns the delta as the client should get it: ``(reasoning, content)`` (see the module docstring).
        """
        self._out_r, self._out_c = [], []
        if reasoning:
            self._field_mode = True
            self._reasoning.append(reasoning)
            self._out_r.append(reasoning)
            self._think_chunks += 1
            if self._t_first_text is None and not reasoning.isspace():
                self._t_first_text = self.clock()
        if content:
            if self._implicit:
                self._out_c.append(content)
            if self._field_mode or self._phase == _ANSWER or (self._phase == _START and self.hint is False):
                self._phase = _ANSWER
                self._add_answer(content)
            elif self._phase == _THINK:
                self._add_think(content)
            else:
                self._add_start(content)
        return "".join(self._out_r), "".join(self._out_c)

    def flush(self) -> tuple[str, str]:
        """The routed text still held back (a partial tag, whitespace): call once the choice has ended."""
        self._out_r, self._out_c = [], []
        self._flush_pending()
        return "".join(self._out_r), "".join(self._out_c)

    def _flush_pending(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, ""
            if self._phase == _THINK:
                self._reasoning.append(pending)
                self._route_reasoning(pending)
            else:
                self._phase = _ANSWER
                self._add_answer(pending)

    def _route_reasoning(self, text: str) -> None:
        if self._implicit:
            return
        if not self._r_started:
            text = text.lstrip()
            if not text:
                return
            self._r_started = True
        kept = text.rstrip()
        if kept:
            self._out_r.append(self._r_ws + kept)
            self._r_ws = ""
        self._r_ws += text[len(kept):]

    def _route_content(self, text: str) -> None:
        if self._implicit:
            return
        if not self._c_started:
            text = text.lstrip()
            if not text:
                return
            self._c_started = True
        self._out_c.append(text)

    def _add_start(self, content: str) -> None:
        text = self._pending + content
        stripped = text.lstrip()
        if not stripped or (len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped)):
            self._pending = text  # whitespace, or maybe the start of "<think>"
            return
        self._pending = ""
        self._phase = _THINK
        if stripped.startswith(THINK_OPEN):
            self._explicit_open = True
            text = stripped[len(THINK_OPEN):]
        elif self.hint is None:
            self._implicit = True
            self._out_c.append(text)
        self._add_think(text)

    def _add_think(self, content: str) -> None:
        text = self._pending + content
        idx = text.find(THINK_CLOSE)
        if idx >= 0:
            self._pending = ""
            self._add_reasoning(text[:idx])
            self._phase = _ANSWER
            self._add_answer(text[idx + len(THINK_CLOSE):])
            return
        keep = _partial_suffix(text, THINK_CLOSE)
        if keep:
            self._pending = text[-keep:]
            text = text[:-keep]
        else:
            self._pending = ""
        self._add_reasoning(text)

    def _add_reasoning(self, text: str) -> None:
        if text:
            self._route_reasoning(text)
            self._reasoning.append(text)
            self._think_chunks += 1
            if self._t_first_text is None and not text.isspace():
                self._t_first_text = self.clock()

    def _add_answer(self, text: str) -> None:
        if not text:
            return
        self._route_content(text)
        self._answer_chars += len(text)
        if len(self._head) < self.head_chars:
            self._head += text[: self.head_chars - len(self._head)]
        if self._t_answer is None and not text.isspace():
            self._t_answer = self.clock()

    # ------------------------------------------------------------------ result

    def finish(
        self,
        finish_reason: str | None = None,
        *,
        completion_tokens: int | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> Decision:
        """The decision for everything fed so far (``finish_reason`` as the server reported it)."""
        now = self.clock()
        self._flush_pending()
        reasoning = "".join(self._reasoning)
        head, answer_chars = self._head, self._answer_chars
        closed = self._phase == _ANSWER or (self._field_mode and answer_chars > 0)
        t_decision = self._t_answer
        if self._phase == _THINK and not self._field_mode:
            # The block never closed.
            truncated = finish_reason == "length" and (self._explicit_open or self.hint is True)
            if not truncated:  # the model answered inside the block: it is the answer
                head, answer_chars = reasoning[: self.head_chars], len(reasoning)
                reasoning, t_decision, closed = "", self._t_first_text, True
        elif self._phase == _START:  # nothing but whitespace
            closed = True
        cot = bool(reasoning.strip())
        refused = bool(head.strip()) and self.judge.is_refusal(head)
        if not self.streaming:
            t_decision = now
        elif not closed:
            t_decision = None
        self.reasoning_text, self.answer_head = reasoning, head
        think_tokens, method = self._think_tokens(reasoning, cot, answer_chars, completion_tokens, count_tokens)
        return Decision(
            path=DecisionPath.of(refused, cot),
            refused=refused,
            think_tokens=think_tokens,
            think_tokens_method=method,
            reasoning_chars=len(reasoning),
            answer_chars=answer_chars,
            think_closed=closed,
            time_to_decision_s=None if t_decision is None else max(0.0, t_decision - self.t0),
        )

    def _think_tokens(self, reasoning: str, cot: bool, answer_chars: int, completion_tokens: int | None,
                      count_tokens: Callable[[str], int] | None) -> tuple[int, str]:
        if count_tokens is not None:
            return (count_tokens(reasoning) if cot else 0), "tokenizer"
        if self.streaming:
            return (self._think_chunks if cot else 0), "stream_chunks"
        if completion_tokens is not None:
            total = len(reasoning) + answer_chars
            return (round(completion_tokens * len(reasoning) / total) if cot and total else 0), "usage_ratio"
        return (math.ceil(len(reasoning) / 4) if cot else 0), "chars_div_4"


def analyze(
    text: str | None = None,
    reasoning: str | None = None,
    *,
    judge: RefusalJudge | None = None,
    starts_in_think: bool | None = None,
    finish_reason: str | None = None,
    completion_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> Decision:
    """Analyse a whole response: ``text`` (content) and optionally a separate ``reasoning`` field."""
    tracker = DecisionTracker(judge, starts_in_think=starts_in_think, streaming=False)
    tracker.feed(text, reasoning)
    return tracker.finish(finish_reason, completion_tokens=completion_tokens, count_tokens=count_tokens)


def split_think(text: str, *, starts_in_think: bool | None = None,
                finish_reason: str | None = None) -> tuple[str, str, bool]:
    """``(reasoning, answer, think_closed)`` of a whole text, by the rules of :class:`DecisionTracker`."""
    tracker = DecisionTracker(starts_in_think=starts_in_think, streaming=False, head_chars=len(text) + 1)
    tracker.feed(text)
    decision = tracker.finish(finish_reason)
    return tracker.reasoning_text, tracker.answer_head, decision.think_closed


def prompt_starts_in_think(prompt: str) -> bool:
    """Whether a raw completion prompt leaves the model inside an open think block."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)
