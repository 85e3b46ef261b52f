"""Activation capture for one shard of images, written straight into the store.

A shard is a fixed, contiguous range of image rows; it owns the matching
chunk-aligned range of activation rows, so shards can run in any order, in
parallel, and again after a crash, always writing the same values.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from atlas.capture import get_module
from atlas.datasets import open_image
from atlas.errors import ImageDecodeError, ModelError
from atlas.models import LoadedModel, load_model
from atlas.store import TOP_PREDICTIONS, open_store, read_strings

logger = logging.getLogger(__name__)

_MODEL_CACHE: dict[tuple[str, str], LoadedModel] = {}
_MODEL_LOCK = threading.Lock()


@dataclass
class ExtractSettings:
    """Plain-data settings a worker needs to process a shard (picklable)."""

    store: str
    model: str
    layers: list[str]
    positions: str
    per_image: int
    seed: int
    batch_size: int
    shard_size: int
    attribution: bool
    attribution_candidates: int
    attribution_top_k: int
    sample_seed: int = 0
    sample_min_scale: float = 0.08
    device: str = "cpu"
    torch_threads: int | None = None
    decode_threads: int = 2
    layer_shapes: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class ShardResult:
    """Counts from one processed shard."""

    shard: int
    n_images: int
    n_ok: int
    n_rejected: int
    n_nonfinite_rows: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def cached_model(spec: str, device: str = "cpu") -> LoadedModel:
    """Load a model once per process and reuse it for every later shard."""
    key = (spec, device)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = load_model(spec, device=device)
        return _MODEL_CACHE[key]


def rows_per_image(positions: str, per_image: int, height: int, width: int) -> int:
    """Return how many activation rows each image contributes under a sampling policy."""
    if positions == "all":
        return height * width
    if positions == "center":
        return 1
    return min(per_image, height * width)


def sample_positions(image_row: int, positions: str, per_image: int, height: int, width: int, seed: int) -> np.ndarray:
    """Return the flat spatial indices (y * width + x) sampled for one image, shape (rows_per_image,).

    Random positions come from a generator seeded with ``(seed, image_row)``,
    so a rerun, or another worker, picks the same ones.
    """
    if positions == "all":
        return np.arange(height * width)
    if positions == "center":
        return np.array([(height // 2) * width + width // 2])
    count = rows_per_image(positions, per_image, height, width)
    rng = np.random.default_rng([seed, image_row])
    return np.sort(rng.choice(height * width, size=count, replace=False))


def probe_layer_shapes(model: LoadedModel, layers: list[str]) -> dict[str, list[int]]:
    """Run one blank input to learn each layer's (C, h, w) at the model's input size.

    The result keeps the order of ``layers``, not the order the hooks fire in,
    because the store lists its layers in this order and the first one is the
    primary layer.
    """
    from atlas.capture import forward_to

    height, width = model.input_size
    blank = torch.zeros(1, 3, height, width, device=model.device)
    with torch.no_grad():
        outputs = forward_to(model.module, blank, layers)
    shapes = {}
    for name in layers:
        tensor = outputs[name]
        if tensor.dim() != 4:
            raise ModelError(
                f"layer {name} outputs shape {tuple(tensor.shape)}; pick a convolutional layer with (B, C, h, w) output"
            )
        shapes[name] = [int(tensor.shape[1]), int(tensor.shape[2]), int(tensor.shape[3])]
    return shapes


def describe_model(spec: str, layers: list[str], device: str = "cpu") -> dict:
    """Return what the store records about a model: layer shapes, preprocessing and class names.

    Runs where the shards run (a Dask worker), so the model is loaded once, in
    the process that needs it anyway, and never in the job's driver.
    """
    model = cached_model(spec, device)
    return {
        "layer_shapes": probe_layer_shapes(model, layers),
        "preprocessing": model.preprocessing_info(),
        "class_names": list(model.class_names),
    }


def peak_memory_mib() -> float:
    """Return this process's peak resident memory in MiB (Linux ``ru_maxrss``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _LayerTap:
    """Forward hooks that keep the layers' outputs; the primary one becomes a gradient leaf.

    Replacing the primary output by a detached copy with ``requires_grad`` lets
    the class-logit gradient reach it although the weights are frozen.
    """

    def __init__(self, model: torch.nn.Module, layers: list[str], leaf: str | None) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in layers:
            self.handles.append(get_module(model, name).register_forward_hook(self._hook(name, name == leaf)))

    def _hook(self, name: str, make_leaf: bool):
        def hook(_module, _inputs, output):
            if make_leaf:
                leaf = output.detach().requires_grad_(True)
                self.outputs[name] = leaf
                # The rest of the network gets a copy: an in-place module after this layer
                # (a ReLU(inplace=True) after a batch norm) may not modify a leaf that requires grad.
                return leaf.clone()
            # A copy, so that a later in-place module does not change the kept activations.
            self.outputs[name] = output.detach().clone()
            return None

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def attribute_batch(
    model: LoadedModel, x: torch.Tensor, layers: list[str], candidates: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the full model, keeping layer outputs and per-position class attribution.

    The attribution of class c at a position is ``h · ∂logit_c/∂h`` summed over
    channels, with ``h`` the primary layer's output there. It is computed for
    each image's ``candidates`` highest logits only: one backward pass per
    candidate rank instead of one per class.

    Returns
    -------
    outputs
        Layer name to activations, (B, C, h, w) float32.
    candidate_classes
        (B, candidates) int64, the classes scored.
    scores
        (B, candidates, h, w) float32 attribution per candidate and position.
    probabilities
        (B, n_classes) float32 softmax of the logits.
    """
    tap = _LayerTap(model.module, layers, leaf=layers[0])
    try:
        with torch.enable_grad():
            logits = model.module(x).float()
            leaf = tap.outputs[layers[0]]
            top = logits.topk(min(candidates, logits.shape[1]), dim=1).indices
            scores = []
            for rank in range(top.shape[1]):
                selected = logits.gather(1, top[:, rank : rank + 1]).sum()
                (gradient,) = torch.autograd.grad(selected, leaf, retain_graph=rank < top.shape[1] - 1)
                scores.append((leaf.detach() * gradient).sum(1).float())
        outputs = {name: tensor.detach().float() for name, tensor in tap.outputs.items()}
        return outputs, top, torch.stack(scores, 1), logits.detach().softmax(1)
    finally:
        tap.close()


def _decode(item: str, settings: ExtractSettings, model: LoadedModel) -> torch.Tensor | str:
    try:
        image = open_image(item, seed=settings.sample_seed, min_scale=settings.sample_min_scale)
        return model.transform(image)
    except ImageDecodeError as error:
        return str(error)
    except (OSError, ValueError, RuntimeError) as error:
        return f"cannot preprocess image: {error}"


def process_shard(
    shard: int,
    settings: ExtractSettings,
    items: list[str] | None = None,
    rejected: dict[int, str] | None = None,
) -> ShardResult:
    """Extract one shard of images and write its rows, then mark the shard done.

    Parameters
    ----------
    shard
        Shard number; it covers image rows ``[shard * shard_size, (shard + 1) * shard_size)``.
    settings
        Store path, model, layers and sampling policy.
    items
        The shard's image items; read from ``images/path`` when omitted.
    rejected
        Reasons for images to skip without decoding (duplicates), keyed by
        the image's position within the shard.
    """
    start_time = time.perf_counter()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    group = open_store(settings.store, mode="r+")
    n_images_total = int(group.attrs["n_images"])
    first = shard * settings.shard_size
    last = min(first + settings.shard_size, n_images_total)
    if items is None:
        items = list(read_strings(group["images/path"], slice(first, last)))

    model = cached_model(settings.model, settings.device)
    primary = settings.layers[0]
    _, height, width = settings.layer_shapes[primary]
    per_row = rows_per_image(settings.positions, settings.per_image, height, width)
    n_rows = (last - first) * per_row
    top_k = settings.attribution_top_k

    activations = {
        name: np.zeros((n_rows, settings.layer_shapes[name][0]), np.float16) for name in settings.layers
    }
    sample_image = np.full(n_rows, -1, np.int32)
    sample_y = np.full(n_rows, -1, np.int16)
    sample_x = np.full(n_rows, -1, np.int16)
    valid = np.zeros(n_rows, bool)
    attribution_class = np.full((n_rows, top_k), -1, np.int16)
    attribution_score = np.zeros((n_rows, top_k), np.float32)
    status = np.array(["pending"] * (last - first), dtype=object)
    top_class = np.full((last - first, TOP_PREDICTIONS), -1, np.int16)
    top_prob = np.zeros((last - first, TOP_PREDICTIONS), np.float32)

    autocast = settings.device.startswith("cuda")
    with ThreadPoolExecutor(max_workers=settings.decode_threads) as pool:
        # Decoding runs in the pool while the model works on the previous batch.
        rejected = rejected or {}
        decoded = pool.map(
            lambda local: rejected.get(local) or _decode(items[local], settings, model), range(len(items))
        )
        batch: list[tuple[int, torch.Tensor]] = []
        for local, result in enumerate(decoded):
            if isinstance(result, str):
                status[local] = result
                logger.warning("skipping %s: %s", items[local], result)
            else:
                batch.append((local, result))
            if len(batch) == settings.batch_size or (local == len(items) - 1 and batch):
                x = torch.stack([tensor for _, tensor in batch]).to(model.device)
                with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
                    if settings.attribution:
                        outputs, candidates, scores, probabilities = attribute_batch(
                            model, x, settings.layers, settings.attribution_candidates
                        )
                    else:
                        from atlas.capture import forward_to

                        with torch.no_grad():
                            outputs = {k: v.float() for k, v in forward_to(model.module, x, settings.layers).items()}
                        candidates = scores = probabilities = None
                for index_in_batch, (local_row, _) in enumerate(batch):
                    image_row = first + local_row
                    flat = sample_positions(image_row, settings.positions, settings.per_image, height, width, settings.seed)
                    rows = slice(local_row * per_row, (local_row + 1) * per_row)
                    ys, xs = np.divmod(flat, width)
                    finite = np.ones(per_row, bool)
                    for name in settings.layers:
                        layer_map = outputs[name][index_in_batch]
                        _, layer_h, layer_w = layer_map.shape
                        # Other layers may have another resolution: take the same relative position.
                        ly = (ys * layer_h) // height
                        lx = (xs * layer_w) // width
                        vectors = layer_map[:, torch.from_numpy(ly), torch.from_numpy(lx)].T.cpu().numpy()
                        as_half = vectors.astype(np.float16)
                        finite &= np.isfinite(as_half).all(1)
                        activations[name][rows] = as_half
                    sample_image[rows] = image_row
                    sample_y[rows] = ys
                    sample_x[rows] = xs
                    valid[rows] = finite
                    status[local_row] = "ok"
                    if scores is not None:
                        at_positions = scores[index_in_batch][:, torch.from_numpy(ys), torch.from_numpy(xs)].T
                        best = at_positions.topk(top_k, dim=1)
                        attribution_score[rows] = best.values.cpu().numpy()
                        attribution_class[rows] = candidates[index_in_batch][best.indices].cpu().numpy()
                        top = probabilities[index_in_batch].topk(TOP_PREDICTIONS)
                        top_class[local_row] = top.indices.cpu().numpy()
                        top_prob[local_row] = top.values.cpu().numpy()
                batch = []

    row_slice = slice(first * per_row, first * per_row + n_rows)
    for name in settings.layers:
        group[f"activations/{name}"][row_slice] = activations[name]
    group["samples/image"][row_slice] = sample_image
    group["samples/y"][row_slice] = sample_y
    group["samples/x"][row_slice] = sample_x
    group["samples/attribution_class"][row_slice] = attribution_class
    group["samples/attribution_score"][row_slice] = attribution_score
    group["samples/valid"][row_slice] = valid
    group["images/status"][first:last] = status.astype(str)
    group["images/top_class"][first:last] = top_class
    group["images/top_prob"][first:last] = top_prob
    # Written last: a shard counts as done only once every array above is on disk.
    group["extract/shard_done"][shard] = True

    ok = int((status == "ok").sum())
    n_nonfinite = int((~valid).sum() - (len(items) - ok) * per_row)
    if n_nonfinite:
        logger.warning("shard %d: %d activation rows hold NaN or inf and are flagged invalid", shard, n_nonfinite)
    return ShardResult(
        shard=shard,
        n_images=len(items),
        n_ok=ok,
        n_rejected=len(items) - ok,
        n_nonfinite_rows=n_nonfinite,
        seconds=time.perf_counter() - start_time,
    )
