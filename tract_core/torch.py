"""PyTorch adapter: ``wrap(layer)`` gives a layer whose weight gradient is TrAct's.

    >>> import torch, tract_core.torch as tt
    >>> conv = tt.wrap(torch.nn.Conv2d(3, 16, 3, padding=1), lam=0.1)
    >>> tt.wrap_first_layer(model, images, lam=0.1)  # finds the layer, wraps it in place
    'conv1'

Outputs and input gradients are the plain layer's: an identity autograd node on the
output owns the weight and the bias, turns G = dL/dz into TrAct's weight gradient and
sums G into the bias's, as PyTorch's own formula does.
"""

from __future__ import annotations

import copy
import functools
import math
import typing
from collections.abc import Sequence

from tract_core._requires import requires

with requires("torch", "PyTorch"):
    import array_api_compat.torch as _xp
    import torch
    from torch import nn

import tract_core as _tc
from tract_core import _args
from tract_core import _torch_accumulate as _accumulate
from tract_core import _torch_adopt as _adopt
from tract_core._torch_accumulate import discard, finalize

__all__ = ["TrAct", "TrActConv1d", "TrActConv2d", "TrActConv3d", "TrActLinear", "conv",
           "discard", "finalize", "linear", "unwrap", "wrap", "wrap_first_layer"]

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


def _bias_grad(grad_z, spec, dtype):
    """The bias's gradient: G summed over batch and positions, PyTorch's own formula. A
    conv's node would take it from oneDNN's fused backward, which computes a whole float32
    weight gradient even for the bias alone (on a 7x7/2 stem, ten times the sum's time)."""
    axes = [0, *range(2, grad_z.ndim)] if spec.stride else list(range(grad_z.ndim - 1))
    return (grad_z.sum(axes) if axes else grad_z).to(dtype)


class _TrActGrads(torch.autograd.Function):
    """Identity on the output z whose backward gives the weight TrAct's gradient and the
    bias the plain one (per vmap call)."""

    @staticmethod
    def forward(z, weight, x, spec, statistics, bias):
        return z

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, weight, x, ctx.spec, statistics, bias = inputs
        ctx.accumulating = statistics is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_dirty(z)  # z itself, not a view: in-place ops after it (ReLU) work
        ctx.save_for_backward(weight, x)

    @staticmethod
    def vmap(info, in_dims, z, weight, x, spec, statistics, bias):
        return z, in_dims[0]

    @staticmethod
    def backward(ctx, grad_z):
        (weight, x), spec = ctx.saved_tensors, ctx.spec
        grad_w = grad_x = statistics = grad_b = None
        compiling = torch.compiler.is_compiling()
        if ctx.accumulating:  # the sums go to the statistics; the weight's wait for finalize
            statistics = (_accumulate.statistics_op if compiling else _accumulate.statistics)(
                x, grad_z, weight, spec.lam, *spec[3:-1])
            grad_w = torch.zeros_like(weight)
        elif ctx.needs_input_grad[1]:
            weight_grad = _weight_grad_op if compiling else _weight_grad
            grad_w = weight_grad(x, grad_z, weight, *spec[:-1])
        if torch.is_grad_enabled() and ctx.needs_input_grad[2]:  # create_graph=True
            # Zero whose derivative in W is that of dx = dz/dx^T G (the layer's node has it
            # blind to W): penalties on dx get the plain weight gradient. vjp nests in torch.func.
            _, vjp = torch.func.vjp(lambda xs: spec.plain_forward(xs, weight), x.detach())
            (dx,) = vjp(grad_z.detach())
            grad_x = dx - dx.detach()
        if ctx.needs_input_grad[5]:
            grad_b = _bias_grad(grad_z, spec, ctx.bias_dtype)
        return grad_z, grad_w, grad_x, None, statistics, grad_b


def _apply(x, weight, bias, spec, statistics=None):
    """The plain forward, and TrAct's node on its output if the weight wants a gradient."""
    if statistics is not None:
        _tc.check_packed_shape(statistics.shape, weight.shape[0], math.prod(weight.shape[1:]),
                               spec.groups)
    # Under torch.func, a weight only an outer transform differentiates has no requires_grad.
    transforms = not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()
    if not (torch.is_grad_enabled() and (weight.requires_grad or transforms)):
        return _nan_if_stepped(spec.plain_forward(x, weight, bias), statistics)
    # The plain op's node gives only the input gradient; TrAct's node the weight's and bias's.
    z = spec.plain_forward(x, weight.detach(), None if bias is None else bias.detach())
    if z.is_complex():
        raise TypeError(f"TrAct's weight gradient needs real floating point tensors; got "
                        f"weight of dtype {weight.dtype} and input of dtype {x.dtype}")
    return _TrActGrads.apply(_nan_if_stepped(z, statistics), weight, x, spec, statistics, bias)


