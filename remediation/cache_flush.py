"""CacheFlush: empty the shop's shared Redis level, then every instance's in-process level."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis
import requests
from pydantic import BaseModel, ConfigDict, Field
from redis.backoff import NoBackoff
from redis.retry import Retry

from remediation.base import Action, ActionContext, ActionError, Check, Outcome, parse_params


class FlushParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    redis_url: str = Field(pattern=r"^rediss?://")
    instances: list[str] = Field(min_length=1)
    admin_token: str = Field(min_length=1)
    key_prefix: str = "shop:product:"
    timeout_s: float = 5.0


class CacheFlush(Action):
    kind = "cache_flush"
    may_start_over = True
    Params = FlushParams

    @staticmethod
    def _params(ctx: ActionContext) -> FlushParams:
        return parse_params(FlushParams, ctx, "cache_flush")

    @classmethod
    def plan(cls, target: str, params: Mapping[str, Any]) -> list[str]:
        p = FlushParams.model_validate(dict(params))
        return [
            "check that Redis answers (else: skipped)",
            f"delete every Redis key under {p.key_prefix!r}",
            f"empty the in-process cache of {len(p.instances)} instance(s): "
            + ", ".join(p.instances),
            "the next reads fill both levels from the database; no order is touched",
        ]

    def precheck(self, ctx: ActionContext) -> Check:
        p = self._params(ctx)
        client = redis.Redis.from_url(
            p.redis_url, socket_timeout=p.timeout_s, retry=Retry(NoBackoff(), 0)
        )
        try:
            client.ping()
        except redis.RedisError as exc:
            return Check.not_now(f"Redis unreachable, nothing to flush yet: {exc}")
        finally:
            client.close()
        return Check.go("Redis reachable")

    def execute(self, ctx: ActionContext) -> Outcome:
        p = self._params(ctx)
        client = redis.Redis.from_url(
            p.redis_url, socket_timeout=p.timeout_s, retry=Retry(NoBackoff(), 0)
        )
        try:
            keys = list(client.scan_iter(match=p.key_prefix + "*", count=1000))
            removed = int(client.delete(*keys)) if keys else 0
        except redis.RedisError as exc:
            raise ActionError(f"Redis flush failed: {exc}") from exc
        finally:
            client.close()
        flushed, failed = [], {}
        for url in p.instances:
            try:
                response = requests.post(
                    f"{url}/admin/cache/flush",
                    headers={"Authorization": f"Bearer {p.admin_token}"},
                    timeout=p.timeout_s,
                )
            except requests.RequestException as exc:
                failed[url] = type(exc).__name__
                continue
            if response.status_code == 200:
                flushed.append(url)
            else:
                failed[url] = f"HTTP {response.status_code}"
        if failed:
            raise ActionError(f"instances not flushed: {failed}")
        return Outcome(
            f"removed {removed} Redis keys, flushed {len(flushed)} instances",
            {"redis_keys_removed": removed, "instances": flushed},
        )
