"""Flax adapter: NNX and Linen layers whose kernel gradient is TrAct's.

    >>> from flax import nnx
    >>> import tract_core.flax as tflax
    >>> stem = tflax.TrActConv(3, 64, (3, 3), padding="SAME", lam=0.1, rngs=nnx.Rngs(0))
    >>> stem = tflax.wrap(nnx.Conv(3, 64, (3, 3), rngs=nnx.Rngs(0)))  # same params

NNX: ``TrActLinear`` and ``TrActConv`` are ``nnx.Linear`` and ``nnx.Conv`` whose
``dot_general`` / ``conv_general_dilated`` hook (a constructor argument of both) is a
stand-in that makes the same ``lax`` call through :func:`tract_core.jax.dense` /
:func:`tract_core.jax.conv`. Everything else (parameters, batch-dimension handling,
'CIRCULAR'/'REFLECT'/'CAUSAL' padding, masks, dtype promotion, the bias add) is the
plain layer's own code, so the forward, the input gradient and the bias gradient are
exactly the plain layer's.

Linen: ``TrActDense`` and ``TrActLinenConv`` (also ``linen.TrActDense`` and
``linen.TrActConv``) subclass ``nn.Dense`` and ``nn.Conv``: same fields plus ``lam``, same
parameter names and shapes, so a plain Linen param tree loads; they call
:mod:`tract_core.jax` directly. Linen auto-names submodules after their class
(``TrActDense_0``, not ``Dense_0``): give the layer the plain tree's ``name=`` to load it
inside a larger model.
"""

from __future__ import annotations

import dataclasses
import types

import flax.linen as nn
import jax.numpy as jnp
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


@dataclasses.dataclass(frozen=True)
class _TrActDotGeneral:
    """Stands in for ``lax.dot_general`` inside ``nnx.Linear``; hashable for NNX graphs."""

    lam: float

    def __call__(self, lhs, rhs, dimension_numbers, precision=None,
                 preferred_element_type=None, out_sharding=None):
        if rhs.ndim != 2 or _nested_tuple(dimension_numbers) != (((lhs.ndim - 1,), (0,)), ((), ())):
            _unsupported("contractions other than x @ kernel over the last axis",
                         dimension_numbers)
        if preferred_element_type is not None:
            _unsupported("preferred_element_type", preferred_element_type)
        if out_sharding is not None:
            _unsupported("out_sharding", out_sharding)
        return _tj.dense(lhs, rhs, None, lam=self.lam, precision=precision)


@dataclasses.dataclass(frozen=True)
class _TrActConvGeneralDilated:
    """Stands in for ``lax.conv_general_dilated`` inside ``nnx.Conv``."""

    lam: float

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                 batch_group_count=1, precision=None, preferred_element_type=None,
                 out_sharding=None):
        channels_last = _tj._channels_last_dimension_numbers(lhs.ndim)
        if _nested_tuple(dimension_numbers) != _nested_tuple(channels_last):
            _unsupported("dimension_numbers other than channels-last", dimension_numbers)
        if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
            _unsupported("input_dilation", lhs_dilation)
        if batch_group_count != 1:
            _unsupported("batch_group_count", batch_group_count)
        if preferred_element_type is not None:
            _unsupported("preferred_element_type", preferred_element_type)
        if out_sharding is not None:
            _unsupported("out_sharding", out_sharding)
        return _tj.conv(lhs, rhs, None, strides=window_strides, padding=padding,
                        kernel_dilation=1 if rhs_dilation is None else rhs_dilation,
                        feature_group_count=feature_group_count, lam=self.lam,
                        precision=precision)


# --------------------------------------------------------------------------- NNX


class TrActLinear(nnx.Linear):
    """``nnx.Linear`` with TrAct's kernel gradient. x: (..., in_features).

    Takes nnx.Linear's arguments (except ``dot_general``) plus ``lam``, a finite
    float > 0 (0.1 in the paper, 0.2 for long runs).
    """

    def __init__(self, in_features, out_features, *, lam=0.1, **kwargs):
        if "dot_general" in kwargs:
            raise TypeError("TrActLinear supplies its own dot_general")
        super().__init__(in_features, out_features,
                         dot_general=_TrActDotGeneral(_tc.check_lam(lam)), **kwargs)

    @property
    def lam(self) -> float:
        return self.dot_general.lam


