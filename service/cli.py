"""``presafe serve``: the gateway, with an embedded vLLM server (default) or in front of ``PRESAFE_VLLM_URL``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from typing import Annotated

import typer

from service.core.settings import Settings, get_settings

log = logging.getLogger("presafe.serve")

TRAIN_HINT = "presafe train run --config configs/cpu-smollm2.yaml"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: PRESAFE_HOST or 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: PRESAFE_PORT or 8080).")] = None,
    vllm_url: Annotated[str | None, typer.Option(
        help="Front this vLLM server instead of starting one (default: PRESAFE_VLLM_URL).")] = None,
    base_model: Annotated[str | None, typer.Option(
        help="Embedded mode: model to serve (known name, path or HF id) (default: PRESAFE_BASE_MODEL).")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    train_if_missing: Annotated[str | None, typer.Option(
        help="Embedded mode: when the adapter store has no promoted adapter, first run the training pipeline "
             "with this config (e.g. configs/cpu-smollm2.yaml), with progress shown.")] = None,
) -> None:
    """Serve the OpenAI-compatible PreSafe gateway (decision analysis, /metrics) in front of vLLM."""
    from service.gateway.logs import setup_logging

    updates = {k: v for k, v in {"host": host, "port": port, "vllm_url": vllm_url, "base_model": base_model,
                                 "log_level": log_level}.items() if v is not None}
    settings = get_settings().model_copy(update=updates)
    if train_if_missing and not settings.vllm_url:
        _train_default_adapter(settings, train_if_missing)
    setup_logging(settings.log_level)
    if settings.vllm_url:
        _run_external(settings)
    else:
        try:
            asyncio.run(_run_embedded(settings))
        except KeyboardInterrupt:
            pass
        except RuntimeError as exc:
            _say(f"error: {exc}")
            raise typer.Exit(code=1) from None


def _train_default_adapter(settings: Settings, config: str) -> None:
    """Run the pipeline once (it publishes and promotes into the store) unless an adapter is promoted: the
    job runner's trainer command (``presafe train run``) as a child process, its console output shown as is."""
    import subprocess

    from service.adapters.store import AdapterStore
    from service.jobs.runners import default_train_command

    if AdapterStore(settings.adapters_dir).promoted():
        return
    _say(f"no promoted adapter in {settings.adapters_dir}: training one with {config} first "
         f"(the CPU default takes about 1 h on 2 cores; a rerun resumes finished stages)")
    try:
        code = subprocess.run([*default_train_command(), "--config", config], check=False).returncode
    except OSError as exc:  # e.g. PRESAFE_TRAIN_COMMAND names no program
        code, detail = None, str(exc)
    else:
        detail = f"the trainer exited with code {code}"
    if code != 0:
        _say(f"error: training the default adapter failed: {detail}")
        raise typer.Exit(code=1)
    store = AdapterStore(settings.adapters_dir)
    if not store.promoted():  # trained and published, but the promotion gate said no (fails closed)
        _say(f"warning: the trained adapter did not pass the promotion gate (the "
             f"reasons are above; the figures in the run's eval/eval.md): model {settings.model_alias!r} answers 503 "
             f"until an adapter is promoted (admin: POST /admin/adapters/NAME/promote, force to override the gate)")


def _uvicorn_server(app, settings: Settings):
    import uvicorn

    class Server(uvicorn.Server):
        """Exits normally after a graceful shutdown on SIGINT/SIGTERM (uvicorn would re-raise the signal,
        killing the process before the embedded vLLM is stopped)."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=10, limit_concurrency=settings.limit_concurrency)
    return Server(config)


def claim_port(settings: Settings) -> socket.socket:
    """The gateway's socket, bound before the embedded vLLM starts: vLLM takes free ports for its own
    processes while it starts, and one of them could otherwise be the gateway's (a port in use fails here,
    at once, not after vLLM's start-up)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    return sock


def _run_external(settings: Settings) -> None:
    from service.app import create_app

    _say(f"PreSafe gateway on http://{settings.host}:{settings.port} → vLLM at {settings.vllm_url}")
    _uvicorn_server(create_app(settings), settings).run()


def _check_base_model(settings: Settings) -> None:
    from service.core.assets import KNOWN_MODELS, model_dir

    name = settings.base_model
    if name in KNOWN_MODELS and not (model_dir(name) / "config.json").is_file():
        raise RuntimeError(f"the base model {name!r} is not fetched yet: run `presafe models pull {name}`")


def adapters_message(plan, settings: Settings) -> str:
    """What the embedded server will serve (and how to make an adapter when there is none)."""
    if plan.adapters:
        merged = "" if settings.serve_merged is False else (
            "; the promoted one moves to its merged weights on a vLLM of its own once that is ready (log: "
            f"{settings.root / 'merged' / '.serve'})")
        return f"adapters: {', '.join(plan.adapters)} (from {settings.adapters_dir}){merged}"
    return (f"no adapter in {settings.adapters_dir} yet: model {settings.model_alias!r} answers 503 until one is "
            f"promoted (it never serves the unaligned base {plan.served_name}). Make one with: {TRAIN_HINT}")


def with_vllm_key(settings: Settings) -> Settings:
    """The settings with an API key for the embedded vLLM (a fresh random one unless the operator set one):
    its runtime LoRA routes answer only the gateway and the admin, not any local process."""
    if settings.vllm_api_key is not None:
        return settings
    import secrets

    from pydantic import SecretStr

    return settings.model_copy(update={"vllm_api_key": SecretStr(secrets.token_urlsafe(32))})


async def _run_embedded(settings: Settings) -> None:
    from service.app import create_app
    from service.vllm_server import VLLMSupervisor, plan_embedded

    _check_base_model(settings)
    listener = claim_port(settings)
    settings = with_vllm_key(settings)
    plan = await asyncio.to_thread(plan_embedded, settings)
    _say(adapters_message(plan, settings))
    supervisor = VLLMSupervisor(plan, settings, settings.root / "serve" / "vllm.log")
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    watch: asyncio.Task | None = None
    supervisor.start()
    try:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
        _say(f"starting vLLM ({plan.served_name}) on {plan.url}; log: {supervisor.log_path}")
        await supervisor.wait_ready(settings.vllm_startup_timeout_s)
        loop.remove_signal_handler(signal.SIGTERM)
        app = create_app(settings, upstream_url=plan.url, think_open=plan.think_open, supervisor=supervisor)
        watch = asyncio.create_task(supervisor.watch())
        _say(f"PreSafe gateway on http://{settings.host}:{settings.port} (OpenAI API at /v1, metrics at /metrics)")
        await _uvicorn_server(app, settings).serve(sockets=[listener])
    except asyncio.CancelledError:
        pass
    finally:
        listener.close()
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGTERM)
        if watch is not None:
            watch.cancel()
        await asyncio.to_thread(supervisor.stop)



def main() -> None:
    """``python -m service.cli [OPTIONS]``: what ``presafe serve`` runs (the ``presafe`` command lives on the
    training side, which may not be imported here; it hands ``serve`` over to this process)."""
    app = typer.Typer(add_completion=False)
    app.command()(serve)
    app(prog_name="presafe serve")


if __name__ == "__main__":
    main()
