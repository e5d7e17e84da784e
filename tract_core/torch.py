"""PyTorch adapter: ``wrap(layer)`` gives a layer whose weight gradient is TrAct's.

    >>> import torch, tract_core.torch as tt
    >>> conv = tt.wrap(torch.nn.Conv2d(3, 16, 3, padding=1), lam=0.1)

How it hooks into autograd: the wrapped forward runs the plain layer's own forward with
the weight detached, so forward values, input gradients and bias gradients are computed
by exactly the code the plain layer runs. The output then passes through an identity
autograd node that owns the weight; its backward receives G = dL/dz and returns TrAct's
weight gradient computed by :mod:`tract_core`.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import array_api_compat.torch as _xp
import torch
from torch import nn

import tract_core as _tc

__all__ = [
    "TrActConv1d",
    "TrActConv2d",
    "TrActConv3d",
    "TrActLinear",
    "conv",
    "linear",
    "unwrap",
    "wrap",
]


@dataclasses.dataclass(frozen=True)
class _ConvGeometry:
    """What the backward needs to know about a conv: padding as F.pad takes it, etc."""

    pad: tuple  # F.pad order: last axis first, (lo, hi) each
    pad_mode: str  # nn.ConvNd padding_mode
    stride: tuple
    dilation: tuple
    groups: int


@dataclasses.dataclass(frozen=True)
class _Options:
    """TrAct's settings for one call: lam and how statistics are shared across replicas."""

    lam: float
    sync: bool = False
    group: object = None  # torch.distributed process group; None: the default group


def _compute_dtype(x, grad_z):
    """The dtype of TrAct's products, G^T X and the Gram, and of the solve: the core's
    statistics dtype (float64 but on devices without it), since the solve amplifies
    their rounding errors."""
    return _tc.statistics_dtype(_xp, torch.promote_types(x.dtype, grad_z.dtype), x.device)


def _tf32_off(device):
    """Full float32 products on CUDA while TrAct computes (eager; returns what to restore).

    A user's TF32 opt-in speeds up their own layers, but its 10-bit mantissa loses digits
    that the Gram of pixel-scale patches and the solve need (the JAX adapter computes at
    'highest' precision likewise). Compiled, this runs eagerly too (in _weight_grad_op).
    """
    if device.type != "cuda":
        return None
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    return saved


def _tf32_restore(saved):
    if saved is not None:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def _syncing(options):
    return (options.sync and torch.distributed.is_available()
            and torch.distributed.is_initialized())


def _precondition(plain, gram, rows, options):
    """plain (gram_all / b_all + lam I)^-1, summing gram and b over replicas if syncing.

    With every replica's gradient preconditioned by the global statistics, the usual
    gradient averaging yields exactly the single-device full-batch TrAct gradient.
    """
    count = rows
    if _syncing(options):
        # all_reduce works in place on dense storage: the Gram may be a strided view.
        gram = gram.contiguous()
        count = torch.full((), rows, dtype=gram.dtype, device=gram.device)  # no host copy
        torch.distributed.all_reduce(gram, group=options.group)
        torch.distributed.all_reduce(count, group=options.group)
        # No rows on any replica: a zero Gram and gradient, and a zero result, as the
        # core gives a count of 0 given as a number.
        count = count.clamp(min=1)
    return _tc.precondition(plain, gram, count, options.lam, xp=_xp)


def _linear_weight_grad(x, grad_z, weight, options):
    n, m = weight.shape[1], weight.shape[0]
    dtype = _compute_dtype(x, grad_z)
    rows = x.reshape(-1, n).to(dtype)
    grads = grad_z.reshape(-1, m).to(dtype)
    if rows.shape[0] < n and not _syncing(options):
        return _tc.weight_grad(rows, grads, options.lam, xp=_xp)  # b x b push-through form
    return _precondition(grads.T @ rows, _tc.gram(rows, xp=_xp), rows.shape[0], options)


def _correlate(g, y, kernel_shape):
    """out[i, j, u] = sum_{n, q} g[n, i, q] y[n, j, q + u], by torch's conv weight-grad kernel."""
    d = len(kernel_shape)
    if d == 2 and y.device.type == "cpu" and _CHANNELS_LAST_CORRELATION:
        # oneDNN's channels-last kernel: measured on CPU, conv_gram in 0.78-0.92x the time
        # for strided stems (7x7/2, 5x5/2, 4x4/2, 3x3/2 on 1-6 channels; the 7x7/2 ImageNet
        # stem's 52 ms down to 40) and 0.96-1.07x for the other shapes tried; and nearer
        # float64 (that stem: 2.7e-5 against 7.8e-5 relative error).
        y = y.contiguous(memory_format=torch.channels_last)
    weight = g.new_empty(1).expand(g.shape[1], y.shape[1], *kernel_shape)
    return torch.ops.aten.convolution_backward(
        g, y, weight, None, [1] * d, [0] * d, [1] * d, False, [0] * d, 1,
        [False, True, False])[1]


