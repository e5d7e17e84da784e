"""Flax adapter: NNX and Linen layers whose kernel gradient is TrAct's.

    >>> from flax import nnx
    >>> import tract_core.flax as tflax
    >>> stem = tflax.TrActConv(3, 64, (3, 3), padding="SAME", lam=0.1, rngs=nnx.Rngs(0))
    >>> stem = tflax.wrap(nnx.Conv(3, 64, (3, 3), rngs=nnx.Rngs(0)))  # same params
    >>> tflax.wrap_first_layer(model, images)  # in place: 'stem.conv', from one forward

Each layer is the plain Flax layer with its ``dot_general`` / ``conv_general_dilated`` hook
making the same ``lax`` call through `tract_core.jax`. Everything else (parameters,
padding modes, masks, dtype promotion, the bias add) is the plain layer's own code: the
forward and the input and bias gradients are exactly the plain layer's, and a plain
parameter tree loads. Linen names submodules after their class (``TrActDense_0``, not
``Dense_0``): give the layer the plain tree's ``name=``.
"""

from __future__ import annotations

import dataclasses
import types
from collections import abc
from collections.abc import Sequence
from typing import Any

from tract_core._call_order import recording_calls
from tract_core._requires import requires

with requires("flax", "Flax and JAX", "flax", "jax"):
    import flax.linen as nn
    import jax
    from flax import nnx
    from jax import lax

import tract_core as _tc
from tract_core import jax as _tj

__all__ = ["TrActConv", "TrActDense", "TrActLinear", "TrActLinenConv", "linen", "wrap",
           "wrap_first_layer"]


def _refuse(**options):
    """NotImplementedError naming the first option that is set (not None)."""
    for name, value in options.items():
        if value is not None:
            raise NotImplementedError(f"TrAct layers do not support {name}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class _TrActDotGeneral:
    """Stands in for ``lax.dot_general`` in the dense layers; hashable for NNX graphs."""

    lam: float

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, **options):
        _refuse(**options)  # preferred_element_type, out_sharding
        return _tj.dense(lhs, rhs, None, lam=self.lam, precision=precision)


@dataclasses.dataclass(frozen=True)
class _TrActConvGeneralDilated:
    """Stands in for ``lax.conv_general_dilated`` (channels-last) in the conv layers."""

    lam: float

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                 precision=None, **options):
        _refuse(input_dilation=None if all(d == 1 for d in lhs_dilation or ()) else lhs_dilation,
                **options)
        return _tj.conv(lhs, rhs, None, strides=window_strides, padding=padding,
                        kernel_dilation=rhs_dilation or 1, lam=self.lam,
                        feature_group_count=feature_group_count, precision=precision)


class TrActLinear(nnx.Linear):
    """``nnx.Linear`` with TrAct's kernel gradient. x: (..., in_features). Takes its
    arguments (but ``dot_general``) and ``lam``, a finite float > 0 (paper: 0.1)."""

    def __init__(self, in_features: int, out_features: int, *, lam: float = 0.1,
                 **kwargs: Any) -> None:
        super().__init__(in_features, out_features,
                         dot_general=_TrActDotGeneral(_tc.check_lam(lam)), **kwargs)

    lam = property(lambda self: self.dot_general.lam)


