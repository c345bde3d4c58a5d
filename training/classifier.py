"""Stage 1, classifier: fine-tune a BERT-family encoder on prompt → teacher decision.

The classifier "encapsulates the teacher's binary safety policy": it reads only the prompt and
returns the probability that the teacher refuses. Input is the teacher's JSONL
(:mod:`training.teacher`); the pool's splits are kept: ``train`` trains, ``val`` picks the decision
threshold (best F1, on the style-matched part of ``val``: ``threshold_sources``, where harmful and
benign prompts share forms), ``test`` and ``heldout`` measure it.

Beside F1 and AUROC, every measured split reports what a style detector would fail:

- **pairs**: counterfactual pairs (``pair_id``: a harmful and a benign prompt differing only in the
  task) must get different verdicts; ``accuracy`` = share of pairs with the harmful member at or
  above the threshold and the benign one below;
- **calibration**: ECE over 10 equal-width bins of p(refuse), and ``reliability.png``;
- **forms**: false-refuse rate (benign marked refuse) and miss rate (harmful marked comply) per
  surface form, with Wilson 95% intervals.

"Harmful" there is the pool label (the teacher decision where a record has none); F1, AUROC and
ECE are measured against the teacher decision the classifier learns.

Output (written atomically, default ``$PRESAFE_HOME/classifier/``): a Hugging Face model dir that
``AutoModelForSequenceClassification`` loads (two labels, ``id2label = {0: comply, 1: refuse}``),
its tokenizer, ``metrics.json`` (``threshold``, ``threshold_set``, metrics per split, source and
form; ``config.max_length`` is what the gateway truncates to) and ``reliability.png``. Stage 2 feeds
the frozen classifier ``inputs_embeds``, which every BERT-family encoder accepts; a backbone that is
not an encoder is refused up front.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.core.assets import AssetError, atomic_dir, resolve_model, write_manifest
from service.core.config import ClassifierConfig
from service.core.formats import CLASSIFIER_ONNX
from service.core.hardware import autocast_bf16
from service.core.labels import CLASSIFIER_LABELS, REFUSE
from service.core.settings import get_settings

METRICS_FILE = "metrics.json"
RELIABILITY_FILE = "reliability.png"
ECE_BINS = 10
NO_FORM = "unspecified"


class ClassifierError(ValueError):
    """The classifier cannot be trained with this backbone or data."""


# Fixed options of a classifier run (recorded in ``metrics.json`` ``config`` beside the ``classifier`` section).
TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("val", "test", "heldout")
EVAL_BATCH_SIZE = 64
ONNX = True  # also export model.onnx (ONNX Runtime) when onnx is installed


def default_output() -> Path:
    return get_settings().root / "classifier"


# --------------------------------------------------------------------------- backbone


def check_encoder(backbone: str) -> str:
    """Resolve ``backbone`` and make sure it is an encoder; return its path or id."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    path = resolve_model(backbone)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ClassifierError(f"cannot load a model config from {backbone!r} ({path}): {exc}") from None
    kind = config.model_type
    encoder = (kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and kind in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
               and not getattr(config, "is_encoder_decoder", False) and not getattr(config, "is_decoder", False))
    if not encoder:
        arch = ", ".join(getattr(config, "architectures", None) or [kind])
        raise ClassifierError(
            f"classifier backbone {backbone!r} is a {kind!r} model ({arch}), not an encoder; the decision "
            f"classifier needs a BERT-family encoder (bert, roberta, distilbert, deberta-v2, electra, …), "
            f"e.g. all-minilm-l6-v2")
    return path


# --------------------------------------------------------------------------- data and metrics


@dataclass
class Example:
    id: str
    prompt: str
    source: str
    split: str
    target: int  # 1 = refuse (the teacher's decision)
    label: str | None = None  # the pool's "harmful" / "benign"
    form: str | None = None
    pair_id: str | None = None
    template: str | None = None  # the jailbreak template a wrapped prompt is in
    base_id: str | None = None  # the id of the prompt it wraps

    @property
    def harmful(self) -> bool:
        """The pool label; the teacher decision where the record has none."""
        return self.label == "harmful" if self.label in ("harmful", "benign") else bool(self.target)


