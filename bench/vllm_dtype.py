"""vLLM's output tokens/s with ``--dtype float32`` against ``bfloat16`` on this host (one run, same prompts).

On a CPU without native bf16 (AVX2 only), vLLM emulates bf16: measured here for SmolLM2-135M-Instruct,
24 against 97 tok/s at 32 streams (10 against 13 single-stream), hence ``service.vllm_server.vllm_dtype``.

    python bench/vllm_dtype.py                       # both dtypes, concurrency 1 and 32
    python bench/vllm_dtype.py --dtypes float32 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx


async def _tokens_per_s(url: str, concurrency: int, max_tokens: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int) -> int:
            resp = await client.post("/v1/completions", json={
                "model": "m", "prompt": f"Question {i}: how do plants grow? Answer:", "max_tokens": max_tokens,
                "ignore_eos": True, "temperature": 0})
            resp.raise_for_status()
            return resp.json()["usage"]["completion_tokens"]

        await one(-1)  # warm-up
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(concurrency))))
        return tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model (default: PRESAFE_BASE_MODEL)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from service.core.assets import resolve_model
    from service.core.settings import get_settings
    from service.vllm_server import EmbeddedPlan, VLLMSupervisor, free_port, native_bf16

    settings = get_settings()
    model = resolve_model(args.model or settings.base_model)
    print(f"native bf16 on this host: {native_bf16()}", file=sys.stderr)
    results: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            plan = EmbeddedPlan(model=model, served_name="m", port=free_port(), lora=False, max_model_len=2048,
                                dtype=dtype)
            supervisor = VLLMSupervisor(plan, settings, Path(tmp) / f"vllm-{dtype}.log", max_restarts=0)
            supervisor.start()
            try:
                asyncio.run(supervisor.wait_ready(settings.vllm_startup_timeout_s))
                results[dtype] = {c: asyncio.run(_tokens_per_s(plan.url, c, args.max_tokens))
                                  for c in args.concurrency}
            finally:
                supervisor.stop()
    print("| concurrency | " + " | ".join(args.dtypes) + " |")
    print("|---|" + "---|" * len(args.dtypes))
    for c in args.concurrency:
        print(f"| {c} | " + " | ".join(f"{results[d][c]:.1f} tok/s" for d in args.dtypes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
