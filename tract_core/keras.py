"""Keras 3 layers whose kernel gradient is TrAct's, on the TensorFlow, JAX or torch backend.

    >>> import keras, tract_core.keras as tk
    >>> stem = tk.TrActConv2D(64, 3, padding="same", lam=0.1)
    >>> stem = tk.wrap(existing_conv2d, lam=0.1)     # same weights and config

``TrActDense`` and ``TrActConv1D/2D/3D`` subclass ``keras.layers.Dense``/``ConvND``: same
options plus ``lam`` and ``sync``, same weights. Only the matrix product or convolution is
swapped for the active backend's adapter (`tract_core.tensorflow`, `tract_core.jax` or
`tract_core.torch`), laid out as Keras's own op: forward values and input gradients are
the plain layer's. After ``import tract_core.keras``, ``keras.models.load_model``
restores the layers (registered as ``tract_core>TrActDense`` etc.), ``lam`` included.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from tract_core._requires import requires

with requires("keras", "Keras 3"):
    import keras
    from keras import ops

import tract_core as _tc
from tract_core._args import resolve_pads

__all__ = ["TrActConv1D", "TrActConv2D", "TrActConv3D", "TrActDense", "wrap"]

_ADAPTERS = {backend: f"tract_core.{backend}" for backend in ("tensorflow", "jax", "torch")}


def _adapter(lam, sync):
    """The active backend's name, its adapter module (imported now) and TrAct options."""
    backend = keras.backend.backend()
    if backend not in _ADAPTERS:
        raise NotImplementedError(f"TrAct layers run on the Keras backends {list(_ADAPTERS)}; "
                                  f"keras.backend.backend() is {backend!r}")
    # On JAX, Keras's data parallelism jits over the global batch: nothing to sync.
    tract = {"lam": lam} if backend == "jax" else {"lam": lam, "sync": sync}
    return backend, importlib.import_module(_ADAPTERS[backend]), tract


def _torch_conv(adapter, x, kernel, strides, padding, dilation, groups, channels_last, tract):
    """``ops.conv`` as Keras's torch backend lays it out (channels-first operands)."""
    import torch

    d = kernel.ndim - 2
    weight = torch.permute(kernel, (d + 1, d, *range(d)))  # (M, C/g, *k)
    if channels_last:  # channels-first operands in channels-last memory, as Keras
        fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(d, torch.contiguous_format)
        x = torch.permute(x, (0, d + 1, *range(1, d + 1))).contiguous(memory_format=fmt)
        weight = weight.contiguous(memory_format=fmt)
    pads = resolve_pads(padding.upper(), x.shape[2:], weight.shape[2:], strides, dilation)
    if any(lo != hi for lo, hi in pads):  # torch's conv takes symmetric pads only
        x = torch.nn.functional.pad(x, [p for pair in reversed(pads) for p in pair])
        pads = ((0, 0),) * d
    z = adapter.conv(x, weight, None, stride=strides, padding=[lo for lo, _ in pads],
                     dilation=dilation, groups=groups, **tract)
    return torch.permute(z, (0, *range(2, d + 2), 1)) if channels_last else z


def _non_float_inputs(layer, inputs):
    """Whether ``inputs`` are integer or bool; TypeError for complex ones."""
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if "complex" in dtype:
        raise TypeError(f"{type(layer).__name__} takes real inputs (floating, integer or "
                        f"bool), got inputs of dtype {dtype}")
    return not keras.backend.is_float_dtype(dtype)


class _TrAct:
    """Mixin: a TrAct layer is its Keras layer plus ``lam`` and ``sync`` (in the config)."""

    def get_config(self):
        return {**super().get_config(), "lam": self.lam, "sync": self.sync}


@keras.saving.register_keras_serializable(package="tract_core")
class TrActDense(_TrAct, keras.layers.Dense):
    """``keras.layers.Dense`` with TrAct's kernel gradient.

    Args:
        units: output features m.
        lam: finite float > 0 (0.1 in the paper, 0.2 for long runs).
        sync: sum the Gram and row count over tf.distribute replicas (TensorFlow) or the
            torch.distributed world (torch): the averaged gradient is then the full-batch
            one. On JAX, Keras's data parallelism already computes over the global batch.
        **kwargs: any ``keras.layers.Dense`` option.

    Input (..., n), output (..., m); every leading position is one row of the Gram.
    """

    def __init__(self, units: int, lam: float = 0.1, sync: bool = False,
                 **kwargs: Any) -> None:
        lam = _tc.check_lam(lam)  # before building anything
        super().__init__(units, **kwargs)
        self.lam, self.sync = lam, bool(sync)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        # keras.layers.Dense.call, with the matmul swapped for the adapter's.
        kernel = ops.convert_to_tensor(self.kernel)
        if _non_float_inputs(self, inputs):  # as ops.matmul: both to the result type
            dtype = keras.backend.result_type(inputs.dtype, kernel.dtype)
            inputs, kernel = ops.cast(inputs, dtype), ops.cast(kernel, dtype)
        backend, adapter, tract = _adapter(self.lam, self.sync)
        x = (adapter.linear(inputs, kernel.T, None, **tract) if backend == "torch"  # W: (m, n)
             else adapter.dense(inputs, kernel, None, **tract))
        if self.bias is not None:
            x = ops.add(x, self.bias)
        return x if self.activation is None else self.activation(x)


