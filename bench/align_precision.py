"""What ``align.mixed_precision=bf16`` buys: an align step (forward + backward through ``PreSafeModel``, as
``AlignTrainer`` runs it) in fp32 against the same step under bf16 autocast, on the same model and the same
micro-batches of the CPU default recipe (built from a teacher file by the product's own code, see
``bench/align_batching.py``), interleaved (``fp32, bf16, bf16, fp32, …``). Prints the median bf16 / fp32 wall-time
ratio and how far the two losses differ.

    .venv/bin/python bench/align_precision.py --teacher $PRESAFE_HOME/runs/cpu-smollm2/teacher.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "cpu-smollm2.yaml"))
    parser.add_argument("--teacher", required=True, help="A pipeline run's teacher.jsonl.")
    parser.add_argument("--steps", type=int, default=10, help="Timed optimizer steps (each run both ways).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Config overrides for both ways (e.g. align.lora_dropout=0).")
    args = parser.parse_args()

    import torch
    from align_batching import step_examples

    from service.core.config import load_config
    from training.align.data import AlignCollator
    from training.align.model import load_base_tokenizer
    from training.align.train import build_model

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_base_tokenizer(cfg.models)
    model = build_model(cfg, None)
    model.train()
    steps = step_examples(cfg, tokenizer, Path(args.teacher), args.steps + 1, args.seed)
    collate = AlignCollator(tokenizer.pad_token_id)
    size = cfg.align.batch_size

    def run(way: str, rows: list) -> tuple[float, float]:
        batches = [collate(rows[i:i + size]) for i in range(0, len(rows), size)]
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if way == "bf16" else nullcontext()
        start, loss = time.perf_counter(), 0.0
        for batch in batches:
            with autocast:
                out = model(**batch)["loss"]
            out.backward()
            loss += out.item()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss

    run("fp32", steps[0]), run("bf16", steps[0])  # warm-up
    ratios, gaps, totals = [], [], {"fp32": 0.0, "bf16": 0.0}
    for i, rows in enumerate(steps[1:]):
        results = {way: run(way, rows) for way in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32"))}
        for way, (seconds, _) in results.items():
            totals[way] += seconds
        ratios.append(results["bf16"][0] / results["fp32"][0])
        gaps.append(abs(results["bf16"][1] - results["fp32"][1]) / max(abs(results["fp32"][1]), 1e-9))
        print(f"step {i + 1}: fp32 {results['fp32'][0]:.2f} s, bf16 {results['bf16'][0]:.2f} s, "
              f"ratio {ratios[-1]:.2f}, loss {results['fp32'][1]:.4f} / {results['bf16'][1]:.4f}", flush=True)
    print(f"\n{args.steps} optimizer steps of {len(steps[0])} examples, {torch.get_num_threads()} threads")
    for way, seconds in totals.items():
        print(f"  {way}: {seconds / args.steps:.2f} s per step")
    print(f"  bf16 / fp32 wall time: median {statistics.median(ratios):.2f}, total {totals['bf16'] / totals['fp32']:.2f}; "
          f"loss relative difference: median {statistics.median(gaps):.4f}")


if __name__ == "__main__":
    main()
