"""What the align forward's batching saves: one forward of the chat template's shared opening plus decision-only
rows grouped by length, against one padded forward per path (SFT rows, decision-only rows), as before.

The micro-batches are the CPU default recipe's, built from a teacher file by the product's own code
(``load_training_records``, ``build_examples``, ``build_decision_only``, ``transfer_split``; the teacher's
decision stands in for the classifier's, which changes no length) and shuffled with the seed. Both ways run on
the same model and the same examples per optimizer step, interleaved (``old, new, new, old, …``): before,
forwards of ``--old-batch`` rows accumulated; now, forwards of ``--batch-size`` (default ``align.batch_size``).
Each is a forward + backward through ``PreSafeModel`` as ``AlignTrainer`` runs it; the figure is the median over
steps of new / old wall time, with the padded tokens each way computes.

    .venv/bin/python bench/align_batching.py --teacher $PRESAFE_HOME/runs/cpu-smollm2/teacher.jsonl --batch-size 8
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_examples(cfg, tokenizer, teacher: Path, count: int, seed: int) -> list[list]:
    from training.align.data import (
        build_decision_only,
        build_examples,
        load_training_records,
        transfer_split,
    )

    a = cfg.align
    sample, extra, rest = load_training_records(teacher, cfg.data.train_split, cfg.data.max_train_prompts,
                                                cfg.data.seed, a.extra_refuse_prompts, a.decision_only_prompts,
                                                cfg.data.sft_sources)
    prob = [1.0 if r.decision == "refuse" else 0.0 for r in sample + extra]
    examples, _ = build_examples(sample + extra, prob, 0.5, tokenizer, a)
    examples = transfer_split(examples, a.sft_refuse_fraction, cfg.data.seed)
    examples += build_decision_only(rest, [1.0 if r.decision == "refuse" else 0.0 for r in rest], 0.5, tokenizer, a)
    random.Random(seed).shuffle(examples)
    size = a.batch_size * a.grad_accum
    return [[e.features() for e in examples[i:i + size]] for i in range(0, size * count, size)]


def padded_tokens(model, batch, module) -> int:
    """Tokens the forward computes for this batch (rows × each group's longest row, the shared opening once)."""
    lengths = batch["attention_mask"].sum(1)
    target = (batch["labels"] != -100).any(1)
    rows = [lengths[target].tolist(), lengths[~target].tolist()]
    prefix = model._shared_prefix(batch["input_ids"], lengths) if module.MIN_SHARED_PREFIX < 10**6 else None
    shared = prefix[0] if prefix else 0
    total = shared
    for i, group in enumerate(rows):
        groups = [group] if i == 0 else [[group[j] for j in g] for g in module.length_groups(group)]
        total += sum(len(g) * (max(g) - shared) for g in groups if g)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "cpu-smollm2.yaml"))
    parser.add_argument("--teacher", required=True, help="A pipeline run's teacher.jsonl.")
    parser.add_argument("--steps", type=int, default=12, help="Timed optimizer steps (each run both ways).")
    parser.add_argument("--old-batch", type=int, default=4, help="Rows per forward before (the rest accumulates).")
    parser.add_argument("--batch-size", type=int, help="Rows per forward now (default: align.batch_size).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from service.core.config import load_config
    from training.align import model as module
    from training.align.data import AlignCollator
    from training.align.model import load_base_tokenizer
    from training.align.train import build_model

    cfg = load_config(args.config)
    tokenizer = load_base_tokenizer(cfg.models)
    model = build_model(cfg, None)
    model.train()
    steps = step_examples(cfg, tokenizer, Path(args.teacher), args.steps + 1, args.seed)
    collate = AlignCollator(tokenizer.pad_token_id)
    settings = {"old": (10**9, 10**9, args.old_batch),
                "new": (module.MIN_SHARED_PREFIX, module.FORWARD_COST_TOKENS, args.batch_size or cfg.align.batch_size)}

    def run(way: str, rows: list) -> tuple[float, int]:
        module.MIN_SHARED_PREFIX, module.FORWARD_COST_TOKENS, size = settings[way]
        batches = [collate(rows[i:i + size]) for i in range(0, len(rows), size)]
        tokens = sum(padded_tokens(model, batch, module) for batch in batches)
        start = time.perf_counter()
        for batch in batches:
            model(**batch)["loss"].backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, tokens

    run("old", steps[0]), run("new", steps[0])  # warm-up
    ratios, totals = [], {"old": [0.0, 0], "new": [0.0, 0]}
    for i, batch in enumerate(steps[1:]):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        times = {}
        for way in order:
            seconds, tokens = run(way, batch)
            times[way] = seconds
            totals[way][0] += seconds
            totals[way][1] += tokens
        ratios.append(times["new"] / times["old"])
        print(f"step {i + 1}: old {times['old']:.2f} s, new {times['new']:.2f} s, "
              f"ratio {ratios[-1]:.2f}", flush=True)
    print(f"\n{args.steps} optimizer steps of {len(steps[0])} examples (forwards of {args.old_batch} rows before, "
          f"{settings['new'][2]} now), {torch.get_num_threads()} threads")
    for way, (seconds, tokens) in totals.items():
        print(f"  {way}: {seconds / args.steps:.2f} s per step, {tokens / args.steps:.0f} padded tokens")
    print(f"  new / old wall time: median {statistics.median(ratios):.2f}, "
          f"total {totals['new'][0] / totals['old'][0]:.2f}; padded tokens "
          f"{totals['new'][1] / totals['old'][1]:.2f}")


if __name__ == "__main__":
    main()
