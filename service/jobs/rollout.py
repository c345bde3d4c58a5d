"""The promoted adapter served merged on a Kubernetes Deployment of its own, moved by a rolling update.

``k8s/components/merged-promotion`` runs ``presafe-vllm --merged`` in the Deployment ``presafe-vllm-promoted``:
each pod merges the adapter its pod template names (the annotation :data:`ANNOTATION`, read through the
downward API) into the base and serves it under that name without LoRA. The admin sets the annotation on
promote and rollback, which Kubernetes turns into a rolling update (pods on the new weights come up before the
old ones go, as the Deployment's strategy says); a loop sets it again whenever it differs from the registry (a
promote while the API was unreachable, a hand edit). Until a pod on the new weights is ready the gateway serves
the alias through runtime LoRA on the LoRA replicas, which hold every promoted adapter; :meth:`status` says how
far the rollout is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger("presafe.rollout")

ANNOTATION = "presafe.io/promoted-adapter"
MERGE_PATCH = "application/merge-patch+json"  # the client's default for a dict body is JSON Patch (a list)


def _rollout_of(deployment: Any) -> dict[str, Any]:
    """The fields of a ``V1Deployment`` that say where its rolling update stands."""
    meta, spec = deployment.metadata, deployment.spec
    annotations = (spec.template.metadata.annotations if spec.template.metadata is not None else None) or {}
    want = spec.replicas if spec.replicas is not None else 1
    status = deployment.status
    updated, total, ready, available, observed = (
        (status.updated_replicas or 0, status.replicas or 0, status.ready_replicas or 0,
         status.available_replicas or 0, status.observed_generation or 0) if status is not None else (0,) * 5)
    return {"adapter": annotations.get(ANNOTATION) or None, "replicas": want, "updated": updated,
            "ready": ready, "available": available,
            "complete": observed >= (meta.generation or 0) and updated == want == available and total == want}


class DeploymentRollout:
    """The merged Deployment the admin rolls (:class:`service.core.serving.MergedServing`)."""

    def __init__(self, deployment: str, *, replicas: Callable[[], list[dict]], namespace: str | None = None,
                 apps_api: Any = None, interval: float = 10.0):
        from service.jobs.runners import kube_namespace

        self.deployment, self.interval = deployment, interval
        self.replicas = replicas  # the merged replicas as the gateway sees them: url, admitted, models
        self.namespace = kube_namespace(namespace)
        self._apps = apps_api
        self.seen: dict[str, Any] | None = None  # the Deployment at the last read
        self.error: str | None = None  # why the last read or patch failed
        self._follow: asyncio.Task | None = None

    @property
    def apps(self) -> Any:
        if self._apps is None:
            from kubernetes import client

            from service.jobs.runners import load_kube_config

            load_kube_config()
            self._apps = client.AppsV1Api()
        return self._apps

    async def roll_to(self, adapter: str) -> None:
        """Name ``adapter`` in the pod template (a rolling update when it changes)."""
        body = {"spec": {"template": {"metadata": {"annotations": {ANNOTATION: adapter}}}}}
        deployment = await asyncio.to_thread(self.apps.patch_namespaced_deployment, self.deployment,
                                             self.namespace, body, _content_type=MERGE_PATCH)
        self.seen, self.error = _rollout_of(deployment), None
        log.info("merged deployment rolling", extra={"deployment": self.deployment, "adapter": adapter})

    async def refresh(self) -> dict[str, Any] | None:
        deployment = await asyncio.to_thread(self.apps.read_namespaced_deployment, self.deployment, self.namespace)
        self.seen, self.error = _rollout_of(deployment), None
        return self.seen

    @contextlib.asynccontextmanager
    async def serving(self, adapter: str) -> AsyncIterator[bool]:
        """Start the rolling update to ``adapter``; yields whether a merged replica serves it already (else the
        alias goes through LoRA until one does). A failed patch leaves the promote standing: the loop retries."""
        try:
            await self.roll_to(adapter)
        except Exception as exc:  # noqa: BLE001 - the API is down or refuses: LoRA serves, the loop retries
            self.error = f"patching deployment {self.deployment}: {type(exc).__name__}: {exc}"[:500]
            log.warning("could not roll the merged deployment", extra={"adapter": adapter, "error": self.error})
        yield self._served(adapter)

    def _served(self, adapter: str) -> bool:
        return any(r["admitted"] and adapter in r["models"] for r in self.replicas())

    def status(self, promoted: str | None) -> dict[str, Any]:
        """Mode ``merged`` once a ready merged replica serves the promoted adapter (``lora`` until then, with the
        rollout's progress as the reason); ``rollout.complete`` once every one does."""
        replicas = self.replicas()
        serving = [r for r in replicas if r["admitted"] and promoted in r["models"]]
        rollout = {"deployment": self.deployment, "namespace": self.namespace, **(self.seen or {}),
                   "error": self.error}
        admitted = [r for r in replicas if r["admitted"]]
        rollout["complete"] = bool(self.seen and self.seen["complete"] and self.seen["adapter"] == promoted
                                   and admitted and len(serving) == len(admitted))
        if promoted is None:
            mode, reason = "none", "no adapter is promoted"
        elif serving:
            mode, reason = "merged", None
        else:
            mode = "lora"
            reason = self.error or (f"rolling deployment {self.deployment} to {promoted}: "
                                    f"{(self.seen or {}).get('updated', 0)} of {(self.seen or {}).get('replicas', '?')}"
                                    " pods updated, none serving it yet")
        return {"mode": mode, "adapter": promoted, "reason": reason, "engine": None,
                "engines": replicas,
                "last_swap": None, "rollout": rollout}

    # ------------------------------------------------------------ the loop
    def start(self, promoted: Callable[[], str | None]) -> None:
        self._follow = asyncio.create_task(self.follow(promoted))

    async def follow(self, promoted: Callable[[], str | None]) -> None:
        """Read the Deployment every ``interval`` s; name the promoted adapter there when it names another."""
        while True:
            try:
                seen = await self.refresh()
                target = promoted()
                if target is not None and seen is not None and seen["adapter"] != target:
                    log.warning("merged deployment names another adapter: rolling it",
                                extra={"deployment": self.deployment, "has": seen["adapter"], "promoted": target})
                    await self.roll_to(target)
            except Exception as exc:  # noqa: BLE001 - an unreachable API must not stop the loop
                self.error = f"reading deployment {self.deployment}: {type(exc).__name__}: {exc}"[:500]
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
