"""Align recipes side by side, measured by the teacher-forced decision score (no generation, no vLLM).

Three steps, so the training can run where it is fast (a GPU) and everything else here:

    # 1. here, from a finished pipeline run: SFT examples, decision-only prompts (classifier-labelled)
    #    and the held-out eval prompts, tokenized exactly as train_align and presafe eval do them
    python bench/align_sweep.py prepare --run-dir RUN --out bundle.json
    # 2. anywhere with the base model: every arm x seed is trained with the product's own PreSafeModel and
    #    AlignTrainer, then scored on every held-out prompt (training/evaluate/decision_score.py)
    python bench/align_sweep.py run --bundle bundle.json --model MODEL_DIR --out results.jsonl
    # 3. here: rates with Wilson intervals per set and form, AUROC, paired tests against the λ = 0 twin
    python bench/align_sweep.py report --bundle bundle.json --results results.jsonl --out sweep.md

An arm is a set of ``align`` overrides (ARMS below); seeds vary ``align.seed`` (LoRA init and data order).
The greedy decision is exact for the first tokens: a prompt counts as refused when greedy decoding opens the
empty think block, i.e. refuses before any CoT (the path the eval calls ``refuse_pre_cot``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Annotated

import typer

from training.evaluate.stats import auroc, mcnemar_p

app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])

BASELINE = "sft"
# name -> align overrides; λ > 0 arms use the linear decision head. "twin" names the λ = 0 arm to test against.
ARMS: dict[str, dict] = {
    "sft": {"lambda_decision": 0.0},
    "lin1": {"lambda_decision": 1.0},
    "lin5_d400": {"lambda_decision": 5.0, "decision_only_prompts": 400},
    "lin1_d1500": {"lambda_decision": 1.0, "decision_only_prompts": 1500},
    "lin5_d1500": {"lambda_decision": 5.0, "decision_only_prompts": 1500},
    "lin20_d1500": {"lambda_decision": 20.0, "decision_only_prompts": 1500},
    "bal_sft": {"lambda_decision": 0.0, "extra_refuse_prompts": 0},
    "bal_lin5_d1500": {"lambda_decision": 5.0, "extra_refuse_prompts": 0, "decision_only_prompts": 1500},
    "xfer_sft": {"lambda_decision": 0.0, "sft_refuse_fraction": 0.25},
    "xfer_lin5_d1500": {"lambda_decision": 5.0, "sft_refuse_fraction": 0.25, "decision_only_prompts": 1500},
    "sft_ep3": {"lambda_decision": 0.0, "epochs": 3},
    "lin5_d1500_ep3": {"lambda_decision": 5.0, "decision_only_prompts": 1500, "epochs": 3},
}
TWINS = {"bal_lin5_d1500": "bal_sft", "xfer_lin5_d1500": "xfer_sft", "lin5_d1500_ep3": "sft_ep3"}


# --------------------------------------------------------------------------- prepare (here)


@app.command()
def prepare(run_dir: Annotated[Path, typer.Option(help="A finished `presafe train run` dir (teacher.jsonl, classifier/).")],
            out: Annotated[Path, typer.Option()] = Path("bundle.json"),
            config: Annotated[Path, typer.Option()] = Path("configs/cpu-smollm2.yaml"),
            max_train_prompts: Annotated[int, typer.Option(help="The sample the run's teacher wrote CoT-ON answers for.")] = 450,
            decision_only_max: Annotated[int, typer.Option()] = 1500) -> None:
    """Tokenize the run's training data and the held-out eval prompts into one JSON bundle."""
    from service.core.config import load_config
    from training.align.data import build_decision_only, build_examples, load_training_records
    from training.align.model import classifier_probabilities, load_base_tokenizer, load_classifier
    from training.data import load_pool
    from training.evaluate.run import select

    cfg = load_config(config, [f"data.max_train_prompts={max_train_prompts}"])
    a = cfg.align
    tokenizer = load_base_tokenizer(cfg.models)
    records, extra, only = load_training_records(run_dir / "teacher.jsonl", cfg.data.train_split,
                                                 cfg.data.max_train_prompts, cfg.data.seed, a.extra_refuse_prompts,
                                                 decision_only_max, cfg.data.sft_sources)
    clf = load_classifier(run_dir / "classifier", a.threshold)
    probs = classifier_probabilities(clf, [r.prompt for r in records + extra + only], cfg.classifier.max_length)
    n, m = len(records), len(records) + len(extra)
    kept_extra = [(r, p) for r, p in zip(extra, probs[n:m], strict=True) if p >= clf.threshold]
    sft, _ = build_examples(records + [r for r, _ in kept_extra], probs[:n] + [p for _, p in kept_extra],
                            clf.threshold, tokenizer, a)
    extra_ids = {r.id for r, _ in kept_extra}
    decision_only = build_decision_only(only, probs[m:], clf.threshold, tokenizer, a)
    eval_records = select(cfg.eval, load_pool(cfg.data.pool_path()).records, cfg.data.seed)
    eval_records = [r for r in eval_records if r.source != "arithmetic"]
    bundle = {
        "config": json.loads(cfg.model_dump_json()), "threshold": clf.threshold, "run_dir": str(run_dir),
        "sft": [{**e.features(), "id": e.id, "path": e.path, "extra": e.id in extra_ids} for e in sft],
        "decision_only": [{**e.features(), "id": e.id, "path": e.path} for e in decision_only],
        "eval": [{"id": r.id, "prompt": r.prompt, "label": r.label, "source": r.source, "form": r.form,
                  "set": (r.model_extra or {}).get("eval_set", r.source), "pair_id": r.pair_id} for r in eval_records],
    }
    out.write_text(json.dumps(bundle))
    typer.echo(f"{out}: {len(bundle['sft'])} SFT ({len(extra_ids)} extra refuse), {len(decision_only)} "
               f"decision-only, {len(bundle['eval'])} eval prompts, threshold {clf.threshold:.3f}")


