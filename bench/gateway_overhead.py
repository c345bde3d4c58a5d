"""Gateway overhead: the same streamed chat requests sent to vLLM directly and through the gateway.

Interleaved rounds (direct and gateway alternate, order flipped every round) at each concurrency;
every request generates exactly ``--max-tokens`` tokens (``ignore_eos``). Reports, per concurrency,
output tokens/s of each path and their ratio (target >= 0.97) and the added median time to first
token (target <= 5 ms). Exits 1 when a target is missed (``--report-only``: always 0).

``--fake-upstream`` puts a fake vLLM that answers at once (``bench/fake_upstream.py``, in a process of its own as
vLLM is) in place of vLLM, so the figure is the gateway's own added latency, streamed (time to first token) and
non-streamed (whole response); there the target is the added median latency only (a fake's tokens/s is no
model's). ``--floor`` measures a bare pass-through proxy (``bench/bare_proxy.py``) in the same rounds: the floor
of any Python hop on this machine, so the gateway's own share is what it adds beyond it.

``--aligned`` measures the price of safety instead: the gateway's alias (``presafe``: the promoted adapter of
``$PRESAFE_HOME``'s store) against the base model, both through the same gateway. The alias is served as
``make serve`` serves it: from the adapter merged into the base, on a vLLM the gateway starts
(``PRESAFE_SERVE_MERGED``, ``service.engines``); the base model on a plain vLLM started here (no LoRA, the same
CoT serving template), the engine a user of the base model alone would run. ``--lora`` serves the alias through
runtime LoRA instead (both on one ``--enable-lora`` vLLM: the price before merged serving). Targets: the alias at
>= 0.95x the base's output tokens/s, its median TTFT within +5 ms of the base's.

    python bench/gateway_overhead.py                          # starts vLLM (embedded default) + gateway
    python bench/gateway_overhead.py --vllm-url http://127.0.0.1:8000 --gateway-url http://127.0.0.1:8080
    python bench/gateway_overhead.py --fake-upstream --floor  # the gateway alone, before a fake vLLM
    PRESAFE_HOME=... python bench/gateway_overhead.py --aligned  # the alias against the base model
    PRESAFE_HOME=... python bench/gateway_overhead.py --aligned --lora  # the same, the alias through LoRA

The requests name the base model and set ``ignore_eos``, which the public gateway refuses by default: a
gateway started here gets ``PRESAFE_PUBLIC_MODELS=<served model>`` and
``PRESAFE_EXTRA_REQUEST_FIELDS=ignore_eos``; start a ``--gateway-url`` one with the same two settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Explain, step by step, how a bicycle gear system works."


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=3).status_code == 200:
                return
        time.sleep(1)
    sys.exit(f"{what} not ready after {timeout}s; log {log}")


class Stack:
    """vLLM and/or the gateway as subprocesses (only those not given by URL); stopped on exit."""

    def __init__(self, vllm_url: str | None, gateway_url: str | None, model: str | None, served: str | None,
                 max_model_len: int = 2048, extra_vllm_args: tuple[str, ...] = (), aligned: bool = False,
                 lora: bool = False, fake_upstream: bool = False):
        self.procs: list[subprocess.Popen] = []
        self.gateway_pid: int | None = None  # when started here: its CPU time is reported
        self.floor_url: str | None = None  # bench/bare_proxy.py before the same upstream (start_floor)
        self.workdir = Path(tempfile.mkdtemp(prefix="presafe-bench-"))
        self.model_name = served
        try:
            self._start_servers(vllm_url, gateway_url, model, served, max_model_len, extra_vllm_args, aligned, lora,
                                fake_upstream)
        except BaseException:  # one failed to start (wait_http exits): stop those started before it
            self.close()
            raise

    def _start_servers(self, vllm_url: str | None, gateway_url: str | None, model: str | None, served: str | None,
                       max_model_len: int, extra_vllm_args: tuple[str, ...], aligned: bool, lora: bool,
                       fake_upstream: bool) -> None:
        if fake_upstream:  # in a process of its own, as vLLM is
            from fake_upstream import MODEL

            vllm_url, self.model_name = self._start_script("fake_upstream.py"), MODEL
        elif vllm_url is None:
            from service.core.assets import resolve_model
            from service.core.settings import get_settings
            from service.vllm_server import EmbeddedPlan, served_name

            base = model or get_settings().base_model
            self.model_name = served or served_name(base)
            port = free_port()
            vllm_url = f"http://127.0.0.1:{port}"
            log = self.workdir / "vllm.log"
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
                   "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_NO_USAGE_STATS": "1"}
            if aligned:
                plan = aligned_plan(base, port, max_model_len, extra_vllm_args, lora)
                self.model_name = plan.served_name
                if plan.api_key:
                    env["VLLM_API_KEY"] = plan.api_key
            else:
                plan = EmbeddedPlan(model=resolve_model(base), served_name=self.model_name, port=port,
                                    max_model_len=max_model_len, extra_args=list(extra_vllm_args))
            cmd = plan.command()
            print(f"starting vLLM ({self.model_name}) on {vllm_url}, log {log}", file=sys.stderr)
            self._start(cmd, env, log)
            wait_http(f"{vllm_url}/health", self.procs[-1], 900, "vLLM", log)
        if gateway_url is None:
            port = free_port()
            gateway_url = f"http://127.0.0.1:{port}"
            log = self.workdir / "gateway.log"
            env = {**os.environ, "PRESAFE_HOME": os.environ.get("PRESAFE_HOME", str(self.workdir / "home"))}
            if self.model_name is None:
                self.model_name = httpx.get(f"{vllm_url}/v1/models", timeout=10).json()["data"][0]["id"]
            env.setdefault("PRESAFE_PUBLIC_MODELS", self.model_name)  # the base model, named by the requests
            env.setdefault("PRESAFE_EXTRA_REQUEST_FIELDS", "ignore_eos")  # fixed-length generations
            admin_token = None
            if aligned and not lora:  # the alias from merged weights, on the gateway's own engine
                import secrets

                admin_token = secrets.token_urlsafe(16)
                env.update(PRESAFE_SERVE_MERGED="true", PRESAFE_ADMIN_TOKEN=admin_token)
            cmd = [sys.executable, "-m", "service.cli", "--vllm-url", vllm_url, "--port", str(port)]  # presafe serve
            print(f"starting the gateway on {gateway_url}, log {log}", file=sys.stderr)
            self._start(cmd, env, log)
            self.gateway_pid = self.procs[-1].pid
            wait_http(f"{gateway_url}/ready", self.procs[-1], 120, "gateway", log)
            if admin_token is not None:
                wait_merged(gateway_url, admin_token, self.procs[-1], log)
        self.vllm_url, self.gateway_url = vllm_url.rstrip("/"), gateway_url.rstrip("/")
        if self.model_name is None:
            self.model_name = httpx.get(f"{self.vllm_url}/v1/models", timeout=10).json()["data"][0]["id"]

    def start_floor(self) -> None:
        """Start ``bench/bare_proxy.py`` before the same upstream as the gateway (``--floor``)."""
        self.floor_url = self._start_script("bare_proxy.py", "--upstream", self.vllm_url)

    def _start_script(self, script: str, *args: str) -> str:
        """Start ``bench/<script> [args] --port P`` and wait for its ``/health``; returns its URL."""
        port, log = free_port(), self.workdir / f"{Path(script).stem}.log"
        self._start([sys.executable, str(ROOT / "bench" / script), *args, "--port", str(port)], dict(os.environ), log)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", self.procs[-1], 60, script, log)
        return url

    def _start(self, cmd: list[str], env: dict, log: Path) -> None:
        with open(log, "wb") as fh:
            # A process group of its own (stopped with killpg), in this process's session: Linux's scheduler
            # autogroups would otherwise put a server started in a new session into a scheduling group of its own,
            # which on 2 cores added ~2 ms to every hop through it (the bare proxy: 1.0 -> 3.2 ms).
            self.procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                               process_group=0))

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_merged(gateway_url: str, token: str, proc: subprocess.Popen, log: Path, timeout: float = 1800) -> None:
    """Wait until the gateway serves the alias from its merged engine (``/admin/adapters`` ``serving.mode``)."""
    print("waiting for the alias's merged engine (merge + vLLM start)", file=sys.stderr)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the gateway exited ({proc.returncode}); log {log}")
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            serving = httpx.get(f"{gateway_url}/admin/adapters", headers={"authorization": f"Bearer {token}"},
                                timeout=10).json()["serving"]
            if serving["mode"] == "merged":
                return
            if serving["reason"] != "the merged engine is starting":
                sys.exit(f"the alias is not served merged: {serving['reason']}")
        time.sleep(2)
    sys.exit(f"the alias's merged engine was not ready after {timeout:.0f}s; log {log}")


def aligned_plan(base: str, port: int, max_model_len: int, extra_vllm_args: tuple[str, ...], lora: bool = False):
    """The base model's vLLM for ``$PRESAFE_HOME`` with the CoT serving template ``make serve`` plans, on ``port``:
    plain (``lora`` False: the alias is served merged by the gateway's own engine) or the LoRA engine with the
    store's adapters; exits when no adapter is promoted (the alias would not answer)."""
    from service.adapters.store import AdapterStore
    from service.core.settings import get_settings
    from service.vllm_server import plan_embedded

    settings = get_settings().model_copy(update={"base_model": base})
    promoted = AdapterStore(settings.adapters_dir).promoted()
    if promoted is None:
        sys.exit(f"--aligned: no adapter is promoted in {settings.adapters_dir} (set PRESAFE_HOME to a store "
                 "with a promoted adapter)")
    plan = plan_embedded(settings, port=port)
    plan.max_model_len = plan.max_model_len or max_model_len
    plan.extra_args += list(extra_vllm_args)
    if not lora:
        plan.lora, plan.adapters = False, {}
    return plan


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vllm-url", help="a running vLLM (default: start one)")
    parser.add_argument("--gateway-url", help="a running gateway in front of --vllm-url (default: start one)")
    parser.add_argument("--model", help="model to start vLLM with (default: PRESAFE_BASE_MODEL)")
    parser.add_argument("--served-model", help="model name to request (default: the server's first)")


def stack_from_args(args: argparse.Namespace) -> Stack:
    if args.gateway_url and not args.vllm_url:
        sys.exit("--gateway-url needs --vllm-url (the vLLM it fronts)")
    return Stack(args.vllm_url, args.gateway_url, args.model, args.served_model,
                 aligned=getattr(args, "aligned", False), lora=getattr(args, "lora", False))


def bench_paths(stack: Stack, aligned: bool = False, alias: str = "presafe") -> list[tuple[str, str, str]]:
    """The two compared paths, (name, URL, model), the reference first: vLLM directly against the gateway, or
    (aligned) the base model against the alias, both through the gateway."""
    if aligned:
        return [("base", stack.gateway_url, stack.model_name), ("aligned", stack.gateway_url, alias)]
    return [("direct", stack.vllm_url, stack.model_name), ("gateway", stack.gateway_url, stack.model_name)]


# --------------------------------------------------------------------------- measurement


@dataclass
class Sample:
    ttft: float
    tokens: int


def has_text(line: str) -> bool:
    """Whether a ``data:`` event carries generated text (the first token: not the role-only opening event), as
    content or as reasoning (the gateway routes reasoning apart)."""
    for choice in json.loads(line[6:]).get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or choice.get("text"):
            return True
    return False


async def one_request(client: httpx.AsyncClient, url: str, model: str, max_tokens: int,
                      stream: bool = True) -> Sample:
    """One chat request; not streamed, its "time to first token" is the whole response's."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        resp = await client.post(f"{url}/v1/chat/completions", json=body)
        resp.raise_for_status()
        return Sample(time.perf_counter() - t0, resp.json()["usage"]["completion_tokens"])
    body["stream_options"] = {"include_usage": True}
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None and has_text(line):
                ttft = time.perf_counter() - t0
            if '"usage":{' in line or '"usage": {' in line:
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return Sample(ttft if ttft is not None else time.perf_counter() - t0, tokens)


async def run_batch(url: str, model: str, n: int, concurrency: int, max_tokens: int,
                    stream: bool = True) -> tuple[float, list[Sample]]:
    """``n`` requests at ``concurrency``: (output tokens/s over the batch's wall time, samples)."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)
        samples: list[Sample] = []

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                samples.append(await one_request(client, url, model, max_tokens, stream))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return sum(s.tokens for s in samples) / wall, samples


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process and its reaped children (Linux), None if unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


async def bench(stack: Stack, concurrencies: list[int], rounds: int, per_round: int | None, max_tokens: int,
                warmup: int, stream: bool = True, paths: list[tuple[str, str, str]] | None = None,
                profiler: Profiler | None = None) -> list[dict]:
    """Interleaved rounds of the ``paths`` (:func:`bench_paths`; each after the first is measured against the
    first, one result row each; the order rotates every round)."""
    paths = paths or bench_paths(stack)
    ref, measured = paths[0][0], [name for name, _, _ in paths[1:]]
    targets = {name: (url, model) for name, url, model in paths}
    for url, model in targets.values():  # warm every path (connections, caches, the gateway's model list)
        await run_batch(url, model, warmup, min(warmup, 4), max_tokens, stream)
    if profiler is not None:
        profiler.start()  # the steady state only: start-up, first-request imports and caches are behind us
    results = []
    names = [ref, *measured]
    for c in concurrencies:
        n = per_round or max(8, 2 * c)
        tps: dict[str, list[float]] = {name: [] for name in names}
        ttft: dict[str, list[list[float]]] = {name: [] for name in names}
        gw_cpu, gw_tokens = {name: 0.0 for name in names}, {name: 0 for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # each path takes each place in turn
                cpu0 = cpu_seconds(stack.gateway_pid) if targets[name][0] == stack.gateway_url else None
                rate, samples = await run_batch(*targets[name], n, c, max_tokens, stream)
                if cpu0 is not None:
                    gw_cpu[name] += cpu_seconds(stack.gateway_pid) - cpu0
                    gw_tokens[name] += sum(s.tokens for s in samples)
                tps[name].append(rate)
                ttft[name].append([s.ttft for s in samples])
            print(f"  {'' if stream else 'non-streamed '}c={c} round {r + 1}/{rounds}: "
                  + ", ".join(f"{name} {tps[name][-1]:.1f} tok/s" for name in names), file=sys.stderr, flush=True)
        # Paired per round (the paths ran back to back), so slow drifts of the machine cancel out.
        for name in measured:
            results.append(summarize(ref, name, tps, ttft, stream=stream, concurrency=c, requests_per_round=n,
                                     rounds=rounds, max_tokens=max_tokens, gw_cpu=gw_cpu[name],
                                     gw_tokens=gw_tokens[name]))
    return results


def summarize(ref: str, new: str, tps: dict[str, list[float]], ttft: dict[str, list[list[float]]], *,
              stream: bool, concurrency: int, requests_per_round: int, rounds: int, max_tokens: int,
              gw_cpu: float = 0.0, gw_tokens: int = 0) -> dict:
    """One result row from per-round tokens/s and TTFTs of the reference path ``ref`` and the measured ``new``:
    the tokens/s ratio and the added median TTFT are medians over the paired rounds."""
    ratios = [b / a for b, a in zip(tps[new], tps[ref])]
    added = [statistics.median(b) - statistics.median(a) for b, a in zip(ttft[new], ttft[ref])]
    all_a = [t for batch in ttft[ref] for t in batch]
    all_b = [t for batch in ttft[new] for t in batch]
    return {
        "stream": stream, "concurrency": concurrency, "requests_per_round": requests_per_round, "rounds": rounds,
        "max_tokens": max_tokens, "paths": [ref, new],
        f"{ref}_tok_s": round(statistics.mean(tps[ref]), 2),
        f"{new}_tok_s": round(statistics.mean(tps[new]), 2),
        "tok_s_ratio": round(statistics.median(ratios), 4),
        "tok_s_ratio_of_means": round(statistics.mean(tps[new]) / statistics.mean(tps[ref]), 4),
        f"{ref}_ttft_p50_ms": round(1000 * statistics.median(all_a), 2),
        f"{new}_ttft_p50_ms": round(1000 * statistics.median(all_b), 2),
        "added_ttft_p50_ms": round(1000 * statistics.median(added), 2),
        f"{ref}_ttft_p90_ms": round(1000 * pct(all_a, 0.9), 2),
        f"{new}_ttft_p90_ms": round(1000 * pct(all_b, 0.9), 2),
        "gateway_cpu_ms_per_request": round(1000 * gw_cpu / (requests_per_round * rounds), 3) if gw_tokens else None,
        "gateway_cpu_ms_per_1k_tokens": round(1e6 * gw_cpu / gw_tokens, 2) if gw_tokens else None,
    }


MIN_RATIO, MAX_ADDED_MS = 0.97, 5.0
FLOOR = "floor"  # bench/bare_proxy.py: a pass-through Python proxy (--floor)
MIN_RATIO_ALIGNED = 0.95  # the alias against the base model (issue #17)


def missed_targets(results: list[dict], fake: bool, max_added_ms: float = MAX_ADDED_MS,
                   min_ratio: float = MIN_RATIO) -> list[str]:
    """What missed its target: the tokens/s ratio (not against a fake) and the added median latency."""
    missed = []
    for r in results:
        if r.get("paths", ("", ""))[1] == FLOOR:  # a reference, not the product
            continue
        where = f"{'streamed' if r['stream'] else 'non-streamed'} c={r['concurrency']}"
        if not fake and r["tok_s_ratio"] < min_ratio:
            missed.append(f"{where}: tokens/s ratio {r['tok_s_ratio']:.3f} < {min_ratio}")
        if r["added_ttft_p50_ms"] > max_added_ms:
            missed.append(f"{where}: added median latency {r['added_ttft_p50_ms']:.2f} ms > {max_added_ms:g} ms")
    return missed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(parser)
    parser.add_argument("--fake-upstream", action="store_true",
                        help="an in-process fake vLLM that answers at once, streamed and non-streamed requests")
    parser.add_argument("--aligned", action="store_true",
                        help="the alias (the promoted adapter) against the base model, both through the gateway")
    parser.add_argument("--lora", action="store_true",
                        help="--aligned: the alias through runtime LoRA on the base model's vLLM, not merged")
    parser.add_argument("--floor", action="store_true",
                        help="--fake-upstream: also measure a bare pass-through proxy (bench/bare_proxy.py) in the "
                        "same rounds, the floor of any Python hop; the gateway's own cost is what it adds beyond")
    parser.add_argument("--concurrency", type=int, nargs="+", help="default: 1 8 32 (fake upstream: 1)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds per concurrency")
    parser.add_argument("--requests-per-round", type=int, help="default: max(8, 2 x concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--max-added-ms", type=float, default=MAX_ADDED_MS,
                        help=f"target for the added median TTFT (default {MAX_ADDED_MS:g})")
    parser.add_argument("--min-ratio", type=float,
                        help=f"target for the tokens/s ratio (default {MIN_RATIO}; --aligned: {MIN_RATIO_ALIGNED})")
    parser.add_argument("--report-only", action="store_true", help="exit 0 even when a target is missed")
    parser.add_argument("--profile", type=Path, help="sample the gateway started here with py-spy while the "
                        "measured rounds run (not the warm-up), write the stacks in this folder and print where its "
                        "CPU time per request goes")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.aligned and args.fake_upstream:
        sys.exit("--aligned measures a model's adapter: not with --fake-upstream")
    if args.floor and not args.fake_upstream:
        sys.exit("--floor needs --fake-upstream (the floor is measured before the same fake vLLM)")
    min_ratio = args.min_ratio or (MIN_RATIO_ALIGNED if args.aligned else MIN_RATIO)
    concurrencies = args.concurrency or ([1] if args.fake_upstream else [1, 8, 32])
    with contextlib.ExitStack() as stack_cm:
        if args.fake_upstream:
            if args.vllm_url or args.gateway_url:
                sys.exit("--fake-upstream starts its own upstream and gateway: no --vllm-url / --gateway-url")
            stack = stack_cm.enter_context(Stack(None, None, None, None, fake_upstream=True))
            if args.floor:
                stack.start_floor()
        else:
            stack = stack_cm.enter_context(stack_from_args(args))
        from service.core.settings import get_settings

        paths = bench_paths(stack, args.aligned, get_settings().model_alias)
        if stack.floor_url is not None:
            paths.append((FLOOR, stack.floor_url, stack.model_name))
        results = []
        for stream in ([True, False] if args.fake_upstream else [True]):
            with Profiler(stack.gateway_pid, args.profile, f"{'stream' if stream else 'whole'}") as profiler:
                results += asyncio.run(bench(stack, concurrencies, args.rounds, args.requests_per_round,
                                             args.max_tokens, args.warmup, stream, paths, profiler))
    upstream = "a fake upstream answering at once" if args.fake_upstream else f"model {stack.model_name}"
    if args.aligned:
        upstream += (f" against the alias {paths[1][2]!r} ({'runtime LoRA' if args.lora else 'merged'}), both "
                     "through the gateway")
    print(f"{upstream}; {args.rounds} interleaved rounds; {args.max_tokens} tokens per request; "
          "ratio and added TTFT: medians over the paired rounds (not streamed: the whole response's time)")
    print(report_table(results))
    print(floor_summary(results))
    for table in profiles_printed(args.profile, results):
        print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    missed = missed_targets(results, args.fake_upstream, args.max_added_ms, min_ratio)
    targets = (f"added median latency <= {args.max_added_ms:g} ms" if args.fake_upstream
               else f"ratio >= {min_ratio}, added median TTFT <= {args.max_added_ms:g} ms")
    print(f"targets ({targets}):", "NOT met: " + "; ".join(missed) if missed else "met")
    if missed and not args.report_only:
        sys.exit(1)


def report_table(results: list[dict]) -> str:
    """The results as a fixed-width table, one row per (mode, concurrency, measured path); the path's name ends
    the row when several were measured."""
    ref, new = results[0]["paths"] if results else ("direct", "gateway")
    several = len({r["paths"][1] for r in results}) > 1
    lines = [(f"{'mode':>9} {'conc':>4} {ref + ' tok/s':>13} {new + ' tok/s':>14} {'ratio':>7} "
              f"{'TTFT p50 ' + ref:>16} {new:>8} {'added':>8} {'gw CPU ms/req':>14}" + ("  path" if several else ""))]
    for r in results:
        cpu, name = r["gateway_cpu_ms_per_request"], r["paths"][1]
        lines.append(f"{'stream' if r['stream'] else 'whole':>9} {r['concurrency']:>4} {r[f'{ref}_tok_s']:>13.1f} "
                     f"{r[f'{name}_tok_s']:>14.1f} {r['tok_s_ratio']:>7.3f} "
                     f"{r[f'{ref}_ttft_p50_ms']:>14.1f}ms {r[f'{name}_ttft_p50_ms']:>6.1f}ms "
                     f"{r['added_ttft_p50_ms']:>6.2f}ms {'-' if cpu is None else f'{cpu:.2f}':>14}"
                     + (f"  {name}" if several else ""))
    return "\n".join(lines)


def floor_summary(results: list[dict]) -> str:
    """With ``--floor``: per mode, what the gateway adds beyond a bare Python proxy (its own cost)."""
    lines = []
    for row in results:
        floor = next((f for f in results if f["paths"][1] == FLOOR and f["stream"] == row["stream"]
                      and f["concurrency"] == row["concurrency"]), None)
        if floor is None or row is floor:
            continue
        lines.append(f"{'streamed' if row['stream'] else 'whole'} c={row['concurrency']}: the gateway adds "
                     f"{row['added_ttft_p50_ms']:.2f} ms, a bare Python proxy {floor['added_ttft_p50_ms']:.2f} ms: "
                     f"{row['added_ttft_p50_ms'] - floor['added_ttft_p50_ms']:+.2f} ms is the gateway's own")
    return "\n".join(lines)


class Profiler:
    """py-spy sampling the gateway process (``pid``) from :meth:`start` to the end of the block; no-op without
    ``folder``. The stacks (collapsed format) go to ``folder/<name>.txt``."""

    def __init__(self, pid: int | None, folder: Path | None, name: str):
        self.pid, self.out = pid, (folder / f"{name}.txt" if folder else None)
        self.proc: subprocess.Popen | None = None
        if self.out is not None and pid is None:
            sys.exit("--profile samples a gateway started here: not with --gateway-url")

    def start(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        beside = Path(sys.executable).parent / "py-spy"  # the dev extra installs it beside this Python
        self.proc = subprocess.Popen([str(beside) if beside.is_file() else "py-spy", "record", "--pid", str(self.pid),
                                      "--rate", "1000", "--format", "raw",
                                      "--output", str(self.out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # attached before the first measured request

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            _, err = self.proc.communicate(timeout=60)
            if self.proc.returncode not in (0, -signal.SIGINT) and not self.out.is_file():
                print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)


# What the request path's time is spent on, by the innermost frame of these files/functions on each stack.
PROFILE_PARTS = [
    ("decision tracking (judge, think tags)", ("service/core/decision.py", "service/core/judge.py")),
    ("stream relay and event rewrite (json)", ("service/gateway/proxy.py (_relay)", "proxy.py (feed)",
                                               "proxy.py (final_chunk)")),
    ("request checks and model resolution", ("proxy.py (check_request)", "proxy.py (parse_json_object)",
                                             "upstream.py (resolve)", "schemas.py")),
    ("upstream client (aiohttp; httpx for the model list)", ("aiohttp/", "yarl/", "multidict/", "proxy.py (_open)",
                                                            "proxy.py (_body)", "httpx/", "httpcore/", "h11/")),
    ("HTTP server (uvicorn/starlette)", ("uvicorn/", "starlette/", "fastapi/")),
    ("metrics and access log", ("prometheus_client/", "service/gateway/logs.py (format)", "logging/")),
    ("event loop and sockets (asyncio, uvloop)", ("asyncio/", "uvloop", "selectors.py", "anyio/")),
    # last: the rest of the gateway's own frames (the handler's own lines, body read, routing, middleware); without
    # it such stacks fell through to an outer frame (the request-id middleware counted as "access log")
    ("rest of the gateway (handler, body read, routing)", ("service/gateway/", "service/core/")),
]


def _part(stack: list[str]) -> str:
    for frame in reversed(stack):  # innermost first
        for part, needles in PROFILE_PARTS:
            for needle in needles:
                path, _, func = needle.partition(" (")
                if path in frame and (not func or f"{func.rstrip(')')} (" in frame):
                    return part
    return "other"


def profile_table(path: Path, requests: int, top: int = 12) -> str:
    """Where the gateway's CPU time per request went: py-spy's samples (1 ms each) by part of the request path,
    and the functions that held the CPU (innermost frame)."""
    parts: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames, n = stack_text.split(";"), int(count)
        total += n
        part = _part(frames)
        parts[part] = parts.get(part, 0) + n
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + n
    per = 1000 / max(requests, 1)  # us per request of one 1 ms sample
    lines = [(f"{path.stem}: py-spy, {total} samples of 1 ms over {requests} requests = {total * per:.0f} us of the "
              "gateway's CPU per request"),
             "| part of the request path | us/request | share |", "| --- | --- | --- |"]
    for part, n in sorted(parts.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {part} | {n * per:.0f} | {n / max(total, 1):.0%} |")
    lines += ["", "| busiest functions (innermost frame) | us/request | share |", "| --- | --- | --- |"]
    for leaf, n in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| `{leaf[:110]}` | {n * per:.0f} | {n / max(total, 1):.0%} |")
    return "\n".join(lines)


def profiles_printed(folder: Path | None, results: list[dict]) -> list[str]:
    """One table per profiled mode (streamed, whole), per measured request through the gateway."""
    if folder is None:
        return []
    out = []
    for mode in ("stream", "whole"):
        path = folder / f"{mode}.txt"
        rows = [r for r in results if r["stream"] == (mode == "stream")]
        if path.is_file() and rows:
            out.append(profile_table(path, sum(r["requests_per_round"] * r["rounds"] for r in rows)))
    return out


if __name__ == "__main__":
    main()

