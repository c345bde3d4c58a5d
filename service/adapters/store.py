"""The adapter store: versioned PEFT adapters, the promoted one, rollback, and loading into vLLM.

Layout under ``$PRESAFE_HOME/adapters``::

    registry.json            {"promoted": "presafe-v3", "history": ["presafe-v1", "presafe-v3"], ...}
    presafe-v3/              adapter_config.json, adapter_model.safetensors,
                             presafe-manifest.json (written by the trainer), presafe-store.json (by us)
    .presafe-v4.tmp-XXXX/    a publish in progress (removed by :meth:`AdapterStore.recover`)
    .lock                    flock taken by every writer

Invariants, whatever moment a writer is killed at (``kill -9`` included), once :meth:`recover` ran:
every directory without a leading dot is a complete adapter that passed :func:`check_adapter`
(it only appears by ``rename`` of a checked temporary directory), and ``registry.json`` (only ever
replaced with ``os.replace``) names only such directories. ``promoted`` is the adapter the
``presafe`` alias serves; ``history`` is the stack of promoted adapters that rollback pops.

An adapter's vLLM name is its store name (``presafe-v3``): every version is loaded under its own
name and the gateway maps the alias to the promoted one, so a swap never reloads weights in place
and requests in flight keep the adapter they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from service.core.assets import MANIFEST, verify_manifest
from service.core.formats import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    NAME_RE,
    PREFIX_RE,
    REGISTRY,
    STORE_RECORD,
    VERSIONED_RE,
)
from service.core.gate import GateConfig, GateResult, evaluate_gate, gate_reference
from service.core.settings import get_settings

HISTORY_LIMIT = 100
# dtype name in a safetensors header -> (bytes per element, numpy dtype or None when numpy lacks it)
_ST_DTYPES = {"F64": (8, "<f8"), "F32": (4, "<f4"), "F16": (2, "<f2"), "BF16": (2, None),
              "I64": (8, "<i8"), "I32": (4, "<i4"), "I16": (2, "<i2"), "I8": (1, "i1"), "U8": (1, "u1"),
              "BOOL": (1, "u1")}


class AdapterError(Exception):
    """Base of the adapter store's errors."""


class AdapterNotFound(AdapterError):
    """No adapter of that name in the store."""


