"""The extraction job: list images, create or resume the store, run shards on Dask."""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from distributed import as_completed
from tqdm.auto import tqdm

import atlas
from atlas.config import AtlasConfig
from atlas.datasets import fingerprint, is_network_failure, is_url, list_items, stat_fingerprint
from atlas.errors import AtlasError, ConfigError, StoreError
from atlas.extract import ExtractSettings, describe_model, peak_memory_mib, process_shard, rows_per_image
from atlas.store import (
    clear_stage,
    create_store,
    is_store_url,
    mark_stage,
    open_store,
    read_strings,
    stage_done,
    store_exists,
)
from jobs.cluster import dask_client, torch_threads_per_task
from jobs.lock import store_lock

logger = logging.getLogger(__name__)


def _layers(config: AtlasConfig) -> list[str]:
    layers = [config.layer, *[name for name in config.extract.extra_layers if name != config.layer]]
    return layers


def _settings(config: AtlasConfig, store: str, layer_shapes: dict[str, list[int]]) -> ExtractSettings:
    return ExtractSettings(
        store=store,
        model=config.model,
        layers=_layers(config),
        positions=config.extract.positions,
        per_image=config.extract.per_image,
        seed=config.extract.seed,
        batch_size=config.extract.batch_size,
        shard_size=config.extract.shard_size,
        attribution=config.extract.attribution,
        attribution_candidates=config.extract.attribution_candidates,
        attribution_top_k=config.extract.attribution_top_k,
        sample_seed=config.sample.seed,
        sample_min_scale=config.sample.min_scale,
        device=config.compute.device,
        torch_threads=torch_threads_per_task(config.compute),
        layer_shapes=layer_shapes,
    )


# Settings that may change between an interrupted run and its resumption: they do
# not change which rows a shard contains (the batch size may change the last bits).
RESUMABLE_CHANGES = frozenset({"extract.batch_size"})


def _setting_changes(stored: dict, current: dict) -> dict[str, tuple]:
    """Return the extraction settings that differ, as key to ``(stored value, current value)``.

    ``images`` is left out: the image list is compared by its fingerprint.
    """
    changes = {}
    for section in ("model", "layer", "sample", "extract"):
        old, new = stored.get(section), current.get(section)
        pairs = (
            {f"{section}.{key}": (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))}
            if isinstance(old, dict) and isinstance(new, dict)
            else {section: (old, new)}
        )
        changes.update({key: values for key, values in pairs.items() if values[0] != values[1]})
    return changes


def _check_same_job(group, store: str, config: AtlasConfig, items: list[str]) -> None:
    """Raise ConfigError unless ``group`` was extracted with these settings and this image list.

    Changes in RESUMABLE_CHANGES are allowed and logged.
    """
    stored = group.attrs.get("config")
    difference = None
    if isinstance(stored, dict):
        changes = _setting_changes(stored, config.model_dump(mode="json"))
        blocking = [f"{key}: {before!r} then, {after!r} now" for key, (before, after) in changes.items()
                    if key not in RESUMABLE_CHANGES]
        if blocking:
            difference = f"other extraction settings ({'; '.join(blocking)})"
        else:
            for key, (before, after) in changes.items():
                logger.info("extract: %s changed from %r to %r; the shards still to run use the new value", key, before, after)
    elif group.attrs.get("config_digest") != config.digest():
        difference = "another extraction configuration"
    if difference is None and group.attrs.get("dataset_fingerprint") != fingerprint(items):
        difference = f"another image list ({int(group.attrs.get('n_images', 0)):,} images then, {len(items):,} now)"
    stored_stats = group.attrs.get("dataset_stat_fingerprint")
    if difference is None and stored_stats is not None and stored_stats != stat_fingerprint(items):
        difference = "the same image list, but some files have changed since (size or modification time)"
    if difference is None:
        return
    raise ConfigError(
        f"store {store} was extracted with {difference}; pass --force to overwrite it, or choose another --store"
    )


def _existing_store(store: str, force: bool):
    """Open the store of an earlier run to resume it, or return None when a new one is to be created."""
    if force or not store_exists(store):
        return None
    try:
        return open_store(store, mode="r")
    except StoreError:
        return None


