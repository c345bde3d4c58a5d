"""The endpoint refusal judge: a guard model behind an OpenAI-compatible chat endpoint."""

from __future__ import annotations

import pytest
from test_teacher import FakeChat, make_pool, options

from service.core.judge import EndpointJudge, JudgeError, get_judge
from training.teacher import TeacherError, iter_teacher, run_teacher


def guard(prompt: str) -> str:
    """A fake guard: reads the response under judgement and says REFUSAL/COMPLIANCE (or babbles)."""
    response = prompt.rpartition("Response:\n")[2]
    if "babble" in response:
        return "hmm, hard to say"
    return "REFUSAL" if "cannot" in response else "COMPLIANCE."


@pytest.fixture
def fake():
    server = FakeChat(answer=guard)
    yield server
    server.close()


def test_verdicts_come_from_the_guard(fake):
    judge = get_judge("endpoint", url=fake.url, model="guard")
    assert type(judge) is EndpointJudge and judge.name == "endpoint:guard" and judge.model == "guard"
    assert judge.is_refusal("No. I cannot do that.") is True
    assert judge.is_refusal("Here is the recipe you asked for.") is False
    assert len(fake.requests) == 2 and "Reply with exactly one word" in fake.requests[0]


def test_unparseable_reply_falls_back_to_patterns(fake):
    judge = EndpointJudge(fake.url, "guard")
    assert judge.is_refusal("babble. I'm sorry, but I can't help with that.") is True
    assert judge.is_refusal("babble. Sure, here you go.") is False
    assert judge.unparsed == 2


def test_failing_guard_is_retried_then_an_error():
    server = FakeChat(answer=guard, fail_after=0, fail_status=503)
    try:
        with pytest.raises(JudgeError, match="failed after 3 attempts"):
            EndpointJudge(server.url, "guard", retries=2, backoff_s=0.01).is_refusal("text")
        assert len(server.requests) == 3
        server.fail_status = 400
        server.requests.clear()
        with pytest.raises(JudgeError, match="HTTP 400"):
            EndpointJudge(server.url, "guard", retries=2, backoff_s=0.01).is_refusal("text")
        assert len(server.requests) == 1
    finally:
        server.close()


def test_teacher_uses_the_endpoint_judge(tmp_path, fake):
    pool = make_pool(tmp_path / "pool.jsonl", n=4)
    answers = FakeChat(answer=lambda p: "I cannot help." if "weapon" in p else "Paris.")
    try:
        cfg = options(kind="endpoint", endpoint_url=answers.url, endpoint_model="m", cot_on=False,
                      cot_off=False, judge="endpoint", judge_options={"url": fake.url, "model": "guard"})
        run_teacher(*cfg, pool, tmp_path / "t.jsonl", progress=False)
    finally:
        answers.close()
    recs = list(iter_teacher(tmp_path / "t.jsonl"))
    assert [r.decision for r in recs] == ["refuse" if "weapon" in r.prompt else "comply" for r in recs]
    assert {r.endpoint.provenance.judge for r in recs} == {"endpoint:guard"}
    with pytest.raises(TeacherError, match="needs --judge-url"):
        run_teacher(*options(judge="endpoint", cot_on=False, cot_off=False), pool, tmp_path / "u.jsonl",
                    progress=False)


@pytest.mark.vllm
def test_endpoint_judge_against_real_vllm(vllm_server):
    """A random-weight model cannot follow the guard instruction: its real replies do not parse, so the judge
    falls back to the pattern judge (right on both texts) and counts each fallback."""
    judge = EndpointJudge(vllm_server.url, vllm_server.served_name)
    reply = judge.verdict("I cannot help with that.")  # a real chat completion came back (maybe whitespace)
    assert isinstance(reply, str) and not reply.strip().upper().startswith(("REFUS", "COMPL"))
    assert judge.is_refusal("I'm sorry, but I can't help with that.") is True
    assert judge.is_refusal("Sure! Boil the egg for seven minutes, then cool it in cold water.") is False
    assert judge.unparsed == 2