class AdapterInvalid(AdapterError):
    """An adapter directory failed the loadability check; ``problems`` says why."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class NothingToRollBack(AdapterError):
    """Rollback asked for with fewer than two promoted adapters in the history."""


class AdapterLoadError(AdapterError):
    """vLLM refused to load (or could not be asked to load) an adapter."""


def _checkpoint(point: str) -> None:
    """No-op marker between the steps of a store write; crash tests replace it to SIGKILL there."""


# --------------------------------------------------------------------------- records


@dataclass
class Registry:
    """Contents of ``registry.json``. ``promoted`` stays a top-level key (the gateway reads it)."""

    promoted: str | None = None
    history: list[str] = field(default_factory=list)
    updated_at: float | None = None
    # every promotion and rollback: {"adapter", "at", "action", "forced", "gate": reasons, ...}
    promotions: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Any) -> Registry:
        if not isinstance(data, dict):
            raise TypeError("registry is not a JSON object")
        promoted = data.get("promoted")
        history = data.get("history") or []
        if promoted is not None and not isinstance(promoted, str):
            raise TypeError("registry 'promoted' is not a string")
        if not isinstance(history, list) or not all(isinstance(h, str) for h in history):
            raise TypeError("registry 'history' is not a list of names")
        promotions = data.get("promotions") or []
        if not isinstance(promotions, list) or not all(isinstance(p, dict) for p in promotions):
            promotions = []
        return cls(promoted=promoted, history=list(history), updated_at=data.get("updated_at"),
                   promotions=list(promotions))


def read_registry_file(path: Path) -> Registry:
    """Parse ``registry.json`` (a missing file is an empty registry; a malformed one raises)."""
    try:
        return Registry.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return Registry()


def adapter_version(name: str) -> str:
    """The version of a store name ``<prefix>-v<N>`` (``"N"``), or ``""`` for another name."""
    match = VERSIONED_RE.match(name)
    return match["version"] if match else ""


class AdapterInfo(BaseModel):
    """One stored adapter, as listed by the admin API."""

    name: str
    version: int
    path: str
    published_at: float
    base_model: str | None
    job_id: str | None
    metrics: dict[str, Any]
    trainer_version: str | None
    size_bytes: int
    promoted: bool = False

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


@dataclass
class RecoveryReport:
    """What :meth:`AdapterStore.recover` cleaned up."""

    removed_temp: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    promoted: str | None = None
    registry_rewritten: bool = False


# --------------------------------------------------------------------------- loadability check


def _read_json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        problems.append(f"{path.name} is missing")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name} does not parse: {exc}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} is not a JSON object")
        return None
    return data


def _check_safetensors(path: Path, problems: list[str]) -> list[str]:
    """Validate header, byte ranges and (float tensors) finiteness; return the tensor names."""
    import numpy as np
    from safetensors import safe_open

    if not path.is_file():
        problems.append(f"{path.name} is missing")
        return []
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > min(size - 8, 100 << 20):
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(fh.read(header_len))
        with safe_open(str(path), framework="numpy") as st:  # the library's own validation
            names = list(st.keys())
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not readable"
        problems.append(f"{path.name} is not readable safetensors: {exc}")
        return []
    if not names:
        problems.append(f"{path.name} holds no tensors")
        return []
    data_start = 8 + header_len
    with open(path, "rb") as fh:
        buf = fh.read()
    for name in names:
        meta = header[name]
        dtype = meta.get("dtype")
        begin, end = meta.get("data_offsets", (0, -1))
        if dtype not in _ST_DTYPES:
            problems.append(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
            continue
        width, np_dtype = _ST_DTYPES[dtype]
        count = math.prod(meta.get("shape", []))
        if end - begin != count * width or data_start + end > size:
            problems.append(f"{path.name}: tensor {name} has an inconsistent byte range")
            continue
        raw = buf[data_start + begin:data_start + end]
        if dtype == "BF16":
            values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in ("F64", "F32", "F16"):
            values = np.frombuffer(raw, dtype=np_dtype)
        else:
            continue
        if not np.isfinite(values).all():
            problems.append(f"{path.name}: tensor {name} has NaN or infinite values")
    if not any("lora_" in n for n in names):
        problems.append(f"{path.name} holds no LoRA tensors (lora_A / lora_B)")
    return names


def _same_model(a: str, b: str) -> bool:
    from service.core.assets import resolve_model

    def norm(x: str) -> str:
        resolved = resolve_model(x)
        path = Path(resolved).expanduser()
        return str(path.resolve()) if path.exists() else resolved.rstrip("/")

    return norm(a) == norm(b)


def adapter_base_model(directory: Path) -> str | None:
    """The base model an adapter names: its manifest's ``base_model``, else its adapter_config's
    ``base_model_name_or_path`` (None when neither names one)."""
    for name, key in ((MANIFEST, "base_model"), (ADAPTER_CONFIG, "base_model_name_or_path")):
        data = _read_json(Path(directory) / name, [])
        value = data.get(key) if data is not None else None
        if isinstance(value, str) and value:
            return value
    return None


def check_adapter(directory: Path, expected_base: str | None = None) -> dict[str, Any]:
    """Check that ``directory`` is a PEFT LoRA adapter vLLM can load; return its manifest.

    adapter_config.json parses and describes a LoRA, the safetensors weights are readable (header,
    byte ranges, finite values), the trainer's manifest parses (and its checksums hold, if it lists
    any), and the base model matches ``expected_base`` when given. Raises :class:`AdapterInvalid`.
    """
    directory = Path(directory)
    problems: list[str] = []
    if not directory.is_dir():
        raise AdapterInvalid([f"{directory} is not a directory"])
    config = _read_json(directory / ADAPTER_CONFIG, problems)
    if config is not None:
        if str(config.get("peft_type", "")).upper() != "LORA":
            problems.append(f"{ADAPTER_CONFIG}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
        rank = config.get("r")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            problems.append(f"{ADAPTER_CONFIG}: r must be a positive integer, got {rank!r}")
        if not config.get("target_modules"):
            problems.append(f"{ADAPTER_CONFIG}: target_modules is empty")
    _check_safetensors(directory / ADAPTER_WEIGHTS, problems)
    manifest = _read_json(directory / MANIFEST, problems)
    if manifest is not None:
        if "files" in manifest:
            problems.extend(f"{MANIFEST}: {p}" for p in verify_manifest(directory))
        metrics = manifest.get("metrics", {})
        if metrics is not None and not isinstance(metrics, dict):
            problems.append(f"{MANIFEST}: metrics is not an object")
    bases = {b for b in ((manifest or {}).get("base_model"), (config or {}).get("base_model_name_or_path"))
             if isinstance(b, str) and b}
    if expected_base is not None:
        if not bases:
            problems.append("the adapter names no base model (manifest base_model / base_model_name_or_path)")
        elif not any(_same_model(b, expected_base) for b in bases):
            problems.append(f"base model {sorted(bases)} does not match the served base model {expected_base!r}")
    if problems:
        raise AdapterInvalid(problems)
    return manifest or {}


# --------------------------------------------------------------------------- the store


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` to a temporary sibling, fsync it, then ``os.replace`` it onto ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        _checkpoint(f"{path.name}:written")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _copy_without_links(source: Path, target: Path, top: bool = False) -> None:
    """Copy the regular files and directories of ``source`` (never following a link); a symbolic link or
    a special file anywhere is :class:`AdapterInvalid`. At the top, dot entries and ``checkpoint-*`` are skipped."""
    with os.scandir(source) as entries:
        for entry in entries:
            if top and (entry.name.startswith(".") or entry.name.startswith("checkpoint-")):
                continue
            if entry.is_symlink():
                raise AdapterInvalid([f"{entry.name} is a symbolic link; the store copies no links"])
            if entry.is_dir(follow_symlinks=False):
                (target / entry.name).mkdir()
                _copy_without_links(Path(entry.path), target / entry.name)
            elif entry.is_file(follow_symlinks=False):
                shutil.copy2(entry.path, target / entry.name, follow_symlinks=False)
            else:
                raise AdapterInvalid([f"{entry.name} is not a regular file; the store copies no special files"])


class AdapterStore:
    """Versioned adapters under one directory; every write holds an exclusive ``flock``."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or get_settings().adapters_dir).expanduser()

    # ------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def path(self, name: str) -> Path:
        if not NAME_RE.match(name):
            raise AdapterNotFound(f"adapter {name!r} not found")
        return self.root / name

    def exists(self, name: str) -> bool:
        return NAME_RE.match(name) is not None and (self.root / name / STORE_RECORD).is_file()

    def read_registry(self) -> Registry:
        """The registry as on disk; a missing file is an empty registry."""
        return read_registry_file(self.root / REGISTRY)

    def _write_registry(self, registry: Registry) -> None:
        registry.history = registry.history[-HISTORY_LIMIT:]
        registry.promotions = registry.promotions[-HISTORY_LIMIT:]
        registry.updated_at = time.time()
        _write_json_atomic(self.root / REGISTRY, asdict(registry))

    def promoted(self) -> str | None:
        """Name of the adapter the alias serves (None: the base model)."""
        try:
            return self.read_registry().promoted
        except (OSError, ValueError, TypeError):
            return None

    # ------------------------------------------------------------ reading
    def get(self, name: str) -> AdapterInfo:
        directory = self.path(name)
        record_path = directory / STORE_RECORD
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise AdapterNotFound(f"adapter {name!r} not found") from None
        try:
            manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
        metrics = manifest.get("metrics") if isinstance(manifest.get("metrics"), dict) else {}
        size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        return AdapterInfo(
            name=name, version=int(record.get("version", 0)), path=str(directory),
            published_at=float(record.get("published_at", 0)), base_model=record.get("base_model"),
            job_id=record.get("job_id"), metrics=metrics, trainer_version=manifest.get("version"),
            size_bytes=size, promoted=(name == self.promoted()),
        )

    def names(self) -> list[str]:
        """Names of the complete adapters (a directory with the store's record), in directory order."""
        if not self.root.is_dir():
            return []
        return [entry.name for entry in self.root.iterdir()
                if not entry.name.startswith(".") and entry.is_dir() and self.exists(entry.name)]

    def list(self) -> list[AdapterInfo]:
        """Every stored adapter, oldest first."""
        infos = []
        for name in self.names():
            with contextlib.suppress(AdapterNotFound):
                infos.append(self.get(name))
        return sorted(infos, key=lambda i: (i.published_at, i.name))

    def find_job(self, job_id: str) -> AdapterInfo | None:
        """The adapter a job already published (its store record names the job), if any."""
        return next((info for info in self.list() if info.job_id == job_id), None)

    def _next_version(self, prefix: str) -> int:
        versions = [0]
        if self.root.is_dir():
            for entry in self.root.iterdir():
                match = VERSIONED_RE.match(entry.name)
                if match and match["prefix"] == prefix:
                    versions.append(int(match["version"]))
        return max(versions) + 1

    # ------------------------------------------------------------ writing
    def publish(self, source: Path, *, prefix: str = "presafe", expected_base: str | None = None,
                job_id: str | None = None) -> AdapterInfo:
        """Copy ``source`` into the store as ``<prefix>-v<N>``: temp dir, check, then rename.

        Raises :class:`AdapterInvalid` (nothing is stored) when the check fails. Does not promote.
        """
        if not PREFIX_RE.match(prefix) or VERSIONED_RE.match(prefix):
            raise AdapterError(f"invalid adapter name prefix {prefix!r}")
        source = Path(source)
        if source.is_symlink():
            raise AdapterInvalid([f"{source.name} is a symbolic link (the trainer's output must be a directory)"])
        with self._locked():
            version = self._next_version(prefix)
            name = f"{prefix}-v{version}"
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=self.root))
            try:
                _copy_without_links(source, tmp, top=True)
                _checkpoint("publish:copied")
                check_adapter(tmp, expected_base)
                _checkpoint("publish:checked")
                base = adapter_base_model(tmp)
                record = {"name": name, "version": version, "published_at": time.time(),
                          "job_id": job_id, "source": str(source), "base_model": base}
                with open(tmp / STORE_RECORD, "w", encoding="utf-8") as fh:
                    json.dump(record, fh, indent=2, sort_keys=True)
                    fh.flush()
                    os.fsync(fh.fileno())
                for item in tmp.rglob("*"):
                    if item.is_file():
                        with open(item, "rb") as fh:
                            os.fsync(fh.fileno())
                _fsync_dir(tmp)
                _checkpoint("publish:recorded")
                os.rename(tmp, self.root / name)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _checkpoint("publish:renamed")
            _fsync_dir(self.root)
        return self.get(name)

    def gate(self, name: str, gate: GateConfig) -> GateResult:
        """``gate`` for adapter ``name`` against the promoted adapter (else the base figures)."""
        metrics = self.get(name).metrics
        promoted = self.promoted()
        reference = None
        if promoted and self.exists(promoted):
            with contextlib.suppress(AdapterNotFound):
                reference = self.get(promoted).metrics
        ref, source = gate_reference(metrics, reference, promoted if reference is not None else None)
        return evaluate_gate(gate, metrics, ref, source)

    def promote(self, name: str, *, expected_base: str | None = None,
                record: dict[str, Any] | None = None) -> Registry:
        """Make ``name`` the served adapter (after re-checking it); push it on the history and log
        the promotion (``record``: e.g. forced, gate reasons, job) in ``promotions``."""
        with self._locked():
            if not self.exists(name):
                raise AdapterNotFound(f"adapter {name!r} not found")
            check_adapter(self.root / name, expected_base)
            registry = self.read_registry()
            registry.history = [h for h in registry.history if h != name] + [name]
            registry.promoted = name
            registry.promotions.append({"forced": False, **(record or {}), "adapter": name, "action": "promote",
                                        "at": time.time()})
            _checkpoint("promote:before-registry")
            self._write_registry(registry)
            return registry

    def rollback_target(self) -> tuple[str, str]:
        """(current, previous) for a rollback, without changing anything."""
        registry = self.read_registry()
        alive = [h for h in registry.history if self.exists(h)]
        if registry.promoted is None or len(alive) < 2 or alive[-1] != registry.promoted:
            raise NothingToRollBack("no earlier promoted adapter to roll back to")
        return alive[-1], alive[-2]

    def rollback(self, expected_current: str | None = None) -> tuple[str, str]:
        """Pop the promoted adapter from the history; the one before it is served again."""
        with self._locked():
            current, previous = self.rollback_target()
            if expected_current is not None and current != expected_current:
                raise NothingToRollBack(f"the promoted adapter changed to {current!r} meanwhile")
            registry = self.read_registry()
            registry.history = [h for h in registry.history if self.exists(h)][:-1]
            registry.promoted = previous
            registry.promotions.append({"adapter": previous, "action": "rollback", "from": current,
                                        "at": time.time()})
            self._write_registry(registry)
            return current, previous

    def recover(self, expected_base: str | None = None) -> RecoveryReport:
        """Make the store consistent after a crash: drop temp dirs, point the registry at good adapters."""
        report = RecoveryReport()
        if not self.root.is_dir():
            return report
        with self._locked():
            for entry in self.root.iterdir():
                if entry.name.startswith(".") and ".tmp-" in entry.name:
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            entry.unlink()
                    report.removed_temp.append(entry.name)
            try:
                registry = self.read_registry()
            except (OSError, ValueError, TypeError):
                registry = Registry()
                report.registry_rewritten = True
            good: dict[str, bool] = {}

            def ok(name: str) -> bool:
                if name not in good:
                    try:
                        good[name] = self.exists(name)
                        if good[name]:
                            check_adapter(self.root / name, expected_base)
                    except AdapterInvalid:
                        good[name] = False
                return good[name]

            history = [h for h in registry.history if ok(h)]
            promoted = registry.promoted if registry.promoted and ok(registry.promoted) else None
            if promoted is None and registry.promoted is not None:
                promoted = history[-1] if history else None
            if promoted is not None and (not history or history[-1] != promoted):
                history = [h for h in history if h != promoted] + [promoted]
            report.dropped = sorted({h for h in [*registry.history, registry.promoted] if h} - set(history))
            report.promoted = promoted
            if promoted != registry.promoted or history != registry.history or report.registry_rewritten:
                self._write_registry(Registry(promoted=promoted, history=history, promotions=registry.promotions))
                report.registry_rewritten = True
        return report


