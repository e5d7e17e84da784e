"""Exact gradient accumulation for the PyTorch adapter: k backward passes, one TrAct step.

A layer wrapped with ``accumulate=True`` adds each backward's statistics, ``G^T X``,
``X^T X + lam b I`` and the row count b (`tract_core.pack_statistics`, in
`tract_core.statistics_dtype`), to one flat tensor of its own, the way autograd adds
gradients, and gives its weight a zero gradient meanwhile. `finalize` turns the sums into
the union batch's TrAct gradient, ``(sum G_i^T X_i) (sum X_i^T X_i / sum b_i + lam I)^-1``,
all-reducing them first under data parallelism (one all-reduce, averaged as DDP averages
gradients). Until then, ``optimizer.step()`` on that weight raises: a forgotten `finalize`
cannot train on zero gradients.
"""

from __future__ import annotations

import math
import weakref

import array_api_compat.torch as _xp
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import tract_core as _tc

_ACCUMULATING = weakref.WeakSet()  # layers made with accumulate=True
_HOOK = []  # the optimizer step pre-hook's handle, registered on first use


def _packed_size(weight, groups):
    return _tc.packed_size(weight.shape[0], math.prod(weight.shape[1:]), groups)


def statistics(x: torch.Tensor, grad_z: torch.Tensor, weight: torch.Tensor, lam: float,
               pad: list[int], stride: list[int], dilation: list[int],
               groups: int) -> torch.Tensor:
    """One backward's packed [G^T X, X^T X + lam b I, b], in the statistics dtype."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, grad_z.dtype), weight.dtype)
    with torch.autocast(grad_z.device.type, enabled=False):
        x, grad_z = x.to(dtype), grad_z.to(dtype)
        if stride:
            x = nn.functional.pad(x, pad) if any(pad) else x
            moment, gram = _tc.conv_moments(x, grad_z, weight.shape[2:], stride, dilation,
                                            groups, xp=_xp)
            rows = grad_z.shape[0] * math.prod(grad_z.shape[2:])
        else:
            x, grad_z = x.reshape(-1, weight.shape[1]), grad_z.reshape(-1, weight.shape[0])
            moment, gram = _tc.moments(x, grad_z, xp=_xp)
            rows = x.shape[0]
    return _tc.pack_statistics(moment, gram, rows, lam, xp=_xp)


# As the weight gradient's op in torch.py: torch.compile runs it eagerly in a backward.
statistics_op = torch.library.custom_op("tract_core::statistics", statistics, mutates_args=())


@statistics_op.register_fake
def _(x, grad_z, weight, lam, pad, stride, dilation, groups):
    dtype = _tc.statistics_dtype(_xp, weight.dtype, weight.device)
    return weight.new_empty((_packed_size(weight, groups),), dtype=dtype)


def _check_finalized(optimizer, args, kwargs):
    """Optimizer step pre-hook: refuse to step a weight whose statistics are pending."""
    weights = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in list(_ACCUMULATING):
        statistics = layer._statistics
        if statistics is not None and statistics.grad is not None and id(layer.weight) in weights:
            raise RuntimeError(
                f"{type(layer).__name__} accumulates TrAct's statistics over micro-batches "
                f"and its weight gradient is not written yet: call "
                f"tract_core.torch.finalize(model) after the last backward and before "
                f"optimizer.step() (or tract_core.torch.discard(model) to drop them)")


def attach(layer: nn.Module) -> None:
    """Give an accumulating layer zero sums that match its weight's device and dtype.

    Called when the layer is made and whenever its weight moves (``module.to``), so that
    the forward only reads it (a tensor made inside a compiled forward could not be a
    leaf); refused while sums are pending.
    """
    check_not_pending(layer)
    weight, groups = layer.weight, getattr(layer, "groups", 1)
    dtype = _tc.statistics_dtype(_xp, weight.dtype, weight.device)
    layer._statistics = torch.zeros(_packed_size(weight, groups), dtype=dtype,
                                    device=weight.device, requires_grad=True)
    register(layer)


def register(layer: nn.Module) -> None:
    """Let the optimizer check ``layer`` (an accumulating layer, made or unpickled)."""
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_check_finalized))
    _ACCUMULATING.add(layer)


def check_not_pending(layer: nn.Module) -> None:
    """RuntimeError if ``layer`` holds accumulated statistics (wrap/unwrap would drop them)."""
    statistics = getattr(layer, "_statistics", None)
    if statistics is not None and statistics.grad is not None:
        raise RuntimeError("the layer holds accumulated statistics still pending: call "
                           "tract_core.torch.finalize (or discard) first")


def _accumulating(module: nn.Module):
    return [m for m in module.modules() if getattr(m, "_statistics", None) is not None
            and m._statistics.grad is not None]


def _replicas(layer):
    """The process group to all-reduce over and its size (None, 1: one process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    group = layer.process_group
    size = dist.get_world_size(group)
    if size > 1 and not layer.sync:
        raise RuntimeError(
            "accumulate=True under data parallelism needs sync=True: every replica must "
            "precondition with the union batch's Gram, or their weights drift apart")
    return group, size


def finalize(module: nn.Module) -> int:
    """Write the TrAct weight gradient of every accumulating layer in ``module``.

    Call it once after the last micro-batch's backward (on every process under data
    parallelism: it all-reduces) and before the optimizer reads the gradients (clipping
    included). The weight gradient becomes ``(sum G^T X) (sum X^T X / sum b + lam I)^-1``,
    scaled as the plain layer's accumulated gradient would be (a loss scaler's factor
    included); the sums start again from zero.

    Args:
        module: a model, or one layer made by ``wrap(..., accumulate=True)``.

    Returns:
        The number of layers whose gradient was written.
    """
    layers = _accumulating(module)
    for layer in layers:
        packed, groups = layer._statistics.grad, getattr(layer, "groups", 1)
        group, replicas = _replicas(layer)
        if replicas > 1:  # summed, then averaged as DDP averages gradients
            torch.distributed.all_reduce(packed, group=group)
            packed = packed / replicas
        grad = _tc.unpack_and_precondition(packed, layer.weight.shape[0],
                                           math.prod(layer.weight.shape[1:]), groups, xp=_xp)
        grad = grad.reshape(layer.weight.shape).to(layer.weight.dtype)
        if layer.weight.grad is None:
            layer.weight.grad = grad
        else:
            layer.weight.grad.copy_(grad)  # DDP may keep the gradient as a bucket view
        layer._statistics.grad = None
    return len(layers)


def discard(module: nn.Module) -> int:
    """Drop the accumulated statistics of every accumulating layer in ``module`` (the
    weight gradient is left as it is); returns how many layers had some."""
    layers = _accumulating(module)
    for layer in layers:
        layer._statistics.grad = None
    return len(layers)
