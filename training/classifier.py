"""Stage 1, classifier: fine-tune a BERT-family encoder on prompt → teacher decision.

The classifier "encapsulates the teacher's binary safety policy": it reads only the prompt and
returns the probability that the teacher refuses. Input is the teacher's JSONL
(:mod:`training.teacher`); the pool's splits are kept: ``train`` trains, ``val`` picks the decision
threshold (best F1), ``test`` and ``heldout`` (whole sources never seen in training) measure it.

Output (written atomically, default ``$PRESAFE_HOME/classifier/``): a Hugging Face model dir that
``AutoModelForSequenceClassification`` loads (two labels, ``id2label = {0: comply, 1: refuse}``),
its tokenizer, and ``metrics.json`` with ``threshold`` and the metrics per split. Stage 2 feeds the
frozen classifier ``inputs_embeds``, which every BERT-family encoder accepts; a backbone that is
not an encoder is refused up front.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from service.assets import AssetError, atomic_dir, resolve_model, write_manifest
from service.settings import get_settings

LABELS = {0: "comply", 1: "refuse"}
METRICS_FILE = "metrics.json"
ONNX_FILE = "model.onnx"


class ClassifierError(ValueError):
    """The classifier cannot be trained with this backbone or data."""


class ClassifierConfig(BaseModel):
    """Fine-tuning settings (defaults sized for MiniLM on ~1.5k short prompts on 2 CPU cores)."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field(default_factory=lambda: get_settings().classifier_model,
                          description="Known name, local dir or HF id of a BERT-family encoder.")
    max_length: int = Field(default=128, gt=8)
    epochs: float = Field(default=3.0, gt=0)
    batch_size: int = Field(default=32, gt=0)
    eval_batch_size: int = Field(default=64, gt=0)
    learning_rate: float = Field(default=1e-4, gt=0)
    weight_decay: float = 0.01
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 0
    threads: int | None = Field(default=None, description="torch CPU threads (default: torch's choice).")
    onnx: bool = Field(default=True, description="Also export model.onnx (ONNX Runtime) when onnx is installed.")
    train_splits: tuple[str, ...] = ("train",)
    threshold_split: str = "val"
    eval_splits: tuple[str, ...] = ("val", "test", "heldout")


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
    target: int  # 1 = refuse


def load_examples(teacher_path: Path) -> list[Example]:
    from training.teacher import REFUSE, iter_teacher

    rows = [Example(r.id, r.prompt, r.source, r.split, int(r.decision == REFUSE)) for r in iter_teacher(teacher_path)]
    if not rows:
        raise AssetError(f"{teacher_path} holds no teacher records")
    return rows


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


def refuse_probabilities(trainer, dataset) -> list[float]:
    import torch

    logits = torch.as_tensor(trainer.predict(dataset).predictions)
    return torch.softmax(logits.float(), dim=-1)[:, 1].tolist()


def train_classifier(cfg: ClassifierConfig, teacher_path: Path, out: Path | None = None,
                     log: Callable[[str], None] = lambda msg: None, callbacks: Sequence = ()) -> ClassifierResult:
    """Fine-tune, pick the threshold on ``val``, measure, and save the model dir with ``metrics.json``
    (``callbacks``: extra ``TrainerCallback``s, e.g. the pipeline's progress)."""
    start = time.monotonic()
    out = out or default_output()
    backbone = check_encoder(cfg.backbone)
    examples = load_examples(teacher_path)
    by_split: dict[str, list[Example]] = {}
    for e in examples:
        by_split.setdefault(e.split, []).append(e)
    train = [e for s in cfg.train_splits for e in by_split.get(s, [])]
    if not train or len({e.target for e in train}) < 2:
        raise ClassifierError(f"{teacher_path}: the {'/'.join(cfg.train_splits)} split needs both refuse and "
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

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = AutoModelForSequenceClassification.from_pretrained(
        backbone, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    train_ds = _Encoded(tokenizer, train, cfg.max_length)
    steps = math.ceil(len(train_ds) / cfg.batch_size) * cfg.epochs
    log(f"training {backbone} on {len(train_ds)} prompts ({sum(e.target for e in train)} refuse), "
        f"{cfg.epochs:g} epochs, ~{int(steps)} steps")
    with tempfile.TemporaryDirectory(prefix="presafe-classifier-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.eval_batch_size, learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay, warmup_steps=int(steps * cfg.warmup_fraction), lr_scheduler_type="linear",
            logging_steps=max(1, int(steps) // 10), save_strategy="no", eval_strategy="no", report_to="none",
            seed=cfg.seed, dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=False)
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, callbacks=list(callbacks),
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
        trainer.train()

        probs: dict[str, list[float]] = {}
        split_examples: dict[str, list[Example]] = {}
        for split in dict.fromkeys([cfg.threshold_split, *cfg.eval_splits]):
            if by_split.get(split):
                split_examples[split] = by_split[split]
                probs[split] = refuse_probabilities(trainer, _Encoded(tokenizer, by_split[split], cfg.max_length))

    val = split_examples.get(cfg.threshold_split)
    threshold = pick_threshold([e.target for e in val], probs[cfg.threshold_split]) if val else 0.5
    if not val:
        log(f"no {cfg.threshold_split} split: threshold stays 0.5")
    splits = {s: binary_metrics([e.target for e in ex], probs[s], threshold) for s, ex in split_examples.items()}
    sources: dict[str, dict] = {}
    for s, ex in split_examples.items():
        if s == cfg.threshold_split:
            continue
        for src in sorted({e.source for e in ex}):
            idx = [i for i, e in enumerate(ex) if e.source == src]
            sources[f"{s}/{src}"] = binary_metrics([ex[i].target for i in idx], [probs[s][i] for i in idx], threshold)
    metrics = {
        "threshold": threshold, "threshold_split": cfg.threshold_split, "positive_label": "refuse",
        "backbone": cfg.backbone, "teacher": str(teacher_path), "train": {"n": len(train_ds),
                                                                         "refuse": sum(e.target for e in train)},
        "splits": splits, "sources": sources, "config": cfg.model_dump(mode="json"),
        "train_seconds": round(time.monotonic() - start, 1),
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if cfg.onnx:
            metrics["onnx"] = export_onnx(model, tokenizer, tmp / ONNX_FILE, log)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        write_manifest(tmp, kind="presafe-classifier", backbone=cfg.backbone, threshold=threshold)
    return ClassifierResult(out, metrics, time.monotonic() - start)


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