# --------------------------------------------------------------------------- vLLM runtime LoRA


class VLLMAdapters:
    """vLLM's runtime LoRA endpoints (server started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client_args = {"base_url": self.base_url, "headers": headers, "timeout": timeout,
                             "transport": transport}

    async def _post(self, path: str, body: dict) -> httpx.Response:
        try:
            async with httpx.AsyncClient(**self._client_args) as client:
                return await client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise AdapterLoadError(f"vLLM at {self.base_url} is unreachable: {exc}") from exc

    async def _adapters(self) -> dict[str, str]:
        """Loaded LoRA adapters (model cards with a parent): name -> path."""
        try:
            async with httpx.AsyncClient(**self._client_args) as client:
                response = await client.get("/v1/models")
            response.raise_for_status()
            cards = response.json().get("data", [])
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise AdapterLoadError(f"vLLM at {self.base_url}: cannot list models: {exc}") from exc
        return {card["id"]: card.get("root") or "" for card in cards if card.get("parent")}

    async def loaded(self) -> set[str]:
        """Names of the LoRA adapters vLLM serves now."""
        return set(await self._adapters())

    async def load(self, name: str, path: Path | str) -> None:
        """Load ``path`` as ``name``. Already loaded from that path: nothing to do; from another path
        (e.g. a store rebuilt while vLLM kept running): reloaded in place from the new path."""
        body = {"lora_name": name, "lora_path": str(path)}
        response = await self._post("/v1/load_lora_adapter", body)
        if response.status_code == 400 and "already been loaded" in response.text:
            if (await self._adapters()).get(name) == str(path):
                return
            response = await self._post("/v1/load_lora_adapter", {**body, "load_inplace": True})
        if response.status_code != 200:
            raise AdapterLoadError(f"vLLM refused adapter {name!r} ({response.status_code}): "
                                   f"{response.text[:500]}")

    async def unload(self, name: str) -> None:
        """Unload ``name`` (already absent is fine). vLLM finishes requests that already use it."""
        response = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if response.status_code not in (200, 404):
            raise AdapterLoadError(f"vLLM refused to unload {name!r} ({response.status_code}): "
                                   f"{response.text[:500]}")


class ReplicaAdapters:
    """:class:`VLLMAdapters` over every vLLM replica (``urls()``: the admitted ones, read at each call): an
    adapter counts as loaded when every replica has it; load and unload go to all of them."""

    def __init__(self, urls: Callable[[], list[str]], api_key: str | None = None, timeout: float = 120.0):
        self.urls, self.api_key, self.timeout = urls, api_key, timeout

    def _each(self) -> list[VLLMAdapters]:
        return [VLLMAdapters(url, api_key=self.api_key, timeout=self.timeout) for url in self.urls()]

    async def loaded(self) -> set[str]:
        """Adapters every replica serves now (AdapterLoadError when one cannot say)."""
        sets = await asyncio.gather(*(replica.loaded() for replica in self._each()))
        return set.intersection(*sets) if sets else set()

    async def load(self, name: str, path: Path | str) -> None:
        """Load ``name`` into every replica (all are tried; AdapterLoadError names those that refused)."""
        await self._all("load", name, path)

    async def unload(self, name: str) -> None:
        await self._all("unload", name)

    async def _all(self, method: str, *args) -> None:
        replicas = self._each()
        results = await asyncio.gather(*(getattr(r, method)(*args) for r in replicas), return_exceptions=True)
        failed = [(r.base_url, e) for r, e in zip(replicas, results, strict=True) if isinstance(e, BaseException)]
        for _, exc in failed:
            if not isinstance(exc, AdapterLoadError):
                raise exc
        if failed:
            raise AdapterLoadError("; ".join(str(exc) for _, exc in failed)
                                   + f" ({len(replicas) - len(failed)} of {len(replicas)} replicas did it)")