class TrActConv(nnx.Conv):
    """``nnx.Conv`` with TrAct's kernel gradient. x: (*batch, *spatial, in_features).

    Takes nnx.Conv's arguments (except ``conv_general_dilated``; ``input_dilation`` must
    stay 1) plus ``lam``, a finite float > 0. One Gram per feature group.
    """

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


class TrActDense(nn.Dense):
    """``nn.Dense`` with TrAct's kernel gradient; same params ('kernel' (n, m), 'bias').

    Attributes: nn.Dense's (``dot_general``/``dot_general_cls`` must stay unset) plus
    ``lam``, a finite float > 0.
    """

    lam: float = 0.1

    @nn.compact
    def __call__(self, inputs):
        lam = _tc.check_lam(self.lam)
        if self.dot_general is not None or self.dot_general_cls is not None:
            _unsupported("a custom dot_general", self.dot_general or self.dot_general_cls)
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        return _tj.dense(inputs, kernel, bias, lam=lam, precision=self.precision)


def _flax_pre_padding(inputs, padding, kernel_size, kernel_dilation):
    """Flax's own handling of 'CIRCULAR', 'REFLECT' and 'CAUSAL': pad, then 'VALID'."""
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
        pads = [(0, 0), *(((k - 1) // 2, k // 2) for k in dilated), (0, 0)]
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
        return jnp.pad(inputs, pads, mode=mode), "VALID"
    if padding == "CAUSAL":
        if len(kernel_size) != 1:
            raise ValueError("Causal padding is only implemented for 1D convolutions.")
        left = kernel_dilation[0] * (kernel_size[0] - 1)
        return jnp.pad(inputs, [(0, 0), (left, 0), (0, 0)]), "VALID"
    return inputs, padding


class TrActLinenConv(nn.Conv):
    """``nn.Conv`` with TrAct's kernel gradient; same params ('kernel' (*k, C/g, M), 'bias').

    Attributes: nn.Conv's (``input_dilation`` must stay 1, no custom conv function)
    plus ``lam``, a finite float > 0. x: (*batch, *spatial, C), channels-last.
    """

    lam: float = 0.1

    @nn.compact
    def __call__(self, inputs):
        lam = _tc.check_lam(self.lam)
        if self.conv_general_dilated is not None or self.conv_general_dilated_cls is not None:
            _unsupported("a custom conv_general_dilated",
                         self.conv_general_dilated or self.conv_general_dilated_cls)
        kernel_size = ((self.kernel_size,) if isinstance(self.kernel_size, int)
                       else tuple(self.kernel_size))

        def per_axis(value):
            value = 1 if value is None else value
            return (value,) * len(kernel_size) if isinstance(value, int) else tuple(value)

        if any(d != 1 for d in per_axis(self.input_dilation)):
            _unsupported("input_dilation", self.input_dilation)
        # Same batch-dimension handling as nn.Conv: flatten all of them into one.
        batch_dims = inputs.ndim - (len(kernel_size) + 1)
        batch_shape = inputs.shape[:batch_dims]
        if batch_dims != 1:
            inputs = jnp.reshape(inputs, (-1, *inputs.shape[batch_dims:]))
        dilation = per_axis(self.kernel_dilation)
        padding = nn.linear.canonicalize_padding(self.padding, len(kernel_size))
        inputs, padding = _flax_pre_padding(inputs, padding, kernel_size, dilation)

        kernel_shape = (*kernel_size, inputs.shape[-1] // self.feature_group_count,
                        self.features)
        if self.mask is not None and self.mask.shape != kernel_shape:
            raise ValueError("Mask needs to have the same shape as weights. "
                             f"Shapes are: {self.mask.shape}, {kernel_shape}")
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        if self.mask is not None:
            kernel = kernel * self.mask
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = _tj.conv(inputs, kernel, bias, strides=per_axis(self.strides), padding=padding,
                     kernel_dilation=dilation, feature_group_count=self.feature_group_count,
                     lam=lam, precision=self.precision)
        if batch_dims != 1:
            y = jnp.reshape(y, (*batch_shape, *y.shape[1:]))
        return y


# The Linen layers under the names the NNX ones take at module level.
linen = types.SimpleNamespace(TrActDense=TrActDense, TrActConv=TrActLinenConv)
