"""Keras 3 layers whose kernel gradient is TrAct's, on the TensorFlow, JAX or torch backend.

    >>> import keras, tract_core.keras as tk
    >>> stem = tk.TrActConv2D(64, 3, padding="same", lam=0.1)
    >>> stem = tk.wrap(existing_conv2d, lam=0.1)     # same weights and config

``TrActDense`` and ``TrActConv1D/2D/3D`` subclass ``keras.layers.Dense``/``ConvND``: same
constructor options plus ``lam``, same weights (names, shapes, ``get_weights()`` order),
so weights move between a plain model and its TrAct twin with ``get_weights``/
``set_weights``. Only the matrix product or convolution is swapped for the adapter of the
active backend (`tract_core.tensorflow`, `tract_core.jax` or
`tract_core.torch`, imported on first use); the operands are laid out exactly as
Keras's own backend op lays them out, so forward values and input gradients are the
plain layer's. The bias add and activation are Keras's own code.

The layers are registered as ``tract_core>TrActDense`` etc.: after
``import tract_core.keras``, ``keras.models.load_model`` restores them, ``lam`` included.
"""

from __future__ import annotations

import functools
import importlib

import keras
from keras import ops

import tract_core as _tc
from tract_core._args import resolve_pads

__all__ = ["TrActConv1D", "TrActConv2D", "TrActConv3D", "TrActDense", "wrap"]

_ADAPTERS = {
    "tensorflow": "tract_core.tensorflow",
    "jax": "tract_core.jax",
    "torch": "tract_core.torch",
}


@functools.cache
def _adapter(backend):
    """The tract_core adapter module for a Keras backend name, imported on first use."""
    if backend not in _ADAPTERS:
        raise NotImplementedError(
            f"TrAct layers run on the Keras backends {', '.join(_ADAPTERS)}; "
            f"keras.backend.backend() is {backend!r}"
        )
    return importlib.import_module(_ADAPTERS[backend])


# --------------------------------------------------------------------------- operators
# Each takes channels-last or channels-first x (as the layer's data_format says) and the
# Keras kernel, and returns the bias-free output the plain Keras backend op would give.


def _tract_kwargs(backend, lam, sync):
    """The adapter's TrAct options. On JAX, Keras's data parallelism jits over the
    global, sharded batch, so the Gram is already the full batch's: nothing to sync."""
    return {"lam": lam} if backend == "jax" else {"lam": lam, "sync": sync}


def _dense_op(x, kernel, lam, sync=False):
    backend = keras.backend.backend()
    adapter = _adapter(backend)
    tract = _tract_kwargs(backend, lam, sync)
    if backend == "torch":
        return adapter.linear(x, kernel.T, None, **tract)  # torch weight layout (m, n)
    return adapter.dense(x, kernel, None, **tract)


def _torch_conv(adapter, x, kernel, strides, padding, dilation, groups, channels_last, tract):
    """As Keras's torch backend runs ``ops.conv``: channels-first operands (channels-last
    memory format when the layer is channels-last), 'same' as explicit pads."""
    import torch

    d = kernel.ndim - 2
    if channels_last:
        x = torch.permute(x, (0, d + 1, *range(1, d + 1))).contiguous()
    weight = torch.permute(kernel, (d + 1, d, *range(d)))  # (M, C/g, *k)
    if channels_last and x.ndim in (4, 5):
        memory_format = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=memory_format)
        weight = weight.contiguous(memory_format=memory_format)
    torch_padding = 0
    if padding == "same":
        # Keras 'same' as TF and XLA resolve it (the odd pixel goes high).
        pads = resolve_pads("SAME", tuple(x.shape[2:]), tuple(weight.shape[2:]), strides,
                            dilation)
        if all(lo == hi for lo, hi in pads):
            torch_padding = [lo for lo, _ in pads]
        else:  # torch's conv takes symmetric pads only
            x = torch.nn.functional.pad(x, [p for pair in reversed(pads) for p in pair])
    z = adapter.conv(x, weight, None, stride=strides, padding=torch_padding,
                     dilation=dilation, groups=groups, **tract)
    if channels_last:
        z = torch.permute(z, (0, *range(2, d + 2), 1))
    return z


