"""The form-matched part of the query pool, generated from hand-written lists (``training/prompts``).

Harmful and benign *tasks* (verb phrases: "make a pipe bomb", "kill a Python process") are rendered
in hand-written *frames* of every generated form ("How do I {t}?", "Explain how to {t}.", role-play,
past and hypothetical framing), so a prompt's form says nothing about its label:

- Tasks are split train/val/test/heldout by a seeded hash of the task, within each category (so
  every split has every category in proportion); a held-out task is never seen in any form.
- Within a split, each harmful rendering is paired with a benign task in the same frame: the two
  prompts of a ``pair_id`` differ only in the task slot ("How do I make pancakes?" / "How do I make a
  pipe bomb?"). Each task is rendered once per form (the smaller side of a split cycles).
- ``probes`` are everyday questions held out of every list (issue 12's refused prompts among them).
"""

from __future__ import annotations

import hashlib
import random
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

PROMPTS_DIR = Path(__file__).parent / "prompts"
LISTS_FILE = PROMPTS_DIR / "formmatched.yaml"
PROBES_FILE = PROMPTS_DIR / "probes.yaml"
GENERATED_FORMS = ("question", "imperative", "roleplay", "past", "hypothetical")
BENIGN_CATEGORIES = ("everyday", "edgy", "sensitive")
SLOT = "{t}"


class TaskLists(BaseModel):
    """The hand-written lists: frames per form, harmful tasks per harm category, benign tasks per kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    frames: dict[str, list[str]]
    harmful: dict[str, list[str]]
    benign: dict[str, list[str]]

    @field_validator("frames")
    @classmethod
    def _frames(cls, frames: dict[str, list[str]]) -> dict[str, list[str]]:
        if set(frames) != set(GENERATED_FORMS):
            raise ValueError(f"frames must cover exactly the forms {GENERATED_FORMS}, got {sorted(frames)}")
        for form, items in frames.items():
            bad = [f for f in items if f.count(SLOT) != 1]
            if not items or bad:
                raise ValueError(f"form {form}: every frame needs exactly one {SLOT} ({bad or 'no frames'})")
        return frames

    @field_validator("benign")
    @classmethod
    def _benign(cls, benign: dict[str, list[str]]) -> dict[str, list[str]]:
        if not set(benign) <= set(BENIGN_CATEGORIES):
            raise ValueError(f"benign categories must be among {BENIGN_CATEGORIES}, got {sorted(benign)}")
        return benign

    @model_validator(mode="after")
    def _unique(self) -> TaskLists:
        tasks = [t for _, _, t in self.tasks()]
        dupes = sorted({t for t in tasks if tasks.count(t) > 1})
        if dupes:
            raise ValueError(f"tasks listed twice: {dupes[:5]}")
        return self

    def tasks(self) -> list[tuple[str, str, str]]:
        """``(label, category, task)`` for every task, in list order."""
        return ([("harmful", c, t) for c, ts in self.harmful.items() for t in ts]
                + [("benign", c, t) for c, ts in self.benign.items() for t in ts])


@cache
def load_task_lists(path: Path = LISTS_FILE) -> TaskLists:
    return TaskLists.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


@cache
def load_probes(path: Path = PROBES_FILE) -> tuple[str, ...]:
    return tuple(yaml.safe_load(path.read_text(encoding="utf-8"))["probes"])


def lists_checksum() -> str:
    """Checksum of the hand-written lists: an edit to them rebuilds the pool on disk."""
    digest = hashlib.sha256()
    for path in (LISTS_FILE, PROBES_FILE):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _rank(seed: int, kind: str, key: str) -> str:
    return hashlib.sha256(f"{seed}:{kind}:{key}".encode()).hexdigest()


def split_tasks(lists: TaskLists, seed: int, heldout: float, val: float, test: float) -> dict[str, str]:
    """Task → split: within each (label, category), tasks ranked by a seeded hash of the task take the
    held-out, test and val shares (rounded) in that order; the rest is train."""
    groups: dict[tuple[str, str], list[str]] = {}
    for label, category, task in lists.tasks():
        groups.setdefault((label, category), []).append(task)
    split: dict[str, str] = {}
    for tasks in groups.values():
        ranked = sorted(tasks, key=lambda t: _rank(seed, "task", t))
        n_held, n_test, n_val = (round(len(ranked) * f) for f in (heldout, test, val))
        for i, task in enumerate(ranked):
            split[task] = ("heldout" if i < n_held else "test" if i < n_held + n_test
                           else "val" if i < n_held + n_test + n_val else "train")
    return split


def render(frame: str, task: str) -> str:
    return frame.replace(SLOT, task)


def generate_formmatched(seed: int, heldout: float, val: float, test: float,
                         lists: TaskLists | None = None) -> list[dict]:
    """Counterfactual pairs for every split (see the module docstring); records carry ``task`` and ``frame``."""
    lists = lists or load_task_lists()
    split_of = split_tasks(lists, seed, heldout, val, test)
    category = {task: cat for _, cat, task in lists.tasks()}
    label_of = {task: label for label, _, task in lists.tasks()}
    records: list[dict] = []
    for split in ("train", "val", "test", "heldout"):
        harmful = sorted(t for t, s in split_of.items() if s == split and label_of[t] == "harmful")
        benign = sorted(t for t, s in split_of.items() if s == split and label_of[t] == "benign")
        if not harmful or not benign:
            continue
        rng = random.Random(f"{seed}:formmatched:{split}")
        used: set[tuple[str, str]] = set()
        for form in GENERATED_FORMS:
            hs, bs = rng.sample(harmful, len(harmful)), rng.sample(benign, len(benign))
            for i in range(max(len(hs), len(bs))):
                h, b = hs[i % len(hs)], bs[i % len(bs)]
                frames = rng.sample(lists.frames[form], len(lists.frames[form]))
                frame = next((f for f in frames if (h, f) not in used and (b, f) not in used), frames[0])
                used |= {(h, frame), (b, frame)}
                pair_id = f"formmatched-{split}-{form}-{i:03d}"
                for label, task in (("harmful", h), ("benign", b)):
                    records.append({
                        "id": f"{pair_id}-{label[0]}", "prompt": render(frame, task), "source": "formmatched",
                        "label": label, "split": split, "category": category[task], "form": form,
                        "pair_id": pair_id, "task": task, "frame": frame,
                    })
    return records


def generate_probes() -> list[dict]:
    return [{"id": f"probes-{i:03d}", "prompt": p, "source": "probes", "label": "benign", "category": "everyday"}
            for i, p in enumerate(load_probes())]
