"""RedisProbe: PING, memory use and the keyspace hit ratio."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis
from pydantic import Field
from redis.backoff import NoBackoff
from redis.retry import Retry

from probes.base import Health, Params, Probe, ProbeResult, describe, down


class RedisParams(Params):
    url: str = Field(pattern=r"^rediss?://")
    max_memory_bytes: int | None = Field(default=None, gt=0)


class RedisProbe(Probe):
    kind = "redis"
    Params = RedisParams

    def check(self) -> ProbeResult:
        p: RedisParams = self.params  # type: ignore[assignment]
        # No client retries: redis-py's default three would make a hung Redis cost four
        # timeouts, and the probe's `timeout_s` is its bound.
        client = redis.Redis.from_url(
            p.url,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            client.ping()
            info = client.info(section="all")
        except redis.RedisError as exc:
            return down(describe(exc), url=without_password(p.url))
        finally:
            client.close()
        hits, misses = int(info.get("keyspace_hits", 0)), int(info.get("keyspace_misses", 0))
        used_memory = int(info.get("used_memory", 0))
        details = {
            "used_memory_bytes": used_memory,
            "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
            "keys": sum(int(v.get("keys", 0)) for k, v in info.items() if k.startswith("db")),
        }
        if p.max_memory_bytes and used_memory > p.max_memory_bytes:
            return ProbeResult(Health.DEGRADED, "memory above the limit", details=details)
        return ProbeResult(Health.UP, "PONG", details=details)


def without_password(url: str) -> str:
    """The URL as it may be shown and stored: `redis://:***@host:port/0`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    netloc = f"{user}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