def _conv_op(x, kernel, strides, padding, dilation, groups, channels_last, lam, sync=False):
    backend = keras.backend.backend()
    adapter = _adapter(backend)
    tract = _tract_kwargs(backend, lam, sync)
    if backend == "torch":
        return _torch_conv(adapter, x, kernel, strides, padding, dilation, groups,
                           channels_last, tract)
    d = len(strides)
    if not channels_last:  # the adapters are channels-last, as Keras's default
        x = ops.transpose(x, (0, *range(2, d + 2), 1))
    z = adapter.conv(x, kernel, None, strides=strides, padding=padding.upper(),
                     kernel_dilation=dilation, feature_group_count=groups, **tract)
    if not channels_last:
        z = ops.transpose(z, (0, d + 1, *range(1, d + 1)))
    return z


# --------------------------------------------------------------------------- layers


def _non_float_inputs(layer, inputs):
    """Whether ``inputs`` are integer or bool (promoted as the plain layer's op promotes
    them); TypeError for complex ones, which TrAct's kernel gradient has no form for."""
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if "complex" in dtype:
        raise TypeError(f"{type(layer).__name__} takes real inputs (floating, integer or "
                        f"bool): TrAct's kernel gradient has no complex form; got inputs of "
                        f"dtype {dtype}")
    return not keras.backend.is_float_dtype(dtype)


class _TrAct:
    """Mixin: a TrAct layer is its Keras layer plus ``lam`` and ``sync`` (in the config).

    ``sync=True`` sums the Gram and row count over the replicas of a tf.distribute
    strategy (TensorFlow backend) or the torch.distributed world (torch backend), so the
    replicas' summed or averaged gradient is the full-batch TrAct gradient. On the JAX
    backend Keras's data parallelism already computes over the global batch.
    """

    sync = False

    def _set_lam(self, lam, sync=False):
        self.lam = _tc.check_lam(lam)
        self.sync = bool(sync)

    def get_config(self):
        return {**super().get_config(), "lam": self.lam, "sync": self.sync}


@keras.saving.register_keras_serializable(package="tract_core")
class TrActDense(_TrAct, keras.layers.Dense):
    """``keras.layers.Dense`` with TrAct's kernel gradient.

    Args:
        units: output features m.
        lam: finite float > 0 (0.1 in the paper, 0.2 for long runs).
        sync: reduce the statistics over data-parallel replicas (see ``_TrAct``).
        **kwargs: any ``keras.layers.Dense`` option.

    Input (..., n), output (..., m); every leading position is one row of the Gram.
    """

    def __init__(self, units, lam=0.1, sync=False, **kwargs):
        lam = _tc.check_lam(lam)  # before building anything
        super().__init__(units, **kwargs)
        self._set_lam(lam, sync)

    def call(self, inputs, training=None):
        # keras.layers.Dense.call, with the matmul swapped for the adapter's.
        kernel = ops.convert_to_tensor(self.kernel)
        if _non_float_inputs(self, inputs):  # as ops.matmul: both to the result type
            dtype = keras.backend.result_type(inputs.dtype, kernel.dtype)
            inputs, kernel = ops.cast(inputs, dtype), ops.cast(kernel, dtype)
        x = _dense_op(inputs, kernel, self.lam, self.sync)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x


class _TrActConv(_TrAct):
    def __init__(self, filters, kernel_size, lam=0.1, sync=False, **kwargs):
        lam = _tc.check_lam(lam)
        super().__init__(filters, kernel_size, **kwargs)
        self._set_lam(lam, sync)

    def call(self, inputs):
        # keras.layers.ConvND.call, with ops.conv swapped for the adapter's.
        kernel = ops.convert_to_tensor(self.kernel)
        if _non_float_inputs(self, inputs):  # as Keras's JAX conv: to the kernel's dtype
            inputs = ops.cast(inputs, kernel.dtype)
        padding = self.padding
        if padding == "causal":  # Conv1D only: Keras pads the past, then 'valid'
            inputs = ops.pad(inputs, self._compute_causal_padding())
            padding = "valid"
        outputs = _conv_op(inputs, kernel, self.strides, padding,
                           self.dilation_rate, self.groups,
                           self.data_format == "channels_last", self.lam, self.sync)
        if self.use_bias:
            if self.data_format == "channels_last":
                bias_shape = (1,) * (self.rank + 1) + (self.filters,)
            else:
                bias_shape = (1, self.filters) + (1,) * self.rank
            outputs = ops.add(outputs, ops.reshape(self.bias, bias_shape))
        if self.activation is not None:
            return self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package="tract_core")
