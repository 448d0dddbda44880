"""``lorafleet model ...`` commands (the cheap paths; building is tested elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lorafleet.cli.model_cmd import model_group
from lorafleet.models import cache


def test_group_and_commands() -> None:
    assert model_group.name == "model"
    assert {"build-tiny", "path"} <= set(model_group.commands)


def test_build_tiny_refuses_non_empty_dir_without_force(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(model_group, ["build-tiny", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "--force" in result.output
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_path_prints_cached_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAFLEET_CACHE_DIR", str(tmp_path))
    built = cache.tiny_model_path()
    built.mkdir(parents=True)
    (built / cache.BUILD_INFO_FILE).write_text("{}")
    result = CliRunner().invoke(model_group, ["path"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(built)
