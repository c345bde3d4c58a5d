"""What each refuse threshold of a trained classifier buys on held-out prompts: the one training picked
(``metrics.json``) against thresholds chosen for a false-refuse budget on the val prompts it was picked on.

Scores ``val``, ``test`` and ``heldout`` of a run's teacher file with the gateway's classifier (ONNX Runtime
where ``model.onnx`` is there) and prints, per split / source / form, the harmful prompts caught and the benign
ones refused at each threshold:

    python bench/classifier_thresholds.py --run ~/.cache/presafe/runs/cpu-smollm2 --budget 0.05 0.10

``--classifier DIR`` scores another classifier trained on the same run's teacher file (say one from
``presafe train classifier --out DIR``) on the same prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def budget_threshold(benign_probs: Sequence[float], budget: float) -> float:
    """The lowest threshold that refuses at most ``budget`` of ``benign_probs`` (refuse when p >= threshold)."""
    ranked = sorted(benign_probs, reverse=True)
    allowed = int(budget * len(ranked))  # this many may score at or above the threshold
    if allowed >= len(ranked):
        return 0.0
    return min(1.0, ranked[allowed] + 1e-9)


def rates(examples, probs: dict[str, float], threshold: float) -> dict[str, dict[str, list[int]]]:
    """Per ``split/source`` and ``split/source/form``: [harmful caught, harmful n, benign refused, benign n]."""
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for e in examples:
        refused = probs[e.id] >= threshold
        for key in (f"{e.split}/{e.source}", f"{e.split}/{e.source}/{e.form}"):
            row = rows[key]
            if e.target:
                row[0] += refused
                row[1] += 1
            else:
                row[2] += refused
                row[3] += 1
    return dict(rows)


def main() -> None:
    from tqdm import tqdm

    from service.gateway.classifier import PromptClassifier
    from training.classifier import METRICS_FILE, load_examples

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run dir with classifier/ and teacher.jsonl")
    parser.add_argument("--classifier", type=Path, help="the classifier dir (default: the run's classifier/)")
    parser.add_argument("--budget", type=float, nargs="+", default=[0.05], help="false-refuse budgets on val")
    parser.add_argument("--json", type=Path, help="also write the rates here")
    args = parser.parse_args()
    classifier_dir = args.classifier or args.run / "classifier"
    metrics_path = classifier_dir / METRICS_FILE
    if not metrics_path.is_file() or not (args.run / "teacher.jsonl").is_file():
        sys.exit(f"no trained classifier in {classifier_dir} or no teacher file in {args.run}")
    metrics = json.loads(metrics_path.read_text())
    picked_on = metrics["threshold_set"]  # the split and sources (None: all of it) training picked on
    classifier = PromptClassifier(classifier_dir)
    examples = [e for e in load_examples(args.run / "teacher.jsonl") if e.split in ("val", "test", "heldout")]
    probs = {e.id: classifier.predict(e.prompt).p_refuse for e in tqdm(examples, desc="scoring", unit="prompt")}
    val = [e for e in examples if e.split == picked_on["split"]
           and (picked_on["sources"] is None or e.source in picked_on["sources"])]
    thresholds = {"training's (F1-best)": metrics["threshold"]}
    for b in args.budget:
        thresholds[f"budget {b:.0%}"] = budget_threshold([probs[e.id] for e in val if not e.target], b)
    held_out = [e for e in examples if e.split != picked_on["split"]]
    report = {}
    for name, t in thresholds.items():
        report[name] = {"threshold": t, "rates": rates(held_out, probs, t)}
        print(f"\n{name}: threshold {t:.4f} ({classifier.loaded_backend})")
        for key, (caught, n, refused, m) in sorted(report[name]["rates"].items()):
            harmful = f"harmful caught {caught}/{n} {caught / n:.3f}" if n else ""
            benign = f"benign refused {refused}/{m} {refused / m:.3f}" if m else ""
            print(f"  {key:42s} {harmful:34s} {benign}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
