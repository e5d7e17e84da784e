"""Equinox adapter: ``eqx.nn.Linear`` and ``eqx.nn.Conv`` whose weight gradient is TrAct's.

    >>> import equinox as eqx, jax
    >>> import tract_core.equinox as teqx
    >>> stem = teqx.TrActConv2d(3, 64, 3, padding=1, lam=0.1, key=jax.random.key(0))
    >>> model = eqx.tree_at(lambda m: m.stem, model, teqx.wrap(model.stem))  # same arrays

Each class subclasses its Equinox layer: the same fields (plus a static ``lam``), the same
initialisation, options and per-example call, ``x: (in_features,)`` or ``(C, *spatial)``,
mapped over the batch with ``jax.vmap``. The product runs through `tract_core.jax`, whose
weight gradient pools the statistics of every example of the vmap: the gradient a batched
call would give. The forward and the input and bias gradients are the plain layer's.
Equinox modules are immutable: `wrap` returns a new layer and ``eqx.tree_at`` puts it in
the model; `wrap_first_layer` does both for the first layer a forward calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tract_core._call_order import recording_calls
from tract_core._requires import requires

with requires("equinox", "Equinox and JAX", "equinox", "jax"):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

import tract_core as _tc
from tract_core import jax as _tj

__all__ = ["TrActConv", "TrActConv1d", "TrActConv2d", "TrActConv3d", "TrActLinear", "wrap",
           "wrap_first_layer"]

_PAD_MODES = {"REFLECT": "reflect", "REPLICATE": "edge", "CIRCULAR": "wrap"}


class TrActLinear(eqx.nn.Linear):
    """``eqx.nn.Linear`` with TrAct's weight gradient.

    Takes ``eqx.nn.Linear``'s arguments and ``lam``, a finite float > 0, keyword only (0.1
    in the paper, 0.2 for long runs). x: ``(in_features,)`` (``()`` for ``"scalar"``) as
    ``eqx.nn.Linear`` takes it, or ``(..., in_features)``: each leading position is a row
    of the Gram.
    """

    lam: float = eqx.field(static=True, default=0.1)

    def __init__(self, in_features: int | str, out_features: int | str,
                 use_bias: bool = True, dtype: Any = None, *, lam: float = 0.1,
                 key: jax.Array) -> None:
        super().__init__(in_features, out_features, use_bias, dtype, key=key)
        self.lam = _tc.check_lam(lam)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        if self.in_features == "scalar":
            if jnp.shape(x) != ():
                raise ValueError(f"x must have shape () (in_features='scalar'), got shape "
                                 f"{jnp.shape(x)}")
            x = jnp.reshape(x, (1,))
        z = _tj.dense(x, self.weight.T, self.bias, lam=self.lam)
        return jnp.reshape(z, z.shape[:-1]) if self.out_features == "scalar" else z


class TrActConv(eqx.nn.Conv):
    """``eqx.nn.Conv`` with TrAct's weight gradient (one Gram per group).

    Takes ``eqx.nn.Conv``'s arguments (every padding form and mode) and ``lam``, a finite
    float > 0, keyword only. x: ``(in_channels, *spatial)``, one example, as
    ``eqx.nn.Conv`` takes it.
    """

    lam: float = eqx.field(static=True, default=0.1)

    def __init__(self, num_spatial_dims: int, in_channels: int, out_channels: int,
                 kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                 padding: str | int | Sequence[int] | Sequence[tuple[int, int]] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, use_bias: bool = True,
                 padding_mode: str = "ZEROS", dtype: Any = None, *, lam: float = 0.1,
                 key: jax.Array) -> None:
        eqx.nn.Conv.__init__(self, num_spatial_dims, in_channels, out_channels, kernel_size,
                             stride, padding, dilation, groups, use_bias, padding_mode, dtype,
                             key=key)
        self.lam = _tc.check_lam(lam)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        d = self.num_spatial_dims
        if jnp.ndim(x) != d + 1:
            raise ValueError(f"x must have shape (in_channels, *spatial) with {d} spatial "
                             f"axes (vmap the layer over a batch), got shape {jnp.shape(x)}")
        padding = self.padding
        if self.padding_mode != "ZEROS":  # as Equinox does it: pad, then no padding
            if isinstance(padding, str):
                window = [r * (k - 1) + 1 for k, r in zip(self.kernel_size, self.dilation)]
                padding = jax.lax.padtype_to_pads(x.shape[1:], window, self.stride, padding)
            x = jnp.pad(x, [(0, 0), *padding], _PAD_MODES[self.padding_mode])
            padding = "VALID"
        # Equinox: weight (O, I / groups, *window), channels-first; tract_core.jax: the
        # Flax layout (*window, I / groups, O), channels-last.
        kernel = jnp.transpose(self.weight, (*range(2, d + 2), 1, 0))
        z = _tj.conv(jnp.moveaxis(x, 0, -1)[None], kernel, None, strides=self.stride,
                     padding=padding, kernel_dilation=self.dilation,
                     feature_group_count=self.groups, lam=self.lam)
        z = jnp.moveaxis(z[0], -1, 0)
        return z + self.bias if self.use_bias else z  # bias (O, 1, ..., 1), as Equinox's


class TrActConv1d(TrActConv, eqx.nn.Conv1d):
    """``eqx.nn.Conv1d`` with TrAct's weight gradient: its arguments and ``lam``.
    x: (in_channels, length)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1,
                 padding: str | int | Sequence[int] | Sequence[tuple[int, int]] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, use_bias: bool = True,
                 padding_mode: str = "ZEROS", dtype: Any = None, *, lam: float = 0.1,
                 key: jax.Array) -> None:
        TrActConv.__init__(self, 1, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, groups, use_bias, padding_mode, dtype, lam=lam, key=key)


