"""Gateway fault paths and crafted decisions, against a fake upstream (see tests/gateway_support.py).

A real gateway (uvicorn in a thread) with the official openai client; bad input and upstream faults
must come back as OpenAI-format errors with the right status, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import aiohttp
import httpx
import openai
import pytest
from gateway_support import (
    ServerThread,
    assert_openai_error,
    fake_settings,
    sample,
    scrape,
    wait_for_sample,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.app import create_app
from service.vllm_server import free_port

USER = [{"role": "user", "content": "How do I pick a lock?"}]
REFUSAL = "I'm sorry, but I can't help with that."
ANSWER = "Sure. First, insert the tension wrench into the bottom of the keyhole."


def wait_until(condition, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds (asserting it does within ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("presafe-home")


@pytest.fixture(scope="module")
def gw(fake, home):
    settings = fake_settings(home, upstream_timeout_s=60, max_body_bytes=64 * 1024, models_ttl_s=0.5)
    with ServerThread(create_app(settings, upstream_url=fake.url, think_open=True)) as server:
        yield server


@pytest.fixture(scope="module")
def client(gw):
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "crafted"}, "messages"),
        ({"model": "crafted", "messages": "hello"}, "messages"),
        ({"model": "crafted", "messages": []}, "messages"),
        ({"model": "crafted", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"model": "crafted", "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": "crafted", "messages": USER, "max_tokens": "5"}, "max_tokens"),
        ({"model": "crafted", "messages": USER, "temperature": 3}, "temperature"),
        ({"model": "crafted", "messages": USER, "stream": "yes"}, "stream"),
        ({"model": 7, "messages": USER}, "model"),
        ({"messages": USER}, "model"),
    ],
)
def test_schema_errors_are_400(gw, body, param):
    err = assert_openai_error(httpx.post(f"{gw.url}/v1/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_invalid_json_is_400(gw, raw):
    resp = httpx.post(f"{gw.url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(resp, 400)


def test_body_over_the_limit_is_413(gw):
    big = {"model": "crafted", "messages": [{"role": "user", "content": "x" * 70_000}]}
    err = assert_openai_error(httpx.post(f"{gw.url}/v1/chat/completions", json=big), 413)
    assert err["type"] == "request_too_large"
    # chunked upload without content-length is counted too
    chunks = iter([json.dumps(big).encode()[i:i + 8192] for i in range(0, 70_100, 8192)])
    assert_openai_error(httpx.post(f"{gw.url}/v1/chat/completions", content=chunks), 413)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=USER)
    assert info.value.body["code"] == "model_not_found"


def test_unknown_route_and_method_are_openai_errors(gw):
    assert_openai_error(httpx.get(f"{gw.url}/v1/nothing"), 404)
    assert_openai_error(httpx.get(f"{gw.url}/v1/chat/completions"), 405)


def test_operator_allowed_fields_pass_through(fake, client):
    out = client.chat.completions.create(model="crafted", messages=USER, extra_body={"fake_text": ANSWER})
    assert out.choices[0].message.content == ANSWER  # the fake read fake_text: it was forwarded


# --------------------------------------------------------------------------- upstream faults


def test_upstream_error_statuses(gw, client):
    assert_openai_error(httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "broken", "messages": USER}), 502)
    assert_openai_error(httpx.post(f"{gw.url}/v1/completions", json={"model": "malformed", "prompt": "x"}), 502)
    # the upstream's own 4xx (e.g. prompt over the context limit) passes through unchanged
    resp = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "context", "messages": USER})
    assert resp.status_code == 400 and "maximum context length" in resp.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="context", messages=USER, stream=True)


def test_upstream_timeout_is_504(fake, home):
    settings = fake_settings(home, upstream_timeout_s=0.5)
    with ServerThread(create_app(settings, upstream_url=fake.url)) as gw:
        body = {"model": "slow", "messages": USER, "fake_sleep": 3.0}
        assert_openai_error(httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=10), 504)
        assert_openai_error(httpx.post(f"{gw.url}/v1/chat/completions", json={**body, "stream": True},
                                       timeout=10), 504)
        assert sample(scrape(gw.url), "presafe_upstream_errors_total", kind="timeout") == 2


def test_upstream_down_is_503(home):
    settings = fake_settings(home)
    with ServerThread(create_app(settings, upstream_url=f"http://127.0.0.1:{free_port()}")) as down:
        for method, path, body in [("POST", "/v1/chat/completions", {"model": "m", "messages": USER}),
                                   ("POST", "/v1/completions", {"model": "m", "prompt": "x", "stream": True}),
                                   ("GET", "/v1/models", None)]:
            assert_openai_error(httpx.request(method, f"{down.url}{path}", json=body), 503)
        assert httpx.get(f"{down.url}/health").status_code == 200
        assert httpx.get(f"{down.url}/ready").status_code == 503
        metrics = scrape(down.url)
        assert sample(metrics, "presafe_upstream_errors_total", kind="connect") == 3
        assert sample(metrics, "presafe_requests_total", route="/v1/models", status=503) == 1


@pytest.mark.parametrize(("model", "message"), [("cut", "ended the stream early"), ("malformed", "malformed")])
def test_broken_streams_end_with_an_error_event(gw, client, model, message):
    with pytest.raises(openai.APIError) as info:
        for _ in client.chat.completions.create(model=model, messages=USER, stream=True):
            pass
    assert message in str(info.value)
    assert sample(scrape(gw.url), "presafe_requests_total", model=model, status=502) >= 1


def test_client_disconnect_aborts_the_upstream_stream(fake, gw):
    before = fake.cancelled
    with httpx.stream("POST", f"{gw.url}/v1/completions",
                      json={"model": "endless", "prompt": "x", "stream": True}) as resp:
        for i, _ in enumerate(resp.iter_raw()):
            if i == 3:
                break
    wait_until(lambda: fake.cancelled > before)
    assert fake.cancelled == before + 1
    metrics = scrape(gw.url)
    assert sample(metrics, "presafe_requests_total", model="endless", status=499) == 1
    assert sample(metrics, "presafe_active_requests") == 0


def test_a_client_leaving_after_done_is_a_whole_stream_not_499(gw):
    """The gateway drains the upstream body past ``[DONE]``; a client closing then got the whole stream."""
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json={
            "model": "lingering", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "fake_sleep": 5}) as resp:
        events = []
        for line in resp.iter_lines():
            events += [line] if line.startswith("data:") else []
            if line == "data: [DONE]":
                break  # and close: the upstream body is still open
    assert events[-1] == "data: [DONE]" and '"presafe"' in events[-2]
    metrics = scrape(gw.url)
    assert sample(metrics, "presafe_requests_total", model="lingering", status=200) == 1
    assert sample(metrics, "presafe_requests_total", model="lingering", status=499) == 0
    assert sample(metrics, "presafe_decisions_total", model="lingering") == 1


def test_upstream_connections_are_reused(fake, gw, client):
    gateway = gw.server.config.app.state.gateway
    fake.client_ports.clear()
    for stream in (True, False, True, True, False):
        out = client.chat.completions.create(model="crafted", messages=USER, stream=stream)
        if stream:
            list(out)
            # the client has [DONE]; the gateway drains the upstream body, then pools the connection
            wait_until(lambda: gateway.in_flight == 0)
    assert len(fake.client_ports) == 1  # streams are drained to the end, so the connection is pooled


# --------------------------------------------------------------------------- crafted decisions


# (upstream content, upstream reasoning field, decision path, reasoning and answer as the client gets them)
CRAFTED = [
    ("\n\n</think>\n\n" + REFUSAL, None, "refuse_pre_cot", None, REFUSAL),
    ("The user wants to break in. That is harmful.</think>\n\n" + REFUSAL, None, "refuse_after_cot",
     "The user wants to break in. That is harmful.", REFUSAL),
    ("Locks have pins; explaining is fine.</think>\n\n" + ANSWER, None, "answer_with_cot",
     "Locks have pins; explaining is fine.", ANSWER),
    ("</think>" + ANSWER, None, "answer_without_cot", None, ANSWER),
    (REFUSAL, "The user wants to break in.", "refuse_after_cot", "The user wants to break in.", REFUSAL),
]


@pytest.mark.parametrize(("text", "reasoning", "path", "shown_reasoning", "shown_answer"), CRAFTED)
@pytest.mark.parametrize("stream", [False, True])
def test_crafted_decisions_end_to_end(gw, client, text, reasoning, path, shown_reasoning, shown_answer, stream):
    model = "crafted"
    before = scrape(gw.url)
    extra = {"fake_text": text, "fake_chunk": 2, **({"fake_reasoning": reasoning} if reasoning else {})}
    if stream:
        chunks = list(client.chat.completions.create(model=model, messages=USER, stream=True, extra_body=extra))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        content = "".join(d.content or "" for d in deltas)
        assert content == shown_answer  # the answer alone, tags and reasoning routed out
        shown = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
        assert shown == (shown_reasoning or "")
        assert shown == "".join(d.model_extra.get("reasoning") or "" for d in deltas)
        presafe = chunks[-1].model_extra["presafe"]
        assert chunks[-1].choices == []
        assert presafe["think_tokens_method"] == "stream_chunks"
    else:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=USER, extra_body=extra)
        out = raw.parse()
        message = out.choices[0].message
        assert message.content == shown_answer
        assert message.model_extra["reasoning_content"] == message.model_extra["reasoning"] == shown_reasoning
        presafe = out.model_extra["presafe"]
        assert raw.headers["x-presafe-decision"] == path
        assert raw.headers["x-presafe-think-tokens"] == str(presafe["think_tokens"])
        assert presafe["think_tokens_method"] == "usage_ratio"
    assert presafe["path"] == path and presafe["refused"] == path.startswith("refuse")
    assert (presafe["think_tokens"] > 0) == (path.endswith("after_cot") or path == "answer_with_cot")
    after = scrape(gw.url)
    for name, labels, delta in [
        ("presafe_decisions_total", {"path": path, "model": model}, 1),
        ("presafe_think_tokens_count", {"path": path, "model": model}, 1),
        ("presafe_think_tokens_sum", {"path": path, "model": model}, presafe["think_tokens"]),
        ("presafe_time_to_decision_seconds_count", {"model": model}, 1),
        ("presafe_requests_total", {"route": "/v1/chat/completions", "model": model, "status": 200}, 1),
        ("presafe_request_duration_seconds_count", {"route": "/v1/chat/completions", "model": model}, 1),
    ]:
        assert sample(after, name, **labels) - sample(before, name, **labels) == delta, name
    assert sample(after, "presafe_active_requests") == 0


def _decisions(stream: bool, client, **extra) -> tuple[list, dict, dict[int, tuple[str, str, str]]]:
    """(choices' decisions, the presafe field, {index: (reasoning, content, finish_reason)}) as the client got them."""
    if stream:
        chunks = list(client.chat.completions.create(model="crafted", messages=USER, stream=True, **extra))
        assert chunks[-1].choices == []
        got: dict[int, list[str]] = {}
        for chunk in chunks[:-1]:
            for choice in chunk.choices:
                r, c, f = got.setdefault(choice.index, ["", "", ""])
                got[choice.index] = [r + (choice.delta.model_extra.get("reasoning_content") or ""),
                                     c + (choice.delta.content or ""), choice.finish_reason or f]
        presafe = chunks[-1].model_extra["presafe"]
        texts = {i: tuple(v) for i, v in got.items()}
    else:
        raw = client.chat.completions.with_raw_response.create(model="crafted", messages=USER, **extra)
        out = raw.parse()
        presafe = out.model_extra["presafe"]
        assert raw.headers["x-presafe-decision"] == presafe["path"]
        texts = {c.index: (c.message.model_extra.get("reasoning_content") or "", c.message.content or "",
                           c.finish_reason) for c in out.choices}
    return presafe.get("choices") or [presafe], presafe, texts


@pytest.mark.parametrize("stream", [False, True])
def test_two_choices_with_different_known_paths(gw, client, stream):
    """n = 2: each choice is decided on its own text (streamed: interleaved events routed by index)."""
    thought = "Locks have pins; explaining is fine."
    texts = ["\n\n</think>\n\n" + REFUSAL, thought + "</think>\n\n" + ANSWER]
    before = scrape(gw.url)
    choices, presafe, got = _decisions(stream, client, n=2, extra_body={"fake_text": texts, "fake_chunk": 2})
    assert [c["path"] for c in choices] == ["refuse_pre_cot", "answer_with_cot"]
    assert [c["refused"] for c in choices] == [True, False]
    assert choices[0]["think_tokens"] == 0 and choices[1]["think_tokens"] > 0
    assert presafe["path"] == "refuse_pre_cot"  # the top-level field is the first choice's
    assert got == {0: ("", REFUSAL, "stop"), 1: (thought, ANSWER, "stop")}
    after = wait_for_sample(gw.url, 0, "presafe_active_requests")
    for path in ("refuse_pre_cot", "answer_with_cot"):
        assert sample(after, "presafe_decisions_total", path=path, model="crafted") - \
            sample(before, "presafe_decisions_total", path=path, model="crafted") == 1, path


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_reasoning_field_from_the_upstream_is_the_reasoning(client, field, stream):
    """vLLM's reasoning parsers put the reasoning in ``reasoning_content`` (older) or ``reasoning`` (newer)."""
    extra = {"fake_text": REFUSAL, "fake_reasoning": "The user wants to break in.", "fake_reasoning_field": field,
             "fake_chunk": 4}
    choices, _, got = _decisions(stream, client, extra_body=extra)
    assert [c["path"] for c in choices] == ["refuse_after_cot"]
    assert got == {0: ("The user wants to break in.", REFUSAL, "stop")}
    extra["fake_text"] = ANSWER
    choices, _, got = _decisions(stream, client, extra_body=extra)
    assert [c["path"] for c in choices] == ["answer_with_cot"] and got[0][1] == ANSWER


# an unclosed think block: cut by the length limit it is unfinished reasoning; stopped, it is the answer
UNCLOSED = [
    ("The user asks about locks, pins", "length", "answer_with_cot", False, ("The user asks about locks, pins", "")),
    (REFUSAL, "length", "answer_with_cot", False, (REFUSAL, "")),
    (REFUSAL, "stop", "refuse_pre_cot", True, ("", REFUSAL)),
    (ANSWER, "stop", "answer_without_cot", True, ("", ANSWER)),
]


@pytest.mark.parametrize(("text", "finish", "path", "closed", "shown"), UNCLOSED)
@pytest.mark.parametrize("stream", [False, True])
def test_finish_reason_length_through_the_gateway(client, text, finish, path, closed, shown, stream):
    choices, _, got = _decisions(stream, client, extra_body={"fake_text": text, "fake_finish": finish})
    assert [(c["path"], c["think_closed"]) for c in choices] == [(path, closed)]
    assert (choices[0]["time_to_decision_s"] is None) == (stream and not closed)  # no decision reached yet
    if stream:  # routed as reasoning while it streams (an unclosed block), whatever it is decided to be
        assert got[0][:2] == (text, "")
    else:
        assert got[0][:2] == shown
    assert got[0][2] == finish  # passed through to the client


def test_client_disconnect_aborts_a_non_streamed_request(fake, gw):
    """README: a client that leaves a non-streamed request aborts the upstream request (vLLM stops generating)."""
    before = fake.cancelled
    forwarded = len(fake.request_ids)
    body = {"model": "slow", "messages": USER, "fake_sleep": 30}
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        raw = json.dumps(body).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(raw), raw))
        wait_until(lambda: len(fake.request_ids) > forwarded)  # the upstream is generating
    wait_until(lambda: fake.cancelled > before)  # within seconds, not after the upstream's 30 s
    assert fake.cancelled == before + 1
    metrics = wait_for_sample(gw.url, 1, "presafe_requests_total", model="slow", status=499)
    assert sample(metrics, "presafe_active_requests") == 0


