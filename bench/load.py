"""Load test of the gateway: many requests, streaming and not, with clients that disconnect early.

Pass criteria: no 5xx (and no error event inside a 200 stream), and afterwards vLLM's
``vllm:num_requests_running`` and the gateway's ``presafe_active_requests`` are back to 0 (so every
abandoned request was aborted upstream, not leaked).

    python bench/load.py                                   # starts vLLM (embedded default) + gateway
    python bench/load.py --requests 5000 --concurrency 64 --vllm-url URL --gateway-url URL
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
from pathlib import Path

import httpx
from gateway_overhead import add_server_args, stack_from_args
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "How do I bake bread?",
           "Explain photosynthesis briefly.", "List three prime numbers.", "How can I pick a lock?"]


def gauge(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def one(client: httpx.AsyncClient, url: str, model: str, rng: random.Random, stream: bool, disconnect: bool,
              max_tokens: int, tally: collections.Counter) -> None:
    chat = rng.random() < 0.7
    body: dict = {"model": model, "max_tokens": max_tokens, "stream": stream, "temperature": 0.7}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        path, body["prompt"] = "/v1/completions", rng.choice(PROMPTS)
    kind = f"{'stream' if stream else 'whole'}"
    try:
        if stream:
            async with client.stream("POST", url + path, json=body) as resp:
                if disconnect:
                    keep = rng.randint(1, 4)
                    async for _ in resp.aiter_lines():
                        keep -= 1
                        if keep <= 0:
                            break
                    tally["disconnected"] += 1
                    return  # leaving the block closes the connection mid-stream
                errors = 0
                async for line in resp.aiter_lines():
                    if line.startswith('data: {"error"'):
                        errors += 1
                tally[f"{kind} {resp.status_code}{' +error event' if errors else ''}"] += 1
        elif disconnect:
            try:
                await asyncio.wait_for(client.post(url + path, json=body), timeout=rng.uniform(0.005, 0.2))
                tally[f"{kind} finished before the disconnect"] += 1
            except TimeoutError:
                tally["disconnected"] += 1
        else:
            resp = await client.post(url + path, json=body)
            tally[f"{kind} {resp.status_code}"] += 1
    except httpx.HTTPError as exc:
        tally[f"{kind} transport error {type(exc).__name__}"] += 1


async def run(url: str, model: str, n: int, concurrency: int, stream_fraction: float, disconnect_fraction: float,
              max_tokens: int, seed: int) -> tuple[collections.Counter, float]:
    rng = random.Random(seed)
    plan = [(rng.random() < stream_fraction, rng.random() < disconnect_fraction) for _ in range(n)]
    tally: collections.Counter = collections.Counter()
    limits = httpx.Limits(max_connections=concurrency + 16, max_keepalive_connections=concurrency + 16)
    done = 0
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        it = iter(plan)

        async def worker(wid: int) -> None:
            nonlocal done
            wrng = random.Random(seed * 1000 + wid)
            for stream, disconnect in it:
                await one(client, url, model, wrng, stream, disconnect, max_tokens, tally)
                done += 1
                if done % 500 == 0:
                    print(f"  {done}/{n} requests", file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return tally, time.perf_counter() - t0


def wait_zero(url: str, name: str, timeout: float = 120) -> float | None:
    """The gauge once it is 0 (or at the timeout); None if the server no longer answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = gauge(url, name)
        except httpx.HTTPError as exc:
            print(f"cannot read {name} from {url}: {exc!r}", file=sys.stderr)
            return None
        if value == 0 or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def finish(result: dict, ok: bool, criteria: str, json_path: Path | None) -> None:
    """Print the result and PASS/FAIL, write it to ``json_path`` too, exit 0 on a pass."""
    print(json.dumps(result, indent=2))
    print("PASS" if ok else "FAIL", f"({criteria})")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    sys.exit(0 if ok else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(parser)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--stream-fraction", type=float, default=0.5)
    parser.add_argument("--disconnect-fraction", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with stack_from_args(args) as stack:
        tally, wall = asyncio.run(run(stack.gateway_url, stack.model_name, args.requests, args.concurrency,
                                      args.stream_fraction, args.disconnect_fraction, args.max_tokens, args.seed))
        running = wait_zero(stack.vllm_url, "vllm:num_requests_running")
        active = wait_zero(stack.gateway_url, "presafe_active_requests")
        gateway_statuses: collections.Counter = collections.Counter()
        text = httpx.get(f"{stack.gateway_url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "presafe_requests_total":
                    gateway_statuses[s.labels["status"]] += int(s.value)
    server_errors = sum(v for k, v in tally.items() if " 5" in k or "error" in k)
    result = {"requests": args.requests, "concurrency": args.concurrency, "wall_s": round(wall, 1),
              "requests_per_s": round(args.requests / wall, 1), "client_outcomes": dict(sorted(tally.items())),
              "gateway_statuses": dict(sorted(gateway_statuses.items())), "server_errors": server_errors,
              "vllm_num_requests_running_after": running, "presafe_active_requests_after": active}
    finish(result, server_errors == 0 and running == 0 and active == 0,
           "zero 5xx; vLLM running and gateway active gauges back to 0", args.json)


if __name__ == "__main__":
    main()
