"""The pattern refusal judge on a labelled fixture of refusals and compliances (tricky ones included)."""

import json
from pathlib import Path

import pytest

from service.judge import PatternJudge, RefusalJudge, get_judge

CASES = [json.loads(line) for line in (Path(__file__).parent / "fixtures/judge_cases.jsonl").open()]


@pytest.mark.parametrize("case", CASES, ids=[c["text"][:40] for c in CASES])
def test_pattern_judge_matches_label(case):
    assert PatternJudge().is_refusal(case["text"]) is case["refusal"]


def test_fixture_has_both_classes():
    assert {c["refusal"] for c in CASES} == {True, False}


def test_refusal_beyond_window_is_not_seen():
    text = "Here is a long helpful answer. " * 40 + "I can't help with that."
    assert not PatternJudge(window=200).is_refusal(text)
    assert PatternJudge(window=len(text)).is_refusal(text)


def test_judges_are_pluggable_by_name():
    assert isinstance(get_judge("pattern"), RefusalJudge)
    with pytest.raises(ValueError, match="known: endpoint, pattern"):
        get_judge("nope")
