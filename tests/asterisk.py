"""A real Asterisk for tests, in a scratch directory: ../shared/asterisk (beside the checkout,
see its README.md) or else `asterisk` on PATH. Its configuration files are written before it
starts; it runs in the foreground as a subprocess and is driven with `asterisk -rx`."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "asterisk"


def missing_reason() -> str | None:
    """Why no Asterisk can be run here, or None when one can."""
    if (SHARED / "start-scratch").exists() or shutil.which("asterisk"):
        return None
    return f"no Asterisk: neither {SHARED}/start-scratch nor `asterisk` on PATH"


class Asterisk:
    """One private Asterisk. The directory is short (under /tmp): its control socket's path
    must fit in a Unix socket address."""

    def __init__(self, configs: dict[str, str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ast"))
        (self.dir / "etc").mkdir()
        for name, text in configs.items():
            (self.dir / "etc" / name).write_text(text)
        self.proc: asyncio.subprocess.Process | None = None
        if not (SHARED / "start-scratch").exists():
            self._write_asterisk_conf()

    @property
    def log(self) -> str:
        path = self.dir / "var" / "log" / "messages.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _write_asterisk_conf(self) -> None:
        var = self.dir / "var"
        for sub in ("cache", "lib", "spool", "run", "log"):
            (var / sub).mkdir(parents=True, exist_ok=True)
        dirs = {"astetcdir": self.dir / "etc", "astvarlibdir": var / "lib"}
        dirs |= {"astdbdir": var / "lib", "astkeydir": var / "lib", "astspooldir": var / "spool"}
        dirs |= {"astrundir": var / "run", "astlogdir": var / "log", "astcachedir": var / "cache"}
        lines = ["[directories]", *(f"{k} => {v}" for k, v in dirs.items())]
        etc = self.dir / "etc"
        (etc / "asterisk.conf").write_text("\n".join([*lines, "[options]", "nofork = yes", ""]))
        if not (etc / "logger.conf").exists():
            (etc / "logger.conf").write_text(
                "[general]\n[logfiles]\nmessages.log => notice,warning,error,verbose\n"
            )

    def _command(self, *rx: str) -> list[str]:
        if (SHARED / "start-scratch").exists():
            return (
                [str(SHARED / "rx"), str(self.dir), *rx]
                if rx
                else [
                    str(SHARED / "start-scratch"),
                    str(self.dir),
                ]
            )
        conf = str(self.dir / "etc" / "asterisk.conf")
        return ["asterisk", "-C", conf, "-rx", *rx] if rx else ["asterisk", "-f", "-C", conf]

    async def start(self, within: float = 60.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self._command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"asterisk exited with {self.proc.returncode}")
            with contextlib.suppress(RuntimeError):
                await self.rx("core waitfullybooted")  # fails until the CLI socket is up
                return
            await asyncio.sleep(0.3)
        raise RuntimeError("asterisk did not start")

    async def rx(self, command: str) -> str:
        """One CLI command's output (RuntimeError when the CLI cannot reach Asterisk)."""
        proc = await asyncio.create_subprocess_exec(
            *self._command(command),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(out.decode(errors="replace"))
        return out.decode(errors="replace")

    async def stop(self, within: float = 30.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(RuntimeError):
            await self.rx("core stop now")
        try:
            await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
