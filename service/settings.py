"""Process-wide settings, read from ``PRESAFE_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where PreSafe keeps things and which upstream it talks to."""

    model_config = SettingsConfigDict(env_prefix="PRESAFE_", extra="ignore")

    home: Path = Field(default=Path("~/.cache/presafe"), description="Root of models, data, adapters, jobs.")
    base_model: str = Field(default="smollm2-135m-instruct", description="Known name, HF id or local path.")
    classifier_model: str = Field(default="all-minilm-l6-v2", description="Decision classifier backbone.")
    vllm_url: str | None = Field(default=None, description="External vLLM server; unset = embedded mode.")
    admin_token: SecretStr | None = Field(default=None, description="Bearer token for /admin; unset = off.")
    pip_timeout_s: int = 120

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