_CHANNELS_LAST_CORRELATION = True  # see _correlate


# Overlapping patches of at most this many entries per group (C/g * prod(kernel)) go
# through conv_moments. With both products in float64, measured on CPU, 2 threads: the
# 7x7/2 ImageNet stem (n_g = 147) 440 ms against 742 ms through the float64 conv
# kernels (which have no oneDNN path) and the structured Gram. On an H200, with float32
# products, the structured Gram's many small kernels cost more than the patches' copy.
_FEW_PATCH_ENTRIES = 160


def _conv_weight_grad(x, grad_z, weight, options, geometry):
    """TrAct's weight gradient of a conv, (groups, M/g, n_g).

    Overlapping patches of few entries (stems): G^T X and the Gram from conv_moments'
    explicit patches. Otherwise G^T X comes from torch's conv backward kernel, as for
    the plain layer, and is preconditioned with conv_gram's Gram: for disjoint patches
    (ViT) one product of the input reordered, so that TrAct adds only that product and
    the solve to the plain layer's work.
    """
    g, d = geometry.groups, len(geometry.stride)
    dtype = _compute_dtype(x, grad_z)
    x = x.to(dtype)
    if any(geometry.pad):
        mode = "constant" if geometry.pad_mode == "zeros" else geometry.pad_mode
        x = nn.functional.pad(x, geometry.pad, mode=mode)
    grad_z = grad_z.to(dtype)
    kernel_size = weight.shape[2:]
    m_g, n_g = weight.shape[0] // g, math.prod(weight.shape[1:])
    positions = math.prod(grad_z.shape[2:])
    b = grad_z.shape[0] * positions  # no images: b = 0, and a zero gradient
    if b < n_g and not _syncing(options):
        # b < n: the b x b push-through form needs G itself, row by row.
        patches = _tc.conv_patches(x, kernel_size, geometry.stride, geometry.dilation, g,
                                   xp=_xp)
        rows = grad_z.reshape(grad_z.shape[0], g, m_g, positions).permute(1, 0, 3, 2)
        return _tc.weight_grad(patches, rows.reshape(g, b, m_g), options.lam, xp=_xp)
    if not b or (n_g <= _FEW_PATCH_ENTRIES and not _tc.disjoint_patches(
            kernel_size, geometry.stride, geometry.dilation)):
        # Explicit patches of few entries each (or none at all): matmuls on them beat
        # the CPU conv kernel's weight gradient and give the Gram as well.
        grad_w, gram, _ = _tc.conv_moments(x, grad_z, kernel_size, geometry.stride,
                                           geometry.dilation, g, xp=_xp)
        return _precondition(grad_w, gram, b, options)
    grad_w = torch.ops.aten.convolution_backward(
        grad_z, x, weight.to(dtype), None, geometry.stride, [0] * d, geometry.dilation,
        False, [0] * d, g, [False, True, False])[1]
    gram = _tc.conv_gram(x, kernel_size, geometry.stride, geometry.dilation, g,
                         correlate=_correlate, xp=_xp)
    return _precondition(grad_w.reshape(g, m_g, n_g), gram, b, options)


def _weight_grad(x, grad_z, weight, options, geometry):
    """TrAct's weight gradient, in the weight's shape and dtype (geometry None: linear)."""
    # TrAct's products and solve run in the statistics dtype, whatever autocast or TF32 say.
    tf32 = _tf32_off(grad_z.device)
    try:
        with torch.autocast(grad_z.device.type, enabled=False):
            if geometry is None:
                grad_w = _linear_weight_grad(x, grad_z, weight, options)
            else:
                grad_w = _conv_weight_grad(x, grad_z, weight, options, geometry)
    finally:
        _tf32_restore(tf32)
    return grad_w.reshape(weight.shape).to(weight.dtype)


