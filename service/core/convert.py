"""GGUF → plain Hugging Face model directory (fp32 safetensors, tokenizer, chat template)."""

from __future__ import annotations

from pathlib import Path


def load_gguf(gguf: Path):
    """Load (model, tokenizer) from a GGUF file with transformers' own dequantiser."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tokenizer


def gguf_to_hf(gguf: Path, out_dir: Path) -> None:
    """Dequantise ``gguf`` and save it as a safetensors model dir that transformers and vLLM load."""
    model, tokenizer = load_gguf(gguf)
    # The weights are already dequantised in memory; drop the GGUF marker so they save as plain fp32.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = out_dir.name
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
