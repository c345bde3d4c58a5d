"""The prompt classifier: a Hugging Face sequence-classification model directory plus ``metrics.json``
with a decision ``threshold`` on the refuse probability.

Which one (:func:`locate_classifier`): ``PRESAFE_CLASSIFIER_DIR`` if set; else the one the promoted
adapter was trained with (published inside it, ``<adapter>/classifier/``), so a promotion or rollback
switches the verdicts with the adapter; else ``$PRESAFE_HOME/classifier/``.

Loaded lazily on a worker thread, reloaded when the location or its ``metrics.json`` changes, and skipped
cleanly when absent. It runs through ONNX Runtime when the directory holds the ONNX export training writes
(``model.onnx``; the gateway then never imports torch), else through torch (imported only then). Prompts are
truncated to the ``max_length`` training used (``metrics.json`` ``config.max_length``; ``max_length`` here
otherwise). The refuse class is the label named ``refuse`` (or ``refusal``/``harmful``/``unsafe``) in
``config.json``'s ``id2label``, else index 1; a one-logit model is read through a sigmoid.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from service.core.formats import ADAPTER_CLASSIFIER, CLASSIFIER_ONNX
from service.core.labels import refuse_class
from service.core.settings import Settings

log = logging.getLogger("presafe.gateway")
TOKENIZER_FILE = "tokenizer.json"  # a fast tokenizer, whole: what the ONNX path encodes with



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


Backend = Literal["auto", "onnx", "torch"]


def _onnx_scorer(path: Path, max_length: int) -> Callable[[str], list[float]]:
    """Logits of one prompt through ONNX Runtime on one thread (the event loop keeps the other core), the
    prompt encoded by the ``tokenizers`` library from ``tokenizer.json``: neither torch nor transformers."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(str(path / CLASSIFIER_ONNX), opts, providers=["CPUExecutionProvider"])
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    names = [i.name for i in session.get_inputs()]

    def logits(text: str) -> list[float]:
        enc = tokenizer.encode(text)
        feeds = {n: np.asarray([getattr(enc, fields[n])], dtype=np.int64) for n in names}
        return [float(x) for x in session.run(["logits"], feeds)[0][0]]

    return logits


def _torch_scorer(path: Path, max_length: int) -> Callable[[str], list[float]]:
    """Logits of one prompt through transformers and torch on one thread."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def logits(text: str) -> list[float]:
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            return model(**enc).logits[0].float().tolist()

    return logits


def refuse_probability(logits: list[float], refuse: int) -> float:
    """p(refuse) from one prompt's logits: a softmax, or a sigmoid for a one-logit model."""
    if len(logits) == 1:
        return 1.0 / (1.0 + math.exp(-logits[0]))
    top = max(logits)
    z = [math.exp(x - top) for x in logits]
    return z[min(refuse, len(z) - 1)] / sum(z)


class PromptClassifier:
    """Refuse/comply verdicts on prompts, computed off the event loop."""

    def __init__(self, path: Path | Callable[[], Path], *, max_length: int = 512, backend: Backend = "auto"):
        self._locate = path if callable(path) else (lambda: path)
        self.path = self._locate()
        self.max_length = max_length
        self.backend = backend  # "auto": ONNX Runtime where the export and onnxruntime are there, else torch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="presafe-classifier")
        self._loaded: tuple | None = None  # (stamp, scorer, refuse_index, threshold, backend)
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

    def _backend_for(self, path: Path) -> str:
        if self.backend != "auto":
            return self.backend
        onnx = all((path / f).is_file() for f in (CLASSIFIER_ONNX, TOKENIZER_FILE)) and all(
            importlib.util.find_spec(m) is not None for m in ("onnxruntime", "tokenizers"))
        return "onnx" if onnx else "torch"

    def _load(self) -> tuple:
        path = self.path
        stamp = self._stamp(path)
        if self._loaded is not None and self._loaded[0] == stamp:
            return self._loaded
        metrics = json.loads((path / "metrics.json").read_text())
        threshold = float(metrics.get("threshold", 0.5))
        max_length = int((metrics.get("config") or {}).get("max_length") or self.max_length)
        refuse = refuse_class(json.loads((path / "config.json").read_text()).get("id2label"))
        backend = self._backend_for(path)
        try:
            scorer = (_onnx_scorer if backend == "onnx" else _torch_scorer)(path, max_length)
        except Exception as exc:
            if backend != "onnx" or self.backend == "onnx":
                raise
            log.warning("the classifier's ONNX export does not load: running it through torch",
                        extra={"path": str(path), "error": repr(exc)[:300]})
            backend, scorer = "torch", _torch_scorer(path, max_length)
        self._loaded = (stamp, scorer, refuse, threshold, backend)
        log.info("prompt classifier loaded", extra={"path": str(path), "threshold": threshold, "backend": backend})
        return self._loaded

    def predict(self, text: str) -> Verdict:
        _, scorer, refuse, threshold, _ = self._load()
        p = refuse_probability(scorer(text), refuse)
        return Verdict("refuse" if p >= threshold else "comply", p, threshold)

    @property
    def loaded_backend(self) -> str | None:
        """The backend of the loaded classifier ("onnx" or "torch"), None before the first load."""
        return self._loaded[4] if self._loaded else None

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
