"""An adapter served through vLLM's LoRA path against the same adapter merged into the base weights (#17).

One vLLM at a time, each started as the embedded mode plans it (``service.vllm_server.EmbeddedPlan`` and
``VLLMSupervisor``), all with the same CoT serving template rendered from the base:

    base          the base model, no ``--enable-lora`` (the reference)
    lora          base + the adapter through LoRA, the current settings (``--max-loras`` and ``--max-lora-rank``
                  as ``plan_embedded`` computes them for one adapter)
    lora-1-exact  the same with ``--max-loras 1`` and ``--max-lora-rank`` = the adapter's exact rank
    merged        the adapter merged into the base (``service.adapters.merge``), served as its own model, no LoRA

Streamed chat, ``--max-tokens`` tokens each (``ignore_eos``), at each concurrency: output tokens/s and median
time to first token, rounds alternating the models an engine serves (a LoRA engine also serves the base:
the same-engine pair the issue measured), and the ratio against the ``base`` engine. The engines cannot run
side by side here, so the ratio against ``base`` pairs runs minutes apart: the same-engine ratio shows
the LoRA cost without that drift.

Agreement: greedy chat on ``--agreement`` prompts of the pool's eval split, ``--agreement-tokens`` tokens each,
on the first LoRA engine and the merged one: the share of identical texts (the same first tokens) and the
share with the same decision path (``service.core.decision.analyze``, as the eval reads a response).

Targets: ``merged`` at >= 0.95x the base's tokens/s at every concurrency, median TTFT within +5 ms, and the
same decision path on >= 98% of the prompts. Exits 1 on a miss (``--report-only``: 0).

    python bench/lora_vs_merged.py --adapter ~/adapters/presafe-smollm2-v1 --lock /tmp/vllm-tests.lock
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import run_batch

CONFIGS = ("base", "merged", "lora", "lora-1-exact")  # merged right after base: the pair that matters most
MIN_RATIO, MAX_ADDED_MS, MIN_AGREEMENT = 0.95, 5.0, 0.98


@contextlib.contextmanager
def locked(path: Path | None) -> Iterator[None]:
    """Hold ``flock`` on ``path`` (the same lock as ``flock(1)``), so engines never overlap other vLLM users."""
    if path is None:
        yield
        return
    with open(path, "a") as fh:
        t0 = time.monotonic()
        fcntl.flock(fh, fcntl.LOCK_EX)
        if time.monotonic() - t0 > 1:
            print(f"  waited {time.monotonic() - t0:.0f}s for {path}", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def agreement_prompts(pool: Path, n: int, split: str = "val", seed: int = 0) -> list[str]:
    """A fixed seeded sample of ``n`` prompts of the pool's ``split`` (all splits when it has none)."""
    from training.data import iter_pool, seeded_sample

    records = list(iter_pool(pool))
    chosen = [r for r in records if r.split == split] or records
    return [r.prompt for r in seeded_sample(chosen, n, seed)]


async def generate(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int = 8) -> list[dict]:
    """Greedy non-streamed chat on each prompt: [{"text", "finish_reason", "tokens"}] in prompt order."""
    out: list[dict | None] = [None] * len(prompts)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int) -> None:
            async with sem:
                resp = await client.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": prompts[i]}],
                    "max_tokens": max_tokens, "temperature": 0, "seed": 0})
                resp.raise_for_status()
                body = resp.json()
                choice = body["choices"][0]
                out[i] = {"text": choice["message"].get("content") or "", "finish_reason": choice["finish_reason"],
                          "tokens": body["usage"]["completion_tokens"]}

        await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return out  # type: ignore[return-value]


def agreement(a: list[dict], b: list[dict], starts_in_think: bool | None) -> dict:
    """Share of identical texts and of the same decision path between two runs over the same prompts."""
    from service.core.decision import analyze

    def path(r: dict) -> str:
        return str(analyze(r["text"], starts_in_think=starts_in_think, finish_reason=r["finish_reason"],
                           completion_tokens=r["tokens"]).path)

    same_text = sum(x["text"] == y["text"] for x, y in zip(a, b))
    same_path = sum(path(x) == path(y) for x, y in zip(a, b))
    return {"prompts": len(a), "identical": round(same_text / len(a), 4), "same_path": round(same_path / len(a), 4)}


