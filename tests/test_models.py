"""Model resolution: a directory, MODEL_DIR, the bundled packages (base joined once), the hub.

Joining base copies about 145 MB once per session, and one test loads the joined model and
transcribes a second of recorded speech: a few seconds in all.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from streamsrv.asr.models import BUNDLED, ModelNotFound, _package_dir, resolve_model


def bundled_dirs(name: str) -> list[Path]:
    bundle = BUNDLED[name]
    dirs = []
    for package in bundle.packages:
        root = _package_dir(package)
        assert root is not None, f"{package} is not installed"
        dirs.append(root / bundle.data_subdir)
    return dirs


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub attempt fails at once instead of reaching for the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    # read once at import: set the module's flag as well, in case it was imported already
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def joined_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, os.stat_result]:
    """(MODEL_DIR, the path resolve_model gave for base, model.bin's stat right after)."""
    model_dir = tmp_path_factory.mktemp("models-join")
    path = Path(resolve_model("base", model_dir))
    return model_dir, path, (path / "model.bin").stat()


def fake_model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model.bin").write_bytes(b"not really a model")
    (path / "config.json").write_text("{}")
    return path


def test_tiny_en_is_the_bundled_package_directory(tmp_path: Path) -> None:
    path = Path(resolve_model("tiny.en", tmp_path))
    assert path == bundled_dirs("tiny.en")[0]
    assert (path / "model.bin").is_file()
    assert (path / "config.json").is_file()
    assert list(tmp_path.iterdir()) == []  # nothing copied


def test_base_is_joined_into_model_dir(joined_base: tuple[Path, Path, os.stat_result]) -> None:
    model_dir, path, _ = joined_base
    assert path == model_dir / "base"
    part1_dir, part2_dir = bundled_dirs("base")
    part1, part2 = part1_dir / "model.bin.part1", part2_dir / "model.bin.part2"
    joined = path / "model.bin"
    assert joined.stat().st_size == part1.stat().st_size + part2.stat().st_size
    with open(joined, "rb") as out, open(part1, "rb") as a, open(part2, "rb") as b:
        assert out.read(4096) == a.read(4096)
        out.seek(part1.stat().st_size - 4096)
        a.seek(-4096, os.SEEK_END)
        assert out.read(8192) == a.read(4096) + b.read(4096)  # the seam
        out.seek(-4096, os.SEEK_END)
        b.seek(-4096, os.SEEK_END)
        assert out.read() == b.read()
    # the other files come from the first package, unchanged; no parts are copied
    for src in part1_dir.iterdir():
        if src.is_file() and not src.name.startswith("model.bin"):
            assert (path / src.name).read_bytes() == src.read_bytes()
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("model.bin")) == ["model.bin"]
    # the join went through a temporary directory that is gone
    assert sorted(p.name for p in model_dir.iterdir()) == ["base"]


def test_base_is_joined_only_once(joined_base: tuple[Path, Path, os.stat_result]) -> None:
    model_dir, path, first = joined_base
    again = Path(resolve_model("base", model_dir))
    assert again == path
    now = (path / "model.bin").stat()
    assert (now.st_ino, now.st_mtime_ns, now.st_size) == (
        first.st_ino,
        first.st_mtime_ns,
        first.st_size,
    )


def test_the_joined_base_model_transcribes(
    joined_base: tuple[Path, Path, os.stat_result],
) -> None:
    import soxr
    from faster_whisper import WhisperModel

    from streamsrv.corpus import read_prompt

    _, path, _ = joined_base
    pcm = np.frombuffer(read_prompt("agent-pass"), dtype="<i2").astype(np.float32) / 32768
    audio = soxr.resample(pcm, 8000, 16000).astype(np.float32)[:16000]  # the first second
    model = WhisperModel(str(path), device="cpu", compute_type="int8")
    segments, _ = model.transcribe(audio, language="en", beam_size=1)
    text = " ".join(s.text for s in segments).lower()
    # "Please enter your password followed by the pound key."
    assert "please enter" in text, text


def test_a_model_in_model_dir_comes_first(tmp_path: Path) -> None:
    local = fake_model(tmp_path / "base")
    before = (local / "model.bin").read_bytes()
    assert resolve_model("base", tmp_path) == str(local)
    assert (local / "model.bin").read_bytes() == before  # not replaced by a join
    other = fake_model(tmp_path / "my-finetune")
    assert resolve_model("my-finetune", tmp_path) == str(other)


def test_a_directory_path_is_used_directly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fake_model(tmp_path / "somewhere" / "custom")
    elsewhere = tmp_path / "models"
    assert resolve_model(str(model), elsewhere) == str(model)
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_model("./somewhere/custom", elsewhere)).resolve() == model
    assert not elsewhere.exists()


def test_a_directory_without_model_bin_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound) as info:
        resolve_model(str(broken), tmp_path / "models")
    assert str(broken) in str(info.value)
    assert "model.bin" in str(info.value)


def test_a_missing_directory_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"model\.bin"):
        resolve_model(str(tmp_path / "does-not-exist"), tmp_path)


@pytest.mark.usefixtures("offline_hub")
@pytest.mark.parametrize("name", ["small", "no-such-model"])
def test_a_missing_name_says_everything_that_was_tried(tmp_path: Path, name: str) -> None:
    model_dir = tmp_path / "models"
    with pytest.raises(ModelNotFound) as info:
        resolve_model(name, model_dir)
    message = str(info.value)
    assert repr(name) in message
    assert f"{model_dir / name} (MODEL_DIR)" in message
    assert "bundled" in message
    assert all(bundled in message for bundled in BUNDLED)
    assert "hub" in message
    assert not (model_dir / name).exists()


@pytest.mark.usefixtures("offline_hub")
def test_an_incomplete_model_dir_entry_is_not_used(tmp_path: Path) -> None:
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="MODEL_DIR"):
        resolve_model("small", tmp_path)
