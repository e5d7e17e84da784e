"""PyTorch adapter: ``wrap(layer)`` gives a layer whose weight gradient is TrAct's.

    >>> import torch, tract_core.torch as tt
    >>> conv = tt.wrap(torch.nn.Conv2d(3, 16, 3, padding=1), lam=0.1)

Outputs, input and bias gradients are the plain layer's: an identity autograd node on the
output owns the weight and turns G = dL/dz into TrAct's weight gradient.
"""

from __future__ import annotations

import copy
import functools
import typing
from collections.abc import Sequence

from tract_core._requires import requires

with requires("torch", "PyTorch"):
    import array_api_compat.torch as _xp
    import torch
    from torch import nn

import tract_core as _tc
from tract_core import _args

__all__ = ["TrActConv1d", "TrActConv2d", "TrActConv3d", "TrActLinear", "conv", "linear",
           "unwrap", "wrap"]

_CONV = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}
_PAD_MODES = ("zeros", "reflect", "replicate", "circular")


class _Spec(typing.NamedTuple):
    """One layer call: TrAct's settings and, for a conv (a stride), its geometry."""

    lam: float
    sync: bool
    group: str  # the torch.distributed process group's name; "": the default group
    pad: tuple = ()  # the zero padding as F.pad takes it: last axis first, (lo, hi) each
    stride: tuple = ()
    dilation: tuple = ()
    groups: int = 1
    padding: object = 0  # F.conv's own: nn.ConvNd's forward, bit for bit; not in backward

    def plain_forward(self, x, weight, bias=None):
        if not self.stride:
            return nn.functional.linear(x, weight, bias)
        return _CONV[len(self.stride)](x, weight, bias, self.stride, self.padding,
                                       self.dilation, self.groups)


def _replica_sum(group, gram, count):
    """The core's replica_sum: Gram and row count all-reduced as one tensor."""
    flat = torch.cat([gram.reshape(-1), gram.new_full((1,), count)])
    torch.distributed.all_reduce(flat, group=group)
    return flat[:-1].reshape(gram.shape), flat[-1]


def _weight_grad(x: torch.Tensor, grad_z: torch.Tensor, weight: torch.Tensor, lam: float,
                 sync: bool, group: str, pad: list[int], stride: list[int],
                 dilation: list[int], groups: int) -> torch.Tensor:
    """TrAct's weight gradient from the core, in the weight's shape and dtype."""
    replica_sum = None
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        resolve = torch.distributed.distributed_c10d._resolve_process_group
        replica_sum = functools.partial(_replica_sum, resolve(group) if group else None)
    core = {"replica_sum": replica_sum, "xp": _xp}
    # The core casts to float64 (safe from TF32 and autocast) chunk by chunk where it can;
    # autocast is off for the float32 statistics of devices without float64 (MPS).
    dtype = torch.promote_types(torch.promote_types(x.dtype, grad_z.dtype), weight.dtype)
    with torch.autocast(grad_z.device.type, enabled=False):
        x, grad_z = x.to(dtype), grad_z.to(dtype)
        if stride:
            x = nn.functional.pad(x, pad) if any(pad) else x
            grad_w = _tc.conv_weight_grad(x, grad_z, weight.shape[2:], stride, dilation, groups,
                                          lam, **core)
        else:
            grad_w = _tc.weight_grad(x.reshape(-1, weight.shape[1]),
                                     grad_z.reshape(-1, weight.shape[0]), lam, **core)
    return grad_w.reshape(weight.shape).to(weight.dtype)


# torch.compile cannot trace the core's index plans in a backward: it runs this op eagerly.
# Ops take no Python objects, hence the process group by name.
_weight_grad_op = torch.library.custom_op("tract_core::weight_grad", _weight_grad,
                                          mutates_args=())
_weight_grad_op.register_fake(lambda x, grad_z, weight, *args: torch.empty_like(
    weight, memory_format=torch.contiguous_format))