def _prepare_store(
    config: AtlasConfig, store: str, items: list[str], existing, describe: Callable[[], dict]
) -> dict[str, list[int]]:
    """Return the layer shapes of ``existing`` (an already checked store), or create the store and return them.

    ``describe`` returns the model's layer shapes, preprocessing and class
    names (see :func:`atlas.extract.describe_model`); it is called only when a
    new store is created.
    """
    if existing is not None:
        return dict(existing.attrs["layer_shapes"])

    digest = config.digest()
    data_print = fingerprint(items)
    model = describe()
    shapes = model["layer_shapes"]
    _, height, width = shapes[_layers(config)[0]]
    per_row = rows_per_image(config.extract.positions, config.extract.per_image, height, width)
    create_store(
        store,
        attrs={
            "model": config.model,
            "layer_shapes": shapes,
            "preprocessing": model["preprocessing"],
            "class_names": model["class_names"],
            "positions": config.extract.positions,
            "per_image": config.extract.per_image,
            "attribution": config.extract.attribution,
            "seed": config.extract.seed,
            "config_digest": digest,
            "config": config.model_dump(mode="json"),
            "images_source": config.images,
            "dataset_fingerprint": data_print,
            "dataset_stat_fingerprint": stat_fingerprint(items),
            "package_version": atlas.__version__,
        },
        n_images=len(items),
        rows_per_image=per_row,
        layer_channels={name: shape[0] for name, shape in shapes.items()},
        shard_size=config.extract.shard_size,
        attribution_top_k=config.extract.attribution_top_k,
    )
    group = open_store(store, mode="r+")
    group["images/path"][:] = np.array(items, dtype=str)
    group["images/status"][:] = np.array(["pending"] * len(items), dtype=str)
    logger.info(
        "created store %s: %d images, %d rows per image, layers %s", store, len(items), per_row, shapes
    )
    return shapes


PROGRESS_LOG_SECONDS = 30.0