@torch.library.custom_op("tract_core::weight_grad", mutates_args=())
def _weight_grad_op(x: torch.Tensor, grad_z: torch.Tensor, weight: torch.Tensor,
                    lam: float, sync: bool, group_name: str, pad: list[int], pad_mode: str,
                    stride: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """:func:`_weight_grad` as one opaque op for torch.compile (no stride: linear).

    Compiled, the backward calls this op instead of tracing the core: the core keeps
    memos (backends, Gram plans) and builds its index plans with numpy and Python
    branches, which Dynamo cannot trace inside an autograd.Function's backward. The
    op runs them eagerly, as outside torch.compile.
    """
    group = None
    if sync and group_name:
        group = torch.distributed.distributed_c10d._resolve_process_group(group_name)
    geometry = (_ConvGeometry(tuple(pad), pad_mode, tuple(stride), tuple(dilation), groups)
                if stride else None)
    return _weight_grad(x, grad_z, weight, _Options(lam, sync, group), geometry)


@_weight_grad_op.register_fake
def _(x, grad_z, weight, *args):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _compiled_weight_grad(x, grad_z, weight, options, geometry):
    group_name = options.group.group_name if options.sync and options.group else ""
    if geometry is None:
        return _weight_grad_op(x, grad_z, weight, options.lam, options.sync, group_name,
                               [], "zeros", [], [], 1)
    return _weight_grad_op(x, grad_z, weight, options.lam, options.sync, group_name,
                           list(geometry.pad), geometry.pad_mode, list(geometry.stride),
                           list(geometry.dilation), geometry.groups)


def _plain_forward(x, weight, geometry):
    """The layer's forward without bias, padding explicit (geometry None: linear)."""
    if geometry is None:
        return nn.functional.linear(x, weight)
    if any(geometry.pad):
        mode = "constant" if geometry.pad_mode == "zeros" else geometry.pad_mode
        x = nn.functional.pad(x, geometry.pad, mode=mode)
    return _CONV[len(geometry.stride)](x, weight, None, geometry.stride, 0,
                                       geometry.dilation, geometry.groups)


def _weight_term_of_input_grad(x, grad_z, weight, geometry):
    """Zero, whose derivative is that of the plain input gradient dx(G, W) = dz/dx^T G
    with respect to W, G and x held fixed: dx(G, W) - dx(G, W).detach().

    The layer's own node computes dx with the weight detached: right for the value and
    for its derivative in G, but blind to W. Added to it under create_graph, this gives
    a gradient penalty's weight gradient the plain layer's term through dx.
    """
    # torch.func.vjp rather than autograd.grad on a leaf: it nests under torch.func too.
    _, vjp = torch.func.vjp(lambda inputs: _plain_forward(inputs, weight, geometry),
                            x.detach())
    (dx,) = vjp(grad_z.detach())
    return dx - dx.detach()


def _save(ctx, z, weight, x, options, geometry):
    # z itself comes out, marked dirty rather than viewed, so that in-place ops on it
    # (ReLU(inplace=True)) work as on the plain layer's output.
    ctx.mark_dirty(z)
    ctx.save_for_backward(weight, x)
    ctx.options, ctx.geometry = options, geometry


class _TrActGrads(torch.autograd.Function):
    """Identity on the layer output z whose backward gives the weight TrAct's gradient.

    The layer's forward ran with the weight detached, so autograd's own node computes
    the input and bias gradients exactly as for the plain layer.
    """

    # forward(ctx, ...) rather than setup_context: measured on CPU, a step costs ~25 us
    # less (apply() binds setup_context's arguments through inspect.signature), 25% of
    # a small linear layer's step. torch.func's transforms get _TrActGradsForTransforms.
    @staticmethod
    def forward(ctx, z, weight, x, options, geometry):
        _save(ctx, z, weight, x, options, geometry)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        weight, x = ctx.saved_tensors
        grad_w = grad_x = None
        if ctx.needs_input_grad[1]:
            if torch.compiler.is_compiling():
                grad_w = _compiled_weight_grad(x, grad_z, weight, ctx.options, ctx.geometry)
            else:
                grad_w = _weight_grad(x, grad_z, weight, ctx.options, ctx.geometry)
        if torch.is_grad_enabled() and ctx.needs_input_grad[2]:  # create_graph=True
            grad_x = _weight_term_of_input_grad(x, grad_z, weight, ctx.geometry)
        return grad_z, grad_w, grad_x, None, None


class _TrActGradsForTransforms(_TrActGrads):
    """:class:`_TrActGrads` for torch.func's transforms (grad, vmap, ...), which need
    setup_context and a vmap rule. Under vmap each mapped call is a batch of its own:
    the backward, mapped by torch's batching rules, uses that call's rows' Gram."""

    @staticmethod
    def forward(z, weight, x, options, geometry):
        return z

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, *inputs)

    @staticmethod
    def vmap(info, in_dims, z, weight, x, options, geometry):
        return z, in_dims[0]


