"""A read-only, cheap view of the adapter registry for per-request readers (the gateway's alias lookup).

It parses ``registry.json`` with the store's own parser (:func:`service.adapters.store.read_registry_file`)
and re-reads it only when its modification time or size changes: one ``stat`` per call.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.adapters.store import Registry, adapter_version, read_registry_file
from service.core.formats import REGISTRY

log = logging.getLogger("presafe.gateway")


class RegistryView:
    """``$PRESAFE_HOME/adapters/registry.json`` as last written by the store, cached by modification time."""

    def __init__(self, adapters_dir: Path):
        self.path = Path(adapters_dir) / REGISTRY
        self._stamp: tuple[int, int] | None = None
        self._registry = Registry()

    def registry(self) -> Registry:
        """The registry (empty while the file is missing or unreadable)."""
        try:
            st = self.path.stat()
        except OSError:
            self._stamp, self._registry = None, Registry()
            return self._registry
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._registry = read_registry_file(self.path)
            except (OSError, ValueError, TypeError):
                log.warning("unreadable adapter registry", extra={"path": str(self.path)})
                self._registry = Registry()
            self._stamp = stamp
        return self._registry

    def promoted(self) -> str | None:
        """The adapter the alias serves (None: none is promoted)."""
        return self.registry().promoted or None

    @staticmethod
    def version(adapter: str) -> str:
        """The adapter's version (the ``-v<N>`` of its store name)."""
        return adapter_version(adapter)