def load_examples(teacher_path: Path) -> list[Example]:
    from training.teacher import iter_teacher

    rows = [Example(r.id, r.prompt, r.source, r.split, int(r.decision == REFUSE), r.label, r.form, r.pair_id,
                    r.template, r.base_id) for r in iter_teacher(teacher_path)]
    if not rows:
        raise AssetError(f"{teacher_path} holds no teacher records")
    return rows


def sample_stratified(examples: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded sample of ``n`` examples keeping each (source, decision) group's share (largest
    remainder; original order kept); all of them when ``n`` is None or not smaller."""
    if n is None or n >= len(examples):
        return list(examples)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault((e.source, e.target), []).append(i)
    keys = sorted(groups)
    exact = {k: n * len(groups[k]) / len(examples) for k in keys}
    quota = {k: int(exact[k]) for k in keys}
    for k in sorted(keys, key=lambda k: (-(exact[k] - quota[k]), k))[: n - sum(quota.values())]:
        quota[k] += 1
    rng = random.Random(seed)
    chosen = sorted(i for k in keys for i in rng.sample(groups[k], quota[k]))
    return [examples[i] for i in chosen]


def recovered_templates(examples: Sequence[Example]) -> dict[str, list[str]]:
    """Template name → the text around its prompt (``prompt.join(parts)`` renders it), recovered from the
    wrapped ``examples`` whose wrapped prompt is among ``examples`` (sorted by name)."""
    by_id = {e.id: e for e in examples}
    out: dict[str, list[str]] = {}
    for e in examples:
        base = by_id.get(e.base_id) if e.template and e.base_id else None
        if base is not None and base.prompt and base.prompt in e.prompt and e.template not in out:
            out[e.template] = e.prompt.split(base.prompt)
    return dict(sorted(out.items()))


def wrapped_copies(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """``n`` (about: pairs come whole) seeded copies of unwrapped ``examples`` inside the templates their wrapped
    prompts use, as extra training data in which the wrapper carries no label: counterfactual pairs are drawn
    whole and wrapped in one template, so each template holds a prompt and its twin with opposite decisions. A
    copy keeps its prompt's decision. Empty when ``examples`` hold no recoverable template."""
    templates = recovered_templates(examples)
    if not n or not templates:
        return []
    wrapped_sources = {e.source for e in examples if e.template}
    units: dict[str, list[Example]] = {}
    for e in examples:
        if not e.template and e.source not in wrapped_sources:
            units.setdefault(e.pair_id or e.id, []).append(e)
    rng = random.Random(f"{seed}:wrapped")
    keys = sorted(units)
    rng.shuffle(keys)
    names = list(templates)
    copies: list[Example] = []
    for key in keys:
        if len(copies) >= n:
            break
        name = rng.choice(names)
        for e in units[key]:
            copies.append(Example(f"{e.id}~{name}", e.prompt.join(templates[name]).strip(), e.source, e.split,
                                  e.target, e.label, "jailbreak", None, name, e.id))
    return copies


