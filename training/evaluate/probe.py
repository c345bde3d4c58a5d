"""Linear probes on the pre-CoT states: at which layers do a model's states, before its chain of thought,
separate harmful from benign prompts?

Each prompt is read at the positions the decision loss trains on (the assistant header through the opening
``<think>``, plus the prompt's last token: :func:`training.align.data.encode_decision_prompt`). Every entry of
``hidden_states`` (the embeddings, then each block's output) is reduced as the linear decision head reduces it
(:class:`training.align.model.LinearDecisionHead`): normalised without parameters, averaged over those
positions; one vector per prompt and layer, not averaged over layers. A logistic regression on these frozen
states, scored by stratified k-fold cross-validation (AUROC of the out-of-fold scores), says whether the
decision is linearly readable *before* the CoT, and from which layer on. Probing the base model, the λ = 0
twin and the PreSafe adapter on the same prompts shows whether decision supervision moved it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from service.core.config import PipelineConfig
from training.align.data import AlignCollator, encode_decision_prompt
from training.align.model import pre_cot_vector

BASE = "base"
RESERVED = (BASE, "n", "layers")  # keys of probe.json that are not adapter names
PROBE_JSON, PROBE_PNG = "probe.json", "probe.png"

Log = Callable[[str], None]


class ProbeError(ValueError):
    """The probe cannot run with these inputs (too few examples, a bad adapter spec, …)."""


@torch.no_grad()
def layer_states(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 16, max_prompt_length: int = 256,
                 progress: bool = False, desc: str = "states") -> torch.Tensor:
    """(L+1) × N × d float32: each prompt's pre-CoT state at every entry of ``hidden_states``, normalised
    without parameters per layer and averaged over the pre-CoT positions. ``model``: a causal LM, a PEFT model
    too. Batches are right-padded with an attention mask, as in training (:class:`AlignCollator`)."""
    from tqdm.auto import tqdm

    if not prompts:
        raise ProbeError("no prompts to probe")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = AlignCollator(pad)
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress):
        features = []
        for prompt in prompts[start:start + batch_size]:
            ids, positions, _ = encode_decision_prompt(tokenizer, prompt, max_prompt_length)
            features.append({"input_ids": ids, "labels": [-100] * len(ids), "decision_positions": positions})
        batch = {k: v.to(device) for k, v in collate(features).items()}
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True, logits_to_keep=1).hidden_states
        rows = torch.arange(len(features), device=device).unsqueeze(1)
        picked = (states[rows, batch["decision_positions"]] for states in hidden)
        out.append(torch.stack([pre_cot_vector(p, batch["decision_mask"]) for p in picked]).cpu())
    return torch.cat(out, dim=1)


def probe_auroc(states: torch.Tensor, labels: Sequence[int], *, folds: int = 5, seed: int = 0) -> list[float]:
    """Per layer of ``states`` (L × N × d), the AUROC of a logistic-regression probe's out-of-fold scores
    (stratified ``folds``-fold cross-validation, standardised features). ``labels``: 1 harmful, 0 benign."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels, dtype=int)
    if states.ndim != 3 or states.shape[1] != len(y):
        raise ProbeError(f"states {tuple(states.shape)} do not match {len(y)} labels (expected L × N × d)")
    if not set(y.tolist()) <= {0, 1}:
        raise ProbeError("labels must be 1 (harmful) or 0 (benign)")
    harmful, benign = int(y.sum()), int(len(y) - y.sum())
    if min(harmful, benign) < folds:
        raise ProbeError(f"a {folds}-fold probe needs at least {folds} harmful and {folds} benign prompts; "
                         f"got {harmful} harmful and {benign} benign")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return [float(roc_auc_score(y, cross_val_predict(probe, layer.numpy(), y, cv=cv, method="decision_function")))
            for layer in states.float()]


