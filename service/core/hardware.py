"""What this host computes natively, for the choices that depend on it: vLLM's ``--dtype``
(``service.vllm_server.vllm_dtype``) and the training stages' bf16 autocast (``mixed_precision: auto``)."""

from __future__ import annotations

from pathlib import Path


def native_bf16() -> bool:
    """Whether this host computes bf16 natively: a CUDA device, or a CPU with AVX512-BF16 or AMX."""
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:  # pragma: no cover - torch comes with vLLM
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # pragma: no cover - not Linux
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_bf16(mixed_precision: str) -> bool:
    """Whether a training stage runs under bf16 autocast: ``bf16`` always, ``auto`` where bf16 is native (there
    it is faster; emulated, slower), ``no`` never."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and native_bf16())
