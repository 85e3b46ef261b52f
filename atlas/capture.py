"""Activation capture with forward hooks, optionally stopping at the deepest layer."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from atlas.errors import ModelError


class _StopForward(Exception):
    """Raised inside a hook to end the forward pass once every layer is captured."""


def get_module(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule at a dotted path such as ``blocks.4``.

    Raises
    ------
    ModelError
        No such module; the message lists the closest names.
    """
    modules = dict(model.named_modules())
    if path in modules and path != "":
        return modules[path]
    close = difflib.get_close_matches(path, [name for name in modules if name], n=5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ModelError(f"layer {path!r} not found in {type(model).__name__}{hint}")


@contextmanager
def capture(model: nn.Module, layers: Sequence[str], stop: bool = False, detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``layers`` during forward passes inside the block.

    With ``stop=True`` the forward pass ends as soon as every layer has fired,
    so nothing past the deepest layer runs; call the model through
    :func:`run_until_captured` in that case. Hooks are removed on exit, also
    after an error.
    """
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    wanted = set(layers)

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            # A detached copy, so that a later in-place module (ReLU(inplace=True)) does not change it.
            outputs[name] = output.detach().clone() if detach else output
            if stop and wanted.issubset(outputs):
                raise _StopForward

        return hook

    try:
        for name in layers:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def run_until_captured(model: nn.Module, x: torch.Tensor) -> None:
    """Call ``model(x)`` and swallow the early stop raised by a ``stop=True`` capture."""
    try:
        model(x)
    except _StopForward:
        pass


def forward_to(model: nn.Module, x: torch.Tensor, layers: Sequence[str], detach: bool = True) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``x`` only as far as the deepest of ``layers``.

    Parameters
    ----------
    x
        Input batch, shape (B, 3, H, W).

    Returns
    -------
    dict
        Layer name to output tensor, shape (B, C, h, w) for convolutional layers.
    """
    with capture(model, layers, stop=True, detach=detach) as outputs:
        run_until_captured(model, x)
    missing = [name for name in layers if name not in outputs]
    if missing:
        raise ModelError(f"layers {missing} never ran in the forward pass; pick a module the model calls")
    return dict(outputs)


class TruncatedModel(nn.Module):
    """A model cut at ``layer``: ``forward`` returns that layer's output, shape (B, C, h, w)."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        get_module(model, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_to(self.model, x, [self.layer], detach=False)[self.layer]
