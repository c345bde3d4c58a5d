"""The trainer's progress-line protocol (both sides: the trainer prints, the job runner parses).

The trainer prints, on stdout, JSON objects ending a line, e.g.
``{"stage": "align", "progress": 0.42, "metrics": {"loss": 0.7}}``. ``stage`` (string),
``progress`` (overall fraction 0..1) and ``metrics`` (object, merged into the job's metrics) are
each optional, but an object must carry ``stage`` or ``progress`` to count; everything else is log.
The object is found anywhere in a line: stderr is merged into the same stream and a progress bar
(tqdm) leaves its line open, so ``… 5.27s/it]{"stage": …}`` is one line. :func:`emit_progress`
prints one.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import IO, Any


@dataclass
class ProgressEvent:
    stage: str | None = None
    progress: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def parse_progress_line(line: str) -> ProgressEvent | None:
    """The progress event in ``line`` (see the module docstring), else None. The JSON objects are
    looked for anywhere in the line; several valid ones merge (later values win, metrics merged)."""
    events = []
    pos = line.find("{")
    while pos != -1:
        try:
            data, end = _DECODER.raw_decode(line, pos)
        except ValueError:
            pos = line.find("{", pos + 1)
            continue
        event = _progress_event(data)
        if event is not None:
            events.append(event)
        pos = line.find("{", end)  # past the whole object: an object nested in it is not an event
    if not events:
        return None
    merged = ProgressEvent()
    for event in events:
        merged.stage = event.stage if event.stage is not None else merged.stage
        merged.progress = event.progress if event.progress is not None else merged.progress
        merged.metrics.update(event.metrics)
    return merged


_DECODER = json.JSONDecoder()


def _progress_event(data: Any) -> ProgressEvent | None:
    if not isinstance(data, dict) or not ({"stage", "progress"} & data.keys()):
        return None
    stage, progress, metrics = data.get("stage"), data.get("progress"), data.get("metrics") or {}
    if stage is not None and not isinstance(stage, str):
        return None
    if progress is not None:
        if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not math.isfinite(progress):
            return None
        progress = min(1.0, max(0.0, float(progress)))
    if not isinstance(metrics, dict):
        return None
    return ProgressEvent(stage=stage, progress=progress, metrics=metrics)


def emit_progress(stage: str | None = None, progress: float | None = None, metrics: dict | None = None,
                  stream: IO[str] | None = None) -> None:
    """Print one progress line for the job runner (the trainer side of the protocol)."""
    event = {k: v for k, v in (("stage", stage), ("progress", progress), ("metrics", metrics)) if v is not None}
    print(json.dumps(event), file=stream or sys.stdout, flush=True)