def test_completions_route_detects_think_from_the_prompt(client):
    text = "Fine to answer.</think>" + ANSWER
    opened = client.completions.create(model="crafted", prompt="Q: hi\n<think>\n", extra_body={"fake_text": text})
    assert opened.model_extra["presafe"]["path"] == "answer_with_cot"
    closed = client.completions.create(model="crafted", prompt="Q: hi\n<think></think>",
                                       extra_body={"fake_text": REFUSAL})
    assert closed.model_extra["presafe"]["path"] == "refuse_pre_cot"


def test_enable_thinking_false_means_no_cot(client):
    out = client.chat.completions.create(
        model="crafted", messages=USER,
        extra_body={"fake_text": "x</think>" + REFUSAL, "chat_template_kwargs": {"enable_thinking": False}})
    assert out.model_extra["presafe"]["path"] == "refuse_pre_cot"


async def test_async_client_streams(gw):
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    stream = await client.completions.create(model="crafted", prompt="<think>", stream=True,
                                             extra_body={"fake_text": "hm</think>" + REFUSAL})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "hm</think>" + REFUSAL
    assert chunks[-1].model_extra["presafe"]["path"] == "refuse_after_cot"
    await client.close()


# --------------------------------------------------------------------------- request ids and logs


def test_request_id_is_accepted_propagated_and_logged(fake, gw, client, caplog):
    caplog.set_level(logging.INFO, logger="presafe.gateway")
    raw = client.chat.completions.with_raw_response.create(
        model="crafted", messages=USER, extra_headers={"x-request-id": "req-abc.123"})
    assert raw.headers["x-request-id"] == "req-abc.123"
    assert fake.request_ids[-1] == "req-abc.123"
    assert any(getattr(r, "request_id", None) == "req-abc.123" and r.msg == "request" for r in caplog.records)
    generated = httpx.get(f"{gw.url}/health").headers["x-request-id"]
    assert len(generated) == 32
    # an unusable id (too long, odd characters) is replaced
    assert httpx.get(f"{gw.url}/health", headers={"x-request-id": "a b" * 100}).headers["x-request-id"] != "a b"


