from __future__ import annotations

from pathlib import Path

import pytest

from atlas.config import AtlasConfig, load_config
from atlas.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_config_yaml_matches_defaults():
    assert load_config(REPO / "config.yaml") == AtlasConfig()


def test_config_yaml_every_key_commented():
    lines = (REPO / "config.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        has_inline = "#" in line
        previous = lines[number - 1].strip() if number else ""
        assert has_inline or previous.startswith("#"), f"config.yaml line {number + 1} has no comment: {line!r}"


def test_unknown_key_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grid:\n  sizez: [20]\n")
    with pytest.raises(ConfigError, match=r"grid\.sizez: unknown key"):
        load_config(path)


def test_bad_value_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("project:\n  n_neighbors: 1\n")
    with pytest.raises(ConfigError, match=r"project\.n_neighbors"):
        load_config(path)


def test_override_parsed_as_yaml():
    config = load_config(overrides=["grid.sizes=[40, 20]", "render.steps=12"])
    assert config.grid.sizes == [20, 40]
    assert config.render.steps == 12


def test_override_without_equals():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(overrides=["grid.sizes"])


def test_fields_win_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("store: a.zarr\nlayer: blocks.3\n")
    config = load_config(path, store="b.zarr", layer=None)
    assert config.store == "b.zarr"
    assert config.layer == "blocks.3"


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_top_k_above_candidates():
    with pytest.raises(ConfigError, match="attribution_top_k"):
        load_config(overrides=["extract.attribution_candidates=2", "extract.attribution_top_k=3"])


def test_bad_override_named_as_source():
    with pytest.raises(ConfigError, match=r"in defaults with --set render\.steps=-5:") as caught:
        load_config(overrides=["render.steps=-5"])
    assert "render.steps" in str(caught.value).splitlines()[1]


def test_override_invalid_yaml_named():
    with pytest.raises(ConfigError, match=r"invalid override 'render\.grid_sizes=\[10': the value '\[10' is not valid YAML") as caught:
        load_config(overrides=["render.grid_sizes=[10"])
    message = str(caught.value)
    assert "\n" not in message
    assert "close every bracket" in message


def test_invalid_yaml_file_names_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grid:\n  sizes: [20, 40\nrender:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=rf"config file {path} is not valid YAML at line 3, column 7") as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert "from line 2" in message


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfegrid: 1\n")
    with pytest.raises(ConfigError, match=rf"config file {path} is not UTF-8 text"):
        load_config(path)
