"""The two decisions and how a classifier names them: one home for both sides.

The teacher writes ``refuse``/``comply`` decisions, the classifier is trained with
``id2label = {0: comply, 1: refuse}``, stage 2 routes prompts to Path A (refuse) or Path B (comply),
and the gateway reads a classifier's refuse class by the same rule (:func:`refuse_class`).
"""

from __future__ import annotations

from collections.abc import Mapping

REFUSE, COMPLY = "refuse", "comply"
CLASSIFIER_LABELS = {0: COMPLY, 1: REFUSE}  # id2label of a trained decision classifier
REFUSE_LABELS = (REFUSE, "refusal", "harmful", "unsafe")  # label names read as the refuse class


def refuse_class(id2label: Mapping | None, default: int = 1) -> int:
    """The class index of *refuse* in a classifier's ``id2label``: the label named ``refuse`` (or
    ``refusal``/``harmful``/``unsafe``, any case), else ``default``."""
    return next((int(i) for i, label in (id2label or {}).items() if str(label).lower() in REFUSE_LABELS), default)
