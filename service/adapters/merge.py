"""A LoRA adapter merged into its base model's weights: a plain model vLLM serves without ``--enable-lora``
(the promoted adapter's fast path, :mod:`service.engines`; ``presafe train merge`` by hand).

``merge_adapter`` loads the base in float32, applies the adapter with PEFT, folds it in
(``merge_and_unload``) and saves the result in the dtype vLLM serves the base with (``service.vllm_server.vllm_dtype``;
for ``auto``, vLLM's own pick: a float32 base is served in bfloat16 on this CPU), with the tokenizer and the chat
template the adapter was trained with (its ``chat_template.jinja``, else the base model's own), written atomically
with a manifest of checksums.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.adapters.store import AdapterInvalid, adapter_base_model, check_adapter
from service.core.assets import (
    MANIFEST,
    atomic_dir,
    resolve_model,
    sha256_file,
    verify_manifest,
    write_manifest,
)
from service.core.formats import ADAPTER_CHAT_TEMPLATE, ADAPTER_WEIGHTS

MERGED_KIND = "merged-lora"


class MergeError(RuntimeError):
    """The adapter or its base cannot be merged; the message says why."""


def serving_dtype(dtype: str | None, base_config: Any) -> str:
    """A torch dtype name: ``dtype`` as given, ``auto``/None → the serving dtype (``vllm_dtype``), and where that
    is ``auto`` what vLLM's ``auto`` loads the base in (:func:`vllm_auto_dtype`)."""
    if dtype in (None, "auto"):
        from service.core.settings import get_settings
        from service.vllm_server import vllm_dtype

        dtype = vllm_dtype(get_settings())
    if dtype == "auto":
        own = getattr(base_config, "torch_dtype", None)
        dtype = vllm_auto_dtype(str(own).removeprefix("torch.") if own is not None else "float32")
    return {"half": "float16", "float": "float32"}.get(dtype, dtype)


def vllm_auto_dtype(own: str) -> str:
    """The dtype vLLM's ``--dtype auto`` serves a model saved in ``own`` with, on this host: a float32 model
    downcast to the platform's first supported dtype (bfloat16 on a CPU or an Ampere-or-newer GPU), any other
    kept where the platform supports it (vLLM's ``_resolve_auto_dtype``). A merge saved in float32 would be
    downcast at every load and take twice the disk."""
    try:
        from vllm.platforms import current_platform

        supported = [str(d).removeprefix("torch.") for d in current_platform.supported_dtypes]
    except Exception:  # noqa: BLE001 - no vLLM here: what it picks on every CPU and recent GPU
        supported = ["bfloat16", "float16", "float32"]
    return supported[0] if own == "float32" or own not in supported else own


def merge_adapter(adapter_dir: Path | str, base_model: str | None, out_dir: Path | str,
                  dtype: str | None = None, published: bool = True) -> dict:
    """Merge the LoRA adapter at ``adapter_dir`` into ``base_model`` (default: the base the adapter names) and
    save the merged model to ``out_dir`` (replaced atomically) in ``dtype`` (default: the serving dtype).
    Returns the written manifest. Raises :class:`MergeError` for an adapter or base that cannot be merged.
    ``published=False``: a training run's adapter, without the store's manifest (the pipeline's eval)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    try:
        adapter_manifest = check_adapter(adapter_dir) if published else {}
    except AdapterInvalid as exc:
        raise MergeError(f"{adapter_dir} is not a loadable LoRA adapter: {exc}") from None
    base_model = base_model or adapter_base_model(adapter_dir)
    if base_model is None:
        raise MergeError(f"{adapter_dir}: the adapter names no base model; pass the base model explicitly")
    base = resolve_model(base_model)
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise MergeError(f"base model {base!r} cannot be loaded: {exc}") from None
    dtype_name = serving_dtype(dtype, config)
    torch_dtype = getattr(torch, dtype_name, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise MergeError(f"unknown dtype {dtype_name!r}")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # merge at full precision
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as exc:
        raise MergeError(f"the adapter does not fit base model {base!r}: {exc}") from None
    merged = merged.to(torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(base)
    template = adapter_dir / ADAPTER_CHAT_TEMPLATE
    if template.is_file():  # the template the adapter was trained with, in place of the base's
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if tokenizer.chat_template and not (tmp / ADAPTER_CHAT_TEMPLATE).is_file():
            (tmp / ADAPTER_CHAT_TEMPLATE).write_text(tokenizer.chat_template, encoding="utf-8")
        manifest = write_manifest(tmp, kind=MERGED_KIND, base_model=base, dtype=dtype_name,
                                  adapter=str(adapter_dir), adapter_version=adapter_manifest.get("version"),
                                  adapter_sha256=sha256_file(adapter_dir / ADAPTER_WEIGHTS),
                                  chat_template="adapter" if template.is_file() else "base")
    return manifest


def merged_is_current(merged_dir: Path, adapter_dir: Path) -> bool:
    """Whether ``merged_dir`` holds an intact merge (its checksums hold) of exactly the adapter at ``adapter_dir``
    (the same weights file): a merged model is only ever served for the adapter it was made from."""
    try:
        manifest = json.loads((Path(merged_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("kind") != MERGED_KIND or verify_manifest(Path(merged_dir)):
        return False
    try:
        return manifest.get("adapter_sha256") == sha256_file(Path(adapter_dir) / ADAPTER_WEIGHTS)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """``python -m service.adapters.merge ADAPTER OUT [--base B] [--dtype D]``: the merge in a process of its own
    (the gateway never imports torch); prints the manifest as one JSON line, or the error on stderr (exit 1)."""
    parser = argparse.ArgumentParser(prog="python -m service.adapters.merge")
    parser.add_argument("adapter")
    parser.add_argument("out")
    parser.add_argument("--base", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args(argv)
    try:
        manifest = merge_adapter(args.adapter, args.base, args.out, args.dtype)
    except MergeError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through service.engines
    sys.exit(main())