class _TrActGrads(torch.autograd.Function):
    """Identity on the output z whose backward gives the weight TrAct's gradient (per vmap call)."""

    @staticmethod
    def forward(z, weight, x, spec):
        return z

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, weight, x, ctx.spec = inputs
        ctx.mark_dirty(z)  # z itself, not a view: in-place ops after it (ReLU) work
        ctx.save_for_backward(weight, x)

    @staticmethod
    def vmap(info, in_dims, z, weight, x, spec):
        return z, in_dims[0]

    @staticmethod
    def backward(ctx, grad_z):
        (weight, x), spec = ctx.saved_tensors, ctx.spec
        grad_w = grad_x = None
        if ctx.needs_input_grad[1]:
            weight_grad = _weight_grad_op if torch.compiler.is_compiling() else _weight_grad
            grad_w = weight_grad(x, grad_z, weight, *spec[:-1])
        if torch.is_grad_enabled() and ctx.needs_input_grad[2]:  # create_graph=True
            # Zero whose derivative in W is that of dx = dz/dx^T G (the layer's node has it
            # blind to W): penalties on dx get the plain weight gradient. vjp nests in torch.func.
            _, vjp = torch.func.vjp(lambda xs: spec.plain_forward(xs, weight), x.detach())
            (dx,) = vjp(grad_z.detach())
            grad_x = dx - dx.detach()
        return grad_z, grad_w, grad_x, None


def _apply(x, weight, bias, spec):
    """The plain forward, and TrAct's node on its output if the weight wants a gradient."""
    # Under torch.func, a weight only an outer transform differentiates has no requires_grad.
    transforms = not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()
    if not (torch.is_grad_enabled() and (weight.requires_grad or transforms)):
        return spec.plain_forward(x, weight, bias)
    z = spec.plain_forward(x, weight.detach(), bias)  # the bias keeps its plain gradient
    if z.is_complex():
        raise TypeError(f"TrAct's weight gradient needs real floating point tensors; got "
                        f"weight of dtype {weight.dtype} and input of dtype {x.dtype}")
    return _TrActGrads.apply(z, weight, x, spec)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           lam: float = 0.1, sync: bool = False,
           process_group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
    """``F.linear`` with TrAct's weight gradient.

    Args:
        x: (..., n) inputs; every leading position is one row of X.
        weight: (m, n). bias: (m,) or None. Real floating point (TypeError for complex).
        lam, sync, process_group: as for `wrap`.

    Returns:
        (..., m), exactly ``F.linear(x, weight, bias)``. Input and bias gradients are the
        plain layer's, also under ``create_graph=True`` (gradient penalties).
    """
    group = "" if process_group is None else process_group.group_name
    return _apply(x, weight, bias, _Spec(_tc.check_lam(lam), bool(sync), group))


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         stride: int | Sequence[int] = 1, padding: str | int | Sequence[int] = 0,
         dilation: int | Sequence[int] = 1, groups: int = 1, padding_mode: str = "zeros",
         lam: float = 0.1, sync: bool = False,
         process_group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
    """``F.conv{1,2,3}d`` (with nn.ConvNd's padding modes) and TrAct's weight gradient.

    Args:
        x: (N, C, *spatial) or unbatched (C, *spatial), 1 to 3 spatial axes.
        weight: (M, C / groups, *kernel_size). bias: (M,) or None. Real floating point.
        stride, dilation: int or one per axis. padding: int, one per axis, 'same' or
            'valid'. padding_mode: 'zeros', 'reflect', 'replicate' or 'circular'.
        lam, sync, process_group: as for `wrap`.

    Returns:
        (N, M, *out_spatial), bit-identical to the matching ``nn.ConvNd`` forward.
        Input and bias gradients are the plain layer's, as for `linear`.
    """
    lam, d = _tc.check_lam(lam), weight.ndim - 2
    if d not in _CONV:
        raise ValueError(f"weight must have shape (M, C/groups, *kernel) with 1-3 spatial "
                         f"axes, got shape {tuple(weight.shape)}")
    if padding_mode not in _PAD_MODES:
        raise ValueError(f"padding_mode must be one of {_PAD_MODES}, got {padding_mode!r}")
    stride = _args.per_axis(stride, d, "stride")
    dilation = _args.per_axis(dilation, d, "dilation")
    # nn.ConvNd's 'same' (stride 1 only) is dilation * (kernel - 1), the odd pixel high.
    pads = _args.resolve_pads(_args.conv_padding(padding, d), x.shape[-d:], weight.shape[2:],
                              (1,) * d, dilation)
    pad = tuple(p for pair in reversed(pads) for p in pair)
    unbatched = x.ndim == d + 1  # a batch of one, so that the node's output is no view
    x = x[None] if unbatched else x
    if padding_mode != "zeros":  # as nn.ConvNd: pad, then convolve with no padding
        x, pad, padding = nn.functional.pad(x, pad, mode=padding_mode), (), 0
    group = "" if process_group is None else process_group.group_name
    spec = _Spec(lam, bool(sync), group, pad, stride, dilation, groups, padding)
    z = _apply(x, weight, bias, spec)
    return z[0] if unbatched else z


