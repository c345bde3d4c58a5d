"""Overhead of PreSafe alignment over plain LoRA-SFT: step time and peak memory.

Two variants train on the same batches with the same LoRA settings (the config's ``align`` section):

- ``presafe``: ``L_sft + λ·L_decision`` (hidden states of the decision layers → projector → frozen
  classifier → BCE), past the projector warm-up (warm-up steps run the LLM without gradients and
  are cheaper, so they are not what is measured);
- ``plain``: ``λ = 0``, no decision head and no classifier (plain LoRA-SFT).

**Step time**, in one process, interleaved: both models are built, then optimizer steps alternate
``presafe, plain, plain, presafe, …`` on the same batch per pair, so the load of other processes
on the machine hits both alike. A step is what ``AlignTrainer`` does per batch: ``PreSafeModel``
forward (both losses), backward, AdamW step. The first ``--warmup`` pairs are not timed; the
figure is the median over pairs of presafe time / plain time (wall clock; the ratio of the
process's CPU time is printed too: on a shared, oversubscribed machine it is the steadier one).

**Peak memory**, one child process per variant (a process's peak cannot be split between two
models): each builds its model and runs ``--mem-steps`` steps through the real ``AlignTrainer``;
the figure is the ratio of peak resident set sizes (``VmHWM`` of ``/proc/self/status``). RSS,
because torch's CPU allocations are invisible to tracemalloc; the children run with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the RSS at once (glibc's cached heap
otherwise makes the peak depend on allocation order). The peak increment over the RSS after
loading (peak reset through ``/proc/self/clear_refs``) is printed too.

Targets: step-time ratio ≤ 1.2, peak-memory ratio ≤ 1.1; the script exits 1 when one is missed
(``--report-only``: always 0).

    .venv/bin/python bench/train_overhead.py                       # CPU default config: SmolLM2-135M
    .venv/bin/python bench/train_overhead.py --model PATH --classifier PATH --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FILLER = ("First, I need to understand what is being asked. The question gives a few numbers, so I will "
          "work through them one at a time, check each step, and then write a short, clear answer. ")


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bench_records(n: int, seed: int = 0) -> list:
    """Train-split pool prompts (generated ones without a pool); Path B answers are filler text long
    enough to be cut at ``max_target_length``, so batches are as long as training allows."""
    prompts: list[tuple[str, str, str]] = []
    try:
        from training.data import load_pool, seeded_sample

        pool = seeded_sample([r for r in load_pool().records if r.split == "train"], n, seed)
        prompts = [(r.id, r.prompt, "refuse" if r.label == "harmful" else "comply") for r in pool]
    except Exception as exc:  # noqa: BLE001 - no pool pulled: generated prompts are fine for timing
        print(f"no query pool ({exc}); using generated prompts", file=sys.stderr)
    if not prompts:
        prompts = [(f"gen-{i}", f"Question {i}: a shop sells {i + 3} apples a day. How many in {i % 7 + 2} days?",
                    "refuse" if i % 2 else "comply") for i in range(n)]
    records = []
    for pid, prompt, decision in prompts:
        cot_on = SimpleNamespace(text=FILLER * 8, finish_reason="length")
        records.append(SimpleNamespace(id=pid, prompt=prompt, decision=decision, cot_on=cot_on))
    return records


def setup(args, with_classifier: bool = True):
    """Config, tokenizer, tokenized examples and the frozen classifier, shared by both variants."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from service.core.assets import resolve_model
    from service.core.config import load_config
    from training.align.data import build_examples
    from training.align.model import FrozenClassifier, load_base_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if args.model:
        cfg.models.base = args.model
    a = cfg.align
    a.projector_warmup_steps = 0
    a.batch_size = args.batch_size or a.batch_size
    a.max_target_length = args.target_tokens or a.max_target_length
    tokenizer = load_base_tokenizer(cfg.models)
    steps = max(args.pairs + args.warmup, args.mem_steps)
    records = bench_records(a.batch_size * steps)
    probs = [0.9 if r.decision == "refuse" else 0.1 for r in records]
    examples, _ = build_examples(records, probs, 0.5, tokenizer, a)
    if not with_classifier:
        return cfg, tokenizer, examples, None
    path = resolve_model(args.classifier or cfg.models.classifier_backbone)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).float().eval()
    model.requires_grad_(False)
    classifier = FrozenClassifier(model, AutoTokenizer.from_pretrained(path), 0.5, Path(path))
    return cfg, tokenizer, examples, classifier