class TrActConv(nnx.Conv):
    """``nnx.Conv`` with TrAct's kernel gradient, one Gram per feature group. Takes its
    arguments (but ``conv_general_dilated``; ``input_dilation`` 1) and ``lam``."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] = 1, *, lam: float = 0.1,
                 **kwargs: Any) -> None:
        super().__init__(in_features, out_features, kernel_size, strides,
                         conv_general_dilated=_TrActConvGeneralDilated(_tc.check_lam(lam)),
                         **kwargs)

    lam = property(lambda self: self.conv_general_dilated.lam)


def wrap(module: nnx.Linear | nnx.Conv, lam: float = 0.1) -> TrActLinear | TrActConv:
    """TrAct twin of an ``nnx.Linear`` or ``nnx.Conv``, sharing its parameters.

    Args:
        module: an ``nnx.Linear`` or ``nnx.Conv`` (or a TrAct layer, re-wrapped with the
            new ``lam``) using the default ``lax`` dot / conv function.
        lam: finite float > 0.

    Returns:
        A ``TrActLinear`` / ``TrActConv`` with the same options and the very same
        ``nnx.Param`` objects (an update through either is seen by both): the same forward
        and the same ``nnx.state`` paths and shapes.
    """
    lam = _tc.check_lam(lam)
    if isinstance(module, nnx.Linear):
        twin_class, hook, options = TrActLinear, "dot_general", {}
    elif isinstance(module, nnx.Conv):
        twin_class, hook = TrActConv, "conv_general_dilated"
        options = dict(kernel_size=module.kernel_size, mask=module.mask,
                       feature_group_count=module.feature_group_count)
    else:
        raise TypeError(f"wrap() takes an nnx.Linear or nnx.Conv, got {type(module).__name__}")
    current = getattr(module, hook)  # lax's function of the same name by default
    if current is not getattr(lax, hook) and not isinstance(module, twin_class):
        raise ValueError(f"wrap() would replace the module's custom {hook} {current!r}")
    # The right class and structure, no parameter init; then the module's own attributes.
    twin = nnx.eval_shape(lambda: twin_class(module.in_features, module.out_features, lam=lam,
                                             use_bias=module.use_bias, rngs=nnx.Rngs(0),
                                             **options))
    for name, value in vars(module).items():
        if not name.startswith("_pytree__") and name != hook:
            setattr(twin, name, value)  # the same Param objects: shared, not copied
    return twin


# Layers that normalise what they are given: the input is not raw after them.
_NORMALIZATIONS = tuple(getattr(nnx, name) for name in (
    "BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm") if hasattr(nnx, name))


def _holds_variables(module):
    """Whether ``module`` itself (not a submodule) holds parameters or statistics."""
    return any(isinstance(v, nnx.Variable) and not isinstance(v, nnx.RngState)
               for v in vars(module).values())


def _layer_paths(model):
    """{id: (path, module)} of the modules that can be a first layer: normalisations, and
    modules holding variables whose submodules hold none (a Linear, a Conv; not blocks)."""
    modules = [(path, m) for path, m in nnx.iter_graph(model)
               if path and isinstance(m, nnx.Module)]
    holders = [path for path, m in modules if _holds_variables(m)]
    return {id(m): (path, m) for path, m in modules if isinstance(m, _NORMALIZATIONS) or (
        path in holders and not any(h[:len(path)] == path != h for h in holders))}


def _called_layers(model, args, kwargs):
    """Paths of the candidate layers in the order one forward first calls them, traced
    abstractly on a copy (no FLOPs; the model's statistics and RNG counts untouched)."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    arrays = [i for i, leaf in enumerate(leaves) if hasattr(leaf, "shape")
              and hasattr(leaf, "dtype")]  # the rest (flags, ...) stays static
    graphdef, state = nnx.split(model)
    order = []

    def forward(state, array_leaves):
        copy, values = nnx.merge(graphdef, state), list(leaves)
        for i, array in zip(arrays, array_leaves):
            values[i] = array
        with recording_calls(_layer_paths(copy)) as called:
            call_args, call_kwargs = jax.tree.unflatten(treedef, values)
            copy(*call_args, **call_kwargs)
        order.extend(called)

    jax.eval_shape(forward, state, [leaves[i] for i in arrays])
    return order


def _at(node, path, replace=None):
    """The node at ``path`` (attribute names, list indices, dict keys), or set it there;
    and how Python spells that place from ``model``."""
    spelled = "model"
    for depth, key in enumerate(path):
        container = isinstance(node, (abc.Sequence, abc.Mapping))
        if depth == len(path) - 1 and replace is not None:
            if isinstance(node, (abc.MutableSequence, abc.MutableMapping)):
                node[key] = replace
            elif container:
                raise TypeError(f"the first layer sits in an immutable {type(node).__name__} "
                                f"({spelled}): hold it in an nnx.List or an attribute")
            else:
                setattr(node, key, replace)
        node = node[key] if container else getattr(node, key)
        spelled += f"[{key!r}]" if container else f".{key}"
    return node, spelled


def _dotted(path):
    return ".".join(str(key) for key in path)


def _call_arguments(example_input):
    """(args, kwargs) of ``model(...)`` on the example: a tuple is the positional
    arguments, a dict the keyword arguments, anything else the one argument."""
    if isinstance(example_input, tuple):
        return example_input, {}
    return ((), dict(example_input)) if isinstance(example_input, dict) else (
        (example_input,), {})