class _TrAct:
    """Mixin: TrAct layers are their plain layer plus ``lam``, ``sync``, ``process_group``."""

    lam: float = 0.1  # defaults for layers built directly, e.g. TrActConv2d(3, 64, 3)
    sync: bool = False
    process_group: object = None

    def extra_repr(self):
        return f"{super().extra_repr()}, lam={self.lam}" + (", sync=True" if self.sync else "")

    def forward(self, x):
        tract = {"lam": self.lam, "sync": self.sync, "process_group": self.process_group}
        if isinstance(self, nn.Linear):
            return linear(x, self.weight, self.bias, **tract)
        return conv(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, groups=self.groups,
                    padding_mode=self.padding_mode, **tract)


class TrActLinear(_TrAct, nn.Linear):
    """``nn.Linear`` with TrAct's weight gradient. x: (..., in_features)."""


class TrActConv1d(_TrAct, nn.Conv1d):
    """``nn.Conv1d`` with TrAct's weight gradient. x: (N, C, L) or (C, L)."""


class TrActConv2d(_TrAct, nn.Conv2d):
    """``nn.Conv2d`` with TrAct's weight gradient. x: (N, C, H, W) or (C, H, W)."""


class TrActConv3d(_TrAct, nn.Conv3d):
    """``nn.Conv3d`` with TrAct's weight gradient. x: (N, C, D, H, W) or (C, D, H, W)."""


_PLAIN_TO_TRACT = {nn.Linear: TrActLinear, nn.Conv1d: TrActConv1d, nn.Conv2d: TrActConv2d,
                   nn.Conv3d: TrActConv3d}
_TRACT_TO_PLAIN = {tract: plain for plain, tract in _PLAIN_TO_TRACT.items()}


def _rebuild(module, cls, drop=()):
    """A new ``cls`` module with the same Parameters and its own (copied) registries."""
    twin = cls.__new__(cls)
    twin.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v
                          for k, v in module.__dict__.items() if k not in drop})
    return twin


def wrap(layer: nn.Module, lam: float = 0.1, sync: bool = False,
         process_group: torch.distributed.ProcessGroup | None = None) -> nn.Module:
    """TrAct twin of ``layer``: same Parameters, state_dict keys and forward.

    Args:
        layer: ``nn.Linear`` or ``nn.Conv1d/2d/3d`` with any options, or a TrAct layer to
            re-wrap with new settings.
        lam: finite float > 0; 0.1 in the paper, 0.2 for long runs.
        sync, process_group: with data parallelism (DDP, FSDP), all-reduce the n x n Gram
            and the row count over the group (None: the world) in backward, like
            SyncBatchNorm: the averaged gradient is then the full-batch one. Without
            torch.distributed initialized, each replica uses its own rows.

    Returns:
        A ``TrActLinear``/``TrActConvNd`` (a subclass of the layer's class) whose weight
        gradient is ``G^T X (X^T X / b + lam I)^-1``, b = batch x output positions.
    """
    lam = _tc.check_lam(lam)
    cls = _PLAIN_TO_TRACT.get(type(layer), type(layer))
    if cls not in _TRACT_TO_PLAIN:
        names = ", ".join(f"nn.{c.__name__}" for c in _PLAIN_TO_TRACT)
        raise TypeError(f"wrap() supports {names}; got layer of type {type(layer).__name__}")
    twin = _rebuild(layer, cls)
    twin.lam, twin.sync, twin.process_group = lam, bool(sync), process_group
    return twin


def unwrap(module: nn.Module) -> nn.Module:
    """The plain layer (``nn.Linear``/``nn.ConvNd``) of a TrAct layer, same Parameters."""
    cls = _TRACT_TO_PLAIN.get(type(module))
    if cls is None:
        raise TypeError(f"unwrap() takes a layer made by wrap(); got {type(module).__name__}")
    return _rebuild(module, cls, drop=("lam", "sync", "process_group"))
