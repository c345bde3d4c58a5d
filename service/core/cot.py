"""Chain-of-thought (CoT) on/off rendering of chat prompts: the one home of the `<think>` conventions.

CoT-ON prompts end with the opening ``<think>\\n``; CoT-OFF prompts end with the empty think block
``<think>\\n\\n</think>\\n\\n`` (DESIGN.md §1). Three template families are handled, detected by
rendering the template rather than by model name:

- ``deepseek_r1``: the template itself opens ``<think>\\n`` after the assistant header
  (DeepSeek-R1-Distill); CoT-OFF closes the block right away.
- ``qwen3``: the template understands ``enable_thinking`` (Qwen3); CoT-OFF is the template's own
  switch, CoT-ON adds ``<think>\\n`` after the header when the template leaves it to the model.
- ``plain``: no think tags in the template (SmolLM2); the product adds them.

All rendering goes through :func:`serving_chat_template`, a Jinja template handed to vLLM
(``--chat-template``) that starts the answer with ``<think>\\n`` by default and with the empty think
block when a request passes ``chat_template_kwargs={"enable_thinking": false}``; training renders
with the same template, so served and trained prompts are the same text. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
COT_ON_PREFILL = "<think>\n"
COT_OFF_PREFILL = "<think>\n\n</think>\n\n"
_PROBE = "PRESAFE-PROBE-7f3a"

Messages = Sequence[Mapping[str, Any]]


class TemplateFamily(StrEnum):
    DEEPSEEK_R1 = "deepseek_r1"
    QWEN3 = "qwen3"
    PLAIN = "plain"


class NoChatTemplateError(ValueError):
    """The tokenizer has no chat template and none was given."""


@dataclass(frozen=True)
class RenderedExample:
    """A training example as text: ``prompt + completion`` is the full sequence."""

    prompt: str
    completion: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of a training example; prompt and completion are tokenized separately (as served)."""

    input_ids: list[int]
    prompt_length: int
    pre_cot_positions: list[int]

    @property
    def labels(self) -> list[int]:
        """``input_ids`` with the prompt masked out (-100) for the SFT loss."""
        return [-100] * self.prompt_length + self.input_ids[self.prompt_length:]


def get_chat_template(tokenizer, chat_template: str | None = None) -> str:
    """The explicit template, else the tokenizer's (its ``default`` one if it has several)."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise NoChatTemplateError(f"tokenizer {name!r} has no chat template; pass chat_template=")
    return template


def template_text(value: str) -> str:
    """A chat template given as a ``.jinja`` file path or as the template text itself → the text."""
    candidate = Path(value).expanduser()
    if "{" not in value and candidate.is_file():
        return candidate.read_text(encoding="utf-8")
    if "{" not in value:
        raise NoChatTemplateError(f"chat template {value!r} is neither a file nor Jinja template text")
    return value


def _render(tokenizer, template: str, messages: Messages, add_generation_prompt: bool, **kwargs) -> str:
    return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


def detect_family(tokenizer, chat_template: str | None = None) -> TemplateFamily:
    """Classify a chat template by rendering a probe conversation with and without ``enable_thinking``."""
    template = get_chat_template(tokenizer, chat_template)
    probe = [{"role": "user", "content": _PROBE}]
    on = _render(tokenizer, template, probe, True, enable_thinking=True)
    off = _render(tokenizer, template, probe, True, enable_thinking=False)
    if THINK_CLOSE in off and THINK_CLOSE not in on:
        return TemplateFamily.QWEN3
    if THINK_OPEN in _render(tokenizer, template, probe, True).rpartition(_PROBE)[2]:
        return TemplateFamily.DEEPSEEK_R1
    return TemplateFamily.PLAIN


def serving_chat_template(tokenizer, chat_template: str | None = None,
                          family: TemplateFamily | str | None = None) -> str:
    """A Jinja chat template (for vLLM ``--chat-template``) with the CoT switch ``enable_thinking``.

    It wraps the original template: its output is captured, a ``<think>\\n`` or empty think block
    the original put after the assistant header is removed, and ``<think>\\n`` (default, or
    ``enable_thinking`` true) or the empty think block (``enable_thinking`` false) is appended.
    For the ``qwen3`` family the original's own ``enable_thinking=false`` output is kept as is.
    Without a generation prompt the original's output is unchanged.
    """
    template = get_chat_template(tokenizer, chat_template)
    family = TemplateFamily(family) if family is not None else detect_family(tokenizer, template)
    keep_native_off = "{% elif presafe_off %}{{ presafe_chat }}" if family is TemplateFamily.QWEN3 else ""
    return (
        "{% set presafe_chat %}" + template + "{% endset %}"
        "{% set presafe_off = enable_thinking is defined and enable_thinking is false %}"
        "{% if not add_generation_prompt %}{{ presafe_chat }}" + keep_native_off + "{% else %}"
        f"{{% if presafe_chat.endswith({COT_OFF_PREFILL!r}) %}}{{{{ presafe_chat[:{-len(COT_OFF_PREFILL)}] }}}}"
        f"{{% elif presafe_chat.endswith({COT_ON_PREFILL!r}) %}}{{{{ presafe_chat[:{-len(COT_ON_PREFILL)}] }}}}"
        "{% else %}{{ presafe_chat }}{% endif %}"
        f"{{{{ {COT_OFF_PREFILL!r} if presafe_off else {COT_ON_PREFILL!r} }}}}"
        "{% endif %}"
    )


def _check_prompt_messages(messages: Messages) -> None:
    if not messages:
        raise ValueError("messages must not be empty")
    if messages[-1].get("role") == "assistant":
        raise ValueError("the last message must not be an assistant turn: the prompt ends where it starts")


def render_prompt(tokenizer, messages: Messages, cot: bool, chat_template: str | None = None,
                  family: TemplateFamily | str | None = None) -> str:
    """The prompt text that ends where generation starts: with ``<think>\\n`` (CoT-ON) or the empty
    think block (CoT-OFF). Raises :class:`NoChatTemplateError` if there is no template."""
    _check_prompt_messages(messages)
    template = serving_chat_template(tokenizer, chat_template, family)
    return _render(tokenizer, template, messages, True, enable_thinking=cot)


def _end_of_turn(tokenizer, template: str, messages: Messages) -> str:
    """What the template writes after an assistant message's content (e.g. ``<|im_end|>\\n``)."""
    rendered = _render(tokenizer, template, [*messages, {"role": "assistant", "content": _PROBE}], False)
    if _PROBE in rendered:
        return rendered.rpartition(_PROBE)[2]
    return tokenizer.eos_token or ""