class _TrActConv(_TrAct):
    def __init__(self, filters: int, kernel_size: int | Sequence[int], lam: float = 0.1,
                 sync: bool = False, **kwargs: Any) -> None:
        lam = _tc.check_lam(lam)
        super().__init__(filters, kernel_size, **kwargs)
        self.lam, self.sync = lam, bool(sync)

    def call(self, inputs: Any) -> Any:
        # keras.layers.ConvND.call, with ops.conv swapped for the adapter's.
        kernel = ops.convert_to_tensor(self.kernel)
        if _non_float_inputs(self, inputs):  # as Keras's JAX conv: to the kernel's dtype
            inputs = ops.cast(inputs, kernel.dtype)
        padding, channels_last = self.padding, self.data_format == "channels_last"
        if padding == "causal":  # Conv1D only: Keras pads the past, then 'valid'
            inputs, padding = ops.pad(inputs, self._compute_causal_padding()), "valid"
        backend, adapter, tract = _adapter(self.lam, self.sync)
        if backend == "torch":
            x = _torch_conv(adapter, inputs, kernel, self.strides, padding, self.dilation_rate,
                            self.groups, channels_last, tract)
        else:  # the TF and JAX adapters take channels-last, as Keras's default
            x = inputs if channels_last else ops.moveaxis(inputs, 1, -1)
            x = adapter.conv(x, kernel, None, strides=self.strides, padding=padding.upper(),
                             kernel_dilation=self.dilation_rate,
                             feature_group_count=self.groups, **tract)
            x = x if channels_last else ops.moveaxis(x, -1, 1)
        if self.use_bias:
            bias_shape = ((1,) * (self.rank + 1) + (self.filters,) if channels_last
                          else (1, self.filters) + (1,) * self.rank)
            x = ops.add(x, ops.reshape(self.bias, bias_shape))
        return x if self.activation is None else self.activation(x)


@keras.saving.register_keras_serializable(package="tract_core")
class TrActConv1D(_TrActConv, keras.layers.Conv1D):
    """``keras.layers.Conv1D`` with TrAct's kernel gradient (one Gram per group).

    Args:
        filters, kernel_size, **kwargs: any Conv1D options.
        lam, sync: as for `TrActDense`.

    Padding 'valid', 'same' or 'causal'. Input (N, L, C) channels-last or (N, C, L) channels-first.
    """


@keras.saving.register_keras_serializable(package="tract_core")
class TrActConv2D(_TrActConv, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with TrAct's kernel gradient (one Gram per group).

    Args:
        filters, kernel_size, **kwargs: any Conv2D options.
        lam, sync: as for `TrActDense`.

    Input (N, H, W, C) channels-last or (N, C, H, W) channels-first.
    """


@keras.saving.register_keras_serializable(package="tract_core")
class TrActConv3D(_TrActConv, keras.layers.Conv3D):
    """``keras.layers.Conv3D`` with TrAct's kernel gradient (one Gram per group).

    Args:
        filters, kernel_size, **kwargs: any Conv3D options.
        lam, sync: as for `TrActDense`.

    Input (N, D, H, W, C) channels-last or (N, C, D, H, W) channels-first.
    """


_PLAIN_TO_TRACT = {keras.layers.Dense: TrActDense, keras.layers.Conv1D: TrActConv1D,
                   keras.layers.Conv2D: TrActConv2D, keras.layers.Conv3D: TrActConv3D}


def wrap(layer: keras.layers.Layer, lam: float = 0.1) -> keras.layers.Layer:
    """TrAct twin of a Keras ``Dense``/``Conv1D``/``Conv2D``/``Conv3D`` layer.

    Args:
        layer: the plain layer (any options), built or not; a TrAct layer is re-wrapped
            with the new ``lam``.
        lam: finite float > 0; 0.1 in the paper, 0.2 for long runs.

    Returns:
        A new ``TrActDense``/``TrActConvND`` with the layer's config (name and dtype policy
        included) and, if the layer was built, a copy of its weights; use it in its place.
    """
    lam = _tc.check_lam(lam)
    cls = _PLAIN_TO_TRACT.get(type(layer), type(layer))
    if cls not in _PLAIN_TO_TRACT.values():
        names = ", ".join(f"keras.layers.{c.__name__}" for c in _PLAIN_TO_TRACT)
        raise TypeError(f"wrap() supports {names}; got layer of type {type(layer).__name__}")
    if getattr(layer, "quantization_mode", None):
        raise ValueError(f"wrap() needs a float layer; {layer.name!r} is quantized "
                         f"({layer.quantization_mode})")
    twin = cls.from_config({**layer.get_config(), "lam": lam})
    if layer.built:
        twin.build_from_config(layer.get_build_config())
        twin.set_weights(layer.get_weights())
    return twin