# --------------------------------------------------------------------------- run (GPU or CPU)


def _examples(bundle: dict, arm: dict, seed: int):
    from training.align.data import AlignExample, transfer_split

    def example(f: dict) -> AlignExample:
        return AlignExample(f["id"], f["path"], f["input_ids"], f["labels"], f["decision_positions"],
                            f["decision_target"], f["decision_label"])

    sft = [example(f) for f in bundle["sft"] if arm.get("extra_refuse_prompts", 1) or not f["extra"]]
    sft = transfer_split(sft, arm.get("sft_refuse_fraction", 1.0), bundle["config"]["data"]["seed"])
    if arm.get("lambda_decision", 1.0) == 0:
        return [e for e in sft if not e.decision_only]
    return sft + [example(f) for f in bundle["decision_only"][:arm.get("decision_only_prompts", 0)]]


def _job(bundle_path: str, model_dir: str, name: str, seed: int, batch_size: int, max_steps: int = -1,
         eval_limit: int | None = None) -> dict:
    """Train one arm x seed and score every eval prompt (runs in a worker process)."""
    import tempfile

    import torch

    from service.core.config import PipelineConfig
    from training.align.model import load_base_tokenizer
    from training.align.train import StepTimer, build_model, build_trainer
    from training.evaluate.decision_score import decision_scores

    torch.set_num_threads(2)
    bundle = json.loads(Path(bundle_path).read_text())
    raw = bundle["config"]
    raw["models"]["base"] = model_dir
    raw["align"].update({k: v for k, v in ARMS.get(name, {}).items() if k in raw["align"]},
                        seed=seed, decision_head="linear", batch_size=batch_size,
                        grad_accum=max(1, raw["align"]["batch_size"] * raw["align"]["grad_accum"] // batch_size))
    cfg = PipelineConfig.model_validate(raw)
    tokenizer = load_base_tokenizer(cfg.models)
    prompts = [r["prompt"] for r in bundle["eval"]][:eval_limit]
    started = time.monotonic()
    result = {"arm": name, "seed": seed, "overrides": ARMS.get(name, {})}
    if name == "base":
        from transformers import AutoModelForCausalLM

        llm = AutoModelForCausalLM.from_pretrained(model_dir).to("cuda" if torch.cuda.is_available() else "cpu")
    else:
        examples = _examples(bundle, ARMS[name], seed)
        model = build_model(cfg, None)
        timer = StepTimer()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = build_trainer(cfg, model, examples, tokenizer, Path(tmp), max_steps, progress=False, save=False,
                                    callbacks=[timer])
            trainer.train()
        llm = model.llm
        history = trainer.state.log_history
        result.update(examples=len(examples), decision_only=sum(e.decision_only for e in examples),
                      steps=trainer.state.global_step, train_s=time.monotonic() - started,
                      log=[{k: h[k] for k in h if k in ("step", "loss", "sft_loss", "decision_loss", "decision_mae",
                                                         "grad_norm_sft", "grad_norm_decision", "grad_cosine")}
                           for h in history if "loss" in h])
    llm.eval()
    scores = decision_scores(llm, tokenizer, prompts, batch_size=64, max_prompt_length=cfg.align.max_prompt_length)
    result["p_refuse"] = [round(s.p_refuse, 5) for s in scores]
    result["refuse"] = [int(s.greedy_refuse) for s in scores]
    result["wall_s"] = time.monotonic() - started
    return result


@app.command()
def run(bundle: Annotated[Path, typer.Option()], model: Annotated[Path, typer.Option(help="The base model dir.")],
        out: Annotated[Path, typer.Option()] = Path("results.jsonl"), arms: Annotated[str, typer.Option()] = "all",
        seeds: Annotated[str, typer.Option()] = "0,1,2", workers: Annotated[int, typer.Option()] = 8,
        batch_size: Annotated[int, typer.Option()] = 8,
        deadline_s: Annotated[float, typer.Option(help="Submit no new job after this many seconds.")] = 420,
        max_steps: Annotated[int, typer.Option(help="Cap optimizer steps (a smoke run).")] = -1,
        eval_limit: Annotated[int | None, typer.Option(help="Score only the first N eval prompts (a smoke run).")] = None,
        ) -> None:
    """Train and score every arm x seed (the base model once), in parallel worker processes."""
    import multiprocessing

    names = list(ARMS) if arms == "all" else arms.split(",")
    jobs = [("base", 0)] + [(n, int(s)) for s in seeds.split(",") for n in names]  # seed 0 of every arm first
    started = time.monotonic()
    done = {(r["arm"], r["seed"]) for r in _read(out)} if out.exists() else set()
    jobs = [j for j in jobs if j not in done]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool, open(out, "a") as fh:
        pending = {}
        while jobs or pending:
            while jobs and len(pending) < workers and time.monotonic() - started < deadline_s:
                name, seed = jobs.pop(0)
                pending[pool.submit(_job, str(bundle), str(model), name, seed, batch_size, max_steps, eval_limit)] = (name, seed)
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                name, seed = pending.pop(fut)
                try:
                    result = fut.result()
                except Exception as exc:  # noqa: BLE001 - one broken arm must not lose the others
                    result = {"arm": name, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
                fh.write(json.dumps(result) + "\n")
                fh.flush()
                summary = result.get("error") or f"{result['wall_s']:.0f}s, refuse {sum(result['refuse'])}"
                typer.echo(f"[{time.monotonic() - started:6.0f}s] {name} seed {seed}: {summary}")
    if jobs:
        typer.echo(f"deadline: {len(jobs)} jobs not run: {jobs}")


@app.command()
def score(bundle: Annotated[Path, typer.Option()], model: Annotated[Path, typer.Option(help="The base model dir.")],
          adapter: Annotated[Path, typer.Option(help="A trained adapter dir (e.g. a pipeline run's align/adapter).")],
          name: Annotated[str, typer.Option(help="The arm name it gets in the report.")],
          out: Annotated[Path, typer.Option()] = Path("results.jsonl"), seed: Annotated[int, typer.Option()] = 0,
          batch_size: Annotated[int, typer.Option()] = 16) -> None:
    """Score an adapter trained elsewhere (a CPU pipeline run, say) on the bundle's eval prompts; the row joins
    ``results.jsonl`` so the report sets it beside the sweep's arms."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.core.cot import template_text
    from training.evaluate.decision_score import decision_scores

    data = json.loads(bundle.read_text())
    tokenizer = AutoTokenizer.from_pretrained(model)
    template = data["config"]["models"].get("chat_template")
    if template:
        tokenizer.chat_template = template_text(template)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), adapter).to(device).eval()
    started = time.monotonic()
    scores = decision_scores(llm, tokenizer, [r["prompt"] for r in data["eval"]], batch_size=batch_size,
                             max_prompt_length=data["config"]["align"]["max_prompt_length"])
    row = {"arm": name, "seed": seed, "adapter": str(adapter), "p_refuse": [round(s.p_refuse, 5) for s in scores],
           "refuse": [int(s.greedy_refuse) for s in scores], "wall_s": time.monotonic() - started}
    with open(out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    typer.echo(f"{name}: {sum(row['refuse'])}/{len(scores)} refused, {row['wall_s']:.0f}s")


# --------------------------------------------------------------------------- report (here)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def groups(eval_rows: list[dict]) -> dict[str, list[int]]:
    """Named index sets: every eval set, and formmatched harmful/benign per form."""
    out: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(eval_rows):
        out[r["set"]].append(i)
        if r["source"] == "formmatched":
            out[f"formmatched/{r['label']}/{r['form']}"].append(i)
        out[f"all/{r['label']}"].append(i)
    return dict(sorted(out.items()))


@app.command()
def report(bundle: Annotated[Path, typer.Option()], results: Annotated[Path, typer.Option()],
           out: Annotated[Path, typer.Option()] = Path("sweep.md"),
           png: Annotated[Path | None, typer.Option()] = None) -> None:
    """Per arm (seeds pooled): refusal per set with Wilson intervals, AUROC of the decision score, and the
    exact McNemar test against the λ = 0 twin, pairing prompt x seed."""
    data = json.loads(bundle.read_text())
    rows = data["eval"]
    by_arm: dict[str, dict[int, dict]] = defaultdict(dict)
    errors = []
    for r in _read(results):
        if "error" in r:
            errors.append(r)
            continue
        by_arm[r["arm"]][r["seed"]] = r
    sets = groups(rows)
    harmful = sets.get("all/harmful", [])
    benign = sets.get("all/benign", [])
    lines = ["# Align sweep: greedy pre-CoT refusal per held-out set (seeds pooled; n = prompts x seeds)", "",
             (f"Bundle: {len(data['sft'])} SFT examples, {len(data['decision_only'])} decision-only prompts, "
              f"{len(rows)} eval prompts; run dir {data['run_dir']}."), ""]
    arms = [a for a in ["base", *ARMS] if a in by_arm] + [a for a in by_arm if a not in ARMS and a != "base"]
    header = "| set | n | " + " | ".join(arms) + " |"
    lines += [header, "|" + "---|" * (len(arms) + 2)]
    for name, idx in sets.items():
        cells = []
        for arm in arms:
            runs = by_arm[arm].values()
            k = sum(r["refuse"][i] for r in runs for i in idx)
            n = len(idx) * len(runs)
            lo, hi = wilson(k, n)
            cells.append(f"{k / n:.1%} ({lo:.0%}–{hi:.0%})" if n else "–")
        lines.append(f"| {name} | {len(idx)} | " + " | ".join(cells) + " |")
    lines += ["", ("| arm | seeds | AUROC harmful vs benign (mean over seeds) | steps | train s | final decision_mae | "
                   "grad norm sft / decision, cosine (mean) |"), "|---|---|---|---|---|---|---|"]
    for arm in arms:
        runs = list(by_arm[arm].values())
        au = [auroc([r["p_refuse"][i] for i in harmful], [r["p_refuse"][i] for i in benign]) for r in runs]
        logs = [h for r in runs for h in r.get("log", [])]
        mae = [next((h["decision_mae"] for h in reversed(r.get("log", [])) if "decision_mae" in h), math.nan)
               for r in runs]
        lines.append(f"| {arm} | {sorted(by_arm[arm])} | {sum(au) / len(au):.3f} | "
                     f"{runs[0].get('steps', '–')} | {sum(r.get('train_s', 0) for r in runs) / len(runs):.0f} | "
                     f"{sum(mae) / len(mae):.3f} | {_mean(logs, 'grad_norm_sft'):.3g} / "
                     f"{_mean(logs, 'grad_norm_decision'):.3g}, {_mean(logs, 'grad_cosine'):.2f} |")
    lines += ["", ("Paired against the λ = 0 twin (exact McNemar on prompt x seed pairs; b = arm refuses and twin "
                   "does not, c = the reverse):"), "", "| arm | twin | set | arm | twin | b | c | p |",
              "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        twin = TWINS.get(arm, BASELINE)
        if arm in ("base", twin) or twin not in by_arm or ARMS.get(arm, {}).get("lambda_decision", 0) == 0:
            continue
        seeds = sorted(set(by_arm[arm]) & set(by_arm[twin]))
        for name in ("jailbreak/harmful", "jailbreak/benign", "formmatched/harmful", "formmatched/benign",
                     "formmatched/edgy", "probes", "advbench", "writingbench"):
            idx = sets.get(name, [])
            if not idx or not seeds:
                continue
            a = [by_arm[arm][s]["refuse"][i] for s in seeds for i in idx]
            t = [by_arm[twin][s]["refuse"][i] for s in seeds for i in idx]
            b = sum(x and not y for x, y in zip(a, t, strict=True))
            c = sum(y and not x for x, y in zip(a, t, strict=True))
            lines.append(f"| {arm} | {twin} | {name} | {sum(a) / len(a):.1%} | {sum(t) / len(t):.1%} | {b} | {c} | "
                         f"{mcnemar_p(b, c):.3g} |")
    probes = [i for i, r in enumerate(rows) if r["set"] == "probes"]
    if probes and by_arm:
        lines += ["", "Probe prompts refused (of seeds) per arm:", "", "| prompt | " + " | ".join(arms) + " |",
                  "|" + "---|" * (len(arms) + 1)]
        for i in probes:
            cells = [f"{sum(r['refuse'][i] for r in by_arm[a].values())}/{len(by_arm[a])}" for a in arms]
            lines.append(f"| {rows[i]['prompt'][:60]} | " + " | ".join(cells) + " |")
    if errors:
        lines += ["", "Errors:", *[f"- {e['arm']} seed {e['seed']}: {e['error']}" for e in errors]]
    out.write_text("\n".join(lines) + "\n")
    typer.echo(out.read_text())
    if png:
        _plot(by_arm, sets, arms, png)


def _mean(logs: list[dict], key: str) -> float:
    values = [h[key] for h in logs if key in h]
    return sum(values) / len(values) if values else math.nan


def _plot(by_arm, sets, arms, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rate(arm, name):
        runs = by_arm[arm].values()
        idx = sets.get(name, [])
        return sum(r["refuse"][i] for r in runs for i in idx) / max(1, len(idx) * len(runs))

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, (harm, ben, title) in zip(axes, [("formmatched/harmful", "formmatched/benign", "form-matched"),
                                              ("jailbreak/harmful", "jailbreak/benign", "jailbreak-wrapped")],
                                      strict=True):
        for n, arm in enumerate(arms):
            plain = ARMS.get(arm, {}).get("lambda_decision", 1.0) == 0 or arm == "base"
            ax.scatter(rate(arm, ben), rate(arm, harm), marker="x" if plain else "o", s=60,
                       color=plt.cm.tab20(n % 20), label=f"{arm}{' (λ = 0)' if plain and arm != 'base' else ''}")
        ax.set_xlabel("benign refused (over-refusal)")
        ax.set_ylabel("harmful refused")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{title}: greedy pre-CoT refusal, seeds pooled")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