def _transforms_active():
    # The check autograd.Function.apply itself makes before running under torch.func.
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _tract_grads(z, weight, x, options, geometry):
    if _transforms_active():
        return _TrActGradsForTransforms.apply(z, weight, x, options, geometry)
    return _TrActGrads.apply(z, weight, x, options, geometry)


def _tract_active(weight):
    # Under torch.func a weight that only an outer transform differentiates (nested
    # grads for a gradient penalty) has requires_grad False in the inner one: there the
    # node always comes in, and gives a weight gradient at the levels that want one.
    return torch.is_grad_enabled() and (weight.requires_grad or _transforms_active())


def _options(lam, sync, process_group):
    return _Options(_tc.check_lam(lam), bool(sync), process_group)


def _check_real(z, weight, x):
    if z.is_complex():
        raise TypeError(f"TrAct's weight gradient needs real floating point tensors; got "
                        f"weight of dtype {weight.dtype} and input of dtype {x.dtype}")


def linear(x, weight, bias=None, *, lam=0.1, sync=False, process_group=None):
    """``F.linear`` with TrAct's weight gradient.

    Args:
        x: (..., n) inputs; every leading position is one row of X.
        weight: (m, n). bias: (m,) or None. Real floating point (TypeError for complex).
        lam: finite float > 0.
        sync: all-reduce the Gram and row count over ``process_group`` (default: the
            world) in backward when torch.distributed is initialized, so that averaged
            replica gradients equal the full-batch TrAct gradient.

    Returns:
        (..., m), exactly ``F.linear(x, weight, bias)``. Input and bias gradients are
        the plain layer's, also under ``create_graph=True`` (gradient penalties), where
        the input gradient stays differentiable in the weight as for the plain layer.
    """
    options = _options(lam, sync, process_group)
    if not _tract_active(weight):
        return nn.functional.linear(x, weight, bias)
    # The bias stays with autograd: its gradient is a cheap sum, exactly the plain one.
    z = nn.functional.linear(x, weight.detach(), bias)
    _check_real(z, weight, x)
    return _tract_grads(z, weight, x, options, None)


_CONV = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}


def _per_axis(value, d, name):
    value = (value,) * d if isinstance(value, int) else tuple(value)
    if len(value) != d:
        raise ValueError(f"{name} must be an int or {d} ints, got {value!r}")
    return value