async def measure(url: str, models: list[str], concurrencies: list[int], rounds: int, max_tokens: int,
                  warmup: int) -> list[dict]:
    """Rounds alternating ``models`` (order rotated every round) at each concurrency: mean tok/s, median TTFT."""
    for model in models:
        await run_batch(url, model, warmup, min(warmup, 4), max_tokens)
    rows = []
    for c in concurrencies:
        n = max(8, 2 * c)
        tps: dict[str, list[float]] = {m: [] for m in models}
        ttft: dict[str, list[float]] = {m: [] for m in models}
        for r in range(rounds):
            for model in models[r % len(models):] + models[:r % len(models)]:
                rate, samples = await run_batch(url, model, n, c, max_tokens)
                tps[model].append(rate)
                ttft[model] += [s.ttft for s in samples]
            print(f"  c={c} round {r + 1}/{rounds}: " + ", ".join(f"{m} {tps[m][-1]:.1f} tok/s" for m in models),
                  file=sys.stderr, flush=True)
        rows += [{"model": m, "concurrency": c, "tok_s": round(statistics.mean(tps[m]), 2),
                  "ttft_p50_ms": round(1000 * statistics.median(ttft[m]), 1), "rounds": rounds,
                  "requests_per_round": n} for m in models]
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's tokens/s ratio and added median TTFT against the ``base`` engine's base row (same concurrency),
    and a LoRA engine's adapter row also against the base served by the same engine."""
    ref = {r["concurrency"]: r for r in rows if r["config"] == "base" and r["model"] == "base"}
    same = {(r["config"], r["concurrency"]): r for r in rows if r["model"] == "base"}
    for r in rows:
        b = ref.get(r["concurrency"])
        if b is not None:
            r["ratio"] = round(r["tok_s"] / b["tok_s"], 3)
            r["added_ttft_ms"] = round(r["ttft_p50_ms"] - b["ttft_p50_ms"], 1)
        s = same.get((r["config"], r["concurrency"]))
        if s is not None and s is not r:
            r["ratio_same_engine"] = round(r["tok_s"] / s["tok_s"], 3)
    return rows


def missed_targets(rows: list[dict], agreements: dict, min_ratio: float = MIN_RATIO,
                   max_added_ms: float = MAX_ADDED_MS, min_agreement: float = MIN_AGREEMENT) -> list[str]:
    """What the merged model misses: its ratio and added TTFT against the base, its decision-path agreement."""
    missed = []
    for r in rows:
        if r["config"] != "merged" or "ratio" not in r:
            continue
        if r["ratio"] < min_ratio:
            missed.append(f"merged c={r['concurrency']}: tokens/s ratio {r['ratio']:.3f} < {min_ratio}")
        if r["added_ttft_ms"] > max_added_ms:
            missed.append(f"merged c={r['concurrency']}: added median TTFT {r['added_ttft_ms']:.1f} ms "
                          f"> {max_added_ms:g} ms")
    for name, a in agreements.items():
        if a["same_path"] < min_agreement:
            missed.append(f"{name}: same decision path on {a['same_path']:.1%} < {min_agreement:.0%}")
    return missed


