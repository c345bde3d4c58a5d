"""The shared vLLM fixture serves the tiny model through the official openai client."""

import openai
import pytest

pytestmark = pytest.mark.vllm


def test_tiny_model_is_served(vllm_server):
    client = openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="x")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0)
    assert out.usage.completion_tokens > 0
