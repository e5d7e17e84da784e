"""Flax adapter: NNX and Linen layers whose kernel gradient is TrAct's.

    >>> from flax import nnx
    >>> import tract_core.flax as tflax
    >>> stem = tflax.TrActConv(3, 64, (3, 3), padding="SAME", lam=0.1, rngs=nnx.Rngs(0))
    >>> stem = tflax.wrap(nnx.Conv(3, 64, (3, 3), rngs=nnx.Rngs(0)))  # same params

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
from collections.abc import Sequence
from typing import Any

from tract_core._requires import requires

with requires("flax", "Flax and JAX", "flax", "jax"):
    import flax.linen as nn
    from flax import nnx
    from jax import lax

import tract_core as _tc
from tract_core import jax as _tj

__all__ = ["TrActConv", "TrActDense", "TrActLinear", "TrActLinenConv", "linen", "wrap"]


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
