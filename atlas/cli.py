"""The `atlas` command line: parses arguments, configures logging, calls `jobs` and `server`."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from atlas.config import AtlasConfig, load_config
from atlas.errors import AtlasError, ConfigError

logger = logging.getLogger("atlas")

STAGE_ORDER = ("extract", "index", "project", "grid", "render")


def _configure_logging(verbose: int, quiet: bool) -> None:
    if verbose < 2:
        # Dask sets its loggers' levels from its own config when distributed is
        # first imported, after this function runs; this variable reaches
        # worker processes too.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    level = logging.INFO
    if quiet:
        level = logging.WARNING
    elif verbose > 0:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Dask and Bokeh log every connection at INFO; keep their warnings only.
    for noisy in ("distributed", "bokeh", "tornado", "numba", "matplotlib", "PIL", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)


# Exit status after Ctrl-C: shells report a process killed by SIGINT (2) as 128 + 2.
EXIT_INTERRUPTED = 130


class AtlasGroup(click.Group):
    """Click group that turns the library's own errors into one-line messages and exit code 2.

    Ctrl-C prints click's "Aborted!" and exits with code 130, the shell convention for SIGINT.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AtlasError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo(err=True)
            click.echo("Aborted!", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=AtlasGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output: -v for DEBUG, -vv also shows Dask and Bokeh.")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only.")
@click.version_option(package_name="activation-atlas")
def main(verbose: int, quiet: bool) -> None:
    """Activation Atlas: build, browse and query atlases of what a CNN has learned."""
    _configure_logging(verbose, quiet)