def _nan_if_stepped(z, statistics):
    """NaN outputs once the statistics are not zero: an optimizer stepped them, so their
    sums were never preconditioned (a plain optimizer on a Keras layer's statistics)."""
    if statistics is None:
        return z
    return z + torch.where((statistics != 0).any(), torch.nan, 0.0).to(z.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           lam: float = 0.1, sync: bool = False,
           process_group: torch.distributed.ProcessGroup | None = None,
           statistics: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with TrAct's weight gradient.

    Args:
        x: (..., n) inputs; every leading position is one row of X.
        weight: (m, n). bias: (m,) or None. Real floating point (TypeError for complex).
        lam, sync, process_group: as for `wrap`.
        statistics: for exact accumulation by hand, a leaf tensor of
            `tract_core.packed_size` entries in `tract_core.statistics_dtype`, requiring
            grad: its gradient receives the call's `tract_core.pack_statistics` and the
            weight's gradient is zero (`wrap(..., accumulate=True)` does this for a layer).

    Returns:
        (..., m), exactly ``F.linear(x, weight, bias)``. Input and bias gradients are the
        plain layer's (the bias's, G summed, from TrAct's node), also under
        ``create_graph=True`` (gradient penalties).
    """
    group = "" if process_group is None else process_group.group_name
    return _apply(x, weight, bias, _Spec(_tc.check_lam(lam), bool(sync), group), statistics)


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         stride: int | Sequence[int] = 1, padding: str | int | Sequence[int] = 0,
         dilation: int | Sequence[int] = 1, groups: int = 1, padding_mode: str = "zeros",
         lam: float = 0.1, sync: bool = False,
         process_group: torch.distributed.ProcessGroup | None = None,
         statistics: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv{1,2,3}d`` (with nn.ConvNd's padding modes) and TrAct's weight gradient.

    Args:
        x: (N, C, *spatial) or unbatched (C, *spatial), 1 to 3 spatial axes.
        weight: (M, C / groups, *kernel_size). bias: (M,) or None. Real floating point.
        stride, dilation: int or one per axis. padding: int, one per axis, 'same' or
            'valid'. padding_mode: 'zeros', 'reflect', 'replicate' or 'circular'.
        lam, sync, process_group, statistics: as for `linear` (statistics per group).

    Returns:
        (N, M, *out_spatial), bit-identical to the matching ``nn.ConvNd`` forward.
        Input and bias gradients are the plain layer's, as for `linear`; the bias's sum of
        G is the conv kernel's to float rounding (summed in another order).
    """
    return _conv(x, weight, bias, stride, padding, dilation, groups, padding_mode, lam, sync,
                 process_group, statistics)


def _conv(x, weight, bias, stride, padding, dilation, groups, padding_mode, lam, sync,
          process_group, statistics=None):
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
    z = _apply(x, weight, bias, spec, statistics)
    return z[0] if unbatched else z


class _TrAct:
    """Mixin: TrAct layers are their plain layer plus ``lam``, ``sync``, ``process_group``."""

    lam: float
    sync: bool
    process_group: torch.distributed.ProcessGroup | None
    accumulate: bool = False
    _statistics: torch.Tensor | None = None  # accumulate=True: the sums, see finalize

    def __init__(self, *args: typing.Any, lam: float = 0.1, sync: bool = False,
                 process_group: torch.distributed.ProcessGroup | None = None,
                 accumulate: bool = False, **kwargs: typing.Any) -> None:
        lam = _tc.check_lam(lam)
        super().__init__(*args, **kwargs)
        self.lam, self.sync, self.process_group = lam, bool(sync), process_group
        self.accumulate = bool(accumulate)
        if self.accumulate:
            _accumulate.attach(self)

    def _apply(self, fn, recurse=True):
        if self.accumulate:
            _accumulate.check_not_pending(self)  # before the weight moves, not after
        out = super()._apply(fn, recurse)
        if self.accumulate:  # the sums follow the weight to its new device or dtype
            _accumulate.attach(self)
        return out

    def __setstate__(self, state):  # copies and unpickled layers: the optimizer checks them
        super().__setstate__(state)
        if self.accumulate:
            _accumulate.register(self)

    def extra_repr(self):
        return (f"{super().extra_repr()}, lam={self.lam}" + (", sync=True" if self.sync else "")
                + (", accumulate=True" if self.accumulate else ""))

    def forward(self, x):
        statistics = None
        if self.accumulate and torch.is_grad_enabled() and self.weight.requires_grad:
            statistics = self._statistics
        group = "" if self.process_group is None else self.process_group.group_name
        if isinstance(self, nn.Linear):
            spec = _Spec(self.lam, self.sync, group)
            return _apply(x, self.weight, self.bias, spec, statistics)
        return _conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups, self.padding_mode, self.lam, self.sync, self.process_group,
                     statistics)