class TrActConv2d(TrActConv, eqx.nn.Conv2d):
    """``eqx.nn.Conv2d`` with TrAct's weight gradient: its arguments and ``lam``.
    x: (in_channels, height, width)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1,
                 padding: str | int | Sequence[int] | Sequence[tuple[int, int]] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, use_bias: bool = True,
                 padding_mode: str = "ZEROS", dtype: Any = None, *, lam: float = 0.1,
                 key: jax.Array) -> None:
        TrActConv.__init__(self, 2, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, groups, use_bias, padding_mode, dtype, lam=lam, key=key)


class TrActConv3d(TrActConv, eqx.nn.Conv3d):
    """``eqx.nn.Conv3d`` with TrAct's weight gradient: its arguments and ``lam``.
    x: (in_channels, depth, height, width)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1,
                 padding: str | int | Sequence[int] | Sequence[tuple[int, int]] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, use_bias: bool = True,
                 padding_mode: str = "ZEROS", dtype: Any = None, *, lam: float = 0.1,
                 key: jax.Array) -> None:
        TrActConv.__init__(self, 3, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, groups, use_bias, padding_mode, dtype, lam=lam, key=key)


_PLAIN_TO_TRACT = {eqx.nn.Linear: TrActLinear, eqx.nn.Conv: TrActConv,
                   eqx.nn.Conv1d: TrActConv1d, eqx.nn.Conv2d: TrActConv2d,
                   eqx.nn.Conv3d: TrActConv3d}
_TRACT = set(_PLAIN_TO_TRACT.values())


def wrap(layer: eqx.nn.Linear | eqx.nn.Conv, lam: float = 0.1) -> TrActLinear | TrActConv:
    """TrAct twin of an ``eqx.nn.Linear`` or ``eqx.nn.Conv`` (``Conv1d/2d/3d``).

    Args:
        layer: the plain layer, any options; a TrAct layer is re-wrapped with the new lam.
        lam: finite float > 0.

    Returns:
        A new ``TrActLinear``/``TrActConv*`` holding the very same arrays and options (a
        subclass of the layer's class, same pytree leaves). Equinox modules are immutable:
        put it in the model with ``eqx.tree_at(lambda m: m.stem, model, twin)``.
    """
    lam = _tc.check_lam(lam)
    cls = _PLAIN_TO_TRACT.get(type(layer), type(layer))
    if cls not in _TRACT:
        raise TypeError(f"wrap() takes an eqx.nn.Linear or eqx.nn.Conv (Conv1d/2d/3d), got "
                        f"{type(layer).__name__}")
    # As Equinox rebuilds a module from its leaves: no init, the fields set as they are.
    twin = object.__new__(cls)
    for field in dataclasses.fields(layer):
        object.__setattr__(twin, field.name, getattr(layer, field.name))
    object.__setattr__(twin, "lam", lam)
    return twin


_NORMALIZATIONS = tuple(getattr(eqx.nn, name) for name in (
    "LayerNorm", "GroupNorm", "RMSNorm", "BatchNorm") if hasattr(eqx.nn, name))


