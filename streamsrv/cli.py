"""Command line: serve, migrate, check-config, demo, worker, ari, tail."""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import uuid
from pathlib import Path

import structlog

from streamsrv.config import (
    ConfigError,
    Settings,
    known_variables,
    read_env_file,
    variable_aliases,
)

log = structlog.get_logger(__name__)


def _settings(env_file: Path | None) -> Settings:
    from streamsrv import logs

    settings = Settings.load(env_file)
    logs.configure(settings)
    return settings


def _run(coro: object) -> None:
    import uvloop

    uvloop.run(coro)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    from streamsrv.asr.models import ModelNotFound
    from streamsrv.blas import one_blas_thread
    from streamsrv.server import Server
    from streamsrv.systemd import Notifier

    settings = _settings(args.env_file)
    _raise_file_limit()
    one_blas_thread()
    try:
        _run(Server(settings, Notifier.from_environ(os.environ)).run())
    except ModelNotFound as exc:
        log.error("model_not_found", error=str(exc))
        return 2
    except OSError as exc:
        log.error("startup_failed", error=str(exc))
        return 1
    return 0


def _raise_file_limit() -> None:
    """Every call is a socket: lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cmd_migrate(args: argparse.Namespace) -> int:
    from streamsrv.jobs import run_migrations

    settings = _settings(args.env_file)
    _run(run_migrations(settings.database_url))
    print("schema is up to date")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate an env file on its own (not merged with this shell's environment)."""
    path: Path = args.file
    try:
        values = read_env_file(path)
        unknown = sorted(set(values) - known_variables() - set(variable_aliases()))
        Settings.from_mapping(values)
    except FileNotFoundError:
        print(f"{path}: no such file", file=sys.stderr)
        return 2
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return 1
    for name in unknown:
        print(f"{path}: {name}: unknown variable (ignored)", file=sys.stderr)
    print(f"{path}: ok")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streamsrv.demo import run_demo

    settings = Settings.load(args.env_file)
    return asyncio.run(run_demo(settings, args.prompts, args.speed, args.seed))


def cmd_worker(args: argparse.Namespace) -> int:
    """The post-call worker: runs until SIGTERM, or with --drain until the queue is empty."""
    from streamsrv.blas import one_blas_thread
    from streamsrv.postcall.worker import DB_ERRORS, Worker, abandoned_jobs

    settings = _settings(args.env_file)
    one_blas_thread()
    try:
        _run(Worker(settings).run(drain=args.drain))
    except DB_ERRORS as exc:
        log.error("worker_failed", error=repr(exc))
        return 1
    if abandoned_jobs():
        # A forced stop gave the running jobs back; their threads are still inside the model,
        # and tearing the interpreter down under native code aborts the process. Leave now.
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_ari(args: argparse.Namespace) -> int:
    """Both directions of the calls that enter the Stasis app, to streamsrv (until SIGTERM)."""
    from streamsrv.ari_service import AriService

    settings = _settings(args.env_file)
    try:
        _run(AriService(settings).run())
    except OSError as exc:
        log.error("startup_failed", error=str(exc))
        return 1
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    """Follow calls in the terminal: what they said so far, then live."""
    from streamsrv.tail import TailOptions, run_tail

    if bool(args.calls) == args.all:
        print("streamsrv tail: give call ids or --all", file=sys.stderr)
        return 2
    if (args.recent and not args.all) or args.recent < 0:
        print("streamsrv tail: --recent N (N >= 0) goes with --all", file=sys.stderr)
        return 2
    settings = _settings(args.env_file)
    options = TailOptions(
        calls=None if args.all else list(dict.fromkeys(args.calls)),
        recent=args.recent,
        json=args.json,
        partials=args.partials,
        wait=not args.no_wait,
    )
    try:
        return asyncio.run(run_tail(settings, options))
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place
        return 0


def _call_id(value: str) -> str:
    """A call id in its canonical form (AudioSocket UUIDs are published lowercase)."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a call id: {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamsrv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_env(p: argparse.ArgumentParser) -> None:
        p.add_argument("--env-file", type=Path, help="systemd-style KEY=value file")

    p = sub.add_parser("serve", help="run the server in the foreground")
    with_env(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("migrate", help="create or upgrade the Postgres schema")
    with_env(p)
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser("check-config", help="validate an env file and say what is wrong")
    p.add_argument("file", type=Path, nargs="?", default=Path("configs/streamsrv.env"))
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser(
        "demo", help="play a recorded call into a running server, print its transcript"
    )
    with_env(p)
    p.add_argument("--prompts", type=int, default=6, help="recorded prompts in the call")
    p.add_argument("--speed", type=float, default=1.0, help="1 = real time")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("worker", help="run post-call jobs from the queue")
    with_env(p)
    p.add_argument("--drain", action="store_true", help="exit 0 once the queue is empty")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "ari", help="snoop both directions of calls in the ARI_APP Stasis app into streamsrv"
    )
    with_env(p)
    p.set_defaults(func=cmd_ari)

    p = sub.add_parser("tail", help="follow calls in the terminal: so far, then live")
    with_env(p)
    p.add_argument("calls", nargs="*", type=_call_id, metavar="CALL_ID", help="calls to follow")
    p.add_argument("--all", action="store_true", help="every running call and those to come")
    p.add_argument(
        "--recent", type=int, default=0, metavar="N", help="with --all: the N that ended last too"
    )
    p.add_argument("--json", action="store_true", help="each message as published, one a line")
    p.add_argument("--partials", action="store_true", help="print partials when not a terminal")
    p.add_argument("--no-wait", action="store_true", help="exit 1 for an unknown call id")
    p.set_defaults(func=cmd_tail)

    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"configuration: {problem}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
