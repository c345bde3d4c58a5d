"""Publish → gate → promote: the one sequence that turns a trainer's output into the served adapter.

The pipeline (``presafe train run`` publishing into the store) runs :func:`release` as a whole; the admin's
job lifecycle runs the same steps (:func:`store_once`, :meth:`AdapterStore.gate`, :func:`may_promote`,
:func:`promotion_record`) around loading the adapter into vLLM before the registry moves the alias.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.adapters.store import AdapterInfo, AdapterStore
from service.core.gate import GateConfig, GateResult


def store_once(store: AdapterStore, source: Path, *, prefix: str, expected_base: str | None,
               job_id: str | None = None) -> AdapterInfo:
    """The adapter ``job_id`` already stored (a publish resumed after a restart), else ``source`` published now
    (checked; :class:`~service.adapters.store.AdapterInvalid` when it fails)."""
    info = store.find_job(job_id) if job_id is not None else None
    return info or store.publish(source, prefix=prefix, expected_base=expected_base, job_id=job_id)


def may_promote(result: GateResult, *, promote: bool = True, force: bool = False) -> bool:
    """Whether a gated adapter is promoted: asked for, and the gate passed (or the promotion is forced)."""
    return promote and (result.passed or force)


def promotion_record(result: GateResult, *, forced: bool = False, **context: Any) -> dict[str, Any]:
    """The entry a promotion leaves in the registry's ``promotions`` (with e.g. the job or run it came from)."""
    return {"forced": forced, "gate_passed": result.passed, "gate": result.reasons, **context}


@dataclass
class Release:
    """What :func:`release` did: the stored adapter, the gate's verdict, and whether it is now promoted."""

    info: AdapterInfo
    verdict: GateResult
    promoted: bool


def release(store: AdapterStore, source: Path, *, prefix: str, gate: GateConfig, expected_base: str | None,
            promote: bool = True, **context: Any) -> Release:
    """Store ``source``, gate it against the promoted adapter (else the base figures), promote it if it passes.

    Promotes in the store only (the embedded server loads the store's adapters when it starts)."""
    info = store_once(store, source, prefix=prefix, expected_base=expected_base)
    verdict = store.gate(info.name, gate)
    promoted = may_promote(verdict, promote=promote)
    if promoted:
        store.promote(info.name, record=promotion_record(verdict, **context))
    return Release(info, verdict, promoted)
