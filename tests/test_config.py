"""Settings, the env-file parser and `streamsrv check-config`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from streamsrv.cli import main
from streamsrv.config import ConfigError, Settings, known_variables, read_env_file

ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = ROOT / "configs" / "streamsrv.env"

BAD_VALUES = {"AUDIOSOCKET_PORT": "abc", "BATCH_SIZE": "0", "LANGUAGE": "english"}


def problems_of(values: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping(values)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def named(problems: list[str]) -> set[str]:
    """The variable each problem names (its text up to the first colon)."""
    return {p.split(":", 1)[0] for p in problems}


def write(tmp_path: Path, text: str, name: str = "test.env") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the shipped env file and the defaults ---------------------------------------------------


def test_env_file_lists_exactly_the_settings_variables() -> None:
    values = read_env_file(ENV_FILE)
    assert sorted(set(values) - known_variables()) == [], "in the file, not in Settings"
    assert sorted(known_variables() - set(values)) == [], "in Settings, not in the file"


def test_env_file_names_each_variable_once() -> None:
    keys = [
        line.split("=", 1)[0].strip()
        for line in ENV_FILE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert sorted(k for k in set(keys) if keys.count(k) > 1) == []


def test_env_file_values_are_the_defaults() -> None:
    values = read_env_file(ENV_FILE)
    mismatched = []
    for f in dataclasses.fields(Settings):
        env = f.metadata["env"]
        if env not in values:
            mismatched.append(f"{env}: not in the file")
            continue
        parsed = f.metadata["parse"](values[env])
        if parsed != f.default or type(parsed) is not type(f.default):
            mismatched.append(f"{env}: file {values[env]!r} -> {parsed!r}, default {f.default!r}")
    assert mismatched == []
    assert Settings.from_mapping(values) == Settings()


def test_every_field_names_a_distinct_variable() -> None:
    envs = [f.metadata["env"] for f in dataclasses.fields(Settings)]
    assert len(envs) == len(set(envs))
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", e) for e in envs)


# -- values and problems ---------------------------------------------------------------------


def test_values_are_parsed_to_their_types() -> None:
    s = Settings.from_mapping(
        {
            "AUDIOSOCKET_PORT": "9100",
            "ADAPTIVE_BATCHING": "no",
            "CONDITION_ON_PREVIOUS_TEXT": "Yes",
            "STREAMING_INTERVAL": "0.25",
            "MODEL_DIR": "/var/lib/streamsrv/models",
            "REALTIME_WHISPER_MODEL": "  ",
            "POSTCALL_WHISPER_MODEL": "small",
            "WHISPER_DEVICE": "cpu",
            "NOT_A_SETTING": "ignored",
        }
    )
    assert s.audiosocket_port == 9100
    assert s.adaptive_batching is False
    assert s.condition_on_previous_text is True
    assert s.streaming_interval == 0.25
    assert s.model_dir == Path("/var/lib/streamsrv/models")
    assert s.realtime_whisper_model is None
    assert s.postcall_whisper_model == "small"
    assert s.whisper_device == "cpu"


def test_parse_errors_are_all_reported_with_their_names() -> None:
    problems = problems_of(
        {
            "AUDIOSOCKET_PORT": "abc",
            "HTTP_PORT": "",
            "ADAPTIVE_BATCHING": "maybe",
            "WHISPER_DEVICE": "tpu",
            "VAD_THRESHOLD": "half",
        }
    )
    assert named(problems) == {
        "AUDIOSOCKET_PORT",
        "HTTP_PORT",
        "ADAPTIVE_BATCHING",
        "WHISPER_DEVICE",
        "VAD_THRESHOLD",
    }
    assert len(problems) == 5


def test_range_problems_are_all_reported_with_their_names() -> None:
    problems = problems_of(
        {
            "AUDIOSOCKET_PORT": "70000",
            "BATCH_SIZE": "0",
            "LANGUAGE": "english",
            "VAD_THRESHOLD": "1.5",
            "MAX_SEGMENT_SECONDS": "40",
            "REDIS_URL": "http://localhost",
        }
    )
    assert named(problems) == {
        "AUDIOSOCKET_PORT",
        "BATCH_SIZE",
        "LANGUAGE",
        "VAD_THRESHOLD",
        "MAX_SEGMENT_SECONDS",
        "REDIS_URL",
    }


def test_parse_and_range_problems_are_reported_together() -> None:
    assert named(problems_of(BAD_VALUES)) == set(BAD_VALUES)


def test_min_batch_size_above_max_is_a_problem() -> None:
    problems = problems_of({"MIN_BATCH_SIZE": "9", "MAX_BATCH_SIZE": "8"})
    assert problems == ["MIN_BATCH_SIZE: must not exceed MAX_BATCH_SIZE"]
    assert Settings.from_mapping({"MIN_BATCH_SIZE": "8", "MAX_BATCH_SIZE": "8"}).min_batch_size == 8


def test_soft_segment_is_off_at_zero_and_may_lie_past_max_segment() -> None:
    assert problems_of({"SOFT_SEGMENT_SECONDS": "0.5"}) == [
        "SOFT_SEGMENT_SECONDS: 0 (off) or at least 1 (past MAX_SEGMENT_SECONDS it never acts)"
    ]
    assert Settings.from_mapping({"SOFT_SEGMENT_SECONDS": "0"}).soft_segment_seconds == 0
    assert Settings.from_mapping({"MAX_SEGMENT_SECONDS": "5"}).soft_segment_seconds == 6


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="BATCH_SIZE"):
        Settings(batch_size=0)
    with pytest.raises(ConfigError, match="MIN_BATCH_SIZE"):
        Settings().replace(min_batch_size=20)


@pytest.mark.parametrize("language", ["auto", "en", "sw", "haw"])
def test_language_codes_are_accepted(language: str) -> None:
    assert Settings.from_mapping({"LANGUAGE": language}).language == language


def test_load_lets_the_environment_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "BATCH_SIZE=6\nHTTP_PORT=9000\n")
    s = Settings.load(path, environ={"HTTP_PORT": "9001", "UNRELATED": "x"})
    assert (s.batch_size, s.http_port) == (6, 9001)
    assert Settings.load(None, environ={}) == Settings()


# -- read_env_file ---------------------------------------------------------------------------


def test_read_env_file_syntax(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "\n".join(
            [
                "# a comment",
                "; another comment",
                "",
                "   ",
                "PLAIN=value",
                "  INDENTED = spaced  ",
                'DOUBLE="quoted value"',
                "SINGLE='quoted value'",
                "export EXPORTED=yes",
                "BLANK=",
                'EMPTY_QUOTES=""',
                "URL=postgresql://u:p@h/db?sslmode=require",
                "HASH=abc#def",
                "ONE_QUOTE='",
            ]
        ),
    )
    assert read_env_file(path) == {
        "PLAIN": "value",
        "INDENTED": "spaced",
        "DOUBLE": "quoted value",
        "SINGLE": "quoted value",
        "EXPORTED": "yes",
        "BLANK": "",
        "EMPTY_QUOTES": "",
        "URL": "postgresql://u:p@h/db?sslmode=require",
        "HASH": "abc#def",
        "ONE_QUOTE": "'",
    }


def test_a_later_line_overrides_an_earlier_one(tmp_path: Path) -> None:
    assert read_env_file(write(tmp_path, "A=1\nA=2\n")) == {"A": "2"}


def test_read_env_file_reports_every_malformed_line(tmp_path: Path) -> None:
    path = write(tmp_path, "GOOD=1\nJUST_A_WORD\n=value\nBAD-KEY=1\nTWO WORDS=1\nALSO_GOOD=2\n")
    with pytest.raises(ConfigError) as info:
        read_env_file(path)
    lines = [re.search(r":(\d+): ", p) for p in info.value.problems]
    assert [int(m.group(1)) for m in lines if m] == [2, 3, 4, 5]
    assert all(str(path) in p for p in info.value.problems)


# -- streamsrv check-config ------------------------------------------------------------------


def test_check_config_accepts_the_shipped_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(ENV_FILE)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{ENV_FILE}: ok"
    assert err == ""


def test_check_config_defaults_to_the_shipped_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["check-config"]) == 0
    assert "ok" in capsys.readouterr().out


def test_check_config_ignores_the_process_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCH_SIZE", "0")
    assert main(["check-config", str(ENV_FILE)]) == 0


def test_check_config_lists_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "BATCH_SIZE=0\nLANGUAGE=english\nMIN_BATCH_SIZE=9\nMAX_BATCH_SIZE=4\n")
    assert main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "ok" not in out
    lines = err.strip().splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert named([line.removeprefix(f"{path}: ") for line in lines]) == {
        "BATCH_SIZE",
        "LANGUAGE",
        "MIN_BATCH_SIZE",
    }


def test_check_config_reports_parse_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "AUDIOSOCKET_PORT=abc\nADAPTIVE_BATCHING=perhaps\n")
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "AUDIOSOCKET_PORT" in err
    assert "ADAPTIVE_BATCHING" in err


def test_check_config_reports_parse_and_range_problems_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "".join(f"{k}={v}\n" for k, v in BAD_VALUES.items()))
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert all(name in err for name in BAD_VALUES)


def test_check_config_reports_malformed_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "BATCH_SIZE=4\nthis is not a setting\n")
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert ":2:" in err
    assert "this is not a setting" in err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.env"
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "no such file" in err
    assert str(path) in err


def test_check_config_warns_about_unknown_variables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "BATCH_SIZE=4\nBATCHSIZE=5\nredis_url=redis://x\n")
    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"{path}: ok" in out
    assert f"{path}: BATCHSIZE: unknown variable" in err
    assert f"{path}: redis_url: unknown variable" in err
    assert "BATCH_SIZE:" not in err
