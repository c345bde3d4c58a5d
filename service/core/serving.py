"""What the admin's job lifecycle needs of the serving gateway, as a protocol (the admin never imports it).

The gateway (:class:`service.gateway.app.Gateway`) implements it; :mod:`service.app` hands it to the admin.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from service.core.settings import Settings


class MergedServing(Protocol):
    """The promoted adapter served from merged weights (:class:`service.engines.MergedEngines`)."""

    def serving(self, adapter: str) -> AbstractAsyncContextManager[bool]:
        """Start ``adapter``'s merged engine and route its name there (blue/green); the caller moves the alias
        inside the block. Yields False when it stays on LoRA (``status`` says why)."""
        ...

    def status(self, promoted: str | None) -> dict[str, Any]:
        """How the alias is served: mode merged/lora/none, why, the engines, the last swap."""
        ...


class ServingGateway(Protocol):
    """The running gateway, seen from the admin: its settings, its vLLM, its model list and its metrics."""

    settings: Settings
    upstream_url: str  # the (first) vLLM server
    engines: MergedServing | None  # the promoted adapter's merged engine (None: runtime LoRA only)

    def merged_replica_view(self) -> list[dict]:
        """The replicas serving merged weights (``PRESAFE_MERGED_URL``): ``url``, ``admitted``, ``models``."""
        ...

    def replica_urls(self) -> list[str]:
        """The vLLM replicas requests go to (runtime LoRA loading goes to each)."""
        ...

    async def replica_status(self) -> list[dict]:
        """Each vLLM replica, health-checked now: ``url``, ``admitted``, ``models`` it serves, ``error``."""
        ...

    async def served_models(self, *, fresh: bool = False) -> list[dict]:
        """vLLM's model objects (base first, then the loaded adapters); ``fresh`` refetches them."""
        ...

    def record_jobs(self, counts: dict[str, int], last_success: float | None) -> None:
        """Publish the retrain job counts by state and the time of the last successful one."""
        ...

    def record_served(self, adapter: str | None) -> None:
        """Publish which adapter the alias serves now (None: none)."""
        ...
