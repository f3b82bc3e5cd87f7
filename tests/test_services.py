"""The service fixtures and scripts/services.sh give working, isolated Redis and Postgres."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio
from conftest import SERVICES_SH, read_env_file, run_async, temporary_database, with_database


async def test_database_url_is_a_private_writable_database(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert (await conn.fetchval("SELECT current_database()")).startswith("streamsrv_test_")
        transaction = conn.transaction()  # leave no trace for other tests
        await transaction.start()
        await conn.execute("CREATE TABLE services_probe (id int PRIMARY KEY)")
        await conn.execute("INSERT INTO services_probe VALUES (1)")
        assert await conn.fetchval("SELECT count(*) FROM services_probe") == 1
        await transaction.rollback()
    finally:
        await conn.close()


async def database_names(admin_url: str) -> set[str]:
    conn = await asyncpg.connect(admin_url)
    try:
        return {row[0] for row in await conn.fetch("SELECT datname FROM pg_database")}
    finally:
        await conn.close()


async def user_tables(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        return [row[0] for row in rows]
    finally:
        await conn.close()


def test_temporary_database_is_empty_and_dropped_afterwards(postgres_admin_url: str) -> None:
    """The mechanism behind database_url: a new, empty database that is gone afterwards."""
    with temporary_database(postgres_admin_url) as url:
        name = url.split("?")[0].rsplit("/", 1)[1]
        assert name.startswith("streamsrv_test_")
        assert name in run_async(database_names(postgres_admin_url))
        assert run_async(user_tables(url)) == []
    assert name not in run_async(database_names(postgres_admin_url))


async def test_redis_set_get_and_pubsub(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    key = f"streamsrv-test:{uuid.uuid4().hex}"
    try:
        await client.set(key, b"hello", ex=60)
        assert await client.get(key) == b"hello"
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(key)
            assert await client.publish(key, b"partial") == 1
            message = None
            async with asyncio.timeout(10):
                while message is None:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            assert message["data"] == b"partial"
    finally:
        await client.delete(key)
        await client.aclose()


def test_settings_env(settings_env: dict[str, str], tmp_path: Path) -> None:
    assert settings_env["RECORDINGS_DIR"] == str(tmp_path / "recordings")
    assert Path(settings_env["MODEL_DIR"]).name == "models"
    assert settings_env["AUDIOSOCKET_PORT"] == settings_env["HTTP_PORT"] == "0"
    assert (
        settings_env["DATABASE_URL"].split("?")[0].rsplit("/", 1)[1].startswith("streamsrv_test_")
    )


def test_with_database_keeps_credentials_and_query() -> None:
    url = "postgresql://user:pw@db.example:5433/streamsrv?sslmode=require"
    assert (
        with_database(url, "postgres")
        == "postgresql://user:pw@db.example:5433/postgres?sslmode=require"
    )
    assert with_database("postgresql://localhost", "x") == "postgresql://localhost/x"


async def fetch_database_name(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SELECT current_database()"))
    finally:
        await conn.close()


@pytest.mark.skipif(
    not shutil.which("redis-server") or not glob.glob("/usr/lib/postgresql/*/bin/initdb"),
    reason="needs the redis-server and postgresql Debian packages",
)
def test_services_sh_starts_and_stops_private_instances(tmp_path: Path) -> None:
    """With nothing at the configured URLs, `up` starts private servers; `purge` removes them."""
    env = {
        **os.environ,
        "REDIS_URL": "redis://127.0.0.1:1/3",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/streamsrv_private",
    }
    state = tmp_path / "state"
    try:
        for _ in range(2):  # the second `up` finds the running instances
            out = subprocess.run(
                [str(SERVICES_SH), "up", str(state)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            ).stdout
            assert out.count("\n") == 2 and "redis:" in out and "postgres:" in out
        urls = read_env_file(state / "services.env")
        assert urls["REDIS_URL"].endswith("/3") and ":1/" not in urls["REDIS_URL"]
        assert redis.Redis.from_url(urls["REDIS_URL"], socket_timeout=5).ping()
        assert urls["DATABASE_URL"].startswith("postgresql://postgres@127.0.0.1:")
        assert urls["DATABASE_URL"].endswith("/streamsrv_private")
        assert run_async(fetch_database_name(urls["DATABASE_URL"])) == "streamsrv_private"
        pid = int((state / "redis" / "redis.pid").read_text())
    finally:
        subprocess.run([str(SERVICES_SH), "purge", str(state)], env=env, check=True, timeout=120)
    assert not Path(f"/proc/{pid}").exists()
    assert not (state / "services.env").exists() and not (state / "pg").exists()
