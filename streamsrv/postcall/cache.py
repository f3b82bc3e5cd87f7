"""Post-call results cached in Redis, keyed by the recording's bytes and the settings.

The same recording processed again with the same settings (a re-queued job, a file uploaded
twice) is answered from the cache without running the model. The key is the SHA-256 of the
audio's SHA-256 and the canonical JSON of everything else that changes the outcome, so a change
of model, beam size or language misses. The cache is an optimisation: when Redis is away the
worker carries on without it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import redis.asyncio as redis
import structlog

log = structlog.get_logger(__name__)


def cache_key(prefix: str, audio_digest: str, fingerprint: dict[str, Any]) -> str:
    settings = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(f"{audio_digest}\n{settings}".encode()).hexdigest()
    return f"{prefix}postcall:result:{digest}"


class ResultCache:
    """get/put of JSON results; failures are logged and read as a miss."""

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self._client = client
        self._ttl = ttl

    async def get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self._client.get(key)
            return json.loads(raw) if raw is not None else None
        except (redis.RedisError, OSError, ValueError) as exc:
            log.warning("result_cache_unavailable", op="get", error=repr(exc))
            return None

    async def put(self, key: str, value: dict[str, Any]) -> None:
        try:
            await self._client.set(key, json.dumps(value), ex=self._ttl)
        except (redis.RedisError, OSError) as exc:
            log.warning("result_cache_unavailable", op="put", error=repr(exc))