def test_json_log_lines(caplog):
    from service.gateway.logs import JsonFormatter, request_id_var

    token = request_id_var.set("rid-1")
    try:
        record = logging.LogRecord("presafe.gateway", logging.INFO, __file__, 1, "request", None, None)
        record.route = "/v1/completions"
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["request_id"] == "rid-1" and line["route"] == "/v1/completions" and line["msg"] == "request"


# --------------------------------------------------------------------------- models and the alias


def test_models_lists_the_alias_and_follows_the_registry(gw, home, client):
    ids = [m.id for m in client.models.list().data]
    assert "presafe" not in ids and "crafted" in ids  # no promoted adapter: the alias cannot serve yet
    (home / "adapters").mkdir(exist_ok=True)
    (home / "adapters" / "registry.json").write_text(json.dumps({"promoted": "cut"}))
    try:
        alias = client.models.list().data[-1]
        assert alias.id == "presafe" and alias.model_extra["root"] == "cut"
        resp = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "presafe", "messages": USER})
        assert resp.json()["model"] == "cut"  # the alias was rewritten to the promoted name upstream
        metrics = scrape(gw.url)
        assert sample(metrics, "presafe_served_adapter_info", alias="presafe", adapter="cut") == 1
        (home / "adapters" / "registry.json").write_text(json.dumps({"promoted": "not-loaded"}))
        resp = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "presafe", "messages": USER})
        err = assert_openai_error(resp, 503)  # fail safe: never the base model instead
        assert "not-loaded" in err["message"] and err["code"] == "no_aligned_model"
        assert int(resp.headers["retry-after"]) > 0
    finally:
        (home / "adapters" / "registry.json").unlink()
    client.models.list()
    assert sample(scrape(gw.url), "presafe_served_adapter_info", alias="presafe") == 0


