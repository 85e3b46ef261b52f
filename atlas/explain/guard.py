"""A context manager that lets explanation methods hook and differentiate a model safely.

Explanation methods need things a caller's model may not offer: eval mode,
gradients enabled, activations that are not modified in place, and each
nonlinearity module called once per forward pass. Captum's DeepLift stores a
module's input and output on the module, so a module called twice, such as the
shared ``relu`` of torchvision's ResNet blocks, breaks it. :func:`model_guard`
and :func:`attribution_model` provide these for the duration of one call and
leave the caller's model as they found it.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# Dictionaries keyed by the same hook ids, with per-hook flags (torch 2.x).
_HOOK_FLAG_DICTS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


class CallCycler(nn.Module):
    """Stand-in for a parameterless module that one forward pass calls several times.

    The k-th call goes to copy ``k % calls`` of ``calls`` identical copies. When
    every forward pass makes ``calls`` calls, as in a fixed graph, each copy
    runs once per pass.
    """

    def __init__(self, module: nn.Module, calls: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(module) for _ in range(calls))
        self.calls = 0

    def forward(self, *args, **kwargs):
        module = self.copies[self.calls % len(self.copies)]
        self.calls += 1
        return module(*args, **kwargs)


class IsolatedInput(nn.Module):
    """Wrapper that calls ``module`` on a copy of its input, so that input has no other use.

    Captum 0.9's DeepLift replaces the gradient of a nonlinearity's input
    tensor with its multiplier (a tensor hook), which drops the gradient of
    every other use of that tensor, as in ``relu(h) + h``. A fresh copy
    confines the hook to the nonlinearity's own path.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.clone())