class TrActLinear(_TrAct, nn.Linear):
    """``nn.Linear`` with TrAct's weight gradient. x: (..., in_features).

    ``TrActLinear(48, 96, lam=0.1)``:
    nn.Linear's arguments, and ``lam``, ``sync``, ``process_group`` by keyword (as for
    `wrap`).
    """


class TrActConv1d(_TrAct, nn.Conv1d):
    """``nn.Conv1d`` with TrAct's weight gradient. x: (N, C, L) or (C, L).

    ``TrActConv1d(1, 32, 9, stride=2, lam=0.1)``:
    nn.Conv1d's arguments, and ``lam``, ``sync``, ``process_group`` by keyword (as for
    `wrap`).
    """


class TrActConv2d(_TrAct, nn.Conv2d):
    """``nn.Conv2d`` with TrAct's weight gradient. x: (N, C, H, W) or (C, H, W).

    ``TrActConv2d(3, 64, 7, stride=2, padding=3, bias=False, lam=0.05)``:
    nn.Conv2d's arguments, and ``lam``, ``sync``, ``process_group`` by keyword (as for
    `wrap`).
    """


class TrActConv3d(_TrAct, nn.Conv3d):
    """``nn.Conv3d`` with TrAct's weight gradient. x: (N, C, D, H, W) or (C, D, H, W).

    ``TrActConv3d(3, 32, (2, 7, 7), stride=(1, 2, 2), lam=0.1)``:
    nn.Conv3d's arguments, and ``lam``, ``sync``, ``process_group`` by keyword (as for
    `wrap`).
    """


_PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Plain layer class (nn.Linear, nn.ConvNd or an accepted subclass) <-> its TrAct class.
_PLAIN_TO_TRACT = dict(zip(_PLAIN, (TrActLinear, TrActConv1d, TrActConv2d, TrActConv3d)))
_TRACT_TO_PLAIN = {tract: plain for plain, tract in _PLAIN_TO_TRACT.items()}


def _new_twin(plain_cls):
    """An empty instance of ``plain_cls``'s TrAct class (pickle and deepcopy fill it)."""
    cls = _tract_class(plain_cls)
    return cls.__new__(cls)


def _reduce_twin(self, protocol):
    return _new_twin, (_TRACT_TO_PLAIN[type(self)],), self.__dict__


def _tract_class(plain_cls):
    """The TrAct class of a plain layer class; for a subclass of nn.Conv2d (say), made once:
    a subclass of both TrActConv2d and it, whose forward is TrActConv2d's."""
    if plain_cls not in _PLAIN_TO_TRACT:
        base = next(c for c in plain_cls.__mro__ if c in _PLAIN)
        cls = type(f"TrAct{plain_cls.__name__}", (_PLAIN_TO_TRACT[base], plain_cls),
                   {"__module__": __name__, "__reduce_ex__": _reduce_twin,
                    "__doc__": f"``{plain_cls.__name__}`` with TrAct's weight gradient."})
        _PLAIN_TO_TRACT[plain_cls], _TRACT_TO_PLAIN[cls] = cls, plain_cls
    return _PLAIN_TO_TRACT[plain_cls]


def _rebuild(module, cls, drop=()):
    """A new ``cls`` module with the same Parameters and its own (copied) registries."""
    twin = cls.__new__(cls)
    twin.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v
                          for k, v in module.__dict__.items() if k not in drop})
    return twin