class ProgressLog:
    """Log an extraction's progress at INFO: images done, images/s and time left, at most every ``interval`` s."""

    def __init__(self, total: int, interval: float = PROGRESS_LOG_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.last_logged = self.started
        self.done = 0

    def update(self, n_images: int) -> None:
        """Count ``n_images`` more images, and log when ``interval`` has passed since the last line.

        Nothing is logged for the last images: the job's summary line follows.
        """
        self.done += n_images
        now = self.clock()
        if now - self.last_logged < self.interval or self.done >= self.total:
            return
        self.last_logged = now
        rate = self.done / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        logger.info(
            "extract: %s of %s images (%.0f %%), %.1f images/s, about %s left",
            f"{self.done:,}", f"{self.total:,}", 100 * self.done / max(self.total, 1), rate, _duration(left),
        )


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown time"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _returning_atlas_error(function: Callable, *args, **kwargs):
    """Call ``function`` on a worker; return its result, or the AtlasError it raised.

    Dask logs every exception that leaves a task as "Compute Failed" with a
    traceback. An AtlasError is a user error whose message gives the fix, so
    it comes back as a value and the driver raises it (``_raise_atlas_error``).
    """
    try:
        return function(*args, **kwargs)
    except AtlasError as error:
        return error


def _raise_atlas_error(result):
    """Return ``result``, or raise it when a worker returned an AtlasError."""
    if isinstance(result, AtlasError):
        raise result
    return result


def _network_failed_shards(group) -> list[int]:
    """Return the shards with an image rejected for a network reason (a timeout or a refused connection)."""
    status = read_strings(group["images/status"])
    rows = np.flatnonzero([is_network_failure(reason) for reason in status])
    return sorted({int(row) // int(group.attrs["shard_size"]) for row in rows})


def _duplicate_reasons(items: list[str]) -> dict[int, str]:
    first_seen: dict[str, int] = {}
    reasons = {}
    for row, item in enumerate(items):
        # Local paths compare after resolving links; sample items and URLs compare as text.
        key = item if item.startswith("sample:") or is_url(item) else str(Path(item).resolve())
        if key in first_seen:
            reasons[row] = f"duplicate path: same file as image row {first_seen[key]}"
        else:
            first_seen[key] = row
    return reasons


def run_extract(config: AtlasConfig, force: bool = False, progress: bool | None = None) -> dict:
    """Extract activations for every image of ``config.images`` into ``config.store``.

    Completed shards of an earlier, interrupted run of the same configuration
    are kept; a completed store is left as it is unless ``force``.

    Returns
    -------
    dict
        Counts and timings: n_images, n_ok, n_rejected, n_nonfinite_rows, seconds, images_per_second,
        and worker_peak_memory_mib (peak resident memory of each worker process).
    """
    store = config.store if is_store_url(config.store) else str(Path(config.store).resolve())
    items = list_items(config.images, config.sample.crops_per_photo)
    logger.info("extract: %d images from %s", len(items), config.images)
    existing = _existing_store(store, force)
    if existing is not None:
        _check_same_job(existing, store, config, items)
        if stage_done(existing, "extract") and not _network_failed_shards(existing):
            logger.info("extract: %s is already complete; pass --force to redo it", store)
            return dict(existing.attrs["stages"]["extract"])
    start = time.perf_counter()
    duplicates = _duplicate_reasons(items)
    show = sys.stderr.isatty() if progress is None else progress

    with dask_client(config.compute) as client:
        # The model is loaded on a worker, which keeps it for the shards, never in this process.
        def describe() -> dict:
            return _raise_atlas_error(
                client.submit(
                    _returning_atlas_error, describe_model, config.model, _layers(config), config.compute.device, pure=False
                ).result()
            )

        shapes = _prepare_store(config, store, items, existing, describe)
        settings = _settings(config, store, shapes)
        with store_lock(store, "extract"):
            group = open_store(store, mode="r+")
            clear_stage(group, "extract")
            # A timeout or a refused connection may pass, so those images are tried again.
            retried = [] if force else _network_failed_shards(group)
            if retried:
                logger.info("extract: running %d shards again for images rejected for a network reason", len(retried))
            for shard in retried:
                # The shard runs again as a whole; its other rows come out the same.
                group["extract/shard_done"][shard] = False
            done = np.asarray(group["extract/shard_done"][:])
            todo = [int(shard) for shard in np.flatnonzero(~done)]
            logger.info("extract: %d of %d shards to run", len(todo), len(done))
            futures = [
                client.submit(
                    _returning_atlas_error,
                    process_shard,
                    shard,
                    settings,
                    rejected={
                        row - shard * settings.shard_size: reason
                        for row, reason in duplicates.items()
                        if row // settings.shard_size == shard
                    },
                    key=f"extract-shard-{shard}-{config.digest()}",
                    pure=False,
                )
                for shard in todo
            ]
            n_todo_images = sum(min(settings.shard_size, len(items) - shard * settings.shard_size) for shard in todo)
            bar = tqdm(total=len(items), unit="img", disable=not show, desc="extract")
            bar.update(len(items) - n_todo_images)
            # Without a terminal for the bar, progress goes to the log at most every PROGRESS_LOG_SECONDS.
            progress_log = None if show else ProgressLog(n_todo_images)
            try:
                for future in as_completed(futures):
                    result = _raise_atlas_error(future.result())
                    bar.update(result.n_images)
                    logger.debug("shard %d: %d ok, %d rejected in %.1f s", result.shard, result.n_ok, result.n_rejected, result.seconds)
                    if progress_log is not None:
                        progress_log.update(result.n_images)
            except KeyboardInterrupt:
                bar.close()
                _interrupted(group, store)
                raise
            bar.close()
            peaks = client.run(peak_memory_mib)
            summary = _finish(group, items, n_todo_images, start, peaks)
    logger.info(
        "extract: %d images (%d rejected), %d activation rows in %.1f s",
        summary["n_images"], summary["n_rejected"], summary["n_valid_rows"], summary["seconds"],
    )
    return summary


def _interrupted(group, store: str) -> None:
    """Log how far an interrupted job got and how to resume it."""
    done = np.asarray(group["extract/shard_done"][:])
    logger.warning(
        "extract: interrupted with at least %d of %d shards complete (a running shard may still finish); "
        "run the same command again to resume %s",
        int(done.sum()), len(done), store,
    )


def _finish(group, items: list[str], n_todo_images: int, start: float, peaks: dict[str, float]) -> dict:
    """Count the job's outcome, log rejection reasons and mark the stage done."""
    status = read_strings(group["images/status"])
    valid = np.asarray(group["samples/valid"][:])
    n_ok = int((status == "ok").sum())
    per_row = int(group.attrs["rows_per_image"])
    summary = {
        "n_images": len(items),
        "n_ok": n_ok,
        "n_rejected": len(items) - n_ok,
        "n_rows": int(valid.shape[0]),
        "n_valid_rows": int(valid.sum()),
        "n_nonfinite_rows": int(n_ok * per_row - valid.sum()),
        "seconds": round(time.perf_counter() - start, 2),
    }
    # Images processed by this run only: resumed shards do not count.
    summary["images_per_second"] = round(n_todo_images / max(summary["seconds"], 1e-9), 2)
    reasons = Counter(reason for reason in status if reason != "ok")
    if reasons:
        # The workers log each file; this line sums them up by reason.
        counts = "; ".join(f"{count} × {reason}" for reason, count in reasons.most_common(5))
        more = f"; {len(reasons) - 5} more reasons" if len(reasons) > 5 else ""
        logger.warning(
            "extract: %d of %d images rejected, by reason: %s%s. `atlas info` lists them",
            summary["n_rejected"], len(items), counts, more,
        )
    summary["worker_peak_memory_mib"] = {address: round(mib, 1) for address, mib in sorted(peaks.items())}
    mark_stage(group, "extract", **summary)
    return summary