def build(cfg, classifier, presafe: bool):
    import torch

    from training.align.train import build_model

    model = build_model(cfg, classifier if presafe else None, lambda_decision=None if presafe else 0.0)
    model.train()
    groups = [{"params": [p for p in model.llm.parameters() if p.requires_grad], "lr": cfg.align.learning_rate}]
    if model.head is not None:
        groups.append({"params": list(model.head.parameters()), "lr": cfg.align.projector_lr})
    return model, torch.optim.AdamW(groups)


def step(model, optimizer, batch) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one optimizer step."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = model(**batch)
    out["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_interleaved(args) -> dict:
    import torch

    from training.align.data import AlignCollator

    cfg, tokenizer, examples, classifier = setup(args)
    collate, size = AlignCollator(tokenizer.pad_token_id), cfg.align.batch_size
    batches = [collate([e.features() for e in examples[i:i + size]]) for i in range(0, len(examples) - size + 1, size)]
    variants = {"presafe": build(cfg, classifier, True), "plain": build(cfg, classifier, False)}
    times: dict[str, list[float]] = {"presafe": [], "plain": []}
    cpu: dict[str, list[float]] = {"presafe": [], "plain": []}
    ratios, cpu_ratios = [], []
    for i in range(args.warmup + args.pairs):
        batch = batches[i % len(batches)]
        order = ("presafe", "plain") if i % 2 == 0 else ("plain", "presafe")
        pair = {name: step(*variants[name], batch) for name in order}
        if i >= args.warmup:
            for name, (wall, used) in pair.items():
                times[name].append(wall)
                cpu[name].append(used)
            ratios.append(pair["presafe"][0] / pair["plain"][0])
            cpu_ratios.append(pair["presafe"][1] / pair["plain"][1])
            print(f"pair {i - args.warmup + 1}: presafe {pair['presafe'][0]:.2f}s  plain {pair['plain'][0]:.2f}s  "
                  f"ratio {ratios[-1]:.3f}  (CPU time ratio {cpu_ratios[-1]:.3f})", flush=True)
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    return {"ratio_median": statistics.median(ratios), "ratios": ratios, "times": times,
            "cpu_ratio_median": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios, "cpu_times": cpu,
            "step_s": {k: statistics.median(v) for k, v in times.items()},
            "tokens_per_step": tokens,
            "tokens_per_s": {k: tokens / statistics.median(v) for k, v in times.items()},
            "threads": torch.get_num_threads(), "layers": variants["presafe"][0].layers,
            "batch_size": cfg.align.batch_size, "max_target_length": cfg.align.max_target_length}


def memory_child(args) -> dict:
    """One variant through the real AlignTrainer for a few steps; peak RSS."""
    from training.align.data import AlignCollator, ListDataset
    from training.align.train import AlignTrainer, build_model, training_arguments

    presafe = args.child == "presafe"
    cfg, tokenizer, examples, classifier = setup(args, with_classifier=presafe)  # plain LoRA-SFT: no classifier
    rss_setup = proc_status("VmRSS")
    model = build_model(cfg, classifier, lambda_decision=None if presafe else 0.0)
    rss_loaded = proc_status("VmRSS")
    reset_ok = reset_peak_rss()
    features = [e.features() for e in examples]
    with tempfile.TemporaryDirectory(prefix="presafe-bench-") as scratch:
        trainer = AlignTrainer(model=model, args=training_arguments(cfg.align, Path(scratch), args.mem_steps,
                                                                    progress=False, save=False),
                               train_dataset=ListDataset(features), data_collator=AlignCollator(tokenizer.pad_token_id))
        trainer.args.logging_steps = 10_000
        trainer.train()
    return {"variant": args.child, "peak_rss": proc_status("VmHWM"), "rss_loaded": rss_loaded,
            "rss_setup": rss_setup, "peak_reset": reset_ok}


def run_memory_child(variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--mem-steps", str(args.mem_steps), "--config", args.config,
           "--pairs", "0", "--warmup", "0"]
    for flag in ("model", "classifier", "batch_size", "target_tokens", "threads"):
        value = getattr(args, flag)
        if value:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    # Large blocks through mmap (returned to the OS on free): RSS follows live tensors instead of
    # glibc's cached heap, whose size depends on allocation order more than on what is alive.
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


MAX_STEP_RATIO, MAX_MEMORY_RATIO = 1.2, 1.1


def missed_targets(summary: dict) -> list[str]:
    """The targets the measured ratios miss (the memory one only when memory was measured)."""
    missed = []
    if summary["step_time_ratio"] > MAX_STEP_RATIO:
        missed.append(f"step-time ratio {summary['step_time_ratio']:.3f} > {MAX_STEP_RATIO}")
    memory = summary.get("peak_memory_ratio")
    if memory is not None and memory > MAX_MEMORY_RATIO:
        missed.append(f"peak-memory ratio {memory:.3f} > {MAX_MEMORY_RATIO}")
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "cpu-smollm2.yaml"))
    parser.add_argument("--model", help="Base model (default: the config's models.base).")
    parser.add_argument("--classifier", help="Classifier backbone or dir (default: models.classifier_backbone).")
    parser.add_argument("--pairs", type=int, default=8, help="Timed step pairs.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed pairs first.")
    parser.add_argument("--mem-steps", type=int, default=2, help="Steps per memory child.")
    parser.add_argument("--batch-size", type=int, help="align.batch_size override.")
    parser.add_argument("--target-tokens", type=int, help="align.max_target_length override.")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", help="Also write the results here.")
    parser.add_argument("--report-only", action="store_true", help="Exit 0 even when a target is missed.")
    parser.add_argument("--child", choices=["presafe", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(memory_child(args)))
        return

    started = time.monotonic()
    timing = time_interleaved(args)
    summary = {"config": args.config, "model": args.model or "config models.base", **{
        k: timing[k] for k in ("threads", "layers", "batch_size", "max_target_length", "tokens_per_step",
                               "step_s", "tokens_per_s")}, "step_time_ratio": timing["ratio_median"],
               "cpu_time_ratio": timing["cpu_ratio_median"]}
    print(f"\nstep time  presafe/plain = {timing['ratio_median']:.3f} (median of {len(timing['ratios'])} pairs; "
          f"target ≤ {MAX_STEP_RATIO}); CPU time {timing['cpu_ratio_median']:.3f}")
    print(f"tokens/s   presafe {timing['tokens_per_s']['presafe']:.0f}, plain {timing['tokens_per_s']['plain']:.0f} "
          f"({timing['tokens_per_step']:.0f} tokens/step, {timing['threads']} threads)")
    memory = {}
    if not args.skip_memory:
        memory = {v: run_memory_child(v, args) for v in ("presafe", "plain")}
        peak = {v: m["peak_rss"] for v, m in memory.items()}
        inc = {v: m["peak_rss"] - m["rss_loaded"] for v, m in memory.items()}
        summary.update(peak_rss_mib={v: p / 2**20 for v, p in peak.items()},
                       peak_memory_ratio=peak["presafe"] / peak["plain"],
                       peak_increment_ratio=inc["presafe"] / inc["plain"] if inc["plain"] > 0 else None)
        print(f"peak RSS   presafe {peak['presafe'] / 2**20:.0f} MiB / plain {peak['plain'] / 2**20:.0f} MiB = "
              f"{summary['peak_memory_ratio']:.3f} (target ≤ {MAX_MEMORY_RATIO})")
        if summary["peak_increment_ratio"] is not None:
            print(f"peak RSS over the loaded models: presafe/plain = {summary['peak_increment_ratio']:.3f}")
    summary["wall_s"] = time.monotonic() - started
    summary["missed_targets"] = missed = missed_targets(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "timing": timing, "memory": memory}, indent=2))
    print(f"targets (step time ≤ {MAX_STEP_RATIO}, peak memory ≤ {MAX_MEMORY_RATIO}):", "NOT met: " + "; ".join(missed) if missed else "met")
    if missed and not args.report_only:
        sys.exit(1)


if __name__ == "__main__":
    main()