def wrap_first_layer(model: nnx.Module, example_input: Any, lam: float = 0.1) -> str:
    """Replace, in place, the first layer ``model(example_input)`` calls by its TrAct twin.

    One forward of the example, traced abstractly on a copy of the model (no FLOPs, the
    model untouched), records the order in which its layers are called; the first is the
    first module holding parameters or statistics (not a block around such modules). An
    ``nnx.Linear`` / ``nnx.Conv`` is replaced, where its parent holds it, by `wrap`'s twin,
    which shares its ``nnx.Param`` objects: ``nnx.state(model)`` keeps its paths and shapes.

    Args:
        model: an NNX module whose layers are attributes, ``nnx.List``/``nnx.Dict`` (or
            list/dict) entries, or ``nnx.Sequential`` layers.
        example_input: one input (a few examples suffice), a tuple of positional
            arguments or a dict of keyword arguments; arrays or ``jax.ShapeDtypeStruct``
            (only shapes and dtypes matter), other values (flags) as they are.
        lam: finite float > 0 (0.1 in the paper, 0.2 for long runs).

    Returns:
        The path of the wrapped layer, e.g. ``"stem.conv"`` or ``"layers.0"``.

    Raises:
        TypeError: the first layer is a normalisation (named, with the layer after it), an
            ``nnx.ConvTranspose`` or another module that is not a Linear or Conv.
        ValueError: the forward calls no layer with parameters (or ``model`` is a layer
            itself: use `wrap`).
    """
    lam = _tc.check_lam(lam)
    if isinstance(model, (nnx.Linear, nnx.Conv)):
        raise ValueError(f"model is itself an nnx.{type(model).__name__}: use wrap(model, "
                         f"lam)")
    order = _called_layers(model, *_call_arguments(example_input))
    if not order:
        raise ValueError(f"model(...) on the example called no layer with parameters in "
                         f"{type(model).__name__}")
    path, (first, spelled) = order[0], _at(model, order[0])
    kind = type(first).__name__
    if isinstance(first, _NORMALIZATIONS):
        after = [_at(model, p)[1] for p in order
                 if isinstance(_at(model, p)[0], (nnx.Linear, nnx.Conv))][:1]
        hint = "".join(f"; to wrap the layer after it all the same: {a} = "
                       f"tract_core.flax.wrap({a})" for a in after)
        raise TypeError(f"the model normalises its input with {spelled} (nnx.{kind}) before "
                        f"any nnx.Linear or nnx.Conv, and TrAct is for the layer that sees "
                        f"the input{hint}")
    if not isinstance(first, (nnx.Linear, nnx.Conv)):
        raise TypeError(f"the model's first layer {spelled} ({kind}) is not a layer TrAct "
                        f"supports: nnx.Linear or nnx.Conv")
    _at(model, path, replace=wrap(first, lam))
    return _dotted(path)


def _use_shim(module, hook, shim):
    """Set a Linen layer's ``hook`` to TrAct's stand-in before __post_init__ freezes it."""
    custom = getattr(module, f"{hook}_cls") or getattr(module, hook)
    if custom is not None and not isinstance(custom, type(shim)):
        raise NotImplementedError(f"TrAct layers do not support a custom {hook}; got {custom!r}")
    object.__setattr__(module, hook, shim)


class TrActDense(nn.Dense):
    """``nn.Dense`` with TrAct's kernel gradient and the same params. Attributes: its own
    (no custom ``dot_general``) and ``lam``, a finite float > 0 (paper: 0.1)."""

    lam: float = 0.1

    def __post_init__(self):
        _use_shim(self, "dot_general", _TrActDotGeneral(_tc.check_lam(self.lam)))
        super().__post_init__()


class TrActLinenConv(nn.Conv):
    """``nn.Conv`` with TrAct's kernel gradient and the same params. Attributes: its own
    (``input_dilation`` 1, no custom conv function) and ``lam``, a finite float > 0."""

    lam: float = 0.1

    def __post_init__(self):
        _use_shim(self, "conv_general_dilated",
                  _TrActConvGeneralDilated(_tc.check_lam(self.lam)))
        super().__post_init__()


# The Linen layers under the names the NNX ones take at module level.
linen = types.SimpleNamespace(TrActDense=TrActDense, TrActConv=TrActLinenConv)