class ReLU6AsReLU(nn.Module):
    """ReLU6 written as ``relu(x) - relu(x - 6)``.

    Same values as ``nn.ReLU6`` and the same gradients except at exactly 6
    (1 here, 0 there), but built from two ``nn.ReLU`` modules, which captum
    0.9's DeepLift handles with its rescale rule. Captum has no rule for
    ``nn.ReLU6`` and passes its plain gradient, which breaks summation to
    delta.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lower = nn.ReLU()
        self.upper = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each ReLU gets a tensor of its own (see IsolatedInput).
        return self.lower(x.clone()) - self.upper(x - 6.0)


class MaxPool2dAsReLU(nn.Module):
    """``nn.MaxPool2d`` written as a chain of ``m + relu(x_i - m)`` over each window.

    Captum 0.9's DeepLift rule for max pooling does not sum to delta: its
    unpooling overwrites instead of adding where windows overlap, and its
    fallback uses the first example's gradient. For DeepLift the pool is
    therefore rebuilt from ``k * k - 1`` separate ``nn.ReLU`` modules, which
    the rescale rule handles exactly. Values match the pool up to float
    rounding.
    """

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        pair = nn.modules.utils._pair
        self.kernel_size, self.stride = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size)
        self.padding, self.dilation = pair(pool.padding), pair(pool.dilation)
        self.ceil_mode = pool.ceil_mode
        self.steps = nn.ModuleList(nn.ReLU() for _ in range(self.kernel_size[0] * self.kernel_size[1] - 1))

    def _extra_padding(self, size: int, axis: int) -> int:
        # Pixels to add after the input so ceil_mode's last partial window exists (torch's rule:
        # a window may not start in the right padding).
        kernel, stride, padding, dilation = self.kernel_size[axis], self.stride[axis], self.padding[axis], self.dilation[axis]
        span = size + 2 * padding - dilation * (kernel - 1) - 1
        count = (-(-span // stride) if self.ceil_mode else span // stride) + 1
        if self.ceil_mode and (count - 1) * stride >= size + padding:
            count -= 1
        return max(0, (count - 1) * stride + dilation * (kernel - 1) + 1 - (size + 2 * padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        extra_y, extra_x = self._extra_padding(height, 0), self._extra_padding(width, 1)
        # Padding must never win a window; one constant for the whole batch keeps inputs and
        # baselines (DeepLift runs them in one batch) padded alike.
        low = float(x.detach().min()) - 1.0
        pad_y, pad_x = self.padding
        padded = nn.functional.pad(x, (pad_x, pad_x + extra_x, pad_y, pad_y + extra_y), value=low)
        out_height = (padded.shape[2] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        out_width = (padded.shape[3] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1

        # (B, C * k * k, L) -> (B, C, k * k, L)
        windows = nn.functional.unfold(padded, self.kernel_size, dilation=self.dilation, stride=self.stride)
        windows = windows.view(batch, channels, -1, out_height * out_width)
        result = windows[:, :, 0]
        for index, relu in enumerate(self.steps, start=1):
            result = result + relu(windows[:, :, index] - result)
        return result.view(batch, channels, out_height, out_width)


@dataclass
class _Snapshot:
    training: dict[nn.Module, bool]
    requires_grad: dict[nn.Parameter, bool]
    grads: dict[nn.Parameter, torch.Tensor | None]
    hooks: dict[tuple[nn.Module, str], set[int]]


def _snapshot(model: nn.Module) -> _Snapshot:
    modules = list(model.modules())
    parameters = list(model.parameters())
    return _Snapshot(
        training={module: module.training for module in modules},
        requires_grad={parameter: parameter.requires_grad for parameter in parameters},
        grads={parameter: parameter.grad for parameter in parameters},
        hooks={(module, name): set(getattr(module, name, {})) for module in modules for name in _HOOK_DICTS},
    )


def _restore(model: nn.Module, snapshot: _Snapshot) -> None:
    # NOTE: not thread-safe. Hooks that another thread adds to the same model
    # during the call are removed too, so callers sharing a model serialise
    # explanations with its other uses (the explorer holds one model lock).
    # Hooks a method forgot to remove would fire on every later call of the caller's model.
    leaked = 0
    for (module, name), before in snapshot.hooks.items():
        hooks = getattr(module, name, None)
        if hooks is None:
            continue
        for key in [key for key in hooks if key not in before]:
            del hooks[key]
            for flag_name in _HOOK_FLAG_DICTS:
                getattr(module, flag_name, {}).pop(key, None)
            leaked += 1
    if leaked:
        logger.warning("removed %d hooks left on the model by an explanation method", leaked)

    for parameter, flag in snapshot.requires_grad.items():
        parameter.requires_grad_(flag)
    for parameter, grad in snapshot.grads.items():
        parameter.grad = grad
    for module, flag in snapshot.training.items():
        module.training = flag


@contextmanager
def call_counter(model: nn.Module) -> Iterator[Counter]:
    """Count, during the block, the calls of each parameterless leaf module of ``model``.

    Yields a ``Counter`` keyed by module; forward passes run inside the block
    fill it. Hooks are removed on exit.
    """
    counts: Counter = Counter()
    handles = []

    def count(module: nn.Module, _inputs: tuple) -> None:
        counts[module] += 1

    try:
        for module in model.modules():
            leaf = next(module.children(), None) is None
            if leaf and next(module.parameters(recurse=False), None) is None:
                handles.append(module.register_forward_pre_hook(count))
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def count_calls(model: nn.Module, x: torch.Tensor) -> Counter:
    """Run one forward pass on ``x`` and return how often each parameterless leaf module ran."""
    with call_counter(model) as counts, torch.no_grad():
        model(x)
    return counts


# The modules captum 0.9's DeepLift has rules for (its SUPPORTED_NON_LINEAR), other than max pooling.
_DEEPLIFT_NONLINEAR = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softmax)


def _deeplift_replacement(module: nn.Module) -> nn.Module | None:
    if type(module) is nn.ReLU6:
        return ReLU6AsReLU()
    if type(module) is nn.MaxPool2d and not module.return_indices:
        return MaxPool2dAsReLU(module)
    if type(module) in _DEEPLIFT_NONLINEAR:
        return IsolatedInput(module)
    return None


def _needs_rewrite(model: nn.Module, counts: Counter, for_deeplift: bool) -> bool:
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            return True
        if for_deeplift and _deeplift_replacement(module) is not None:
            return True
    return any(calls > 1 for calls in counts.values())


def _rewrite(model: nn.Module, original: nn.Module, counts: Counter, for_deeplift: bool) -> dict[str, int]:
    # `model` is a deep copy of `original`; module paths are the same in both. A module
    # registered under several names is listed under each, and each name gets its own copy.
    originals = dict(original.named_modules(remove_duplicate=False))
    changes = Counter()

    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            changes["in-place"] += 1

    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name:
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        calls = counts.get(originals.get(name), 0)
        replacement = _deeplift_replacement(module) if for_deeplift else None
        if replacement is not None:
            changes[type(module).__name__] += 1
        if calls > 1:
            replacement = CallCycler(replacement or module, calls)
            changes["shared"] += 1
        if replacement is not None:
            setattr(parent, attribute, replacement)
    return dict(changes)


def attribution_model(model: nn.Module, call_counts: Counter | None = None, for_deeplift: bool = False) -> nn.Module:
    """Return ``model``, or a rewritten deep copy of it when attribution needs one.

    The copy is made when the model has in-place activations, parameterless
    modules that one forward pass calls several times (from ``call_counts``),
    or, with ``for_deeplift``, any nonlinearity. In the copy in-place flags
    are off and each repeated module is replaced by a :class:`CallCycler`.
    For DeepLift, ReLU6 is also replaced by :class:`ReLU6AsReLU`, max pooling
    by :class:`MaxPool2dAsReLU`, and the other nonlinearities are wrapped in
    :class:`IsolatedInput`. The caller's model is never rewritten. Module
    paths stay valid in the copy.

    Parameters
    ----------
    model
        The network, already in the state it should be explained in.
    call_counts
        From :func:`call_counter` or :func:`count_calls`; without it repeated
        modules are not detected.
    for_deeplift
        Also rewrite the modules captum's DeepLift has no exact rule for.

    Notes
    -----
    Functional in-place operations (``out += identity``, ``F.relu(x,
    inplace=True)``) cannot be rewritten. Captum clones a hooked layer's
    output, so layer methods still see the right values, but DeepLift passes
    plain gradients through a functional nonlinearity.
    """
    if isinstance(model, torch.jit.ScriptModule):
        logger.debug("model is TorchScript; its modules are used as they are")
        return model
    counts = call_counts or Counter()
    if not _needs_rewrite(model, counts, for_deeplift):
        return model
    working = copy.deepcopy(model)
    changes = _rewrite(working, model, counts, for_deeplift)
    logger.debug("explaining a rewritten copy of the model: %s", changes)
    return working


@contextmanager
def model_guard(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in the state attribution needs and restore the caller's state afterwards.

    Inside the block the model is in eval mode with frozen parameters and
    gradients are enabled, also when the caller is inside ``torch.no_grad()``.
    Enter ``torch.inference_mode(False)`` before this guard when the caller
    may be in inference mode. On exit, also after an error, each submodule's
    train/eval flag, each parameter's ``requires_grad`` and ``.grad``, and the
    caller's grad mode are restored, and hooks added to the model during the
    block are removed.

    Yields
    ------
    nn.Module
        ``model`` itself; pass it to :func:`attribution_model` for a copy that
        captum can hook safely.
    """
    snapshot = _snapshot(model)
    try:
        with torch.enable_grad():
            model.eval()
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            yield model
    finally:
        _restore(model, snapshot)
