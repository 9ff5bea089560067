"""ShopSettings: the shop's typed configuration, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Failpoint = Literal[
    "",
    "before_prepare",
    "after_first_prepare",
    "after_both_prepares",
    "after_decision",
    "after_first_commit",
]

ENV_PREFIX = "SHOP_"


class ConfigError(Exception):
    """The environment does not describe a valid shop; the message names the variable."""


class ShopSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    orders_url: str = Field(description="SQLAlchemy URL of the orders database")
    inventory_url: str = Field(description="SQLAlchemy URL of the inventory database")
    redis_url: str = "redis://127.0.0.1:6379/0"
    instance_id: str = Field(default="shop-0", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    admin_token: str = ""
    local_cache_ttl_s: float = Field(default=2.0, gt=0)
    local_cache_size: int = Field(default=2048, gt=0)
    redis_cache_ttl_s: int = Field(default=60, gt=0)
    redis_timeout_s: float = Field(default=0.2, gt=0)
    redis_retry_after_s: float = Field(default=1.0, ge=0)
    # How long the write-behind invalidator gathers dirty products into one DEL.
    redis_invalidate_batch_s: float = Field(default=0.02, ge=0, le=1)
    db_connect_timeout_s: int = Field(default=2, ge=1)
    # The server's own limits, below the client's deadline so that it is they that speak
    # while the server runs; the deadline speaks when it does not (hung, stopped, gone).
    db_lock_timeout_ms: int = Field(default=1500, ge=1)
    db_statement_timeout_ms: int = Field(default=2500, ge=1)
    db_deadline_s: float = Field(default=3.0, gt=0)
    db_race_after_s: float = Field(default=0.25, ge=0)
    db_tcp_user_timeout_ms: int = Field(default=3000, ge=0)
    db_pool_size: int = Field(default=16, ge=1)
    db_retry_deadline_s: float = Field(default=8.0, ge=0)
    in_doubt_min_age_s: float = Field(default=5.0, ge=0)
    failpoint: Failpoint = ""

    @model_validator(mode="after")
    def deadline_above_server_limits(self) -> ShopSettings:
        if self.db_deadline_s * 1000 <= max(self.db_lock_timeout_ms, self.db_statement_timeout_ms):
            raise ValueError(
                "db_deadline_s must exceed db_lock_timeout_ms and db_statement_timeout_ms"
            )
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ShopSettings:
        environ = os.environ if environ is None else environ
        values = {
            name: environ[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if ENV_PREFIX + name.upper() in environ
        }
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{ENV_PREFIX}{str(err['loc'][0]).upper()}: {err['msg']}"
                if err["loc"]
                else f"{ENV_PREFIX}DB_DEADLINE_S: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(f"invalid shop configuration: {problems}") from None