def write_probe_plot(results: dict[str, list[float]], path: Path, title: str | None = None) -> None:
    """Probe AUROC (y) against layer (x, 0 = the embeddings), one line per model; chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (name, aurocs) in enumerate(results.items()):
        ax.plot(range(len(aurocs)), aurocs, marker="o", markersize=3, label=name, color=f"C{i}")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.9)
    low = min([0.4, *(v for aurocs in results.values() for v in aurocs)])
    ax.set_ylim(low - 0.02, 1.02)
    ax.set_xlabel("layer (0 = embeddings)", fontsize=9)
    ax.set_ylabel("probe AUROC, harmful vs benign", fontsize=9)
    ax.set_title(title or "linear probe on the pre-CoT states (out-of-fold AUROC)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_adapters(specs: Sequence[str]) -> dict[str, Path]:
    """``["presafe=DIR", …]`` → ``{"presafe": Path(DIR)}``; a bad spec, a reserved or repeated name or a
    directory without ``adapter_config.json`` is a :class:`ProbeError`."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = (part.strip() for part in spec.partition("="))
        if not sep or not name or not directory:
            raise ProbeError(f"bad --adapter {spec!r}: expected NAME=DIR")
        if name in RESERVED or name in out:
            raise ProbeError(f"bad --adapter {spec!r}: the name {name!r} is "
                             f"{'taken' if name in out else 'reserved'}")
        if not (Path(directory) / "adapter_config.json").is_file():
            raise ProbeError(f"--adapter {name}: no PEFT adapter at {directory} (no adapter_config.json)")
        out[name] = Path(directory)
    return out


def run_probe(cfg: PipelineConfig, adapters: dict[str, Path], out_dir: Path, *, limit_per_set: int | None = None,
              folds: int = 5, batch_size: int = 16, progress: bool = True, log: Log = lambda msg: None) -> dict:
    """Probe the base model and each adapter on the held-out eval prompts (``presafe eval``'s selection
    without arithmetic and the uncapped set); writes ``probe.json`` and ``probe.png`` into ``out_dir``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from service.core.assets import resolve_model
    from training.align.model import load_base_tokenizer, torch_dtype
    from training.data import HARMFUL, load_pool
    from training.evaluate.data import set_of
    from training.evaluate.run import select

    eval_cfg = cfg.eval.updated(arithmetic_splits=[], uncapped_n=0, limit_per_set=limit_per_set)
    records = select(eval_cfg, load_pool(cfg.data.pool_path()).records, cfg.data.seed)
    labels = [int(r.label == HARMFUL) for r in records]
    prompts = [r.prompt for r in records]
    n = {"harmful": sum(labels), "benign": len(labels) - sum(labels), "folds": folds,
         "sets": dict(sorted(Counter(set_of(r) for r in records).items()))}
    if min(n["harmful"], n["benign"]) < folds:  # before loading any model
        raise ProbeError(f"a {folds}-fold probe needs at least {folds} harmful and {folds} benign prompts; the "
                         f"eval selection has {n['harmful']} harmful and {n['benign']} benign")
    log(f"{len(prompts)} prompts ({n['harmful']} harmful, {n['benign']} benign) × {1 + len(adapters)} model(s)")
    tokenizer = load_base_tokenizer(cfg.models)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.models.base),
                                                 dtype=torch_dtype(cfg.models.dtype)).to(device).eval()
    max_len = cfg.align.max_prompt_length
    results: dict[str, list[float]] = {}
    for name, directory in {BASE: None, **adapters}.items():
        probed = model if directory is None else PeftModel.from_pretrained(model, directory).eval()
        states = layer_states(probed, tokenizer, prompts, batch_size=batch_size, max_prompt_length=max_len,
                              progress=progress, desc=name)
        results[name] = probe_auroc(states, labels, folds=folds, seed=cfg.data.seed)
        if directory is not None:
            model = probed.unload()  # the base model again, without this adapter's LoRA layers
        best = max(range(len(results[name])), key=results[name].__getitem__)
        log(f"{name}: best layer {best}, AUROC {results[name][best]:.3f} (last layer {results[name][-1]:.3f})")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {**results, "n": n, "layers": len(results[BASE])}
    (out_dir / PROBE_JSON).write_text(json.dumps(report, indent=2) + "\n")
    write_probe_plot(results, out_dir / PROBE_PNG,
                     title=f"linear probe on the pre-CoT states: {n['harmful']} harmful vs {n['benign']} benign "
                           f"held-out prompts, {folds}-fold out-of-fold AUROC")
    return report