def test_metrics_names_are_exposed(gw):
    text = httpx.get(f"{gw.url}/metrics").text
    for name in ["presafe_requests_total", "presafe_decisions_total", "presafe_think_tokens",
                 "presafe_time_to_decision_seconds", "presafe_request_duration_seconds", "presafe_active_requests",
                 "presafe_upstream_errors_total", "presafe_classifier_verdicts_total",
                 "presafe_classifier_disagreements_total", "presafe_jobs",
                 "presafe_last_successful_retrain_timestamp_seconds", "presafe_served_adapter_info"]:
        assert f"# TYPE {name} " in text, name


# --------------------------------------------------------------------------- prompt classifier


@pytest.fixture(scope="module")
def classifier_home(tmp_path_factory, tiny_bert_dir):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    home = tmp_path_factory.mktemp("presafe-classifier-home")
    out = home / "classifier"
    torch.manual_seed(0)
    config = BertConfig.from_pretrained(tiny_bert_dir, num_labels=2, id2label={0: "comply", 1: "refuse"},
                                        label2id={"comply": 0, "refuse": 1})
    BertForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps({"threshold": 0.0}))  # every prompt: refuse
    return home


@pytest.mark.slow
def test_classifier_verdicts_and_disagreements(fake, classifier_home):
    settings = fake_settings(classifier_home, classifier_timeout_s=60)
    with ServerThread(create_app(settings, upstream_url=fake.url, think_open=True)) as gw:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        agree = client.chat.completions.create(model="crafted", messages=USER,
                                               extra_body={"fake_text": "</think>" + REFUSAL})
        assert agree.model_extra["presafe"]["classifier"]["verdict"] == "refuse"
        assert agree.model_extra["presafe"]["classifier"]["agrees"] is True
        stream = client.chat.completions.create(model="crafted", messages=USER, stream=True,
                                                extra_body={"fake_text": "</think>" + ANSWER})
        last = list(stream)[-1].model_extra["presafe"]
        assert last["classifier"]["verdict"] == "refuse" and last["classifier"]["agrees"] is False
        metrics = scrape(gw.url)
        assert sample(metrics, "presafe_classifier_verdicts_total", verdict="refuse", model="crafted") == 2
        assert sample(metrics, "presafe_classifier_disagreements_total", model="crafted") == 1


