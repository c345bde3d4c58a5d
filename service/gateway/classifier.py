"""The prompt classifier: a Hugging Face sequence-classification model directory plus ``metrics.json``
with a decision ``threshold`` on the refuse probability.

Which one (:func:`locate_classifier`): ``PRESAFE_CLASSIFIER_DIR`` if set; else the one the promoted
adapter was trained with (published inside it, ``<adapter>/classifier/``), so a promotion or rollback
switches the verdicts with the adapter; else ``$PRESAFE_HOME/classifier/``.

Loaded lazily on a worker thread (torch is imported only then), reloaded when the location or its
``metrics.json`` changes, and skipped cleanly when absent. Prompts are truncated to the ``max_length``
training used (``metrics.json`` ``config.max_length``; ``max_length`` here otherwise). The refuse class is the label named ``refuse`` (or
``refusal``/``harmful``/``unsafe``) in ``config.json``'s ``id2label``, else index 1; a one-logit
model is read through a sigmoid.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from service.core.formats import ADAPTER_CLASSIFIER
from service.core.settings import Settings

log = logging.getLogger("presafe.gateway")

REFUSE_LABELS = ("refuse", "refusal", "harmful", "unsafe")


def is_classifier_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "metrics.json").is_file()


def locate_classifier(settings: Settings, promoted: Callable[[], str | None]) -> Path:
    """The classifier the gateway uses: the operator's, else the promoted adapter's, else the home one."""
    if settings.classifier_dir is not None:
        return settings.classifier_dir.expanduser()
    name = promoted()
    if name:
        inside = settings.adapters_dir / name / ADAPTER_CLASSIFIER
        if is_classifier_dir(inside):
            return inside
    return settings.root / "classifier"


@dataclass(frozen=True)
class Verdict:
    verdict: str  # "refuse" | "comply"
    p_refuse: float
    threshold: float

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "p_refuse": round(self.p_refuse, 4), "threshold": self.threshold}


class PromptClassifier:
    """Refuse/comply verdicts on prompts, computed off the event loop."""

    def __init__(self, path: Path | Callable[[], Path], *, max_length: int = 512):
        self._locate = path if callable(path) else (lambda: path)
        self.path = self._locate()
        self.max_length = max_length
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="presafe-classifier")
        self._loaded: tuple | None = None  # (stamp, tokenizer, model, refuse_index, threshold, max_length)
        self._checked = 0.0
        self._present = False

    def available(self) -> bool:
        """Whether a classifier is in the store (checked at most once a second)."""
        now = time.monotonic()
        if now - self._checked > 1.0:
            self.path = self._locate()
            self._present = is_classifier_dir(self.path)
            self._checked = now
        return self._present

    def _stamp(self, path: Path) -> tuple:
        st = (path / "metrics.json").stat()
        return str(path), st.st_mtime_ns, st.st_size

    def _load(self) -> tuple:
        path = self.path
        stamp = self._stamp(path)
        if self._loaded is not None and self._loaded[0] == stamp:
            return self._loaded
        import torch  # only here: the gateway runs without torch until a classifier exists
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(1)
        metrics = json.loads((path / "metrics.json").read_text())
        threshold = float(metrics.get("threshold", 0.5))
        max_length = int((metrics.get("config") or {}).get("max_length") or self.max_length)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        id2label = {int(k): str(v).lower() for k, v in (model.config.id2label or {}).items()}
        refuse = next((i for i, label in id2label.items() if label in REFUSE_LABELS), 1)
        self._loaded = (stamp, tokenizer, model, refuse, threshold, max_length)
        log.info("prompt classifier loaded", extra={"path": str(path), "threshold": threshold})
        return self._loaded

    def predict(self, text: str) -> Verdict:
        import torch

        _, tokenizer, model, refuse, threshold, max_length = self._load()
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            logits = model(**enc).logits[0]
        if logits.numel() == 1:
            p = torch.sigmoid(logits[0]).item()
        else:
            p = torch.softmax(logits.float(), dim=-1)[min(refuse, logits.numel() - 1)].item()
        return Verdict("refuse" if p >= threshold else "comply", p, threshold)

    async def verdict(self, text: str) -> Verdict | None:
        """The verdict for ``text``, or None when it failed (logged)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self.predict, text)
        except Exception as exc:  # noqa: BLE001 - a broken classifier must never break serving
            log.warning("prompt classifier failed", extra={"error": repr(exc)})
            return None

    def warm_up(self) -> None:
        """Load in the background (no-op without a classifier)."""
        if self.available():
            self._executor.submit(self._safe_load)

    def _safe_load(self) -> None:
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001 - logged; serving goes on without verdicts
            log.warning("prompt classifier could not be loaded", extra={"error": repr(exc)})

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