def render_example(tokenizer, messages: Messages, answer: str, *, cot: bool, reasoning: str | None = None,
                   chat_template: str | None = None, family: TemplateFamily | str | None = None
                   ) -> RenderedExample:
    """A training example: the :func:`render_prompt` prompt and the assistant target after it.

    CoT-ON targets are ``reasoning + "\\n</think>\\n\\n" + answer + end-of-turn`` (the prompt already
    opened ``<think>\\n``); CoT-OFF targets are ``answer + end-of-turn``. Leading/trailing newlines of
    ``reasoning`` and leading newlines of ``answer`` are dropped so the layout is always the same.
    """
    if not cot and reasoning:
        raise ValueError("a CoT-OFF example has no reasoning")
    template = get_chat_template(tokenizer, chat_template)
    prompt = render_prompt(tokenizer, messages, cot, template, family)
    body = answer.lstrip("\n")
    if cot:
        body = (reasoning or "").strip("\n") + "\n" + THINK_CLOSE + "\n\n" + body
    return RenderedExample(prompt, body + _end_of_turn(tokenizer, template, messages))


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split generated text into (reasoning, answer) at the last ``</think>``; reasoning is None if
    there is no ``</think>``. The inverse of a :func:`render_example` completion (minus end-of-turn)."""
    if THINK_CLOSE not in text:
        return None, text
    reasoning, _, answer = text.rpartition(THINK_CLOSE)
    reasoning = reasoning.removeprefix(COT_ON_PREFILL).removeprefix(THINK_OPEN)
    return reasoning.strip("\n"), answer.lstrip("\n")


def _pre_cot_char_span(tokenizer, messages: Messages, prompt: str, template: str) -> tuple[int, int]:
    base = _render(tokenizer, template, messages, False)
    start = len(base) if prompt.startswith(base) else len(_common_prefix(base, prompt))
    end = prompt.rfind(THINK_OPEN)
    if end < start:
        raise ValueError("no opening <think> after the assistant header in the rendered prompt")
    return start, end + len(THINK_OPEN)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _token_positions(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens overlapping characters [start, end) (a BPE merge across either edge
    pulls the whole token in)."""
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


def pre_cot_positions(tokenizer, messages: Messages, cot: bool = True, chat_template: str | None = None,
                      family: TemplateFamily | str | None = None) -> list[int]:
    """Token positions, in ``tokenizer(render_prompt(...), add_special_tokens=False)``, of the pre-CoT
    span: from the start of the assistant header (``<|im_start|>assistant\\n``, ``<｜Assistant｜>``)
    through the opening ``<think>``. Needs a fast tokenizer (offset mapping)."""
    template = get_chat_template(tokenizer, chat_template)
    prompt = render_prompt(tokenizer, messages, cot, template, family)
    start, end = _pre_cot_char_span(tokenizer, messages, prompt, template)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    return _token_positions(enc["offset_mapping"], start, end)


def encode_example(tokenizer, messages: Messages, answer: str, *, cot: bool, reasoning: str | None = None,
                   chat_template: str | None = None, family: TemplateFamily | str | None = None
                   ) -> EncodedExample:
    """Tokenize a :func:`render_example` (prompt and completion separately, no added special tokens,
    as vLLM does for chat) with the prompt's pre-CoT positions."""
    template = get_chat_template(tokenizer, chat_template)
    example = render_example(tokenizer, messages, answer, cot=cot, reasoning=reasoning,
                             chat_template=template, family=family)
    enc = tokenizer(example.prompt, add_special_tokens=False, return_offsets_mapping=True)
    start, end = _pre_cot_char_span(tokenizer, messages, example.prompt, template)
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    prompt_ids = list(enc["input_ids"])
    return EncodedExample(prompt_ids + list(completion_ids), len(prompt_ids),
                          _token_positions(enc["offset_mapping"], start, end))
