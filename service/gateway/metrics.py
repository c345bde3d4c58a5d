"""Prometheus metrics of the gateway, in their own :class:`CollectorRegistry` (names are a contract:
the Grafana dashboard and docs/metrics.md use them verbatim)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

THINK_TOKEN_BUCKETS = (0, 1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DECISION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """Every PreSafe metric; one instance per gateway app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("presafe_requests_total", "API requests by route, model and HTTP status "
                                "(499: the client went away).", ["route", "model", "status"], registry=r)
        self.decisions = Counter("presafe_decisions_total", "Decision paths of generated responses.",
                                 ["path", "model"], registry=r)
        self.think_tokens = Histogram("presafe_think_tokens", "Reasoning tokens before the decision.",
                                      ["path", "model"], buckets=THINK_TOKEN_BUCKETS, registry=r)
        self.time_to_decision = Histogram("presafe_time_to_decision_seconds",
                                          "Request start to the decision (first answer text; whole "
                                          "response for non-streaming).", ["model"],
                                          buckets=DECISION_BUCKETS, registry=r)
        self.request_duration = Histogram("presafe_request_duration_seconds", "API request duration "
                                          "(streams: until the last byte).", ["route", "model"],
                                          buckets=DURATION_BUCKETS, registry=r)
        self.active_requests = Gauge("presafe_active_requests", "API requests in flight.", registry=r)
        self.upstream_errors = Counter("presafe_upstream_errors_total", "Upstream (vLLM) failures by kind.",
                                       ["kind"], registry=r)
        self.replica_requests = Counter("presafe_upstream_requests_total", "Generation requests sent to each vLLM "
                                        "replica (retries on another replica counted there too).", ["replica"],
                                        registry=r)
        self.replica_healthy = Gauge("presafe_upstream_replica_healthy", "1 while a vLLM replica is admitted, 0 "
                                     "while ejected (a failed request or health check).", ["replica"], registry=r)
        self.classifier_verdicts = Counter("presafe_classifier_verdicts_total",
                                           "Prompt-classifier verdicts (refuse/comply).", ["verdict", "model"],
                                           registry=r)
        self.classifier_disagreements = Counter("presafe_classifier_disagreements_total",
                                                "Responses whose refusal disagrees with the prompt classifier.",
                                                ["model"], registry=r)
        # Filled by the admin API (retrain jobs, promoted adapter).
        self.jobs = Gauge("presafe_jobs", "Retrain jobs by state.", ["state"], registry=r)
        self.last_successful_retrain = Gauge("presafe_last_successful_retrain_timestamp_seconds",
                                             "Unix time of the last successful retrain.", registry=r)
        self.served_adapter_info = Gauge("presafe_served_adapter_info", "1 for the adapter an alias serves.",
                                         ["alias", "adapter", "version"], registry=r)

    def set_served_adapter(self, alias: str, adapter: str | None, version: str = "") -> None:
        """Point ``alias`` at ``adapter`` (None: at no adapter); drops the alias's previous series."""
        for labels in [s.labels for m in self.served_adapter_info.collect() for s in m.samples]:
            if labels.get("alias") == alias:
                self.served_adapter_info.remove(alias, labels["adapter"], labels["version"])
        if adapter is not None:
            self.served_adapter_info.labels(alias, adapter, version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