def test_classifier_follows_the_promoted_adapter(tmp_path):
    """The gateway reads the classifier published inside the promoted adapter, switches with a promotion,
    falls back to $PRESAFE_HOME/classifier, and PRESAFE_CLASSIFIER_DIR wins over both."""
    from service.core.settings import Settings
    from service.gateway.classifier import PromptClassifier, locate_classifier

    def classifier(path):
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
        (path / "metrics.json").write_text(json.dumps({"threshold": 0.5}))
        return path

    settings = Settings(home=tmp_path)
    home_clf = classifier(tmp_path / "classifier")
    v1 = classifier(settings.adapters_dir / "presafe-v1" / "classifier")
    (settings.adapters_dir / "presafe-v2").mkdir()  # published without one (an older pipeline)
    promoted = {"name": "presafe-v1"}
    found = PromptClassifier(lambda: locate_classifier(settings, lambda: promoted["name"]))
    assert found.available() and found.path == v1
    promoted["name"] = "presafe-v2"
    found._checked = 0.0  # re-checked at most once a second
    assert found.available() and found.path == home_clf
    promoted["name"] = None
    assert locate_classifier(settings, lambda: None) == home_clf
    own = classifier(tmp_path / "mine")
    assert locate_classifier(Settings(home=tmp_path, classifier_dir=own), lambda: "presafe-v1") == own
    found.close()