class TrActConv1D(_TrActConv, keras.layers.Conv1D):
    """``keras.layers.Conv1D`` with TrAct's kernel gradient (one Gram per group).

    Args:
        filters, kernel_size: as Conv1D. lam: finite float > 0.
        **kwargs: any Conv1D option (strides, padding 'valid'/'same'/'causal',
            data_format, dilation_rate, groups, use_bias, ...).

    Input (N, L, C) channels-last or (N, C, L) channels-first.
    """


@keras.saving.register_keras_serializable(package="tract_core")
class TrActConv2D(_TrActConv, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with TrAct's kernel gradient (one Gram per group).

    Args:
        filters, kernel_size: as Conv2D. lam: finite float > 0.
        **kwargs: any Conv2D option (strides, padding 'valid'/'same', data_format,
            dilation_rate, groups, use_bias, ...).

    Input (N, H, W, C) channels-last or (N, C, H, W) channels-first.
    """


@keras.saving.register_keras_serializable(package="tract_core")
class TrActConv3D(_TrActConv, keras.layers.Conv3D):
    """``keras.layers.Conv3D`` with TrAct's kernel gradient (one Gram per group).

    Args:
        filters, kernel_size: as Conv3D. lam: finite float > 0.
        **kwargs: any Conv3D option.

    Input (N, D, H, W, C) channels-last or (N, C, D, H, W) channels-first.
    """


_PLAIN_TO_TRACT = {
    keras.layers.Dense: TrActDense,
    keras.layers.Conv1D: TrActConv1D,
    keras.layers.Conv2D: TrActConv2D,
    keras.layers.Conv3D: TrActConv3D,
}
_TRACT_TO_PLAIN = {tract: plain for plain, tract in _PLAIN_TO_TRACT.items()}


def _input_shape(layer):
    """The shape ``layer`` was built for, or the least its kernel implies."""
    build_config = layer.get_build_config() or {}
    if "input_shape" in build_config:
        return build_config["input_shape"]
    kernel_shape = tuple(layer.kernel.shape)
    if isinstance(layer, keras.layers.Dense):
        return (None, kernel_shape[0])
    channels = kernel_shape[-2] * layer.groups
    spatial = (None,) * layer.rank
    if layer.data_format == "channels_last":
        return (None, *spatial, channels)
    return (None, channels, *spatial)


def wrap(layer, lam=0.1):
    """TrAct twin of a Keras ``Dense``/``Conv1D``/``Conv2D``/``Conv3D`` layer.

    Args:
        layer: the plain layer (any options), built or not; a TrAct layer is re-wrapped
            with the new ``lam``.
        lam: finite float > 0; 0.1 in the paper, 0.2 for long runs.

    Returns:
        A new ``TrActDense``/``TrActConvND`` with the layer's config (name, dtype policy
        included) and, if it was built, built for the same input shape and holding copies
        of its weights. Use it in place of ``layer`` when building the model.
    """
    lam = _tc.check_lam(lam)
    cls = _PLAIN_TO_TRACT.get(type(layer)) or (type(layer) if type(layer) in _TRACT_TO_PLAIN
                                               else None)
    if cls is None:
        names = ", ".join(f"keras.layers.{c.__name__}" for c in _PLAIN_TO_TRACT)
        raise TypeError(f"wrap() supports {names}; got layer of type {type(layer).__name__}")
    if getattr(layer, "quantization_mode", None):
        raise ValueError(f"wrap() needs a float layer; {layer.name!r} is quantized "
                         f"({layer.quantization_mode})")
    twin = cls.from_config({**layer.get_config(), "lam": lam})
    if layer.built:
        twin.build(_input_shape(layer))
        twin.set_weights(layer.get_weights())
    return twin
