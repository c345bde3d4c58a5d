"""CoT-ON/OFF rendering, pre-CoT positions and the serving template on real chat templates.

The three families: SmolLM2's own tokenizer (plain), and SmolLM2's tokenizer given the real
DeepSeek-R1-Distill-Qwen and Qwen3 chat templates and special tokens stored in
tests/fixtures/templates/ (taken from the models' tokenizer_config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import jinja2.meta
import jinja2.sandbox
import pytest
from transformers import AddedToken, AutoTokenizer

from service.core import cot
from service.core.cot import NoChatTemplateError, TemplateFamily

FIXTURES = Path(__file__).parent / "fixtures" / "templates"
FAMILIES = {"smollm2": TemplateFamily.PLAIN, "deepseek_r1_distill_qwen": TemplateFamily.DEEPSEEK_R1,
            "qwen3": TemplateFamily.QWEN3}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
CHATML_PROMPT = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                 "<|im_start|>assistant\n")
PROMPTS = {  # the prompt up to the assistant header, per family
    "smollm2": CHATML_PROMPT,
    "qwen3": CHATML_PROMPT,
    "deepseek_r1_distill_qwen": "<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is 2+2?<｜Assistant｜>",
}
HEADERS = {"smollm2": "<|im_start|>assistant\n", "qwen3": "<|im_start|>assistant\n",
           "deepseek_r1_distill_qwen": "<｜Assistant｜>"}
END_OF_TURN = {"smollm2": "<|im_end|>\n", "qwen3": "<|im_end|>\n", "deepseek_r1_distill_qwen": "<｜end▁of▁sentence｜>"}


def family_tokenizer(smollm2_dir: Path, name: str):
    """SmolLM2's real tokenizer, given a family's real chat template and special tokens."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    if name == "smollm2":
        return tok
    spec = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    tok.add_tokens([AddedToken(t["content"], special=t["special"], normalized=False) for t in spec["added_tokens"]])
    for key in ("bos_token", "eos_token", "pad_token"):
        setattr(tok, key, spec[key])
    tok.chat_template = spec["chat_template"]
    return tok


@pytest.fixture(scope="module")
def tokenizers(smollm2_dir):
    return {name: family_tokenizer(smollm2_dir, name) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_family_is_detected_by_rendering(tokenizers, name):
    assert cot.detect_family(tokenizers[name]) is FAMILIES[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_prompts_end_with_think_open_or_empty_think_block(tokenizers, name):
    tok = tokenizers[name]
    assert cot.render_prompt(tok, MESSAGES, cot=True) == PROMPTS[name] + "<think>\n"
    assert cot.render_prompt(tok, MESSAGES, cot=False) == PROMPTS[name] + "<think>\n\n</think>\n\n"


def test_templates_own_switches_are_kept(tokenizers):
    """DeepSeek-R1's own generation prompt is CoT-ON; Qwen3's enable_thinking=False is CoT-OFF."""
    ds, qwen = tokenizers["deepseek_r1_distill_qwen"], tokenizers["qwen3"]
    assert cot.render_prompt(ds, MESSAGES, cot=True) == ds.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True)
    assert cot.render_prompt(qwen, MESSAGES, cot=False) == qwen.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    # Qwen3 leaves "<think>" to the model when thinking; the product pre-fills it.
    assert qwen.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == CHATML_PROMPT


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("on", [True, False])
def test_pre_cot_positions_cover_assistant_header_through_think(tokenizers, name, on):
    tok = tokenizers[name]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, *MESSAGES[1:]]
    prompt = cot.render_prompt(tok, messages, cot=on)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    positions = cot.pre_cot_positions(tok, messages, cot=on)
    assert positions == list(range(positions[0], positions[-1] + 1))
    assert tok.decode([ids[i] for i in positions]) == HEADERS[name] + "<think>"
    # the generation header, after the last user turn (not the earlier assistant turn's header)
    assert "What is 2+2?" in tok.decode(ids[:positions[0]])
    assert tok.decode(ids[positions[-1] + 1:]) == ("\n" if on else "\n\n</think>\n\n")


def test_pre_cot_positions_with_bpe_merge_across_the_header(tokenizers):
    """A plain template whose header merges with the preceding text ("re" + "assistant:" -> "Ġreass"):
    the merged token is included, so the span never starts mid-token."""
    tok = tokenizers["smollm2"]
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    messages = [{"role": "user", "content": "re"}]
    prompt = cot.render_prompt(tok, messages, cot=True, chat_template=template)
    assert prompt == "user: reassistant:<think>\n"
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    positions = cot.pre_cot_positions(tok, messages, chat_template=template)
    assert tok.convert_ids_to_tokens(enc["input_ids"][positions[0]]) == "Ġreass"
    assert tok.decode([enc["input_ids"][i] for i in positions]) == " reassistant:<think>"
    # counting the tokens of the text before the header would point one token too far
    assert len(tok("user: re", add_special_tokens=False)["input_ids"]) == positions[0] + 1


@pytest.mark.parametrize("name", FAMILIES)
def test_serving_template_switch(tokenizers, name):
    tok = tokenizers[name]
    template = cot.serving_chat_template(tok)

    def render(**kwargs):
        return tok.apply_chat_template(MESSAGES, chat_template=template, tokenize=False,
                                       add_generation_prompt=True, **kwargs)

    assert render() == render(enable_thinking=True) == PROMPTS[name] + "<think>\n"
    assert render(enable_thinking=False) == PROMPTS[name] + "<think>\n\n</think>\n\n"
    # vLLM forwards only chat_template_kwargs the template reads
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    assert "enable_thinking" in jinja2.meta.find_undeclared_variables(env.parse(template))


