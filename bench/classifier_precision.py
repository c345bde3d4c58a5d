"""What ``classifier.mixed_precision=bf16`` buys: a classifier training step (forward + backward + AdamW, as the
Trainer runs it) in fp32 against the same step under bf16 autocast, on the same backbone and the same batches of
a run's train prompts (seeded, ``classifier.batch_size`` each, padded to their longest), interleaved
(``fp32, bf16, bf16, fp32, …``), each way on a fresh copy of the model. Prints the median bf16 / fp32 wall-time
ratio and how far the two losses differ.

    .venv/bin/python bench/classifier_precision.py --teacher $PRESAFE_HOME/runs/cpu-smollm2/teacher.jsonl
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "cpu-smollm2.yaml"))
    parser.add_argument("--teacher", required=True, help="A pipeline run's teacher.jsonl.")
    parser.add_argument("--steps", type=int, default=8, help="Timed steps (each run both ways).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from service.core.config import load_config
    from training.classifier import TRAIN_SPLITS, check_encoder, load_examples

    cfg = load_config(args.config, [])
    c = cfg.classifier
    backbone = check_encoder(cfg.models.classifier_backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    train = [e for e in load_examples(Path(args.teacher)) if e.split in TRAIN_SPLITS]
    rng = random.Random(args.seed)
    batches = [tokenizer([e.prompt for e in picked], truncation=True, max_length=c.max_length, padding=True,
                         return_tensors="pt") | {"labels": torch.tensor([e.target for e in picked])}
               for picked in (rng.sample(train, c.batch_size) for _ in range(args.steps + 1))]
    torch.manual_seed(args.seed)
    base = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=2)
    models = {way: copy.deepcopy(base).train() for way in ("fp32", "bf16")}
    optims = {way: torch.optim.AdamW(m.parameters(), lr=c.learning_rate) for way, m in models.items()}

    def step(way: str, batch: dict) -> tuple[float, float]:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if way == "bf16" else nullcontext()
        start = time.perf_counter()
        with autocast:
            loss = models[way](**batch).loss
        loss.backward()
        optims[way].step()
        optims[way].zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss.item()

    for way in ("fp32", "bf16"):  # warm-up: first-call allocations
        step(way, batches[0])
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    losses: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i, batch in enumerate(batches[1:]):
        for way in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            seconds, loss = step(way, batch)
            times[way].append(seconds)
            losses[way].append(loss)
    ratios = [b / f for f, b in zip(times["fp32"], times["bf16"], strict=True)]
    tokens = statistics.mean(int(b["attention_mask"].shape[1]) for b in batches[1:])
    print(f"{args.steps} steps of {c.batch_size} prompts (padded length {tokens:.0f} on average), {backbone}")
    print(f"median step: fp32 {statistics.median(times['fp32']):.2f} s, bf16 {statistics.median(times['bf16']):.2f} s")
    print(f"bf16 / fp32 wall time: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, "
          f"max {max(ratios):.2f})")
    gaps = [abs(b - f) / max(abs(f), 1e-9) for f, b in zip(losses["fp32"], losses["bf16"], strict=True)]
    print(f"loss gap bf16 vs fp32: median {100 * statistics.median(gaps):.2f}% (max {100 * max(gaps):.2f}%)")


if __name__ == "__main__":
    main()
