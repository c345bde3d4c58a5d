"""Latency of the decision classifier on one prompt at a time (what the gateway does per request).

Measures tokenisation + forward + softmax per prompt, p50/p90/p99 over pool prompts, with torch
(``torch.set_num_threads``, ``inference_mode``) and, with ``--onnx``, the same model exported to
ONNX and run by ONNX Runtime (needs ``onnx`` and ``onnxruntime``; skipped with a note if absent).

    .venv/bin/python bench/classifier_latency.py --threads 2            # trained $PRESAFE_HOME/classifier
    .venv/bin/python bench/classifier_latency.py --model all-minilm-l6-v2 --onnx   # untrained head, same cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def percentiles(samples: tuple[list[float], list[float]]) -> dict:
    """Wall-clock percentiles, plus the median CPU time of the process per prompt (all its threads):
    on a shared, oversubscribed machine the CPU time shows what the wall time would be when idle."""
    wall, cpu = samples
    qs = statistics.quantiles(wall, n=100, method="inclusive")
    return {"n": len(wall), "p50_ms": round(statistics.median(wall), 3), "p90_ms": round(qs[89], 3),
            "p99_ms": round(qs[98], 3), "mean_ms": round(statistics.fmean(wall), 3),
            "cpu_p50_ms": round(statistics.median(cpu), 3)}


def timed(fn, prompts: list[str], warmup: int) -> tuple[list[float], list[float]]:
    for p in prompts[:warmup]:
        fn(p)
    wall, cpu = [], []
    for p in prompts:
        t0, c0 = time.perf_counter(), time.process_time()
        fn(p)
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return wall, cpu


def bench_torch(path: str, prompts: list[str], threads: int, max_length: int, warmup: int) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()

    def run(prompt: str) -> float:
        with torch.inference_mode():
            enc = tokenizer(prompt, truncation=True, max_length=max_length, return_tensors="pt")
            return torch.softmax(model(**enc).logits, -1)[0, 1].item()

    return {"backend": "torch", "threads": threads, **percentiles(timed(run, prompts, warmup))}


def bench_onnx(path: str, prompts: list[str], threads: int, max_length: int, warmup: int) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"backend": "onnxruntime", "skipped": "onnxruntime is not installed (pip install onnxruntime onnx)"}
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from service.core.formats import CLASSIFIER_ONNX
    from training.classifier import export_onnx

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer("x")]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(path) / CLASSIFIER_ONNX  # written by presafe train classifier
        if not onnx_path.is_file():
            onnx_path = Path(tmp) / CLASSIFIER_ONNX
            try:
                export_onnx(model, tokenizer, onnx_path)
            except Exception as exc:  # noqa: BLE001 - report, do not crash the torch numbers
                return {"backend": "onnxruntime", "skipped": f"export failed: {type(exc).__name__}: {exc}"[:300]}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

        def run(prompt: str) -> float:
            e = tokenizer(prompt, truncation=True, max_length=max_length, return_tensors="np")
            logits = session.run(None, {n: e[n].astype(np.int64) for n in names})[0][0]
            z = np.exp(logits - logits.max())
            return float(z[1] / z.sum())

        with torch.inference_mode():
            ref = torch.softmax(model(**tokenizer(prompts[0], return_tensors="pt")).logits, -1)[0, 1].item()
        assert abs(run(prompts[0]) - ref) < 1e-3, "ONNX and torch disagree"
        return {"backend": "onnxruntime", "threads": threads, **percentiles(timed(run, prompts, warmup))}


def load_prompts(n: int) -> list[str]:
    from training.data import load_pool

    records = [r for r in load_pool().records if r.split in ("test", "heldout")]
    records.sort(key=lambda r: r.id)
    step = max(1, len(records) // n)
    return [r.prompt for r in records[::step]][:n]


def main() -> None:
    from service.core.assets import resolve_model
    from service.core.settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="Classifier dir, known name or HF id (default: $PRESAFE_HOME/classifier).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=300, help="Prompts timed (test + held-out splits).")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--onnx", action="store_true", help="Also export to ONNX and time ONNX Runtime.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here too.")
    args = parser.parse_args()

    path = resolve_model(args.model) if args.model else str(get_settings().root / "classifier")
    if not args.model and not Path(path).is_dir():
        parser.error(f"no trained classifier at {path}; train one (presafe train classifier) or pass --model")
    prompts = load_prompts(args.n)
    results = [bench_torch(path, prompts, args.threads, args.max_length, args.warmup)]
    if args.onnx:
        results.append(bench_onnx(path, prompts, args.threads, args.max_length, args.warmup))
    for r in results:
        print(json.dumps({"model": path, **r}))
    if args.json:
        args.json.write_text(json.dumps({"model": path, "results": results}, indent=2))


if __name__ == "__main__":
    main()
