"""The retrain request's paths and URLs, checked in one place (``POST /admin/retrain``).

Every path or URL key of the pipeline config (:data:`PATH_KEYS`, :data:`URL_KEYS`) that a request
sets, whichever way it arrives (``overrides`` as dotted keys or nested sections, ``data.pool``),
is checked before a job exists: a path must resolve, symlinks followed, inside the key's roots
under ``$PRESAFE_HOME`` or an operator-allowed root (``PRESAFE_ADMIN_ALLOWED_ROOTS``); a URL
must start with an operator-allowed prefix (``PRESAFE_ADMIN_ALLOWED_URLS``; none by default);
a model is a known name, a directory inside the roots or an allowed id
(``PRESAFE_ADMIN_ALLOWED_MODELS``). Anything else is :class:`SandboxError` (400 naming the key).
Values the operator's base config already holds are trusted; checked paths are written back
resolved (absolute, no symlinks), so the trainer reads exactly what was checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from service.core.gate import dotted_lookup
from service.core.settings import Settings

Kind = Literal["path", "model", "template"]

# key -> (kind, roots under $PRESAFE_HOME the value may point into; the first resolves relative paths)
PATH_KEYS: dict[str, tuple[Kind, tuple[str, ...]]] = {
    "data.pool": ("path", ("data",)),
    "run_dir": ("path", ("runs",)),
    "publish.adapters_dir": ("path", ("adapters",)),
    "models.base": ("model", ("models",)),
    "models.classifier_backbone": ("model", ("models",)),
    "models.chat_template": ("template", ("data", "models", "configs")),
}
URL_KEYS: tuple[str, ...] = ("teacher.endpoint_url", "teacher.base_url")
_UNSET = object()


class SandboxError(ValueError):
    """A path or URL outside what the operator allows; ``key`` names the config key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class Sandbox:
    """Where a retrain request may point: ``home`` subdirectories, extra roots, URL prefixes, model ids."""

    home: Path
    extra_roots: Sequence[Path] = ()
    url_prefixes: Sequence[str] = ()
    model_ids: Sequence[str] = ()

    @classmethod
    def from_settings(cls, settings: Settings, extra_roots: Iterable[Path] = (), url_prefixes: Iterable[str] = (),
                      model_ids: Iterable[str] = ()) -> Sandbox:
        return cls(settings.root, tuple(extra_roots), tuple(url_prefixes), tuple(model_ids))

    def roots(self, names: Sequence[str]) -> list[Path]:
        return [(self.home / n).resolve() for n in names] + [Path(r).expanduser().resolve() for r in self.extra_roots]

    def path(self, key: str, value: Any, names: Sequence[str]) -> str:
        """``value`` resolved (symlinks too) inside the roots of ``names``; else :class:`SandboxError`."""
        if not isinstance(value, (str, Path)) or not str(value) or "\0" in str(value):
            raise SandboxError(key, "must be a path")
        roots = self.roots(names)
        path = Path(value).expanduser()
        resolved = (path if path.is_absolute() else roots[0] / path).resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            raise SandboxError(key, f"path {str(value)[:200]!r} is outside the allowed directories "
                               f"({', '.join(str(r) for r in roots)})")
        return str(resolved)

    def model(self, key: str, value: Any, names: Sequence[str]) -> str:
        from service.core.assets import KNOWN_MODELS

        if isinstance(value, str) and (value in KNOWN_MODELS or value in self.model_ids):
            return value
        try:
            resolved = self.path(key, value, names)
            if not Path(resolved).is_dir():
                raise SandboxError(key, "no such directory")
            return resolved
        except SandboxError:
            raise SandboxError(key, f"{str(value)[:200]!r} is neither a known model, an allowed model id "
                               "(PRESAFE_ADMIN_ALLOWED_MODELS) nor a directory inside "
                               f"{', '.join(str(r) for r in self.roots(names))}") from None

    def template(self, key: str, value: Any, names: Sequence[str]) -> str:
        if isinstance(value, str) and ("{{" in value or "{%" in value or "\n" in value):
            return value  # the template text itself, not a path
        return self.path(key, value, names)

    def url(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not any(_url_within(value, p) for p in self.url_prefixes):
            allowed = ", ".join(self.url_prefixes) or "none configured"
            raise SandboxError(key, f"URL {str(value)[:200]!r} is not allowed (PRESAFE_ADMIN_ALLOWED_URLS: {allowed})")
        return value

    def check(self, config: dict[str, Any], trusted: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check every path/URL key of ``config`` not equal to ``trusted``'s; return it with paths resolved."""
        trusted = trusted or {}
        out = config
        for key, (kind, names) in PATH_KEYS.items():
            value = dotted_lookup(config, key, _UNSET)
            if value is _UNSET or value is None or value == dotted_lookup(trusted, key, _UNSET):
                continue
            checked = getattr(self, kind)(key, value, names)
            out = _set(out, key, checked)
        for key in URL_KEYS:
            value = dotted_lookup(config, key, _UNSET)
            if value is _UNSET or value is None or value == dotted_lookup(trusted, key, _UNSET):
                continue
            self.url(key, value)
        return out


def _url_within(url: str, prefix: str) -> bool:
    try:
        u, p = urlsplit(url), urlsplit(prefix)
        same = (u.scheme.lower(), u.hostname, u.port) == (p.scheme.lower(), p.hostname, p.port)
    except ValueError:
        return False
    if not same or u.username or u.password or not u.scheme or not u.hostname:
        return False
    base = p.path.rstrip("/")
    return u.path == base or u.path.startswith(base + "/") or not base


def _set(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    out = dict(data)
    out[head] = _set(out.get(head) or {}, rest, value) if rest else value
    return out
