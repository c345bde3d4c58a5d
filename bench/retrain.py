"""Retrain to serving: time from ``POST /admin/retrain`` to the new adapter answering through the alias,
with ``bench/load.py``'s traffic running against the alias across the hot swap.

Needs a running gateway with ``/admin`` on (``PRESAFE_ADMIN_TOKEN``) and the vLLM it fronts:

    PRESAFE_ADMIN_TOKEN=t presafe serve &                      # embedded default
    python bench/retrain.py --gateway-url http://127.0.0.1:8080 --vllm-url http://127.0.0.1:PORT --token t

The load starts when the job reaches ``--load-from-stage`` (default ``publish``, the trainer writing its
adapter, a few seconds before the gateway loads and promotes it, so training and its eval run on quiet
cores) and stops ``--tail-s`` seconds after the new adapter first answered; the output counts the load's
requests finished before and after the swap. Where the gateway serves the alias merged (``make serve``'s
default), the promote is a blue/green swap of engines: the output adds ``serving`` (its ``last_swap``: peak
resident memory of the engines, the requests drained, the old engine stopped). Pass criteria: the job succeeded, the alias serves the new adapter, and no request of the
load failed (no 4xx/5xx, no error event, no transport error) and vLLM's running gauge is back to 0.
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
from load import finish, one, wait_zero
from tqdm import tqdm

FINAL = {"succeeded", "failed", "cancelled", "interrupted"}


async def serve_load(url: str, model: str, concurrency: int, max_tokens: int, stop: asyncio.Event,
                     tally: collections.Counter, finished_at: list[float]) -> None:
    """``bench/load.py``'s request mix (streaming and not, 10% early disconnects) until ``stop``."""
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(wid: int) -> None:
            rng = random.Random(wid)
            while not stop.is_set():
                await one(client, url, model, rng, rng.random() < 0.5, rng.random() < 0.1, max_tokens, tally)
                finished_at.append(time.perf_counter())
        await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def answering_model(client: httpx.AsyncClient, url: str, alias: str) -> str | None:
    """Which adapter answers a request to ``alias`` now (vLLM reports it as the response's model)."""
    resp = await client.post(f"{url}/v1/chat/completions", json={
        "model": alias, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1})
    return resp.json().get("model") if resp.status_code == 200 else None


async def run(args: argparse.Namespace) -> dict:
    admin = {"authorization": f"Bearer {args.token}"}
    tally: collections.Counter = collections.Counter()
    stop = asyncio.Event()
    load: asyncio.Task | None = None
    stages: dict[str, float] = {}
    finished_at: list[float] = []
    load_started = None
    async with httpx.AsyncClient(base_url=args.gateway_url, timeout=60) as client:
        before = await answering_model(client, args.gateway_url, args.alias)
        body = {"overrides": json.loads(args.overrides)} if args.overrides else {}
        resp = await client.post("/admin/retrain", json=body, headers=admin)
        if resp.status_code != 202:
            sys.exit(f"POST /admin/retrain: {resp.status_code} {resp.text}")
        t0 = time.perf_counter()
        job = resp.json()
        bar = tqdm(total=100, unit="%", desc="retrain", file=sys.stderr)
        while job["state"] not in FINAL:
            await asyncio.sleep(args.poll_s)
            job = (await client.get(f"/admin/jobs/{job['id']}", headers=admin)).json()
            stage = job.get("stage") or job["state"]
            stages.setdefault(stage, round(time.perf_counter() - t0, 1))
            bar.set_postfix_str(stage)
            bar.update(round(100 * job["progress"]) - bar.n)
            if load is None and stage in (args.load_from_stage, "publish"):
                load_started = time.perf_counter()
                load = asyncio.create_task(serve_load(args.gateway_url, args.alias, args.concurrency,
                                                      args.max_tokens, stop, tally, finished_at))
        bar.close()
        trained = time.perf_counter() - t0
        answered, now = None, None
        if job["state"] == "succeeded" and job.get("promoted"):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                now = await answering_model(client, args.gateway_url, args.alias)
                if now == job["adapter"]:
                    answered = time.perf_counter() - t0
                    break
                await asyncio.sleep(0.1)
        if load is not None:
            await asyncio.sleep(args.tail_s)
            stop.set()
            await load
        serving = await merged_swap(client, admin, job.get("adapter"))
    running = wait_zero(args.vllm_url, "vllm:num_requests_running")
    failed = sum(v for k, v in tally.items()
                 if not (k == "disconnected" or k.endswith((" 200", "finished before the disconnect"))))
    swap = t0 + answered if answered else None
    return {"job": job["id"], "state": job["state"], "adapter": job.get("adapter"), "promoted": job.get("promoted"),
            "gate": job.get("gate"), "metrics": job.get("metrics"), "served_before": before, "served_after": now,
            "job_done_s": round(trained, 1), "retrain_to_answer_s": round(answered, 1) if answered else None,
            "stage_started_at_s": stages, "load_started_s": round(load_started - t0, 1) if load_started else None,
            "load_requests": sum(tally.values()),
            "load_finished_before_swap": sum(1 for t in finished_at if swap and t < swap),
            "load_finished_after_swap": sum(1 for t in finished_at if swap and t >= swap), "load_outcomes": dict(sorted(
                tally.items())), "load_failed_requests": failed, "vllm_num_requests_running_after": running,
            "serving": serving}


async def merged_swap(client: httpx.AsyncClient, admin: dict, adapter: str | None, timeout: float = 120) -> dict:
    """How the alias is served after the job (``/admin/adapters`` ``serving``): where it is served merged, wait
    until the blue/green swap has stopped the old engine (its ``last_swap``: peak memory, requests drained)."""
    deadline = time.monotonic() + timeout
    while True:
        serving = (await client.get("/admin/adapters", headers=admin)).json().get("serving") or {}
        swap = serving.get("last_swap") or {}
        settled = serving.get("mode") != "merged" or not swap.get("from") or "stopped" in swap
        if settled or time.monotonic() > deadline:
            return {k: serving.get(k) for k in ("mode", "adapter", "reason", "last_swap")}
        await asyncio.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway-url", required=True)
    parser.add_argument("--vllm-url", required=True, help="the vLLM the gateway fronts (running gauge)")
    parser.add_argument("--token", required=True, help="PRESAFE_ADMIN_TOKEN")
    parser.add_argument("--overrides", help='config overrides as JSON, e.g. \'{"eval.ablation": false}\'')
    parser.add_argument("--alias", default="presafe")
    parser.add_argument("--load-from-stage", default="publish", help="e.g. eval: load for longer")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--poll-s", type=float, default=0.25, help="job polling interval")
    parser.add_argument("--tail-s", type=float, default=20.0, help="load kept up after the swap")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    swap = result["serving"].get("last_swap") or {}
    ok = (result["retrain_to_answer_s"] is not None and result["load_failed_requests"] == 0
          and result["vllm_num_requests_running_after"] == 0
          and (result["serving"].get("mode") != "merged" or not swap.get("from") or swap.get("stopped") is True))
    finish(result, ok, "new adapter answering; zero failed requests across the swap; vLLM idle after; (merged) "
           "the old engine stopped", args.json)


if __name__ == "__main__":
    main()