def binary_metrics(targets: Sequence[int], probs: Sequence[float], threshold: float) -> dict:
    """Accuracy, precision, recall, F1 (refuse = positive) and AUROC (when both classes occur)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    preds = [int(p >= threshold) for p in probs]
    prec, rec, f1, _ = precision_recall_fscore_support(targets, preds, average="binary", zero_division=0)
    both = len(set(targets)) == 2
    return {
        "n": len(targets), "refuse_share": sum(targets) / len(targets) if targets else math.nan,
        "accuracy": accuracy_score(targets, preds), "precision": float(prec), "recall": float(rec), "f1": float(f1),
        "auroc": float(roc_auc_score(targets, probs)) if both else None,
        "predicted_refuse_rate": sum(preds) / len(preds) if preds else math.nan,
    }


def pick_threshold(targets: Sequence[int], probs: Sequence[float]) -> float:
    """The threshold with the best F1 on ``targets`` (midpoints between sorted scores; ties → nearest 0.5)."""
    from sklearn.metrics import f1_score

    if len(set(targets)) < 2:
        return 0.5
    scores = sorted(set(probs))
    candidates = [0.5] + [(a + b) / 2 for a, b in itertools.pairwise(scores)]
    best = max(candidates, key=lambda t: (f1_score(targets, [int(p >= t) for p in probs], zero_division=0),
                                          -abs(t - 0.5)))
    return float(best)


def choose_threshold(examples: Sequence[Example], probs: Sequence[float],
                     sources: Sequence[str]) -> tuple[float, dict]:
    """The best-F1 threshold on the style-matched part of ``examples`` (those from ``sources``) when
    it holds both decisions, else on all of them; and a note of the set used
    (``sources``: None for all, ``n``, ``style_matched``)."""
    idx = [i for i, e in enumerate(examples) if e.source in sources]
    if len({examples[i].target for i in idx}) == 2:
        info = {"sources": sorted({examples[i].source for i in idx}), "n": len(idx), "style_matched": True}
    else:
        idx = list(range(len(examples)))
        info = {"sources": None, "n": len(idx), "style_matched": False}
    return pick_threshold([examples[i].target for i in idx], [probs[i] for i in idx]), info


def calibration(targets: Sequence[int], probs: Sequence[float], bins: int = ECE_BINS) -> dict:
    """Expected calibration error over ``bins`` equal-width bins of p(refuse) (a bin holds
    ``[lo, hi)``, the last one also 1.0): sum over bins of (bin share) × |refuse share − mean p|;
    ``bins`` lists the non-empty bins (the reliability curve)."""
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, p in enumerate(probs):
        members[min(int(p * bins), bins - 1)].append(i)
    curve, ece = [], 0.0
    for b, idx in enumerate(members):
        if not idx:
            continue
        mean_p = sum(probs[i] for i in idx) / len(idx)
        share = sum(targets[i] for i in idx) / len(idx)
        ece += len(idx) / len(probs) * abs(share - mean_p)
        curve.append({"lo": b / bins, "hi": (b + 1) / bins, "n": len(idx), "mean_p": mean_p, "refuse_share": share})
    return {"ece": ece if probs else None, "bins": curve}


def pair_metrics(examples: Sequence[Example], probs: Sequence[float], threshold: float) -> dict | None:
    """Counterfactual pairs (same ``pair_id``: every harmful × benign member): ``accuracy`` = share
    with the harmful member refused and the benign one not; ``different`` = share with different
    verdicts. None when ``examples`` hold no complete pair."""
    from training.evaluate.stats import wilson

    groups: dict[str, tuple[list[float], list[float]]] = {}
    for e, p in zip(examples, probs, strict=True):
        if e.pair_id:
            groups.setdefault(e.pair_id, ([], []))[0 if e.harmful else 1].append(p)
    n = correct = different = 0
    for harmful, benign in groups.values():
        for h, b in itertools.product(harmful, benign):
            n += 1
            correct += h >= threshold > b
            different += (h >= threshold) != (b >= threshold)
    if not n:
        return None
    return {"n": n, "accuracy": correct / n, "accuracy_ci95": wilson(correct, n), "different": different / n}


def _rate(k: int, n: int) -> dict:
    from training.evaluate.stats import wilson

    return {"value": k / n if n else None, "k": k, "n": n, "ci95": wilson(k, n)}


def form_rates(examples: Sequence[Example], probs: Sequence[float], threshold: float) -> dict[str, dict]:
    """Per surface form: ``false_refuse`` (benign at or above the threshold) and ``miss`` (harmful
    below it) with Wilson 95% intervals, and F1 against the teacher decision (None without refusals)."""
    by_form: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_form.setdefault(e.form or NO_FORM, []).append(i)
    out = {}
    for form in sorted(by_form):
        idx = by_form[form]
        benign = [i for i in idx if not examples[i].harmful]
        harmful = [i for i in idx if examples[i].harmful]
        targets = [examples[i].target for i in idx]
        out[form] = {
            "n": len(idx),
            "f1": binary_metrics(targets, [probs[i] for i in idx], threshold)["f1"] if any(targets) else None,
            "false_refuse": _rate(sum(probs[i] >= threshold for i in benign), len(benign)),
            "miss": _rate(sum(probs[i] < threshold for i in harmful), len(harmful)),
        }
    return out


def split_report(examples: Sequence[Example], probs: Sequence[float], threshold: float) -> dict:
    """Every metric of one split: binary metrics, ``ece``, ``pairs``, ``forms`` and the reliability ``bins``."""
    targets = [e.target for e in examples]
    cal = calibration(targets, probs)
    return {**binary_metrics(targets, probs, threshold), "ece": cal["ece"],
            "pairs": pair_metrics(examples, probs, threshold), "forms": form_rates(examples, probs, threshold),
            "reliability": cal["bins"]}


def write_reliability_plot(splits: dict[str, dict], path: Path) -> Path:
    """Reliability diagram: refuse share against mean p(refuse) per bin, one curve per split."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    for name, s in splits.items():
        bins = s["reliability"]
        ax.plot([b["mean_p"] for b in bins], [b["refuse_share"] for b in bins], marker="o",
                label=f"{name} (ECE {s['ece']:.3f}, n={s['n']})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean p(refuse) in bin", ylabel="share the teacher refuses",
           title=f"classifier reliability ({ECE_BINS} bins)")
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------- training


