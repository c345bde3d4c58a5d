"""Process-wide settings, read from ``PRESAFE_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]  # env: "a,b,c"


class Settings(BaseSettings):
    """Where PreSafe keeps things and which upstream it talks to."""

    model_config = SettingsConfigDict(env_prefix="PRESAFE_", extra="ignore")

    home: Path = Field(default=Path("~/.cache/presafe"), description="Root of models, data, adapters, jobs.")
    base_model: str = Field(default="smollm2-135m-instruct", description="Known name, HF id or local path.")
    classifier_model: str = Field(default="all-minilm-l6-v2", description="Decision classifier backbone.")
    vllm_url: str | None = Field(default=None, description="External vLLM server, or several replicas as a comma "
                                 "list (each request goes to the least busy); unset = embedded mode.")
    vllm_discovery: Literal["static", "dns"] = Field(default="static", description="dns: each vllm_url host names "
                                                      "a headless Service; every address it resolves to is a "
                                                      "replica (re-read at each health check).")
    replica_health_s: float = Field(default=2.0, gt=0, description="How often each vLLM replica's /v1/models is "
                                    "checked (a failing replica is ejected, readmitted when it answers).")
    admin_token: SecretStr | None = Field(default=None, description="Bearer token for /admin; unset = off.")
    pip_timeout_s: int = 120
    # Gateway (`presafe serve`).
    host: str = Field(default="127.0.0.1", description="Gateway bind address.")
    port: int = Field(default=8080, description="Gateway port.")
    model_alias: str = Field(default="presafe", description="Model name that serves the promoted adapter.")
    vllm_api_key: SecretStr | None = Field(default=None, description="Bearer token the upstream vLLM expects.")
    upstream_timeout_s: float = Field(default=600.0, description="Read timeout for upstream responses.")
    max_body_bytes: int = Field(default=1 << 20, description="Largest request body (413 above).")
    models_ttl_s: float = Field(default=5.0, description="How long the upstream model list is cached.")
    chat_template: str | None = Field(default=None, description="Chat template (.jinja path or text) for a base "
                                      "model without one; default: the promoted adapter's chat_template.jinja.")
    think_open: bool | None = Field(default=None, description="Whether the served chat template opens "
                                    "<think> (None: detect from the text).")
    classifier_timeout_s: float = Field(default=2.0, description="Longest wait for a classifier verdict.")
    classifier_dir: Path | None = Field(default=None, description="Prompt classifier dir; default: the promoted "
                                        "adapter's own (published with it), else $PRESAFE_HOME/classifier.")
    log_level: str = "info"
    # Public request rules (docs/gateway.md: request rules).
    public_models: CommaList = Field(default_factory=list, description="Served names the public API exposes "
                                     "besides the alias (comma list); empty = the alias only.")
    extra_request_fields: CommaList = Field(default_factory=list, description="Request fields accepted besides "
                                            "the public allowlist (comma list), e.g. ignore_eos for a benchmark.")
    split_reasoning: bool = Field(default=True, description="Return the reasoning in reasoning_content/reasoning "
                                  "and the answer alone in content; false = vLLM's output unchanged.")
    alias_completions: bool = Field(default=False, description="Serve /v1/completions on the alias to public "
                                    "callers. A raw prompt skips the serving chat template (and the CoT opening "
                                    "the decision is trained on), so off: 404 pointing to /v1/chat/completions.")
    max_output_tokens: int | None = Field(default=None, ge=1, description="Largest max_tokens / "
                                          "max_completion_tokens (None: the served context length).")
    max_n: int = Field(default=8, ge=1, description="Largest n (choices per request).")
    max_prompts: int = Field(default=16, ge=1, description="Longest prompt list of /v1/completions.")
    max_in_flight: int = Field(default=512, ge=1, description="Generation requests in flight before 429.")
    max_queue_waiting: int | None = Field(default=256, ge=0, description="vllm:num_requests_waiting above "
                                          "which new requests get 429 (None: not watched).")
    queue_poll_s: float = Field(default=1.0, gt=0, description="How often vLLM's queue length is read.")
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After of 429 answers.")
    limit_concurrency: int | None = Field(default=2048, ge=1, description="uvicorn limit_concurrency "
                                          "(connections+tasks; 503 above).")
    body_timeout_s: float = Field(default=30.0, gt=0, description="Longest wait for a request body (408).")
    # Embedded vLLM (when vllm_url is unset).
    vllm_port: int | None = Field(default=None, description="Embedded vLLM port (None: a free one).")
    vllm_args: str = Field(default="", description="Extra vLLM arguments (shell syntax).")
    vllm_max_model_len: int | None = Field(default=4096, description="--max-model-len for the embedded vLLM.")
    vllm_dtype: str | None = Field(default=None, description="--dtype for every vLLM PreSafe starts (None: "
                                   "float32 on a CPU without native bf16, where vLLM's bf16 runs ~4x slower; "
                                   "else the model's own).")
    vllm_startup_timeout_s: float = 900.0
    # The promoted adapter from merged weights (service.engines).
    serve_merged: bool | None = Field(default=None, description="Serve the promoted adapter from its weights "
                                      "merged into the base, on a vLLM of its own without LoRA (blue/green on "
                                      "promote); None: in embedded mode (where the gateway starts vLLM) only.")
    merged_memory_reserve_gib: float = Field(default=1.0, ge=0, description="Memory a second engine must leave "
                                             "free beyond its weights and KV cache; short of it, runtime LoRA.")
    merged_retry_s: float = Field(default=600.0, gt=0, description="Wait before trying again to serve an adapter "
                                  "merged after a failure (a promote tries at once).")
    drain_timeout_s: float = Field(default=600.0, gt=0, description="Longest wait for a retired engine's requests "
                                   "in flight before it is stopped.")
    # The promoted adapter merged on vLLM replicas of their own that a Kubernetes rolling update moves
    # (service.jobs.rollout; k8s/base/vllm-promoted.yaml).
    merged_url: str | None = Field(default=None, description="vLLM replicas serving the promoted adapter from "
                                   "merged weights (comma list, or with vllm_discovery=dns a headless Service): a "
                                   "request for a name one of them serves goes there, else to vllm_url's LoRA "
                                   "replicas.")
    merged_deployment: str | None = Field(default=None, description="The Kubernetes Deployment of those replicas: "
                                          "on promote and rollback the admin sets its pod template's annotation "
                                          "presafe.io/promoted-adapter (a rolling update onto the new weights).")
    # vLLM API key from a file (docker compose: written by presafe-vllm); PRESAFE_VLLM_API_KEY wins. [admin]
    vllm_api_key_file: Path | None = Field(default=None, description="File holding the vLLM API key.")

    @model_validator(mode="after")
    def _vllm_key_from_file(self) -> Settings:
        unset = self.vllm_api_key is None or not self.vllm_api_key.get_secret_value()
        if unset and self.vllm_api_key_file is not None:
            with contextlib.suppress(OSError):
                self.vllm_api_key = SecretStr(self.vllm_api_key_file.expanduser().read_text().strip()) or None
        return self

    @field_validator("public_models", "extra_request_fields", mode="before")
    @classmethod
    def _comma_list(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def root(self) -> Path:
        return self.home.expanduser()

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def wheels_dir(self) -> Path:
        return self.root / "wheels"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"


@lru_cache
def get_settings() -> Settings:
    return Settings()
