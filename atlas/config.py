"""Typed pipeline configuration, loaded from YAML and validated once.

The schema mirrors ``config.yaml`` key for key. Unknown keys and bad values
raise :class:`~atlas.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from atlas.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SampleConfig(_Section):
    """The built-in ``sample`` dataset: seeded random resized crops of shipped photos."""

    crops_per_photo: int = Field(24, ge=1)
    min_scale: float = Field(0.08, gt=0, le=1)
    seed: int = 0


class ExtractConfig(_Section):
    """Activation capture."""

    extra_layers: list[str] = Field(default_factory=list)
    positions: Literal["all", "random", "center"] = "all"
    per_image: int = Field(48, ge=1)
    batch_size: int = Field(32, ge=1)
    shard_size: int = Field(64, ge=1)
    attribution: bool = True
    attribution_candidates: int = Field(3, ge=1, le=1000)
    attribution_top_k: int = Field(3, ge=1)
    seed: int = 0

    @field_validator("attribution_top_k")
    @classmethod
    def _top_k_within_candidates(cls, value: int, info: Any) -> int:
        candidates = info.data.get("attribution_candidates", value)
        if value > candidates:
            raise ValueError(
                f"attribution_top_k={value} exceeds attribution_candidates={candidates}; "
                "raise attribution_candidates or lower attribution_top_k"
            )
        return value


class ComputeConfig(_Section):
    """Cluster, workers and device of the jobs."""

    scheduler: str | None = None
    n_workers: int = Field(1, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    processes: bool | None = None
    memory_limit: str | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    dashboard: bool = True


class IndexConfig(_Section):
    """FAISS index over L2-normalised activations."""

    factory: str | None = None
    exact_below: int = Field(50_000, ge=1)
    pq_above: int = Field(5_000_000, ge=1)
    train_size: int = Field(100_000, ge=1)
    nprobe: int = Field(16, ge=1)
    seed: int = 0


class ProjectConfig(_Section):
    """UMAP layout of the activations."""

    n_neighbors: int = Field(50, ge=2)
    min_dist: float = Field(0.05, ge=0)
    metric: Literal["cosine", "euclidean"] = "cosine"
    fit_sample: int = Field(20_000, ge=10)
    place_neighbors: int = Field(10, ge=1)
    n_epochs: int | None = Field(None, ge=1)
    clip_percentile: float = Field(1.0, ge=0, lt=50)
    seed: int = 0


class GridConfig(_Section):
    """Multi-scale grids over the layout."""

    sizes: list[int] = Field(default_factory=lambda: [20, 40, 80])
    min_count: int = Field(8, ge=1)
    n_exemplars: int = Field(8, ge=1)
    top_classes: int = Field(5, ge=1)

    @field_validator("sizes")
    @classmethod
    def _positive_sizes(cls, value: list[int]) -> list[int]:
        if not value or any(size < 1 for size in value):
            raise ValueError(f"sizes must be a non-empty list of positive integers, got {value}")
        return sorted(set(value))


class RenderConfig(_Section):
    """Activation maximization of one icon per grid cell."""

    # Grid sizes to render. null picks sizes from the store's grids: the
    # coarsest always, then finer ones while the total of icons stays within
    # max_icons. A list renders exactly those sizes and ignores max_icons.
    grid_sizes: list[int] | None = None
    # Icon budget when grid_sizes is null. In two demo builds (the layout
    # varies) the 20 and 40 grids held 718 and 915 non-empty cells and the 80
    # grid 1,560 and 1,809 more, so 1,500 renders the first two only.
    max_icons: int = Field(1500, ge=1)
    # Icon side in pixels. The network input is size + 2 * pad, so the default
    # 64 gives EfficientNet-Lite0's blocks.4 (stride 16) a 4 x 4 map. Lucid's
    # `render_icons` defaults to 80 px and 128 steps. 64 px and 64 steps cost
    # roughly a third of that (measured per step on a CPU), which fits the
    # CPU demo's time budget.
    size: int = Field(64, ge=16)
    steps: int = Field(64, ge=1)
    lr: float = Field(0.05, gt=0)
    # Images optimized at once. Small batches are faster per image on a CPU;
    # raise it on a GPU.
    batch_size: int = Field(16, ge=1)
    cos_power: float = Field(3.0, ge=0)
    whiten: bool = True
    # Grey border added around the icon before the transforms. Lucid's recipe
    # crops back to the icon size, so the network sees no extra border.
    pad: int = Field(0, ge=0)
    # Maximum shift in whole pixels per step.
    jitter: int = Field(4, ge=0)
    # Range of the zoom factor drawn uniformly per step. Lucid's atlas recipe draws 0.998**n for n in 20..39.
    scale_range: tuple[float, float] = (0.925, 0.961)
    # Maximum rotation in degrees, drawn uniformly in [-rotation, rotation] per step.
    rotation: float = Field(10.0, ge=0, le=180)
    # Independent tries per icon. The one with the highest final objective is kept.
    attempts: int = Field(1, ge=1)
    # Maximum side length of the mosaic PNG in pixels. Icons are shrunk to fit.
    mosaic_max_px: int = Field(4096, ge=16)
    seed: int = 0

    @field_validator("grid_sizes")
    @classmethod
    def _positive_grid_sizes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(size < 1 for size in value)):
            raise ValueError(
                f"grid_sizes must be null (sizes chosen by max_icons) or a non-empty list of positive integers, got {value}"
            )
        return value

    @field_validator("scale_range")
    @classmethod
    def _ordered_scales(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {value}")
        return value


class ServeConfig(_Section):
    """The Bokeh explorer."""

    host: str = "127.0.0.1"
    port: int = Field(5006, ge=0, le=65535)
    allow_websocket_origin: list[str] = Field(default_factory=lambda: ["localhost:5006", "127.0.0.1:5006"])
    max_upload_mb: float = Field(10.0, gt=0)
    neighbors: int = Field(12, ge=1)
    # Longest side of the icon mosaic sent to the browser per zoom level; icons
    # are shrunk to fit (an 80 x 80 grid at 2048 px gets 25 px per cell).
    mosaic_max_px: int = Field(2048, ge=64)
    explanations: bool = True


FILE_SCHEME = "file://"


class AtlasConfig(_Section):
    """The whole pipeline configuration."""

    images: str = "sample"
    store: str = "stores/demo.zarr"
    model: str = "efficientnet_lite0"
    layer: str = "blocks.4"
    sample: SampleConfig = Field(default_factory=SampleConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    project: ProjectConfig = Field(default_factory=ProjectConfig)
    grid: GridConfig = Field(default_factory=GridConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @field_validator("store")
    @classmethod
    def _local_file_url(cls, value: str) -> str:
        # A file:// URL names a local folder: every stage, sidecar files included, then treats it as one.
        return value[len(FILE_SCHEME):] if value.startswith(FILE_SCHEME) else value

    def digest(self) -> str:
        """Return a short hash of the settings that change the extracted rows.

        Later stages (index, projection, grids, icons) are rebuilt with
        ``--force`` and do not enter the hash.
        """
        data = self.model_dump(include={"images", "model", "layer", "sample", "extract"})
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; check its spelling against config.yaml")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Return a one-line description of a YAML syntax error, without yaml's multi-line excerpt."""
    if not isinstance(error, yaml.MarkedYAMLError) or not error.problem:
        return " ".join(str(error).split())
    if not error.context:
        return error.problem
    start = error.context_mark
    if start is not None and error.problem_mark is not None and start.line != error.problem_mark.line:
        return f"{error.problem} ({error.context} from line {start.line + 1})"
    return f"{error.problem} ({error.context})"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"invalid override {item!r}: expected KEY=VALUE, e.g. grid.min_count=5")
    key, raw = item.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"invalid override {item!r}: the key is empty")
    if not raw.strip():
        return path, None
    try:
        return path, yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"invalid override {item!r}: the value {raw!r} is not valid YAML: {_yaml_problem(error)}; "
            "close every bracket and quote, e.g. render.grid_sizes=[20,40]"
        ) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    **fields: Any,
) -> AtlasConfig:
    """Load and validate a configuration.

    Parameters
    ----------
    path
        A YAML file; ``None`` uses the built-in defaults.
    overrides
        ``KEY=VALUE`` strings with dotted keys (``grid.sizes=[20,40]``); the
        value is parsed as YAML.
    **fields
        Top-level values that win over the file (``images``, ``store``,
        ``model``, ``layer``); ``None`` values are ignored.

    Raises
    ------
    ConfigError
        The file is missing or not YAML, or a key is unknown or invalid.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                "pass a YAML file such as config.yaml"
            ) from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(
                f"config file {path} is not valid YAML{where}: {_yaml_problem(error)}; "
                "fix the syntax there, e.g. close brackets and indent with spaces, not tabs"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(loaded).__name__}")
        data = loaded or {}

    if overrides:
        source = f"{source} with --set {' '.join(overrides)}"
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"invalid override {item!r}: {key} is not a section")
            node = child
        node[keys[-1]] = value

    for key, value in fields.items():
        if value is not None:
            data[key] = value

    try:
        return AtlasConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None