@dataclass
class ClassifierResult:
    path: Path
    metrics: dict
    seconds: float


class _Encoded:
    """A list of tokenised examples (a torch-style map dataset without the datasets library)."""

    def __init__(self, tokenizer, examples: Sequence[Example], max_length: int):
        enc = tokenizer([e.prompt for e in examples], truncation=True, max_length=max_length)
        self.items = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                       "labels": e.target} for i, e in enumerate(examples)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def refuse_probabilities(model, tokenizer, prompts: Sequence[str], max_length: int,
                         batch_size: int = 64) -> list[float]:
    """p(refuse) of each prompt, in input order (batched by length, padded per batch)."""
    import torch

    enc = tokenizer(list(prompts), truncation=True, max_length=max_length)
    order = sorted(range(len(prompts)), key=lambda i: len(enc["input_ids"][i]))
    out = [0.0] * len(prompts)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc}, return_tensors="pt").to(model.device)
            probs = torch.softmax(model(**batch).logits.float(), dim=-1)[:, 1].tolist()
            for i, p in zip(idx, probs, strict=True):
                out[i] = p
    return out


def train_classifier(cfg: ClassifierConfig, backbone: str, teacher_path: Path, out: Path | None = None, *,
                     threads: int | None = None, log: Callable[[str], None] = lambda msg: None,
                     callbacks: Sequence = ()) -> ClassifierResult:
    """Fine-tune ``backbone`` (known name, local dir or HF id of a BERT-family encoder) with the config's
    ``classifier`` section, pick the threshold on (the style-matched part of) ``val``, measure, and save the
    model dir with ``metrics.json`` and ``reliability.png`` (``threads``: torch CPU threads, default torch's
    choice; ``callbacks``: extra ``TrainerCallback``s, e.g. the pipeline's progress)."""
    start = time.monotonic()
    out = out or default_output()
    backbone_path = check_encoder(backbone)
    examples = load_examples(teacher_path)
    by_split: dict[str, list[Example]] = {}
    for e in examples:
        by_split.setdefault(e.split, []).append(e)
    available = [e for s in TRAIN_SPLITS for e in by_split.get(s, [])]
    train = sample_stratified(available, cfg.max_train_examples, cfg.seed)
    sampled = f" (sampled from {len(available)})" if len(train) < len(available) else ""
    copies = wrapped_copies(available, cfg.wrapped_copies, cfg.seed)
    train += copies
    if not train or len({e.target for e in train}) < 2:
        raise ClassifierError(f"{teacher_path}: the {'/'.join(TRAIN_SPLITS)} split needs both refuse and "
                              f"comply decisions (found {len(train)} records)")

    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    if threads:
        torch.set_num_threads(threads)
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(backbone_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        backbone_path, num_labels=2, id2label=CLASSIFIER_LABELS, label2id={v: k for k, v in CLASSIFIER_LABELS.items()})
    train_ds = _Encoded(tokenizer, train, cfg.max_length)
    steps = math.ceil(len(train_ds) / cfg.batch_size) * cfg.epochs
    tokens = sum(len(item["input_ids"]) for item in train_ds.items)
    sampled += f", {len(copies)} of them again inside jailbreak templates" if copies else ""
    log(f"training {backbone_path} on {len(train_ds)} prompts{sampled} ({sum(e.target for e in train)} refuse, "
        f"{tokens} tokens), {cfg.epochs:g} epochs, ~{int(steps)} steps")
    with tempfile.TemporaryDirectory(prefix="presafe-classifier-") as scratch:
        # group_by_length: batches of similar length, so dynamic padding keeps short prompts cheap
        args = TrainingArguments(
            output_dir=scratch, num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=EVAL_BATCH_SIZE, learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay, warmup_steps=int(steps * cfg.warmup_fraction), lr_scheduler_type="linear",
            logging_steps=max(1, int(steps) // 10), save_strategy="no", eval_strategy="no", report_to="none",
            seed=cfg.seed, dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=False,
            train_sampling_strategy="group_by_length", bf16=autocast_bf16(cfg.mixed_precision),
            use_cpu=not torch.cuda.is_available())  # the Trainer runs bf16 autocast on a CPU only when told
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, callbacks=list(callbacks),
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
        trainer.train()
        # without the Trainer's autocast wrapper: the scoring below and the ONNX export run fp32, as the gateway
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    train_seconds = time.monotonic() - start

    probs = {split: refuse_probabilities(model, tokenizer, [e.prompt for e in by_split[split]], cfg.max_length,
                                         EVAL_BATCH_SIZE)
             for split in dict.fromkeys([cfg.threshold_split, *EVAL_SPLITS]) if by_split.get(split)}
    val = by_split.get(cfg.threshold_split)
    if val:
        threshold, threshold_set = choose_threshold(val, probs[cfg.threshold_split], cfg.threshold_sources)
        if not threshold_set["style_matched"]:
            log(f"no style-matched {cfg.threshold_split} prompts (sources {', '.join(cfg.threshold_sources)}): "
                f"threshold picked on all of {cfg.threshold_split}")
    else:
        threshold, threshold_set = 0.5, {"sources": None, "n": 0, "style_matched": False}
        log(f"no {cfg.threshold_split} split: threshold stays 0.5")
    threshold_set["split"] = cfg.threshold_split
    splits = {s: split_report(by_split[s], probs[s], threshold) for s in probs}
    sources: dict[str, dict] = {}
    for s in probs:
        if s == cfg.threshold_split:
            continue
        ex = by_split[s]
        for src in sorted({e.source for e in ex}):
            idx = [i for i, e in enumerate(ex) if e.source == src]
            sources[f"{s}/{src}"] = binary_metrics([ex[i].target for i in idx], [probs[s][i] for i in idx], threshold)
    metrics = {
        "threshold": threshold, "threshold_split": cfg.threshold_split, "threshold_set": threshold_set,
        "positive_label": REFUSE, "backbone": backbone, "teacher": str(teacher_path),
        "train": {"n": len(train_ds), "available": len(available), "refuse": sum(e.target for e in train),
                  "wrapped_copies": len(copies), "tokens": tokens, "steps": int(steps), "seconds": round(train_seconds, 1)},
        "splits": splits, "sources": sources, "config": {
            "backbone": backbone, **cfg.model_dump(mode="json"), "eval_batch_size": EVAL_BATCH_SIZE,
            "threads": threads, "onnx": ONNX, "train_splits": list(TRAIN_SPLITS), "eval_splits": list(EVAL_SPLITS)},
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_reliability_plot(splits, tmp / RELIABILITY_FILE)
        if ONNX:
            metrics["onnx"] = export_onnx(model, tokenizer, tmp / CLASSIFIER_ONNX, log)
        metrics["train_seconds"] = round(time.monotonic() - start, 1)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        write_manifest(tmp, kind="presafe-classifier", backbone=backbone, threshold=threshold)
    return ClassifierResult(out, metrics, time.monotonic() - start)


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _rate_cell(rate: dict) -> str:
    if not rate["n"]:
        return "–"
    lo, hi = rate["ci95"]
    return f"{rate['value']:.3f} [{lo:.2f}–{hi:.2f}] {rate['k']}/{rate['n']}"


def summary_tables(metrics: dict) -> list:
    """Rich tables of a classifier's ``metrics.json``: per split and source (F1, AUROC, ECE,
    counterfactual pairs), then false-refuse and miss rates per split and form."""
    from rich.table import Table

    ts = metrics.get("threshold_set") or {}
    picked = metrics["threshold_split"] + (f" ({', '.join(ts['sources'])})" if ts.get("sources") else " (all)")
    main = Table("split", "n", "F1", "AUROC", "ECE", "pair accuracy", "pairs differing",
                 title=f"classifier: threshold {metrics['threshold']:.3f}, picked on {picked}, n={ts.get('n', '?')}")
    for name, s in metrics["splits"].items():
        pairs = s.get("pairs")
        main.add_row(name, str(s["n"]), _num(s["f1"]), _num(s["auroc"]), _num(s.get("ece")),
                     f"{pairs['accuracy']:.3f} (n={pairs['n']})" if pairs else "–",
                     _num(pairs["different"]) if pairs else "–")
    for name, s in metrics.get("sources", {}).items():
        main.add_row(f"  {name}", str(s["n"]), _num(s["f1"]), _num(s["auroc"]), "", "", "", style="dim")
    forms = Table("split", "form", "n", "F1", "false refuse (benign)", "miss (harmful)",
                  title="error rates per form (Wilson 95%)")
    for name, s in metrics["splits"].items():
        for form, f in s.get("forms", {}).items():
            forms.add_row(name, form, str(f["n"]), _num(f["f1"]), _rate_cell(f["false_refuse"]), _rate_cell(f["miss"]))
    return [main, forms]


def export_onnx(model, tokenizer, path: Path, log: Callable[[str], None] = lambda msg: None) -> bool:
    """Export the classifier to ONNX (dynamic batch and sequence axes; inputs as the tokenizer names
    them, output ``logits``) for ONNX Runtime; False, with a note, when ``onnx`` is not installed."""
    import importlib.util

    import torch

    if importlib.util.find_spec("onnx") is None:
        log("onnx is not installed: no model.onnx (pip install onnx onnxruntime)")
        return False
    enc = tokenizer("an example prompt", return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
    model = model.to("cpu").eval()
    with torch.inference_mode():
        torch.onnx.export(model, tuple(enc[n] for n in names), str(path), input_names=names, output_names=["logits"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names}, opset_version=17,
                          dynamo=False)
    return True


def load_classifier(path: Path | None = None):
    """(tokenizer, model, threshold) of a saved classifier dir, model in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path or default_output())
    metrics_path = path / METRICS_FILE
    if not metrics_path.is_file():
        raise AssetError(f"no trained classifier at {path}; make one with: presafe train classifier")
    threshold = json.loads(metrics_path.read_text())["threshold"]
    return (AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval(),
            threshold)
