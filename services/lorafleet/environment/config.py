"""Built-in environment service settings (env prefix ``LORAFLEET_ENVIRONMENT_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lorafleet.core.config import ServiceSettings


class EnvironmentSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFLEET_ENVIRONMENT_", extra="forbid")

    max_prompts_per_call: int = Field(
        default=4096, ge=1, description="Most prompts one SamplePrompts call may ask for."
    )
    max_items_per_call: int = Field(
        default=65536, ge=1, description="Most completions one Score call may carry."
    )
