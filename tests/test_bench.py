"""The overhead benches judge their targets: a miss is a non-zero exit (``--report-only``: 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gateway_overhead
import train_overhead


def row(stream=True, ratio=0.99, added=1.0, path="gateway") -> dict:
    return {"stream": stream, "concurrency": 1, "tok_s_ratio": ratio, "added_ttft_p50_ms": added,
            "paths": ["direct", path]}


def test_gateway_overhead_targets():
    assert gateway_overhead.missed_targets([row(), row(stream=False)], fake=False) == []
    assert gateway_overhead.missed_targets([row(ratio=0.96)], fake=False) == [
        "streamed c=1: tokens/s ratio 0.960 < 0.97"]
    assert gateway_overhead.missed_targets([row(ratio=0.2)], fake=True) == []  # a fake's tokens/s is no model's
    assert gateway_overhead.missed_targets([row(added=5.01, stream=False)], fake=True) == [
        "non-streamed c=1: added median latency 5.01 ms > 5 ms"]
    assert gateway_overhead.missed_targets([row(added=2.0)], fake=True, max_added_ms=1.5) != []
    assert gateway_overhead.missed_targets([row(added=9.0, path="floor")], fake=True) == []  # a reference only


def test_train_overhead_targets():
    assert train_overhead.missed_targets({"step_time_ratio": 1.2, "peak_memory_ratio": 1.1}) == []
    assert train_overhead.missed_targets({"step_time_ratio": 1.21}) == ["step-time ratio 1.210 > 1.2"]
    assert train_overhead.missed_targets({"step_time_ratio": 1.0, "peak_memory_ratio": 1.15}) == [
        "peak-memory ratio 1.150 > 1.1"]


@pytest.mark.parametrize("extra, code", [([], 1), (["--report-only"], 0)])
def test_gateway_overhead_against_a_fake_upstream_exits_on_a_miss(tmp_path, extra, code):
    """The whole bench, a real gateway process before the in-process fake vLLM; a target nothing can meet
    (an added latency below -1 ms) is missed: exit 1, or 0 with --report-only."""
    out = tmp_path / "results.json"
    if "--report-only" in extra:  # ... and where the gateway's time goes (py-spy on the gateway process), beside
        extra = [*extra, "--profile", str(tmp_path / "profile"), "--floor"]  # a bare proxy in the same rounds
    proc = subprocess.run([sys.executable, str(BENCH / "gateway_overhead.py"), "--fake-upstream", "--rounds", "2",
                           "--warmup", "1", "--requests-per-round", "3", "--max-tokens", "5", "--max-added-ms", "-1",
                           "--json", str(out), *extra], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PRESAFE_HOME": str(tmp_path / "home")})
    assert proc.returncode == code, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    measured = ["gateway", "floor"] if "--floor" in extra else ["gateway"]
    assert [(r["stream"], r["concurrency"], r["rounds"], r["paths"][1]) for r in rows] == [
        (stream, 1, 2, path) for stream in (True, False) for path in measured]
    assert all(r[f"{r['paths'][1]}_tok_s"] > 0 and r["direct_tok_s"] > 0 for r in rows)  # 5 tokens each way
    assert "NOT met: streamed c=1: added median latency" in proc.stdout
    missed = next(line for line in proc.stdout.splitlines() if "NOT met" in line)
    assert missed.split("NOT met: ")[1].count("added median latency") == 2  # the gateway's rows: the floor is no target
    assert ("a bare Python proxy" in proc.stdout) == ("--floor" in extra)
    if "--profile" in extra:
        for mode in ("stream", "whole"):
            stacks = (tmp_path / "profile" / f"{mode}.txt").read_text()
            assert "service/gateway/" in stacks  # the gateway's own frames were sampled
            assert f"{mode}: py-spy, " in proc.stdout
        assert proc.stdout.count("| part of the request path |") == 2


def test_gateway_overhead_aligned_targets_and_report():
    """--aligned: the alias against the base (target ratio 0.95, TTFT within +5 ms), rows named by the paths."""
    tps = {"base": [100.0, 110.0, 90.0], "aligned": [96.0, 99.0, 90.0]}
    ttft = {"base": [[0.050, 0.052], [0.051, 0.049], [0.050, 0.050]],
            "aligned": [[0.053, 0.055], [0.054, 0.052], [0.052, 0.056]]}
    r = gateway_overhead.summarize("base", "aligned", tps, ttft, stream=True, concurrency=8, requests_per_round=2,
                                   rounds=3, max_tokens=32)
    assert r["paths"] == ["base", "aligned"] and r["base_tok_s"] == 100.0 and r["aligned_tok_s"] == 95.0
    assert r["tok_s_ratio"] == 0.96  # median of the paired ratios 0.96, 0.9, 1.0
    assert r["base_ttft_p50_ms"] == 50.0 and r["aligned_ttft_p50_ms"] == 53.5
    assert r["added_ttft_p50_ms"] == 3.0 and r["gateway_cpu_ms_per_request"] is None
    ratio = gateway_overhead.MIN_RATIO_ALIGNED
    assert gateway_overhead.missed_targets([r], fake=False, min_ratio=ratio) == []
    assert gateway_overhead.missed_targets([r], fake=False) == ["streamed c=8: tokens/s ratio 0.960 < 0.97"]
    slow = {**r, "tok_s_ratio": 0.5, "added_ttft_p50_ms": 120.0}
    assert gateway_overhead.missed_targets([slow], fake=False, min_ratio=ratio) == [
        "streamed c=8: tokens/s ratio 0.500 < 0.95", "streamed c=8: added median latency 120.00 ms > 5 ms"]
    table = gateway_overhead.report_table([r]).splitlines()
    assert "base tok/s" in table[0] and "aligned tok/s" in table[0] and "TTFT p50 base" in table[0]
    assert table[1].split()[:5] == ["stream", "8", "100.0", "95.0", "0.960"]


def test_gateway_overhead_aligned_paths_and_arguments(tmp_path, monkeypatch):
    stack = type("S", (), {"vllm_url": "http://v", "gateway_url": "http://g", "model_name": "base-m"})()
    assert gateway_overhead.bench_paths(stack) == [("direct", "http://v", "base-m"), ("gateway", "http://g", "base-m")]
    assert gateway_overhead.bench_paths(stack, aligned=True, alias="safe") == [
        ("base", "http://g", "base-m"), ("aligned", "http://g", "safe")]
    args = gateway_overhead.build_parser().parse_args(["--aligned", "--concurrency", "1", "8"])
    assert args.aligned and args.concurrency == [1, 8] and args.min_ratio is None
    with pytest.raises(SystemExit, match="not with --fake-upstream"):
        gateway_overhead.main(["--aligned", "--fake-upstream"])
    # No promoted adapter in the store: a clear exit before any vLLM starts.
    from service.core.settings import get_settings

    monkeypatch.setenv("PRESAFE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit, match="no adapter is promoted"):
            gateway_overhead.aligned_plan("smollm2-135m-instruct", 1234, 2048, ())
    finally:
        get_settings.cache_clear()


def test_lora_vs_merged_ratios_targets_and_agreement(tmp_path):
    import lora_vs_merged as lvm

    def r(config, model, tok_s, ttft, c=1):
        return {"config": config, "model": model, "concurrency": c, "tok_s": tok_s, "ttft_p50_ms": ttft}

    rows = lvm.with_ratios([r("base", "base", 40.0, 50.0), r("merged", "merged", 39.0, 53.0),
                            r("lora", "base", 38.0, 52.0), r("lora", "adapter", 19.0, 170.0)])
    merged, lora_base, lora = rows[1], rows[2], rows[3]
    assert (merged["ratio"], merged["added_ttft_ms"]) == (0.975, 3.0) and "ratio_same_engine" not in merged
    assert (lora["ratio"], lora["added_ttft_ms"], lora["ratio_same_engine"]) == (0.475, 120.0, 0.5)
    assert lora_base["ratio"] == 0.95 and "ratio_same_engine" not in lora_base
    good = {"merged vs lora": {"prompts": 100, "identical": 0.9, "same_path": 0.99}}
    assert lvm.missed_targets(rows, good) == []  # only the merged model is held to the targets
    slow = [{**row, "ratio": 0.9, "added_ttft_ms": 7.0} if row["config"] == "merged" else row for row in rows]
    assert lvm.missed_targets(slow, {"merged vs lora": {**good["merged vs lora"], "same_path": 0.97}}) == [
        "merged c=1: tokens/s ratio 0.900 < 0.95", "merged c=1: added median TTFT 7.0 ms > 5 ms",
        "merged vs lora: same decision path on 97.0% < 98%"]
    table = lvm.table(rows).splitlines()
    assert table[2].startswith("| base | base | 1 | 40.0 | 50 ms | 1.00x | +0 ms | - |")
    assert table[-1] == "| lora | adapter | 1 | 19.0 | 170 ms | 0.47x | +120 ms | 0.50x |"

    texts = [{"text": "Sure, here is how.", "finish_reason": "length", "tokens": 16},
             {"text": "I'm sorry, but I can't help with that.", "finish_reason": "stop", "tokens": 12}]
    other = [{**texts[0], "text": "Sure, here is why."}, texts[1]]
    assert lvm.agreement(texts, other, starts_in_think=False) == {"prompts": 2, "identical": 0.5, "same_path": 1.0}
    refused = [texts[1], texts[1]]
    assert lvm.agreement(texts, refused, starts_in_think=False)["same_path"] == 0.5

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"p{i}", "source": "t",
                                        "split": "val" if i % 2 else "train"}) + "\n"
                            for i in range(20)))
    chosen = lvm.agreement_prompts(pool, 5)
    assert len(chosen) == 5 and all(int(p[1:]) % 2 for p in chosen) and chosen == lvm.agreement_prompts(pool, 5)


def sweep_bundle() -> dict:
    def ex(i, path, decision_only=False, extra=False):
        ids = [1, 2, 3, 4, 5, 6]
        labels = [-100] * 6 if decision_only else [-100, -100, -100, 4, 5, 6]
        return {"id": f"{path}{i}", "path": path, "input_ids": ids if not decision_only else ids[:3],
                "labels": labels if not decision_only else [-100] * 3, "decision_positions": [1, 2],
                "decision_target": 0.9 if path == "refuse" else 0.1, "decision_label": float(path == "refuse"),
                "extra": extra}
    sft = [ex(i, "refuse", extra=i >= 6) for i in range(8)] + [ex(i, "comply") for i in range(4)]
    only = [ex(i, "refuse" if i % 2 else "comply", decision_only=True) for i in range(10)]
    return {"config": {"data": {"seed": 0}}, "sft": sft, "decision_only": only}


def test_align_sweep_arms_select_their_examples():
    import align_sweep

    bundle = sweep_bundle()
    count = lambda arm: (sum(not e.decision_only for e in align_sweep._examples(bundle, arm, 0)),
                         sum(e.decision_only for e in align_sweep._examples(bundle, arm, 0)))
    assert count({"lambda_decision": 0.0}) == (12, 0)
    assert count({"lambda_decision": 5.0, "decision_only_prompts": 4}) == (12, 4)
    assert count({"lambda_decision": 0.0, "extra_refuse_prompts": 0}) == (10, 0)  # the 2 extra refusals dropped
    assert count({"lambda_decision": 5.0, "sft_refuse_fraction": 0.25, "decision_only_prompts": 10}) == (6, 16)
    assert count({"lambda_decision": 0.0, "sft_refuse_fraction": 0.25}) == (6, 0)  # λ = 0 cannot use the rest


def test_align_sweep_statistics():
    import align_sweep

    assert align_sweep.mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    assert align_sweep.mcnemar_p(5, 5) == 1.0 and align_sweep.mcnemar_p(0, 0) == 1.0
    assert align_sweep.auroc([0.9, 0.8], [0.1, 0.2]) == 1.0 and align_sweep.auroc([0.1], [0.9]) == 0.0
    assert align_sweep.auroc([0.5], [0.5]) == 0.5
    lo, hi = align_sweep.wilson(0, 150)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.0250, abs=5e-4)


def test_align_sweep_report_pairs_each_arm_with_its_twin(tmp_path):
    import align_sweep

    rows = [{"id": f"p{i}", "prompt": f"prompt {i}", "label": "harmful" if i < 4 else "benign", "source": "jailbreak",
             "form": "jailbreak", "set": "jailbreak/harmful" if i < 4 else "jailbreak/benign", "pair_id": None}
            for i in range(8)]
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"eval": rows, "sft": [], "decision_only": [], "run_dir": "r"}))
    results = tmp_path / "results.jsonl"
    arm = {"refuse": [1, 1, 1, 1, 0, 0, 0, 0], "p_refuse": [0.9] * 4 + [0.1] * 4}
    twin = {"refuse": [0, 0, 1, 1, 1, 1, 0, 0], "p_refuse": [0.2, 0.2, 0.9, 0.9, 0.8, 0.8, 0.1, 0.1]}
    results.write_text("".join(json.dumps({"arm": a, "seed": s, **r}) + "\n"
                               for s in (0, 1) for a, r in (("lin5_d1500", arm), ("sft", twin))))
    align_sweep.report(bundle, results, tmp_path / "sweep.md", None)
    text = (tmp_path / "sweep.md").read_text()
    harmful = next(line for line in text.splitlines() if line.startswith("| jailbreak/harmful | 4 |"))
    assert harmful.rstrip(" |").split(" | ")[2:4] == ["50.0% (22%–78%)", "100.0% (68%–100%)"]  # sft, lin5_d1500; n = 8
    assert "| lin5_d1500 | sft | jailbreak/harmful | 100.0% | 50.0% | 4 | 0 | 0.125 |" in text
    assert "| lin5_d1500 | [0, 1] | 1.000 |" in text


def test_eval_agreement_run_needs_a_published_adapter(tmp_path):
    """``--run`` merges the run's published adapter (with its manifest); a run stopped before publish is named."""
    import eval_agreement

    (tmp_path / "align" / "adapter").mkdir(parents=True)
    with pytest.raises(SystemExit, match="holds no published adapter"):
        eval_agreement.main(["--run", str(tmp_path), "--b", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def test_eval_agreement_compares_paths_and_headline_intervals(tmp_path):
    import eval_agreement

    from training.evaluate.data import ResponseRow

    def write(directory: Path, model: str, refused_benign: int) -> Path:
        rows = [ResponseRow(model=model, id=f"h{i}", source="advbench", label="harmful", set="advbench",
                            path="refuse_pre_cot", refused=True, form="imperative") for i in range(40)]
        rows += [ResponseRow(model=model, id=f"b{i}", source="writingbench", label="benign", set="writingbench",
                             path="refuse_pre_cot" if i < refused_benign else "answer_with_cot",
                             refused=i < refused_benign, form="imperative") for i in range(40)]
        rows.append(ResponseRow(model=model, id="e", source="advbench", label="harmful", error="timeout"))
        directory.mkdir()
        (directory / "responses.jsonl").write_text("".join(json.dumps(r.__dict__) + "\n" for r in rows))
        return directory

    lora, merged, far = write(tmp_path / "lora", "lora", 2), write(tmp_path / "merged", "m", 3), \
        write(tmp_path / "far", "f", 30)
    close = eval_agreement.compare(eval_agreement.load_rows(lora, "lora"), eval_agreement.load_rows(merged, "m"))
    assert close["prompts"] == 80  # the errored row is left out
    assert close["same_path"] == pytest.approx(79 / 80)
    assert close["differing"] == [{"id": "b2", "set": "writingbench", "a": "answer_with_cot", "b": "refuse_pre_cot"}]
    over = next(f for f in close["figures"] if f["key"] == "benign_over_refusal")
    assert (over["a"], over["b"], over["n"], over["inside"]) == (0.05, 0.075, 40, True)
    assert eval_agreement.main(["--a", str(lora), "--a-model", "lora", "--b", str(merged), "--b-model", "m"]) == 0
    apart = eval_agreement.compare(eval_agreement.load_rows(lora, "lora"), eval_agreement.load_rows(far, "f"))
    assert {f["key"]: f["inside"] for f in apart["figures"]}["benign_over_refusal"] is False
    assert {f["key"]: f["inside"] for f in apart["figures"]}["harmful_refusal_rate"] is True
    args = ["--a", str(lora), "--a-model", "lora", "--b", str(far), "--b-model", "f"]
    assert eval_agreement.main(args) == 1  # 72% the same path, over-refusal 5% against 75%
    assert eval_agreement.main([*args, "--report-only"]) == 0


def test_classifier_thresholds_budget_and_rates():
    from types import SimpleNamespace

    from bench.classifier_thresholds import budget_threshold, rates

    benign = [0.01 * i for i in range(100)]  # 0.00 .. 0.99
    for budget in (0.0, 0.05, 0.10, 0.5):
        t = budget_threshold(benign, budget)
        assert sum(p >= t for p in benign) == int(budget * 100)  # at most the budget, and no fewer
    assert budget_threshold(benign, 1.0) == 0.0
    ex = [SimpleNamespace(id=str(i), split="test", source="fm", form="past", target=i % 2) for i in range(4)]
    got = rates(ex, {"0": 0.9, "1": 0.8, "2": 0.1, "3": 0.2}, 0.5)
    assert got["test/fm"] == got["test/fm/past"] == [1, 2, 1, 2]


def test_a_server_that_fails_to_start_stops_those_started_before_it(tmp_path, monkeypatch):
    """The fake upstream starts, the gateway then fails at start-up (a setting out of range): the bench exits
    naming it, and the fake upstream is not left running."""
    started = []
    start = gateway_overhead.Stack._start

    def recording_start(self, cmd, env, log):
        start(self, cmd, env, log)
        started.append(self.procs[-1])

    monkeypatch.setattr(gateway_overhead.Stack, "_start", recording_start)
    monkeypatch.setenv("PRESAFE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PRESAFE_LIMIT_CONCURRENCY", "0")
    with pytest.raises(SystemExit, match="gateway exited"):
        gateway_overhead.Stack(None, None, None, None, fake_upstream=True)
    assert len(started) == 2 and all(proc.poll() is not None for proc in started)


@pytest.mark.parametrize(("innermost", "part"), [
    # the handler's own lines: the gateway's, not the request-id middleware's "access log" further out
    (["_generate (service/gateway/proxy.py:330)"], "rest of the gateway (handler, body read, routing)"),
    (["_Call.done (service/gateway/proxy.py:288)", "Logger.info (logging/__init__.py:1489)"], "metrics and access log"),
    (["_Call.done (service/gateway/proxy.py:288)", "Handler.handle (logging/__init__.py:978)",
      "JsonFormatter.format (service/gateway/logs.py:35)", "dumps (json/__init__.py:238)"], "metrics and access log"),
    (["check_request (service/gateway/proxy.py:152)", "loads (json/__init__.py:346)"],
     "request checks and model resolution"),
    (["_SSEResponse.__call__ (service/gateway/proxy.py:570)",
      "RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py:542)"], "HTTP server (uvicorn/starlette)"),
])
def test_profile_parts_name_the_innermost_known_frame(innermost, part):
    """py-spy stacks go to the part of the request path of their innermost known frame (`--profile`)."""
    outer = ["Runner.run (asyncio/runners.py:118)", "RequestIdMiddleware.__call__ (service/gateway/logs.py:91)",
             "DirectRoutes.__call__ (service/gateway/proxy.py:103)"]
    assert gateway_overhead._part(outer + innermost) == part
