"""Do two served forms of one adapter give the same eval? The merged model against the LoRA adapter (#17).

Reads two ``presafe eval`` output dirs (``responses.jsonl``) run with the same settings, one model from each,
and prints, on the prompts both answered:

- **decision-path agreement**: the share of prompts where both took the same path (refuse pre-CoT, answer
  with CoT, …), and of identical texts;
- **the eval headline** of each (the product's own ``summarize_model``) with its 95% Wilson interval, and
  whether each figure lies inside the other's interval.

Targets: the same path on ≥ 98% of the prompts and every headline rate inside the other's interval; exit 1
on a miss unless ``--report-only``.

``--run RUN_DIR`` makes the second eval first: it merges the run's published adapter (``RUN/publish``: the
aligned adapter with its manifest of checksums) into the base, serves the merged model on its own vLLM exactly
as the pipeline's eval stage serves the LoRA adapter (the same served template, dtype and model length, no
``--enable-lora``), and asks it the run's eval with the run's config (``eval`` section, seed). Then it compares
with the run's own eval (``RUN/eval``, model ``presafe``):

    python bench/eval_agreement.py --run $PRESAFE_HOME/runs/cpu-smollm2 --b /tmp/merged-eval
    python bench/eval_agreement.py --a RUN/eval --a-model presafe --b /tmp/merged-eval --b-model merged
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIN_AGREEMENT = 0.98


def load_rows(eval_dir: Path, model: str) -> dict[tuple[str, str | None], object]:
    """The error-free rows of ``model`` in ``eval_dir/responses.jsonl``, keyed by (prompt id, eval set)."""
    from training.evaluate.data import ResponseRow

    names = {f.name for f in fields(ResponseRow)}
    rows = {}
    with open(eval_dir / "responses.jsonl", encoding="utf-8") as fh:
        for line in fh:
            data = json.loads(line)
            if data.get("model") == model and data.get("error") is None:
                row = ResponseRow(**{k: v for k, v in data.items() if k in names})
                rows[(row.id, row.set)] = row
    if not rows:
        raise SystemExit(f"{eval_dir}/responses.jsonl has no rows of model {model!r}")
    return rows


def compare(a: dict, b: dict) -> dict:
    """Path agreement and headline figures of two row sets, on the prompts both answered."""
    from training.evaluate.stats import HEADLINE, summarize_model

    common = sorted(set(a) & set(b))
    same_path = sum(a[k].path == b[k].path for k in common)
    same_text = sum(a[k].text == b[k].text for k in common)
    sa = summarize_model([a[k] for k in common])["overall"]
    sb = summarize_model([b[k] for k in common])["overall"]
    figures = []
    for key, label, _ in HEADLINE:
        fa, fb = sa.get(key), sb.get(key)
        if not isinstance(fa, dict) or fa.get("value") is None or fb.get("value") is None:
            continue
        inside = (fa["ci95"][0] <= fb["value"] <= fa["ci95"][1]) and (fb["ci95"][0] <= fa["value"] <= fb["ci95"][1])
        figures.append({"key": key, "label": label, "a": fa["value"], "a_ci95": fa["ci95"], "b": fb["value"],
                        "b_ci95": fb["ci95"], "n": fa["n"], "inside": inside})
    differing = [k for k in common if a[k].path != b[k].path]
    return {"prompts": len(common), "same_path": same_path / len(common) if common else None,
            "same_text": same_text / len(common) if common else None, "figures": figures,
            "differing": [{"id": i, "set": s, "a": a[(i, s)].path, "b": b[(i, s)].path} for i, s in differing]}


def eval_merged(run_dir: Path, out_dir: Path, model_name: str = "merged") -> None:
    """Merge the run's adapter, serve it as the pipeline's eval stage serves the adapter, and ask it the run's
    eval; the report goes to ``out_dir``."""
    import asyncio

    from service.adapters.merge import merge_adapter
    from service.core.assets import MANIFEST, resolve_model
    from service.core.config import load_config
    from service.core.settings import get_settings
    from service.vllm_server import EmbeddedPlan, VLLMSupervisor, free_port
    from training.evaluate.report import write_eval_report
    from training.evaluate.run import EvalRun, evaluate

    adapter = run_dir / "publish"
    if not (adapter / MANIFEST).is_file():
        raise SystemExit(f"{adapter} holds no published adapter: finish the run's publish stage first")
    cfg = load_config(run_dir / "config.yaml")
    merged = out_dir / "merged-model"
    print(f"merging {adapter} into {cfg.models.base} → {merged}", flush=True)
    merge_adapter(adapter, resolve_model(cfg.models.base), merged, cfg.models.dtype)
    plan = EmbeddedPlan(model=str(merged), served_name=model_name, port=free_port(), lora=False,
                        chat_template=run_dir / "eval" / "chat_template.jinja", think_open=True, max_model_len=2048,
                        extra_args=["--dtype", cfg.models.dtype])
    supervisor = VLLMSupervisor(plan, get_settings(), out_dir / "vllm.log")
    supervisor.start()
    try:
        asyncio.run(supervisor.wait_ready(timeout=900))
        run = EvalRun(base_url=plan.url, models=[model_name], seed=cfg.data.seed)
        result = evaluate(cfg.eval, run, pool_path=cfg.data.pool_path())
        write_eval_report(result, out_dir)
    finally:
        supervisor.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished pipeline run: evaluate its adapter merged into --b")
    parser.add_argument("--a", type=Path, help="first eval dir (default with --run: RUN/eval)")
    parser.add_argument("--a-model", default="presafe")
    parser.add_argument("--b", type=Path, required=True, help="second eval dir (e.g. the merged model's)")
    parser.add_argument("--b-model", default="merged")
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    parser.add_argument("--report-only", action="store_true", help="exit 0 even when a target is missed")
    args = parser.parse_args(argv)
    if args.run:
        eval_merged(args.run, args.b, args.b_model)
        args.a = args.a or args.run / "eval"
    if args.a is None:
        parser.error("--a (or --run) is required")

    result = compare(load_rows(args.a, args.a_model), load_rows(args.b, args.b_model))
    print(f"{result['prompts']} prompts answered by both: the same decision path on {result['same_path']:.1%}, "
          f"identical texts on {result['same_text']:.1%}")
    print(f"\n| figure | {args.a_model} | {args.b_model} | n | each inside the other's 95% interval |")
    print("|---|---|---|---|---|")
    for f in result["figures"]:
        print(f"| {f['label']} | {f['a']:.3f} [{f['a_ci95'][0]:.3f}, {f['a_ci95'][1]:.3f}] | {f['b']:.3f} "
              f"[{f['b_ci95'][0]:.3f}, {f['b_ci95'][1]:.3f}] | {f['n']} | {'yes' if f['inside'] else 'NO'} |")
    for d in result["differing"][:20]:
        print(f"  differs: {d['id']} ({d['set']}): {d['a']} vs {d['b']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    missed = (result["same_path"] or 0) < MIN_AGREEMENT or not all(f["inside"] for f in result["figures"])
    print("\ntargets:", "missed" if missed else "met",
          f"(the same path on >= {MIN_AGREEMENT:.0%}, every figure inside the other's interval)")
    return 1 if missed and not args.report_only else 0


if __name__ == "__main__":
    sys.exit(main())