def table(rows: list[dict]) -> str:
    lines = [("| config | model | concurrency | output tok/s | TTFT p50 | ratio vs base | TTFT vs base "
             "| ratio vs base on the same engine |"), "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["concurrency"], CONFIGS.index(r["config"]), r["model"] != "base")):
        lines.append(f"| {r['config']} | {r['model']} | {r['concurrency']} | {r['tok_s']:.1f} | "
                     f"{r['ttft_p50_ms']:.0f} ms | {r.get('ratio', float('nan')):.2f}x | "
                     f"{r.get('added_ttft_ms', float('nan')):+.0f} ms | "
                     + (f"{r['ratio_same_engine']:.2f}x |" if "ratio_same_engine" in r else "- |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True, help="the LoRA adapter dir")
    parser.add_argument("--base", help="base model (default: the one the adapter names)")
    parser.add_argument("--merged", type=Path, help="the merged model (default: merge into a temporary dir)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--agreement", type=int, default=100, help="prompts for the agreement check (0: none)")
    parser.add_argument("--agreement-tokens", type=int, default=16)
    parser.add_argument("--pool", type=Path, help="query pool JSONL (default: the pulled pool)")
    parser.add_argument("--lock", type=Path, help="flock this file while each engine runs")
    parser.add_argument("--json", type=Path, help="write rows and agreement here (after every engine)")
    parser.add_argument("--report-only", action="store_true", help="exit 0 even when a target is missed")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the engine running

    from service.adapters.merge import merge_adapter
    from service.adapters.store import adapter_base_model
    from service.core.assets import resolve_model
    from service.core.settings import get_settings
    from service.vllm_server import (
        EmbeddedPlan,
        VLLMSupervisor,
        adapter_rank,
        free_port,
        lora_rank_bound,
        render_template_plan,
    )

    settings = get_settings()
    adapter = args.adapter.expanduser().resolve()
    base_model = args.base or adapter_base_model(adapter)
    if base_model is None:
        sys.exit(f"{adapter}: the adapter names no base model; pass --base")
    base = resolve_model(base_model)
    work = Path(tempfile.mkdtemp(prefix="presafe-lora-vs-merged-"))
    merged = args.merged
    if "merged" in args.configs and (merged is None or not merged.exists()):
        merged = merged or work / "merged"
        t0 = time.perf_counter()
        merge_adapter(adapter, base, merged)
        print(f"merged {adapter.name} into {base} → {merged} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    template, think_open = render_template_plan(base, work / "serve")
    rank = adapter_rank(adapter)
    planned = {"adapter": adapter}
    engines = {  # config -> (model dir, LoRA on, extra args, models measured)
        "base": (base, False, [], ["base"]),
        "lora": (base, True, [], ["base", "adapter"]),
        "lora-1-exact": (base, True, ["--max-loras", "1", "--max-lora-rank", str(rank)], ["base", "adapter"]),
        "merged": (str(merged), False, [], ["merged"]),
    }
    pool = args.pool or settings.data_dir / "default" / "pool.jsonl"
    prompts = agreement_prompts(pool, args.agreement) if args.agreement else []
    rows: list[dict] = []
    texts: dict[str, list[dict]] = {}
    agreements: dict[str, dict] = {}
    commands: dict[str, str] = {}
    for config in [c for c in CONFIGS if c in args.configs]:
        model, lora, extra, models = engines[config]
        served = models[-1] if not lora else "base"
        plan = EmbeddedPlan(model=model, served_name=served, port=free_port(), lora=lora,
                            adapters=planned if lora else {}, chat_template=template, think_open=think_open,
                            max_lora_rank=lora_rank_bound([rank]), max_model_len=2048, extra_args=extra)
        commands[config] = " ".join(plan.command()[1:])
        with locked(args.lock):
            supervisor = VLLMSupervisor(plan, settings, work / f"vllm-{config}.log", max_restarts=0)
            t0 = time.perf_counter()
            supervisor.start()
            try:
                asyncio.run(supervisor.wait_ready(settings.vllm_startup_timeout_s))
                print(f"{config}: ready in {time.perf_counter() - t0:.0f}s ({commands[config]})", file=sys.stderr)
                for r in asyncio.run(measure(plan.url, models, args.concurrency, args.rounds, args.max_tokens,
                                             args.warmup)):
                    rows.append({"config": config, **r})
                if prompts and models[-1] != "base" and not (lora and any(k.startswith("lora") for k in texts)):
                    texts[config] = asyncio.run(generate(plan.url, models[-1], prompts, args.agreement_tokens))
            finally:
                supervisor.stop()
        if "merged" in texts:
            for name in [k for k in texts if k.startswith("lora")]:
                agreements[f"merged vs {name}"] = agreement(texts["merged"], texts[name], think_open)
        if args.json:
            args.json.write_text(json.dumps({"rows": with_ratios(rows), "agreement": agreements,
                                             "commands": commands}, indent=2))
    with_ratios(rows)
    print(f"model {base}; adapter {adapter} (rank {rank}); streamed chat, {args.max_tokens} tokens (ignore_eos); "
          f"{args.rounds} rounds per concurrency; one engine at a time")
    print(table(rows))
    for name, a in agreements.items():
        print(f"agreement {name}, greedy, {args.agreement_tokens} tokens, {a['prompts']} prompts: identical "
              f"{a['identical']:.1%}, same decision path {a['same_path']:.1%}")
    for config, cmd in commands.items():
        print(f"{config}: vllm {cmd}")
    missed = missed_targets(rows, agreements)
    print(f"targets (merged ratio >= {MIN_RATIO}, TTFT within +{MAX_ADDED_MS:g} ms, same path >= "
          f"{MIN_AGREEMENT:.0%}):", "NOT met: " + "; ".join(missed) if missed else "met")
    return 1 if missed and not args.report_only else 0


if __name__ == "__main__":
    sys.exit(main())
