"""Request schemas: the public fields of each route, type-checked.

The declared top-level fields are the public allowlist (:func:`forbidden_field`): any other field is a
400 naming it, unless the operator allows it (``PRESAFE_EXTRA_REQUEST_FIELDS``). Left out on purpose:
what switches off or pre-fills the CoT opening or forbids a refusal (``add_generation_prompt``,
``continue_final_message``, ``chat_template``, ``logit_bias``, ``bad_words``, ``allowed_token_ids``,
``structured_outputs``, ``guided_*``, ``response_format``, tools), and what defeats the budgets
(``ignore_eos``, ``min_tokens``, ``best_of``, ``prompt_logprobs``). ``chat_template_kwargs`` may carry
only ``enable_thinking`` (the CoT switch the adapter is trained and evaluated with).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

PosInt = Annotated[StrictInt, Field(ge=1)]
Number = StrictInt | StrictFloat


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None


class ChatTemplateKwargs(_Open):
    enable_thinking: StrictBool | None = None


class StreamOptions(_Open):
    include_usage: StrictBool | None = None


class _Sampling(_Open):
    model: StrictStr = Field(min_length=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: PosInt | None = None
    n: PosInt | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    user: StrictStr | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PosInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None

    def prefill_index(self) -> int | None:
        """The index of a last message written as the assistant (a pre-filled answer), else None."""
        return len(self.messages) - 1 if self.messages[-1].role == "assistant" else None

    def prompt_text(self) -> str:
        """The last user message's text (what the prompt classifier reads)."""
        for msg in reversed(self.messages):
            if msg.role == "user":
                if isinstance(msg.content, str):
                    return msg.content
                return "\n".join(p.text for p in msg.content or [] if p.text)
        return ""


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (a string prompt, a list of strings, or token ids)."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool | None = None
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None

    def prompt_count(self) -> int:
        """How many prompts: a list of strings or of token-id lists counts each, else one."""
        if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int):
            return len(self.prompt)
        return 1

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return ""


CHAT_TEMPLATE_KWARGS = frozenset({"enable_thinking"})


def public_fields(schema: type[BaseModel]) -> frozenset[str]:
    return frozenset(schema.model_fields)


def forbidden_field(body: dict, schema: type[BaseModel], extra: frozenset[str] = frozenset()) -> str | None:
    """The first field of ``body`` outside the public allowlist (plus ``extra``), as a dotted name, or None.

    ``extra`` may name top-level fields (``ignore_eos``) or ``chat_template_kwargs`` keys
    (``chat_template_kwargs.reasoning_effort``).
    """
    allowed = public_fields(schema)
    for key in body:
        if key not in allowed and key not in extra:
            return key
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, dict) and "chat_template_kwargs" not in extra:
        for key in kwargs:
            if key not in CHAT_TEMPLATE_KWARGS and f"chat_template_kwargs.{key}" not in extra:
                return f"chat_template_kwargs.{key}"
    return None


def _inline(node: Any, defs: dict) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def openapi_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` declaring ``model`` as the JSON body (the route parses the body itself)."""
    schema = model.model_json_schema()
    schema = _inline(schema, schema.pop("$defs", {}))
    schema["additionalProperties"] = False  # the public allowlist (the operator may extend it)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