def wrap(layer: nn.Module, lam: float = 0.1, sync: bool = False,
         process_group: torch.distributed.ProcessGroup | None = None,
         accumulate: bool = False) -> nn.Module:
    """TrAct twin of ``layer``: same Parameters, state_dict keys and forward.

    Args:
        layer: ``nn.Linear`` or ``nn.Conv1d/2d/3d`` with any options, or a TrAct layer to
            re-wrap with new settings. A subclass is accepted where its forward is provably
            the plain one: neither its class nor the instance defines ``forward``,
            ``_conv_forward`` or an attribute the forward reads. Refused with a TypeError
            saying why: subclasses that do (timm's ``StdConv2d``), parametrized layers
            (``weight_norm``, ``spectral_norm``, pruning) and lazy layers before their
            first forward.
        lam: finite float > 0; 0.1 in the paper, 0.2 for long runs.
        sync, process_group: with data parallelism (DDP, FSDP), all-reduce the n x n Gram
            and the row count over the group (None: the world) in backward, like
            SyncBatchNorm: the averaged gradient is then the full-batch one. Without
            torch.distributed initialized, each replica uses its own rows.
        accumulate: exact gradient accumulation over micro-batches: each backward adds
            its ``G^T X``, ``X^T X`` and row count to the layer's sums (float64) and gives
            the weight a zero gradient; `finalize` then writes the union batch's TrAct
            gradient, and ``optimizer.step()`` raises until it has. Under data
            parallelism it needs ``sync=True`` (`finalize` all-reduces once).

    Returns:
        A ``TrActLinear``/``TrActConvNd`` (for a subclass ``C`` of nn.Conv2d, say, a
        class ``TrActC`` derived from both ``C`` and ``TrActConv2d``) whose weight
        gradient is ``G^T X (X^T X / b + lam I)^-1``, b = batch x output positions.
    """
    lam = _tc.check_lam(lam)
    if isinstance(layer, _TrAct):
        cls = type(layer)
    else:
        base = next((c for c in type(layer).__mro__ if c in _PLAIN), None)
        if base is None:
            names = ", ".join(f"nn.{c.__name__}" for c in _PLAIN)
            raise TypeError(f"wrap() supports {names} and their subclasses; got layer of type "
                            f"{type(layer).__name__}")
        _adopt.check_plain_forward(layer, base)
        cls = _tract_class(type(layer))
    _accumulate.check_not_pending(layer)
    twin = _rebuild(layer, cls, drop=("_statistics",))
    twin.lam, twin.sync, twin.process_group = lam, bool(sync), process_group
    twin.accumulate = bool(accumulate)
    if twin.accumulate:
        _accumulate.attach(twin)
    return twin


def TrAct(layer: nn.Module, l: float = 0.1) -> nn.Module:  # noqa: E741
    """The official implementation's call, ``TrAct(layer, l=0.1)``: ``wrap(layer, lam=l)``.

    Accepts everything `wrap` accepts (``nn.Conv1d/3d`` and subclasses too).
    """
    return wrap(layer, lam=l)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain layer (``nn.Linear``/``nn.ConvNd``, or the subclass that was wrapped) of
    a TrAct layer, same Parameters."""
    cls = _TRACT_TO_PLAIN.get(type(module))
    if cls is None:
        raise TypeError(f"unwrap() takes a layer made by wrap(); got {type(module).__name__}")
    _accumulate.check_not_pending(module)
    return _rebuild(module, cls, drop=("lam", "sync", "process_group", "accumulate",
                                       "_statistics"))


def wrap_first_layer(model: nn.Module, example_input: object = None, lam: float = 0.1, *,
                     sync: bool = False,
                     process_group: torch.distributed.ProcessGroup | None = None) -> str:
    """Wraps the layer that first consumes the input, in place, and returns its path.

        >>> path = tt.wrap_first_layer(model, torch.randn(2, 3, 224, 224), lam=0.1)
        >>> path
        'conv1'

    The layer is timm's ``model.pretrained_cfg['first_conv']`` where the model has one
    (no forward is run). Otherwise one forward of ``example_input`` (eval mode, no
    gradients, every module's mode restored) finds the first leaf module with a weight or
    a trainable parameter that it calls: module names play no part. Other modules on the
    way (``nn.Identity``, ``nn.Dropout``, ``nn.Flatten``, pooling, a fixed mean/std
    standardization) are passed over, and so are functional ops in the model's forward:
    they are the model's preprocessing. A layer that is already a TrAct layer is
    re-wrapped with the given settings.

    Args:
        model: the model, built and on its device; wrap before ``torch.compile`` or DDP.
        example_input: one input batch (a few examples suffice): a tensor, a tuple of
            positional arguments, or a dict of keyword arguments. Not needed for timm
            models with ``pretrained_cfg['first_conv']``.
        lam, sync, process_group: as for `wrap`.

    Returns:
        The layer's dotted path in ``model`` (``"conv1"``, ``"patch_embed.proj"``,
        ``"0"`` in an ``nn.Sequential``); ``model.get_submodule(path)`` is the TrAct layer.
        A layer held at several paths is replaced at each of them.

    Raises:
        TypeError: the first layer is no layer `wrap` accepts (e.g. ``nn.ConvTranspose2d``,
            a weight-standardized conv), or a normalisation (BatchNorm, LayerNorm,
            GroupNorm, InstanceNorm, LocalResponseNorm, RMSNorm) comes before it; the
            message names the layer's path and class.
        ValueError: no example input where one is needed, no layer with a weight or a
            trainable parameter is called, the model is itself the layer, or
            ``first_conv`` names no submodule.
    """
    lam = _tc.check_lam(lam)
    path, layer = _adopt.first_layer(model, example_input)
    try:
        twin = wrap(layer, lam, sync, process_group)
    except TypeError as error:
        raise TypeError(f"first layer {path!r}: {error}") from None
    _adopt.replace(model, layer, twin)
    return path
