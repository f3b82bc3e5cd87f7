"""Shared fixtures: a Redis, a fresh Postgres database and a settings environment.

The servers are the ones at $REDIS_URL / $DATABASE_URL (defaults as in configs/streamsrv.env)
when they answer. Otherwise scripts/services.sh starts private ones in a temporary directory
for this session and removes them at its end. Each session gets its own database,
streamsrv_test_<hex>, dropped at the end; Redis is shared, so tests use unique keys.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import subprocess
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
SERVICES_SH = ROOT / "scripts" / "services.sh"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://localhost/streamsrv"

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, also from inside a running event loop (in a helper thread then)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def with_database(url: str, name: str) -> str:
    """The Postgres URL with its database replaced by name (query string kept)."""
    return urlsplit(url)._replace(path="/" + name).geturl()


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


async def pg_connect(url: str) -> Any:
    return await asyncpg.connect(url, timeout=5)


def maintenance_url(url: str) -> str | None:
    """A URL of the server's `postgres` (or the given, or template1) database that connects."""

    async def probe() -> str | None:
        for candidate in (with_database(url, "postgres"), url, with_database(url, "template1")):
            try:
                conn = await pg_connect(candidate)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                continue
            await conn.close()
            return candidate
        return None

    return run_async(probe())


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("'\"")
    return values


@pytest.fixture(scope="session")
def private_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Redis/Postgres URLs from `scripts/services.sh up` (private instances where needed)."""
    state_dir = tmp_path_factory.mktemp("services")
    env = {
        **os.environ,
        "REDIS_URL": os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
        "DATABASE_URL": os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
    }
    try:
        subprocess.run(
            [str(SERVICES_SH), "up", str(state_dir)],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=600,
        )
        yield read_env_file(state_dir / "services.env")
    finally:
        subprocess.run([str(SERVICES_SH), "purge", str(state_dir)], env=env, check=False)


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    if redis_answers(url):
        return url
    services: dict[str, str] = request.getfixturevalue("private_services")
    url = services["REDIS_URL"]
    assert redis_answers(url), f"Redis at {url} does not answer"
    return url


async def pg_execute(url: str, sql: str) -> None:
    conn = await pg_connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def temporary_database(admin_url: str) -> Iterator[str]:
    """Create streamsrv_test_<hex> through admin_url, yield its URL, then drop it."""
    name = f"streamsrv_test_{secrets.token_hex(6)}"
    run_async(pg_execute(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(admin_url, name)
    finally:
        run_async(pg_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_admin_url(request: pytest.FixtureRequest) -> str:
    """URL of a database on the test server from which databases can be created and dropped."""
    admin = maintenance_url(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
    if admin is None:
        services: dict[str, str] = request.getfixturevalue("private_services")
        admin = maintenance_url(services["DATABASE_URL"])
        assert admin is not None, f"Postgres at {services['DATABASE_URL']} does not answer"
    return admin


@pytest.fixture(scope="session")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """URL of a fresh database for this session, dropped (WITH (FORCE)) at its end."""
    with temporary_database(postgres_admin_url) as url:
        yield url


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MODEL_DIR shared by the session, so models are unpacked at most once."""
    return tmp_path_factory.mktemp("shared") / "models"


@pytest.fixture
def settings_env(
    redis_url: str, database_url: str, tmp_path: Path, model_dir: Path
) -> dict[str, str]:
    """Environment for Settings: the test services, temporary directories, ephemeral ports."""
    return {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "RECORDINGS_DIR": str(tmp_path / "recordings"),
        "SPOOL_DIR": str(tmp_path / "spool"),
        "MODEL_DIR": str(model_dir),
        "AUDIOSOCKET_PORT": "0",
        "HTTP_PORT": "0",
        "LOG_FORMAT": "json",
        "WORKER_METRICS_PORT": "0",  # a test that wants the worker's metrics picks a port
    }