def test_no_classifier_no_verdict(client):
    out = client.chat.completions.create(model="crafted", messages=USER)
    assert "classifier" not in out.model_extra["presafe"]


def test_gateway_import_is_torch_free():
    import subprocess
    import sys

    code = ("import sys, service.gateway, service.cli, service.gateway.metrics, service.core.decision; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_client_gone_before_the_stream_starts_leaks_nothing(fake, gw):
    """The client leaves while the upstream has not even sent its headers: counted 499, nothing left open."""
    before = sample(scrape(gw.url), "presafe_requests_total", model="slow", status=499)
    body = json.dumps({"model": "slow", "fake_sleep": 0.5, "stream": True, "messages": USER,
                       "fake_text": "word " * 2000, "fake_chunk": 1}).encode()
    forwarded = len(fake.request_ids)
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: len(fake.request_ids) > forwarded)  # the upstream has it, its headers not sent yet
    metrics = wait_for_sample(gw.url, before + 1, "presafe_requests_total", model="slow", status=499)
    assert sample(metrics, "presafe_active_requests") == 0


async def _one_shot_server(answer_every: int):
    """A raw HTTP server that drops the connection of each request without a reply, except every
    ``answer_every``-th one (0: never), which gets a 200 JSON reply; records the request bodies."""
    bodies: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        bodies.append(await reader.readexactly(length))
        if answer_every and len(bodies) % answer_every == 0:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n"
                         b'{"ok":true}')
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/completions", bodies


async def test_a_stale_pooled_connection_is_retried_once():
    from service.gateway.metrics import Metrics
    from service.gateway.upstream import generation_session, send, transport_error

    metrics = Metrics()
    server, url, bodies = await _one_shot_server(answer_every=2)  # the first attempt is dropped, like a stale one
    async with server, generation_session(10.0) as session:
        resp = await send(session, url, b'{"a":1}', {"content-type": "application/json"}, metrics)
        assert resp.status == 200 and await resp.json() == {"ok": True}
        assert bodies == [b'{"a":1}', b'{"a":1}']  # the same body, sent again
    assert metrics.upstream_errors.labels("stale_connection")._value.get() == 1

    server, url, bodies = await _one_shot_server(answer_every=0)
    async with server, generation_session(10.0) as session:
        with pytest.raises(aiohttp.ServerDisconnectedError) as failed:  # a second failure is the caller's 502
            await send(session, url, b"{}", {}, metrics)
    assert len(bodies) == 2 and transport_error(failed.value, metrics).status == 502

    async with generation_session(10.0) as session:  # nothing listens: not retried, 503
        with pytest.raises(aiohttp.ClientConnectorError) as refused:
            await send(session, f"http://127.0.0.1:{free_port()}/v1/completions", b"{}", {}, metrics)
    assert transport_error(refused.value, metrics).status == 503
    assert metrics.upstream_errors.labels("stale_connection")._value.get() == 2