def config_options(function: Callable) -> Callable:
    """Add the options every pipeline command shares."""
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML configuration file (default: built-in defaults, as in config.yaml)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. --set grid.sizes=[20,40]. Repeatable."),
        click.option("--images", help="Image source: `sample`, a folder, a glob or a .txt list of paths."),
        click.option("--store", help="Feature store path (a .zarr folder)."),
        click.option("--model", help="Model spec: efficientnet_lite0, timm:NAME, torchvision:NAME or file:PATH."),
        click.option("--layer", help="Layer module path, e.g. blocks.4."),
        click.option("--scheduler", help="Address of a running Dask scheduler, e.g. tcp://127.0.0.1:8786."),
        click.option("--force", is_flag=True, help="Redo stages that are already complete."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _load(config_path, overrides, images, store, model, layer, scheduler, positional_store=None) -> AtlasConfig:
    overrides = list(overrides)
    if scheduler:
        overrides.append(f"compute.scheduler={scheduler}")
    if model and not layer:
        from atlas.models import default_layer

        layer = default_layer(model)
    return load_config(config_path, overrides, images=images, store=store or positional_store, model=model, layer=layer)


def run_stage(stage: str, config: AtlasConfig, force: bool) -> dict:
    """Run one pipeline stage through the library call that implements it."""
    started = time.perf_counter()
    if stage == "extract":
        from jobs.extract import run_extract

        result = run_extract(config, force=force)
    elif stage == "index":
        from atlas.index import build_index

        result = build_index(config.store, config.index, layer=config.layer, force=force)
    elif stage == "project":
        from atlas.project import run_project

        result = run_project(config.store, config.project, layer=config.layer, force=force)
    elif stage == "grid":
        from atlas.grid import run_grid

        result = run_grid(config.store, config.grid, layer=config.layer, force=force)
    elif stage == "render":
        from atlas.render import run_render

        result = run_render(config.store, config.render, layer=config.layer, force=force)
    else:
        raise click.UsageError(f"unknown stage {stage!r}; stages are {', '.join(STAGE_ORDER)}")
    logger.info("%s finished in %.1f s", stage, time.perf_counter() - started)
    return result


def _stage_command(stage: str, summary: str) -> click.Command:
    @click.argument("positional_store", metavar="[STORE]", required=False)
    @config_options
    def command(positional_store, config_path, overrides, images, store, model, layer, scheduler, force):
        config = _load(config_path, overrides, images, store, model, layer, scheduler, positional_store)
        run_stage(stage, config, force)

    command.__doc__ = summary
    return click.command(name=stage, help=summary)(command)


main.add_command(_stage_command("extract", "Extract sampled activations of every image into the feature store."))
main.add_command(_stage_command("index", "Build the FAISS index over the store's activations."))
main.add_command(_stage_command("project", "Lay the activations out in 2-D with UMAP."))
main.add_command(_stage_command("grid", "Aggregate the layout into multi-scale grids of cells."))
main.add_command(_stage_command("render", "Render one feature-visualization icon per non-empty grid cell."))


@main.command()
@config_options
def build(config_path, overrides, images, store, model, layer, scheduler, force):
    """Run every stage: extract, index, project, grid, render."""
    from atlas.store import is_store_url

    config = _load(config_path, overrides, images, store, model, layer, scheduler)
    if is_store_url(config.store):
        # Checked before extraction, which would otherwise run in full first.
        raise ConfigError(
            f"atlas build needs a local store folder, got {config.store}: the index, layout and mosaics are "
            "files beside the store. Run `atlas extract --store URL` alone, or build into a local folder"
        )
    timings = {}
    for stage in STAGE_ORDER:
        started = time.perf_counter()
        run_stage(stage, config, force)
        timings[stage] = time.perf_counter() - started
    logger.info("build finished: %s", ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
    click.echo(f"atlas built in {config.store} ({sum(timings.values()):.0f} s)")


@main.command()
@config_options
@click.option("--no-serve", is_flag=True, help="Build the atlas, then exit instead of serving it.")
@click.option("--port", type=int, help="Port of the explorer (default from serve.port, 5006).")
def demo(config_path, overrides, images, store, model, layer, scheduler, force, no_serve, port):
    """Build the sample atlas of real photos into stores/demo.zarr and serve it."""
    config = _load(config_path, overrides, images, store, model, layer, scheduler)
    for stage in STAGE_ORDER:
        run_stage(stage, config, force)
    click.echo(f"demo atlas ready in {config.store}")
    if not no_serve:
        _serve([config.store], config, port=port, host=None, show=False)


def _serve(stores: list[str], config: AtlasConfig, *, port: int | None, host: str | None, show: bool) -> None:
    from server.serve import serve

    serve_config = config.serve
    if port is not None:
        serve_config = serve_config.model_copy(update={"port": port})
    if host is not None:
        serve_config = serve_config.model_copy(update={"host": host})
    serve(stores, serve_config, show=show)


@main.command()
@click.argument("stores", nargs=-1, metavar="[STORE]...")
@click.option("--store", "store_options", multiple=True, metavar="PATH",
              help="Feature store to serve (a .zarr folder), like a STORE argument. Repeatable.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML configuration file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. --set serve.max_upload_mb=5.")
@click.option("--host", help="Interface to bind (default 127.0.0.1; 0.0.0.0 exposes the explorer to the network).")
@click.option("--port", type=int, help="Port to listen on (default 5006).")
@click.option("--show", is_flag=True, help="Open the explorer in a browser.")
def serve(stores, store_options, config_path, overrides, host, port, show):
    """Serve the atlas explorer for one or more stores.

    Stores given as STORE arguments come first in the explorer's store list,
    then those given with --store.
    """
    from atlas.store import open_store

    paths = unique_stores([*stores, *store_options])
    if not paths:
        raise click.UsageError("no store given; pass one or more stores as `atlas serve STORE...` or `atlas serve --store STORE`")
    for path in paths:
        open_store(path)
    config = load_config(config_path, list(overrides))
    _serve(paths, config, port=port, host=host, show=show)


def unique_stores(paths: list[str]) -> list[str]:
    """Drop stores named more than once, keeping the first spelling and the order.

    Local paths are compared after resolving them, URLs as text.
    """
    from atlas.store import is_store_url, local_store_path

    seen = set()
    unique = []
    for path in paths:
        key = path if is_store_url(path) else str(Path(local_store_path(path)).resolve())
        if key in seen:
            logger.info("store %s is given more than once; serving it once", path)
            continue
        seen.add(key)
        unique.append(path)
    return unique


@main.command()
@click.argument("store")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--k", "k", type=click.IntRange(1, 1000), default=10, show_default=True, help="Neighbours per position.")
@click.option("--layer", help="Layer to search (default: the store's first layer).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
def query(store, image, k, layer, as_json):
    """Find the dataset activations nearest to IMAGE's activations."""
    from atlas.errors import ImageDecodeError
    from atlas.images import decode_image
    from atlas.query import query_image

    try:
        decoded = decode_image(image)
    except ImageDecodeError as error:
        raise ImageDecodeError(
            f"cannot decode image {image}: {error}; pass an image file that Pillow can read (JPEG, PNG, ...)"
        ) from error
    result = query_image(store, decoded, k=k, layer=layer)
    data = result.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(format_query(data, k))


def format_query(data: dict, k: int) -> str:
    """Format a query result as text: the best matches, then the most-hit cells and images."""
    lines = []
    matches = data.get("top_matches") or []
    lines.append(f"nearest activations (best {min(k, len(matches))} of all positions):")
    lines.append(f"  {'score':>6}  {'y':>3} {'x':>3}  {'cell':>12}  image")
    for match in matches[:k]:
        cells = match.get("cells", {})
        first = next(iter(cells.items()), None)
        cell = f"{first[0]}:{tuple(first[1])}" if first else "-"
        lines.append(f"  {match['score']:6.3f}  {match['y']:>3} {match['x']:>3}  {cell:>12}  {match['path']}")
    for size, cells in (data.get("summary", {}).get("cells") or {}).items():
        top = ", ".join(f"({cell['i']},{cell['j']})x{cell['count']}" for cell in cells[:5])
        lines.append(f"most-hit cells at grid {size}: {top}")
    images = data.get("summary", {}).get("images") or []
    if images:
        lines.append("most-hit images: " + ", ".join(f"{item['path']} ({item['count']})" for item in images[:5]))
    return "\n".join(lines)


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(store, as_json):
    """Describe STORE: model, layers, counts, rejected images, index, grids and stages."""
    from atlas.inspect import store_info

    data = store_info(store)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(format_info(data))


def partial_extract(data: dict) -> str | None:
    """Describe an extraction that has not finished, from :func:`atlas.inspect.store_info` output; None otherwise."""
    if data["stages"].get("extract"):
        return None
    return (f"extract partial: {data['n_shards_done']} of {data['n_shards']} shards; "
            "run the same `atlas extract` again to resume")


def format_extract(data: dict) -> str | None:
    """Describe a finished extraction's time and workers' peak memory, from :func:`atlas.inspect.store_info` output.

    Returns None before the extraction finishes.
    """
    seconds = data.get("extract_seconds")
    if not data["stages"].get("extract") or seconds is None:
        return None
    text = f"{data['n_images']:,} images in {seconds:,.0f} s"
    peaks = data.get("worker_peak_memory_mib") or {}
    if peaks:
        text += f", worker peak memory {max(peaks.values()):,.0f} MiB"
        if len(peaks) > 1:
            text += f" (largest of {len(peaks)} workers)"
    return text


def format_info(data: dict) -> str:
    """Format :func:`atlas.inspect.store_info` output as text."""
    lines = [
        f"store          {data['store']}",
        f"model          {data['model']}",
        f"images         {data['n_images']} ({data['n_ok']} ok, {data['n_rejected']} rejected, {data['n_pending']} pending)",
        f"activations    {data['n_activations']} ({data['rows_per_image']} per image, positions: {data['positions']}; "
        f"{data['n_nonfinite_rows']} NaN/inf rows excluded)",
    ]
    for layer, layer_info in data["layers"].items():
        lines.append(f"layer {layer}: dim {layer_info['dim']}, index {layer_info['index_type'] or 'not built'}, "
                     f"{'projected' if layer_info['projected'] else 'not projected'}")
        for size, grid in layer_info["grids"].items():
            lines.append(f"  grid {size}x{size}: {grid['n_nonempty']} non-empty cells, {grid['n_icons']} icons")
    extract = format_extract(data)
    if extract:
        lines.append(f"extract        {extract}")
    stages = data["stages"]
    lines.append("stages         " + (", ".join(f"{key} {'done' if done else 'incomplete'}" for key, done in stages.items()) or "none"))
    partial = partial_extract(data)
    if partial:
        lines.append(f"               {partial}")
    if data["rejected"]:
        lines.append("rejected images:")
        lines.extend(f"  {item['path']}: {item['reason']}" for item in data["rejected"])
    return "\n".join(lines)


@main.command(name="ls")
@click.argument("root", default=".")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_command(root, as_json):
    """List the feature stores under ROOT with model, layers, counts and stage status.

    A store that cannot be read is listed as "PATH  unreadable: REASON".
    """
    from atlas.inspect import list_stores

    stores = list_stores(root)
    if as_json:
        click.echo(json.dumps(stores, indent=2))
        return
    if not stores:
        click.echo(f"no stores under {Path(root)}")
    for item in stores:
        if "error" in item:
            click.echo(f"{item['store']}  unreadable: {item['error']}")
            continue
        done = [key for key, value in item["stages"].items() if value]
        partial = partial_extract(item)
        click.echo(f"{item['store']}  {item['model']}  layers={','.join(item['layers'])}  "
                   f"images={item['n_images']}  activations={item['n_activations']}  done={','.join(done) or '-'}"
                   + (f"  ({partial})" if partial else ""))


try:
    from atlas.cli_explain import explain as _explain_command

    main.add_command(_explain_command)
except ImportError as _error:  # the explain module is optional at import time
    logger.debug("atlas explain unavailable: %s", _error)


if __name__ == "__main__":
    main()