def _children(node):
    """(key path, module) of the modules right inside ``node``, and whether ``node``
    holds arrays of its own (outside those modules)."""
    entries = jax.tree_util.tree_flatten_with_path(
        node, is_leaf=lambda x: x is not node and isinstance(x, eqx.Module))[0]
    modules = [(path, leaf) for path, leaf in entries if isinstance(leaf, eqx.Module)]
    return modules, any(eqx.is_array(leaf) for _, leaf in entries)


def _layer_paths(model):
    """{id: (key path, module)} of the modules that can be a first layer: normalisations,
    and modules holding arrays whose submodules hold none (a Linear, a Conv; not blocks)."""
    holders, found, stack = [], {}, [((), model)]
    while stack:
        path, module = stack.pop()
        modules, holds = _children(module)
        stack.extend((path + key, child) for key, child in modules)
        if path and holds:
            holders.append((path, module))
        if path and isinstance(module, _NORMALIZATIONS):
            found[id(module)] = path, module
    for path, module in holders:
        if not any(p[:len(path)] == path != p for p, _ in holders):
            found[id(module)] = path, module
    return found


def _called_layers(model, args, kwargs):
    """Key paths of the candidate layers in the order one forward first calls them, traced
    abstractly (``eqx.filter_eval_shape``: no FLOPs)."""
    with recording_calls(_layer_paths(model)) as order:
        eqx.filter_eval_shape(lambda *a, **k: model(*a, **k), *args, **kwargs)
    return order


def _follow(node, path):
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            node = getattr(node, key.name)
        else:
            node = node[key.idx if isinstance(key, jax.tree_util.SequenceKey) else key.key]
    return node


def _dotted(path):
    return ".".join(str(getattr(key, "name", getattr(key, "idx", getattr(key, "key", key))))
                    for key in path)


def _call_arguments(example_input):
    """(args, kwargs) of ``model(...)`` on the example: a tuple is the positional
    arguments, a dict the keyword arguments, anything else the one argument."""
    if isinstance(example_input, tuple):
        return example_input, {}
    return ((), dict(example_input)) if isinstance(example_input, dict) else (
        (example_input,), {})


def wrap_first_layer(model: eqx.Module, example_input: Any,
                     lam: float = 0.1) -> tuple[eqx.Module, str]:
    """The model with the first layer ``model(example_input)`` calls replaced by its twin.

    One forward of the example, traced abstractly (no FLOPs), records the order in which
    the model's layers are called; the first is the first module holding arrays (not a
    block around such modules). An ``eqx.nn.Linear``/``Conv`` is replaced by `wrap`'s twin
    with ``eqx.tree_at``.

    Args:
        model: an Equinox module.
        example_input: one example as the model takes it (an image ``(C, H, W)``), a
            tuple of positional arguments (``(image, state)``) or a dict of keyword
            arguments; arrays or ``jax.ShapeDtypeStruct``, other values as they are.
        lam: finite float > 0.

    Returns:
        (new model, path of the wrapped layer, e.g. ``"stem"`` or ``"layers.0"``).

    Raises:
        TypeError: the first layer is a normalisation, an ``eqx.nn.ConvTranspose`` or
            another module that is not a Linear or Conv (named in the message).
        ValueError: the forward calls no layer holding arrays (or ``model`` is a layer
            itself: use `wrap`).
    """
    lam = _tc.check_lam(lam)
    if isinstance(model, tuple(_PLAIN_TO_TRACT)):
        raise ValueError(f"model is itself an eqx.nn.{type(model).__name__}: use wrap(model, "
                         f"lam)")
    order = _called_layers(model, *_call_arguments(example_input))
    if not order:
        raise ValueError(f"model(...) on the example called no layer holding arrays in "
                         f"{type(model).__name__}")
    path = order[0]
    first, name = _follow(model, path), _dotted(path)
    if isinstance(first, _NORMALIZATIONS):
        after = [_dotted(p) for p in order
                 if isinstance(_follow(model, p), tuple(_PLAIN_TO_TRACT))]
        hint = "".join(f"; to wrap the layer after it ({a!r}) all the same, eqx.tree_at it "
                       f"with tract_core.equinox.wrap" for a in after[:1])
        raise TypeError(f"the model normalises its input with {name!r} "
                        f"({type(first).__name__}) before any eqx.nn.Linear or eqx.nn.Conv, "
                        f"and TrAct is for the layer that sees the input{hint}")
    if not isinstance(first, tuple(_PLAIN_TO_TRACT)):
        raise TypeError(f"the model's first layer {name!r} ({type(first).__name__}) is not a "
                        f"layer TrAct supports: eqx.nn.Linear or eqx.nn.Conv")
    return eqx.tree_at(lambda m: _follow(m, path), model, wrap(first, lam)), name