@pytest.mark.parametrize("name", FAMILIES)
def test_serving_template_leaves_full_conversations_unchanged(tokenizers, name):
    tok = tokenizers[name]
    conversation = [*MESSAGES, {"role": "assistant", "content": "4."}]
    assert tok.apply_chat_template(conversation, chat_template=cot.serving_chat_template(tok),
                                   tokenize=False) == tok.apply_chat_template(conversation, tokenize=False)


def test_serving_template_through_vllm_renderer(tokenizers, tmp_path):
    """vLLM's own chat renderer (the code its server runs) applies the --chat-template file's switch."""
    from vllm.renderers.chat_utils import load_chat_template
    from vllm.renderers.hf import _detect_content_format, safe_apply_chat_template

    tok = tokenizers["smollm2"]
    path = tmp_path / "presafe.jinja"
    path.write_text(cot.serving_chat_template(tok), encoding="utf-8")
    template = load_chat_template(path)
    assert _detect_content_format(template, default="openai") == "string"

    def render(**kwargs):
        return safe_apply_chat_template(None, tok, MESSAGES, chat_template=template, tokenize=False,
                                        add_generation_prompt=True, **kwargs)

    assert render() == CHATML_PROMPT + "<think>\n"
    assert render(enable_thinking=False) == CHATML_PROMPT + "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("name", FAMILIES)
def test_render_example(tokenizers, name):
    tok = tokenizers[name]
    on = cot.render_example(tok, MESSAGES, "\n\nIt is 4.", cot=True, reasoning="\n2 plus 2 is 4.\n")
    off = cot.render_example(tok, MESSAGES, "I can't help with that.", cot=False)
    assert on.prompt == cot.render_prompt(tok, MESSAGES, cot=True)
    assert on.completion == "2 plus 2 is 4.\n</think>\n\nIt is 4." + END_OF_TURN[name]
    assert off.text == PROMPTS[name] + "<think>\n\n</think>\n\nI can't help with that." + END_OF_TURN[name]
    with pytest.raises(ValueError):
        cot.render_example(tok, MESSAGES, "x", cot=False, reasoning="thought")


def test_examples_match_qwen3_own_rendering_of_the_conversation(tokenizers):
    """Qwen3's template renders a finished turn with its think block exactly as our training text."""
    tok = tokenizers["qwen3"]
    for reasoning, answer, on in (("2 plus 2 is 4.", "It is 4.", True), ("", "I can't help with that.", False)):
        ours = cot.render_example(tok, MESSAGES, answer, cot=on, reasoning=reasoning or None).text
        conversation = [*MESSAGES, {"role": "assistant", "content": answer, "reasoning_content": reasoning}]
        assert ours == tok.apply_chat_template(conversation, tokenize=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_example(tokenizers, name):
    tok = tokenizers[name]
    enc = cot.encode_example(tok, MESSAGES, "It is 4.", cot=True, reasoning="2 plus 2 is 4.")
    text = cot.render_example(tok, MESSAGES, "It is 4.", cot=True, reasoning="2 plus 2 is 4.")
    assert enc.input_ids[:enc.prompt_length] == tok(text.prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(enc.input_ids[enc.prompt_length:]) == text.completion
    assert enc.labels[:enc.prompt_length] == [-100] * enc.prompt_length
    assert enc.labels[enc.prompt_length:] == enc.input_ids[enc.prompt_length:]
    assert enc.pre_cot_positions == cot.pre_cot_positions(tok, MESSAGES, cot=True)


def test_split_reasoning_inverts_the_completion():
    assert cot.split_reasoning("<think>\nStep 1.\n</think>\n\nDone.") == ("Step 1.", "Done.")
    assert cot.split_reasoning("Step 1.\n</think>\n\nDone.") == ("Step 1.", "Done.")
    assert cot.split_reasoning("\n</think>\n\nNo.") == ("", "No.")
    assert cot.split_reasoning("Just an answer.") == (None, "Just an answer.")


def test_no_chat_template_is_a_clear_error(smollm2_dir, tokenizers):
    tok = family_tokenizer(smollm2_dir, "smollm2")
    template = tok.chat_template
    tok.chat_template = None
    with pytest.raises(NoChatTemplateError, match="no chat template") as err:
        cot.render_prompt(tok, MESSAGES, cot=True)
    assert isinstance(err.value, ValueError)
    with pytest.raises(NoChatTemplateError):
        cot.serving_chat_template(tok)
    assert cot.render_prompt(tok, MESSAGES, cot=True, chat_template=template) == CHATML_PROMPT + "<think>\n"


def test_family_override_and_bad_input(tokenizers):
    tok = tokenizers["smollm2"]
    # forcing "qwen3" trusts the template's own enable_thinking=False output (SmolLM2 has none)
    assert cot.render_prompt(tok, MESSAGES, cot=False, family="qwen3") == CHATML_PROMPT
    # treating Qwen3 as plain strips its own empty think block instead of doubling it
    qwen = tokenizers["qwen3"]
    assert cot.render_prompt(qwen, MESSAGES, cot=False, family="plain") == CHATML_PROMPT + "<think>\n\n</think>\n\n"
    with pytest.raises(ValueError):
        cot.render_prompt(tok, MESSAGES, cot=True, family="llama")
    with pytest.raises(ValueError, match="assistant"):
        cot.render_prompt(tok, [*MESSAGES, {"role": "assistant", "content": "4"}], cot=True)


def test_template_text_from_file_or_text(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert cot.template_text(str(path)) == "{{ messages[0]['content'] }}"
    assert cot.template_text("{% for m in messages %}{{ m.content }}{% endfor %}").startswith("{%")
    with pytest.raises(NoChatTemplateError, match="neither a file nor Jinja template text"):
        cot.template_text(str(tmp_path / "missing.jinja"))