def test_client_gone_while_sending_the_body_is_499_not_500(gw, caplog):
    gateway = gw.server.config.app.state.gateway
    before = sample(scrape(gw.url), "presafe_requests_total", route="/v1/chat/completions", status=499)
    assert gateway.in_flight == 0
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 5000\r\n\r\n{\"model\": \"crafted\", ")
        wait_until(lambda: gateway.in_flight == 1)  # the gateway is reading the body
    metrics = wait_for_sample(gw.url, before + 1, "presafe_requests_total", route="/v1/chat/completions", status=499)
    assert sample(metrics, "presafe_requests_total", status=500) == 0
    assert not [r for r in caplog.records if r.getMessage() == "unexpected error"]


class _FailingJudge:
    """A refusal judge that fails with ``exc`` (an unforeseen fault inside the generation path)."""

    name = "failing"

    def __init__(self, exc: Exception):
        self.exc = exc

    def is_refusal(self, text: str) -> bool:
        raise self.exc


@pytest.mark.parametrize(("exc", "status", "code"), [
    (RuntimeError("boom"), 502, "gateway_error"),  # no handler of its own: the catch-all, never a 500
    (StarletteHTTPException(409, "taken"), 409, None),  # the app's handler for it, as FastAPI's router would
])
def test_a_failure_inside_the_generation_route_gets_the_apps_error_response(fake, tmp_path, exc, status, code):
    """The generation routes bypass FastAPI's router (service.gateway.proxy.DirectRoutes): an exception there still
    gets the app's error handlers' OpenAI-format answer, and the request is counted, not left in flight."""
    settings = fake_settings(tmp_path / "home")
    with ServerThread(create_app(settings, upstream_url=fake.url, think_open=True, judge=_FailingJudge(exc))) as gw:
        resp = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "crafted", "messages": USER}, timeout=30,
                          headers={"x-request-id": "fault-1"})
        err = assert_openai_error(resp, status)
        assert resp.headers["x-request-id"] == "fault-1"  # the catch-all answers outside the request-id middleware
        if code is not None:
            assert err["code"] == code
        assert gw.server.config.app.state.gateway.in_flight == 0


async def test_the_first_token_is_relayed_before_the_rest_of_its_batch():
    """A read that brings many events: the one with the first generated text goes out at once, the rest after
    (the first token's latency does not include parsing the batch)."""
    from types import SimpleNamespace

    from service.core.judge import get_judge
    from service.gateway.metrics import Metrics
    from service.gateway.proxy import _relay

    def event(delta: dict) -> bytes:
        return b"data: " + json.dumps({"id": "x", "choices": [{"index": 0, "delta": delta}]}).encode() + b"\n\n"

    batch = [event({"role": "assistant", "content": ""}), event({"content": "Hel"}), event({"content": "lo"}),
             event({"content": " there"}), b"data: [DONE]\n\n"]

    async def chunks():
        yield b"".join(batch)

    closed = []
    gw = SimpleNamespace(settings=SimpleNamespace(split_reasoning=False, classifier_timeout_s=1.0), metrics=Metrics())
    call = SimpleNamespace(record=lambda decisions, verdict: {"path": str(decisions[0].path)}, done=lambda: None,
                           status=200, error=None)
    reply = SimpleNamespace(chunks=chunks(), close=lambda whole: closed.append(whole))
    args = {"judge": get_judge(), "starts_in_think": False, "t0": time.monotonic()}
    pieces = [piece async for piece in _relay(gw, call, reply, "/v1/chat/completions", args, None, [False])]
    assert pieces[0] == batch[0] + batch[1]
    assert pieces[1].startswith(batch[2] + batch[3]) and pieces[1].endswith(b"data: [DONE]\n\n")
    assert len(pieces) == 2 and closed == [True]