def _resolve_padding(padding, kernel_size, dilation):
    """(lo, hi) per axis, the way nn.ConvNd resolves 'same' (the odd pixel goes high)."""
    d = len(kernel_size)
    if padding == "valid":
        return ((0, 0),) * d
    if padding == "same":
        totals = [dl * (k - 1) for k, dl in zip(kernel_size, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in _per_axis(padding, d, "padding"))


def conv(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1,
         padding_mode="zeros", lam=0.1, sync=False, process_group=None):
    """``F.conv{1,2,3}d`` (with nn.ConvNd's padding modes) and TrAct's weight gradient.

    Args:
        x: (N, C, *spatial) or unbatched (C, *spatial), 1 to 3 spatial axes.
        weight: (M, C / groups, *kernel_size). bias: (M,) or None. Real floating point
            (TypeError for complex).
        stride, dilation: int or one per axis. padding: int, one per axis, 'same' or
            'valid'. padding_mode: 'zeros', 'reflect', 'replicate' or 'circular'.
        lam: finite float > 0. sync, process_group: as for :func:`linear`.

    Returns:
        (N, M, *out_spatial), bit-identical to the matching ``nn.ConvNd`` forward.
        Input and bias gradients are the plain layer's, as for :func:`linear`.
    """
    options = _options(lam, sync, process_group)
    d = weight.ndim - 2
    if d not in _CONV:
        raise ValueError(f"weight must have shape (M, C/groups, *kernel) with 1-3 spatial "
                         f"axes, got shape {tuple(weight.shape)}")
    stride = _per_axis(stride, d, "stride")
    dilation = _per_axis(dilation, d, "dilation")
    pads = _resolve_padding(padding, weight.shape[2:], dilation)
    torch_pad = tuple(p for pair in reversed(pads) for p in pair)  # F.pad order
    if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise ValueError("padding_mode must be 'zeros', 'reflect', 'replicate' or "
                         f"'circular', got {padding_mode!r}")
    active = _tract_active(weight)
    # Active, an unbatched input is a batch of one (as F.conv*d itself treats it), so
    # that the output our node returns is no view.
    unbatched = active and x.ndim == d + 1
    rows = x[None] if unbatched else x
    # The bias stays with autograd: its gradient is the plain layer's, bit for bit.
    weight_in = weight.detach() if active else weight
    if padding_mode == "zeros":
        z = _CONV[d](rows, weight_in, bias, stride, padding, dilation, groups)
    else:  # as nn.ConvNd does it: pad explicitly, then convolve with no padding
        padded = nn.functional.pad(rows, torch_pad, mode=padding_mode)
        z = _CONV[d](padded, weight_in, bias, stride, 0, dilation, groups)
    if not active:
        return z
    _check_real(z, weight, x)
    geometry = _ConvGeometry(torch_pad, padding_mode, stride, dilation, groups)
    z = _tract_grads(z, weight, rows, options, geometry)
    return z[0] if unbatched else z


class _TrAct:
    """Mixin: TrAct layers are their plain layer plus ``lam``, ``sync``, ``process_group``."""

    # Defaults for layers built directly, e.g. TrActConv2d(3, 64, 3); wrap() sets them.
    lam: float = 0.1
    sync: bool = False
    process_group: object = None

    def extra_repr(self):
        return f"{super().extra_repr()}, lam={self.lam}" + (", sync=True" if self.sync else "")

    def _tract_kwargs(self):
        return {"lam": self.lam, "sync": self.sync, "process_group": self.process_group}


class TrActLinear(_TrAct, nn.Linear):
    """``nn.Linear`` with TrAct's weight gradient. x: (..., in_features)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias, **self._tract_kwargs())


class _TrActConv(_TrAct):
    def forward(self, x):
        return conv(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, groups=self.groups,
                    padding_mode=self.padding_mode, **self._tract_kwargs())


class TrActConv1d(_TrActConv, nn.Conv1d):
    """``nn.Conv1d`` with TrAct's weight gradient. x: (N, C, L) or (C, L)."""


class TrActConv2d(_TrActConv, nn.Conv2d):
    """``nn.Conv2d`` with TrAct's weight gradient. x: (N, C, H, W) or (C, H, W)."""


class TrActConv3d(_TrActConv, nn.Conv3d):
    """``nn.Conv3d`` with TrAct's weight gradient. x: (N, C, D, H, W) or (C, D, H, W)."""


_PLAIN_TO_TRACT = {
    nn.Linear: TrActLinear,
    nn.Conv1d: TrActConv1d,
    nn.Conv2d: TrActConv2d,
    nn.Conv3d: TrActConv3d,
}
_TRACT_TO_PLAIN = {tract: plain for plain, tract in _PLAIN_TO_TRACT.items()}


def _rebuild(module, cls):
    """A new module of class ``cls`` holding the very same Parameter objects."""
    twin = cls.__new__(cls)
    # Copy the containers, not their contents: same Parameters, independent registries.
    twin.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v
                          for k, v in module.__dict__.items()})
    return twin


def wrap(layer: nn.Module, lam: float = 0.1, sync: bool = False,
         process_group=None) -> nn.Module:
    """TrAct twin of ``layer``: same Parameters, state_dict keys and forward.

    Args:
        layer: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` with any
            options (stride, padding incl. 'same'/'valid', dilation, groups,
            padding_mode, bias). A TrAct layer is re-wrapped with the new ``lam``.
        lam: finite float > 0; 0.1 in the paper, 0.2 for long runs.
        sync: with data parallelism (DDP, FSDP), all-reduce the n x n Gram and the row
            count over ``process_group`` (default: the world) inside backward, like
            SyncBatchNorm, so that the averaged gradient equals the single-device
            full-batch TrAct gradient. Needs torch.distributed initialized; without it,
            or with ``sync=False``, each replica uses its own rows' statistics.
        process_group: the group to reduce over when ``sync``.

    Returns:
        A ``TrActLinear``/``TrActConvNd`` (a subclass of the layer's class) whose
        ``weight.grad`` after backward is ``G^T X (X^T X / b + lam I)^-1``, reshaped
        to the weight's shape, with b = batch x output positions (or x tokens).
    """
    lam = _tc.check_lam(lam)
    cls = type(layer) if type(layer) in _TRACT_TO_PLAIN else _PLAIN_TO_TRACT.get(type(layer))
    if cls is None:
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
    plain = _rebuild(module, cls)
    for name in ("lam", "sync", "process_group"):
        plain.__dict__.pop(name, None)
    return plain
