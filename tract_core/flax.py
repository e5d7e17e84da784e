"""Flax adapter: NNX and Linen layers whose kernel gradient is TrAct's.

    >>> from flax import nnx
    >>> import tract_core.flax as tflax
    >>> stem = tflax.TrActConv(3, 64, (3, 3), padding="SAME", lam=0.1, rngs=nnx.Rngs(0))
    >>> stem = tflax.wrap(nnx.Conv(3, 64, (3, 3), rngs=nnx.Rngs(0)))  # same params

Each layer is the plain Flax layer (``nnx.Linear``, ``nnx.Conv``, ``nn.Dense``,
``nn.Conv``) with its ``dot_general`` / ``conv_general_dilated`` hook set to a stand-in
that makes the same ``lax`` call through :func:`tract_core.jax.dense` /
:func:`tract_core.jax.conv`. Everything else (parameters, batch dimensions, 'CIRCULAR' /
'REFLECT' / 'CAUSAL' padding, masks, dtype promotion, the bias add) is the plain layer's
own code: the forward and the input and bias gradients are exactly the plain layer's,
and a plain parameter tree loads. Linen names submodules after their class
(``TrActDense_0``, not ``Dense_0``): give the layer the plain tree's ``name=``.
"""

from __future__ import annotations

import dataclasses
import types

import flax.linen as nn
from flax import nnx
from jax import lax

import tract_core as _tc
from tract_core import jax as _tj

__all__ = ["TrActConv", "TrActDense", "TrActLinear", "TrActLinenConv", "linen", "wrap"]


def _nested_tuple(value):
    if isinstance(value, (list, tuple)):
        return tuple(_nested_tuple(v) for v in value)
    return value


def _unsupported(what, value):
    raise NotImplementedError(f"TrAct layers do not support {what}; got {value!r}")


def _refuse(**options):
    """NotImplementedError naming the first option that is set (not None)."""
    for name, value in options.items():
        if value is not None:
            _unsupported(name, value)


@dataclasses.dataclass(frozen=True)
class _TrActDotGeneral:
    """Stands in for ``lax.dot_general`` in the dense layers; hashable for NNX graphs."""

    lam: float

    def __call__(self, lhs, rhs, dimension_numbers, precision=None,
                 preferred_element_type=None, out_sharding=None):
        if rhs.ndim != 2 or _nested_tuple(dimension_numbers) != (((lhs.ndim - 1,), (0,)), ((), ())):
            _unsupported("contractions other than x @ kernel over the last axis",
                         dimension_numbers)
        _refuse(preferred_element_type=preferred_element_type, out_sharding=out_sharding)
        return _tj.dense(lhs, rhs, None, lam=self.lam, precision=precision)


@dataclasses.dataclass(frozen=True)
class _TrActConvGeneralDilated:
    """Stands in for ``lax.conv_general_dilated`` in the conv layers."""

    lam: float

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                 batch_group_count=1, precision=None, preferred_element_type=None,
                 out_sharding=None):
        channels_last = _tj._channels_last_dimension_numbers(lhs.ndim)
        if _nested_tuple(dimension_numbers) != _nested_tuple(channels_last):
            _unsupported("dimension_numbers other than channels-last", dimension_numbers)
        _refuse(input_dilation=None if all(d == 1 for d in lhs_dilation or ()) else lhs_dilation,
                batch_group_count=None if batch_group_count == 1 else batch_group_count,
                preferred_element_type=preferred_element_type, out_sharding=out_sharding)
        return _tj.conv(lhs, rhs, None, strides=window_strides, padding=padding,
                        kernel_dilation=1 if rhs_dilation is None else rhs_dilation,
                        feature_group_count=feature_group_count, lam=self.lam,
                        precision=precision)


# --------------------------------------------------------------------------- NNX


class TrActLinear(nnx.Linear):
    """``nnx.Linear`` with TrAct's kernel gradient. x: (..., in_features). Takes its
    arguments (but ``dot_general``) and ``lam``, a finite float > 0 (paper: 0.1)."""

    def __init__(self, in_features, out_features, *, lam=0.1, **kwargs):
        if "dot_general" in kwargs:
            raise TypeError("TrActLinear supplies its own dot_general")
        super().__init__(in_features, out_features,
                         dot_general=_TrActDotGeneral(_tc.check_lam(lam)), **kwargs)

    @property
    def lam(self) -> float:
        return self.dot_general.lam


class TrActConv(nnx.Conv):
    """``nnx.Conv`` with TrAct's kernel gradient, one Gram per feature group. Takes its
    arguments (but ``conv_general_dilated``; ``input_dilation`` 1) and ``lam``."""

    def __init__(self, in_features, out_features, kernel_size, strides=1, *, lam=0.1,
                 **kwargs):
        if "conv_general_dilated" in kwargs:
            raise TypeError("TrActConv supplies its own conv_general_dilated")
        super().__init__(in_features, out_features, kernel_size, strides,
                         conv_general_dilated=_TrActConvGeneralDilated(_tc.check_lam(lam)),
                         **kwargs)

    @property
    def lam(self) -> float:
        return self.conv_general_dilated.lam


def wrap(module, lam=0.1):
    """TrAct twin of an ``nnx.Linear`` or ``nnx.Conv``, sharing its parameters.

    Args:
        module: an ``nnx.Linear`` or ``nnx.Conv`` (or a TrAct layer, re-wrapped with the
            new ``lam``) using the default ``lax`` dot / conv function.
        lam: finite float > 0.

    Returns:
        A ``TrActLinear`` / ``TrActConv`` holding the very same ``nnx.Param`` objects (an
        update through either module is seen by both) and the same options, so its
        forward equals the module's and ``nnx.state`` has the same paths and shapes.
    """
    lam = _tc.check_lam(lam)
    if isinstance(module, nnx.Linear):
        hook, default, shim = "dot_general", lax.dot_general, _TrActDotGeneral(lam)

        def build():
            return TrActLinear(module.in_features, module.out_features, lam=lam,
                               use_bias=module.use_bias, rngs=nnx.Rngs(0))
    elif isinstance(module, nnx.Conv):
        hook, default, shim = ("conv_general_dilated", lax.conv_general_dilated,
                               _TrActConvGeneralDilated(lam))

        def build():
            return TrActConv(module.in_features, module.out_features, module.kernel_size,
                             lam=lam, feature_group_count=module.feature_group_count,
                             use_bias=module.use_bias, mask=module.mask, rngs=nnx.Rngs(0))
    else:
        raise TypeError(f"wrap() takes an nnx.Linear or nnx.Conv, got {type(module).__name__}")
    current = getattr(module, hook)
    if current is not default and not isinstance(current, type(shim)):
        raise ValueError(f"wrap() would replace the module's custom {hook} {current!r}")
    twin = nnx.eval_shape(build)  # the right class and structure, no parameter init
    for name, value in vars(module).items():
        if not name.startswith("_pytree__") and name != hook:
            setattr(twin, name, value)  # the same Param objects: shared, not copied
    return twin


# --------------------------------------------------------------------------- Linen


def _use_shim(module, hook, shim):
    """Set a Linen layer's ``hook`` field to TrAct's stand-in, before its __post_init__
    freezes it; a custom hook (or hook class) is refused."""
    current = getattr(module, hook)
    if getattr(module, f"{hook}_cls") is not None or not (
            current is None or isinstance(current, type(shim))):
        _unsupported(f"a custom {hook}", getattr(module, f"{hook}_cls") or current)
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
