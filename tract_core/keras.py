"""Keras 3 layers whose kernel gradient is TrAct's, on the TensorFlow, JAX or torch backend.

    >>> import keras, tract_core.keras as tk
    >>> stem = tk.TrActConv2D(64, 3, padding="same", lam=0.1)
    >>> stem = tk.wrap(existing_conv2d, lam=0.1)     # same weights and config
    >>> model, name = tk.wrap_first_layer(model)      # a copy, its first layer wrapped

``TrActDense`` and ``TrActConv1D/2D/3D`` subclass ``keras.layers.Dense``/``ConvND``: same
options plus ``lam`` and ``sync``, same weights. Only the matrix product or convolution is
swapped for the active backend's adapter (`tract_core.tensorflow`, `tract_core.jax` or
`tract_core.torch`), laid out as Keras's own op: forward values and input gradients are
the plain layer's. After ``import tract_core.keras``, ``keras.models.load_model``
restores the layers (registered as ``tract_core>TrActDense`` etc.), ``lam`` included.
`wrap_first_layer` finds the first layer of a Sequential or functional model from its
layer graph and returns a copy of the model with that layer wrapped; `unwrap` undoes `wrap`.
Layers made with ``accumulate=True`` and an optimizer passed through `exact_accumulation`
take the union batch's TrAct step under ``gradient_accumulation_steps``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Sequence
from typing import Any

from tract_core._requires import requires

with requires("keras", "Keras 3"):
    import keras
    from keras import ops

import tract_core as _tc
from tract_core._args import resolve_pads

__all__ = ["TrActConv1D", "TrActConv2D", "TrActConv3D", "TrActDense", "exact_accumulation",
           "unwrap", "wrap", "wrap_first_layer"]

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


def _statistics_dtype():
    """float64, but on JAX without jax_enable_x64 (where JAX has no float64)."""
    if keras.backend.backend() == "jax":
        import jax

        return str(jax.dtypes.canonicalize_dtype("float64"))
    return "float64"


def _kernel_grad(packed, kernel_shape, groups):
    """The kernel gradient of summed packed statistics, in the kernel's layout."""
    m, n_g = kernel_shape[-1], math.prod(kernel_shape[:-1])
    x64 = contextlib.nullcontext()
    if keras.backend.backend() == "jax":  # the solve in float64 even without x64
        import jax

        x64 = jax.enable_x64(True)
    with x64:
        grad = _tc.unpack_and_precondition(packed, m, n_g, groups)
        return _tc.to_channels_last_kernel(grad, kernel_shape)


class _TrAct:
    """Mixin: a TrAct layer is its Keras layer plus ``lam``, ``sync`` and ``accumulate``
    (in the config); ``accumulate=True`` adds the statistics weight."""

    def _init_tract(self, lam, sync, accumulate):
        self.lam, self.sync, self.accumulate = lam, bool(sync), bool(accumulate)
        self.tract_statistics = None

    def get_config(self):
        return {**super().get_config(), "lam": self.lam, "sync": self.sync,
                "accumulate": self.accumulate}

    def build(self, input_shape):
        super().build(input_shape)
        if self.accumulate:
            shape, groups = tuple(self.kernel.shape), getattr(self, "groups", 1)
            self.tract_statistics = self.add_weight(
                name="tract_statistics", shape=(_tc.packed_size(shape[-1], math.prod(shape[:-1]),
                                                                groups),),
                initializer="zeros", dtype=_statistics_dtype(), trainable=True)
            # What exact_accumulation's optimizer reads to precondition the sums.
            self.tract_statistics._tract_kernel = (self._kernel, groups)

    def save_own_variables(self, store):
        super().save_own_variables(store)  # the plain layer's, by position
        if self.tract_statistics is not None:
            store[str(len(store.keys()))] = self.tract_statistics

    def load_own_variables(self, store):
        super().load_own_variables(store)  # reads the plain layer's positions only
        if self.tract_statistics is not None:
            self.tract_statistics.assign(store[str(len(store.keys()) - 1)])

    def _tract_kernel(self, kernel, backend, adapter):
        """The kernel operand: an accumulating one on JAX (kernel and statistics)."""
        if self.tract_statistics is None or backend != "jax":
            return kernel
        return adapter.AccumulatingKernel(kernel, ops.convert_to_tensor(self.tract_statistics),
                                          getattr(self, "groups", 1))

    def _tract_options(self, backend, tract):
        """The adapter's options: the statistics for accumulation on TF and torch."""
        if self.tract_statistics is None or backend == "jax":
            return tract
        statistics = self.tract_statistics.value
        return {**tract, "statistics": statistics}


@keras.saving.register_keras_serializable(package="tract_core")
class TrActDense(_TrAct, keras.layers.Dense):
    """``keras.layers.Dense`` with TrAct's kernel gradient.

    Args:
        units: output features m.
        lam: finite float > 0 (0.1 in the paper, 0.2 for long runs).
        sync: sum the Gram and row count over tf.distribute replicas (TensorFlow) or the
            torch.distributed world (torch): the averaged gradient is then the full-batch
            one. On JAX, Keras's data parallelism already computes over the global batch.
        accumulate: exact gradient accumulation (with `exact_accumulation` on the
            optimizer): a ``tract_statistics`` weight receives each batch's packed
            statistics as its gradient, the kernel's gradient is zero, and the optimizer
            preconditions the accumulated sums once per update.
        **kwargs: any ``keras.layers.Dense`` option.

    Input (..., n), output (..., m); every leading position is one row of the Gram.
    """

    def __init__(self, units: int, lam: float = 0.1, sync: bool = False,
                 accumulate: bool = False, **kwargs: Any) -> None:
        lam = _tc.check_lam(lam)  # before building anything
        super().__init__(units, **kwargs)
        self._init_tract(lam, sync, accumulate)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        # keras.layers.Dense.call, with the matmul swapped for the adapter's.
        kernel = ops.convert_to_tensor(self.kernel)
        if _non_float_inputs(self, inputs):  # as ops.matmul: both to the result type
            dtype = keras.backend.result_type(inputs.dtype, kernel.dtype)
            inputs, kernel = ops.cast(inputs, dtype), ops.cast(kernel, dtype)
        backend, adapter, tract = _adapter(self.lam, self.sync)
        kernel, tract = self._tract_kernel(kernel, backend, adapter), self._tract_options(
            backend, tract)
        x = (adapter.linear(inputs, kernel.T, None, **tract) if backend == "torch"  # W: (m, n)
             else adapter.dense(inputs, kernel, None, **tract))
        if self.bias is not None:
            x = ops.add(x, self.bias)
        return x if self.activation is None else self.activation(x)


class _TrActConv(_TrAct):
    def __init__(self, filters: int, kernel_size: int | Sequence[int], lam: float = 0.1,
                 sync: bool = False, accumulate: bool = False, **kwargs: Any) -> None:
        lam = _tc.check_lam(lam)
        super().__init__(filters, kernel_size, **kwargs)
        self._init_tract(lam, sync, accumulate)

    def call(self, inputs: Any) -> Any:
        # keras.layers.ConvND.call, with ops.conv swapped for the adapter's.
        kernel = ops.convert_to_tensor(self.kernel)
        if _non_float_inputs(self, inputs):  # as Keras's JAX conv: to the kernel's dtype
            inputs = ops.cast(inputs, kernel.dtype)
        padding, channels_last = self.padding, self.data_format == "channels_last"
        if padding == "causal":  # Conv1D only: Keras pads the past, then 'valid'
            inputs, padding = ops.pad(inputs, self._compute_causal_padding()), "valid"
        backend, adapter, tract = _adapter(self.lam, self.sync)
        kernel, tract = self._tract_kernel(kernel, backend, adapter), self._tract_options(
            backend, tract)
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
            bias = ops.reshape(self.bias, bias_shape)
            # Channels first, the bias goes first: Keras's TensorFlow add takes a second
            # operand that squeezes to a vector for a bias of the last axis whenever that
            # axis has the filters' size.
            x = ops.add(x, bias) if channels_last else ops.add(bias, x)
        return x if self.activation is None else self.activation(x)


@keras.saving.register_keras_serializable(package="tract_core")
class TrActConv1D(_TrActConv, keras.layers.Conv1D):
    """``keras.layers.Conv1D`` with TrAct's kernel gradient (one Gram per group).

    Args:
        filters, kernel_size, **kwargs: any Conv1D options.
        lam, sync, accumulate: as for `TrActDense`.

    Padding 'valid', 'same' or 'causal'. Input (N, L, C) channels-last or (N, C, L) channels-first.
    """


@keras.saving.register_keras_serializable(package="tract_core")
class TrActConv2D(_TrActConv, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with TrAct's kernel gradient (one Gram per group).

    Args:
        filters, kernel_size, **kwargs: any Conv2D options.
        lam, sync, accumulate: as for `TrActDense`.

    Input (N, H, W, C) channels-last or (N, C, H, W) channels-first.
    """


@keras.saving.register_keras_serializable(package="tract_core")
class TrActConv3D(_TrActConv, keras.layers.Conv3D):
    """``keras.layers.Conv3D`` with TrAct's kernel gradient (one Gram per group).

    Args:
        filters, kernel_size, **kwargs: any Conv3D options.
        lam, sync, accumulate: as for `TrActDense`.

    Input (N, D, H, W, C) channels-last or (N, C, D, H, W) channels-first.
    """


_PLAIN_TO_TRACT = {keras.layers.Dense: TrActDense, keras.layers.Conv1D: TrActConv1D,
                   keras.layers.Conv2D: TrActConv2D, keras.layers.Conv3D: TrActConv3D}
_TRACT_TO_PLAIN = {tract: plain for plain, tract in _PLAIN_TO_TRACT.items()}
# Layers that normalise what they are given (weights or not): the input is not raw after them.
_NORMALIZATIONS = tuple(getattr(keras.layers, name) for name in (
    "BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization",
    "RMSNormalization", "Normalization") if hasattr(keras.layers, name))


def _twin(cls, config, layer):
    """A ``cls`` layer from ``config``, built and holding a copy of ``layer``'s weights
    (but the statistics weight of exact accumulation: zeros)."""
    twin = cls.from_config(config)
    if layer.built:
        twin.build_from_config(layer.get_build_config())
        _copy_weights(twin, layer)
    return twin


def _copy_weights(twin, layer):
    """``layer``'s weights into ``twin``'s, but the statistics of exact accumulation."""
    weights = lambda layer: [w for w in layer.weights
                             if w is not getattr(layer, "tract_statistics", None)]
    for target, source in zip(weights(twin), weights(layer), strict=True):
        target.assign(source.numpy())  # a copy: JAX may donate the source's buffer later


def wrap(layer: keras.layers.Layer, lam: float = 0.1, *,
         accumulate: bool = False) -> keras.layers.Layer:
    """TrAct twin of a Keras ``Dense``/``Conv1D``/``Conv2D``/``Conv3D`` layer.

    Args:
        layer: the plain layer (any options), built or not; a TrAct layer is re-wrapped
            with the new ``lam``.
        lam: finite float > 0; 0.1 in the paper, 0.2 for long runs.
        accumulate: exact gradient accumulation, as for `TrActDense`.

    Returns:
        A new ``TrActDense``/``TrActConvND`` with the layer's config (name and dtype policy
        included) and, if the layer was built, a copy of its weights; use it in its place.
    """
    lam = _tc.check_lam(lam)
    cls = _PLAIN_TO_TRACT.get(type(layer), type(layer))
    if cls not in _TRACT_TO_PLAIN:
        names = ", ".join(f"keras.layers.{c.__name__}" for c in _PLAIN_TO_TRACT)
        raise TypeError(f"wrap() supports {names}; got layer of type {type(layer).__name__}")
    if getattr(layer, "quantization_mode", None):
        raise ValueError(f"wrap() needs a float layer; {layer.name!r} is quantized "
                         f"({layer.quantization_mode})")
    return _twin(cls, {**layer.get_config(), "lam": lam, "accumulate": bool(accumulate)},
                 layer)


def unwrap(layer: keras.layers.Layer) -> keras.layers.Layer:
    """The plain Keras layer of a TrAct layer.

    Args:
        layer: a ``TrActDense``/``TrActConv1D/2D/3D``, built or not.

    Returns:
        A new ``keras.layers.Dense``/``ConvND`` with the layer's config but ``lam``,
        ``sync`` and ``accumulate`` and, if the layer was built, a copy of its weights.
    """
    cls = _TRACT_TO_PLAIN.get(type(layer))
    if cls is None:
        raise TypeError(f"unwrap() takes a TrActDense or TrActConv1D/2D/3D layer; got layer "
                        f"of type {type(layer).__name__}")
    config = {k: v for k, v in layer.get_config().items()
              if k not in ("lam", "sync", "accumulate")}
    return _twin(cls, config, layer)


def _is_graph_model(model):
    """Whether ``model`` is a Sequential or functional model (a model with a layer graph)."""
    return isinstance(model, keras.Sequential) or (isinstance(model, keras.Model)
                                                    and hasattr(model, "_nodes_by_depth"))


def _stops_the_walk(operation, skip):
    """A layer with weights, or one that normalises (but ``skip`` types): the first layer
    is among these."""
    return not isinstance(operation, skip) and (
        isinstance(operation, _NORMALIZATIONS) or bool(getattr(operation, "weights", None)))


def _input_consumers(model, skip):
    """The layers with weights (or normalising) that the model's input reaches through
    layers and ops without weights (padding, reshapes, rescaling, dropout, ...)."""
    if isinstance(model, keras.Sequential):
        return [layer for layer in model.layers if _stops_the_walk(layer, skip)][:1]
    reached, found = {id(model.inputs[0])}, []
    # The functional graph is the record of one forward: nodes by depth, inputs deepest.
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or not any(id(t) in reached for t in node.input_tensors):
                continue
            if not _stops_the_walk(node.operation, skip):
                reached.update(id(t) for t in node.outputs)
            elif all(node.operation is not f for f in found):
                found.append(node.operation)
    return found


def _check_graph_model(model):
    if not _is_graph_model(model):
        raise TypeError(
            f"wrap_first_layer() needs a Sequential or functional model; {model.name!r} is a "
            f"subclassed {type(model).__name__}, whose layers Keras can neither clone nor "
            f"replace once built: create its first layer as a TrAct layer (or with "
            f"tract_core.keras.wrap) in its __init__")


def _first_layer_path(model, skip=()):
    """Layer names from ``model`` down to its first layer, into nested Sequential and
    functional models; layers of the ``skip`` types are walked through."""
    if not model.built:
        raise ValueError(f"wrap_first_layer() needs a built model; build {model.name!r} first "
                         f"(keras.Input as its first entry, or model.build(input_shape))")
    if len(model.inputs) != 1:
        raise ValueError(f"wrap_first_layer() finds the first layer of a model with one "
                         f"input; {model.name!r} has {len(model.inputs)}: pass layer= to name "
                         f"the layer to wrap")
    found = _input_consumers(model, skip)
    if len(found) != 1:
        names = ", ".join(repr(f.name) for f in found) or "none"
        raise ValueError(f"wrap_first_layer() looks for one layer with weights fed by the "
                         f"input of {model.name!r}, found {names}: pass layer= to name the "
                         f"layer to wrap")
    (first,) = found
    if _is_graph_model(first):
        return [first.name, *_first_layer_path(first, skip)]
    return [first.name]


def _check_supported(model, layer, name, found):
    """A TypeError saying what ``layer`` is and what to do, unless wrap() takes it."""
    kind = type(layer).__name__
    if type(layer) in _PLAIN_TO_TRACT or type(layer) in _TRACT_TO_PLAIN:
        return
    supported = "Dense, Conv1D, Conv2D or Conv3D"
    if found and isinstance(layer, _NORMALIZATIONS):
        try:  # the layer after the normalisation(s), for the hint
            after = repr("/".join(_first_layer_path(model, skip=_NORMALIZATIONS)))
        except (TypeError, ValueError):
            after = "..."
        raise TypeError(f"the model normalises its input with {name!r} ({kind}) before any "
                        f"layer TrAct supports ({supported}), and TrAct is for the layer that "
                        f"sees the input. To wrap the layer after the normalisation all the "
                        f"same, name it: wrap_first_layer(model, layer={after})")
    what = "the model's first layer" if found else "layer"
    raise TypeError(f"{what} {name!r} ({kind}) is not a layer TrAct supports: {supported}")


def _clone_with_twin(model, target, lam, accumulate, recursive):
    """``clone_model`` with ``target`` replaced by its TrAct twin; every weight copied."""
    pairs = []

    def clone(layer):
        # Keras's own default clone (same class, same config), built by the new graph in
        # the new model's name scope; the weights are copied below.
        twin = layer.__class__.from_config(layer.get_config())
        twin = wrap(twin, lam, accumulate=accumulate) if layer is target else twin
        pairs.append((layer, twin))
        return twin

    new_model = keras.models.clone_model(model, clone_function=clone, recursive=recursive)
    if all(layer is not target for layer, _ in pairs):  # inside a subclassed model
        raise TypeError(f"layer {target.name!r} is inside a subclassed model, which "
                        f"clone_model copies whole: create it with tract_core.keras.wrap there")
    for layer, twin in pairs:  # built now, by the clone's graph
        if getattr(layer, "weights", None):  # ops (keras.ops in the graph) have none
            _copy_weights(twin, layer)
    return new_model


def wrap_first_layer(model: keras.Model, lam: float = 0.1, *, layer: str | None = None,
                     accumulate: bool = False) -> tuple[keras.Model, str]:
    """A copy of a Sequential or functional model whose first layer is its TrAct twin.

    The first layer is found from the model's layer graph (the record of its forward): the
    layer with weights that the input reaches, through layers and ops without weights
    (padding, reshapes, ``Rescaling``, dropout, augmentation), into nested Sequential and
    functional models. A built model's layers cannot be swapped in place, so the model is
    cloned (``keras.models.clone_model``), that layer replaced by `wrap`'s twin, and every
    weight copied (non-trainable ones included). The original model is left as it was.

    Args:
        model: a built ``keras.Sequential`` or functional ``keras.Model`` with one input.
        lam: finite float > 0; 0.1 in the paper, 0.2 for long runs.
        layer: the name of the layer to wrap instead (``"outer/inner"`` inside a nested
            model), e.g. the convolution after an input normalisation.
        accumulate: exact gradient accumulation, as for `TrActDense`.

    Returns:
        (new model, name of the wrapped layer, ``"outer/inner"`` if nested). A compiled
        model's copy is compiled from its compile config: a fresh optimizer.

    Raises:
        TypeError: the first layer is not ``Dense``/``Conv1D/2D/3D`` (a normalisation, a
            transposed convolution, an embedding: named in the message), or the model is
            subclassed (no graph to clone: create its first layer with `wrap` instead).
        ValueError: no single first layer (several layers read the input, or none).
    """
    lam = _tc.check_lam(lam)
    _check_graph_model(model)
    path = _first_layer_path(model) if layer is None else str(layer).split("/")
    target = model
    for depth, name in enumerate(path):
        try:
            target = target.get_layer(name)
        except (ValueError, AttributeError):
            raise ValueError(f"layer={layer!r}: {'/'.join(path[:depth + 1])!r} is not a layer "
                             f"of {model.name!r}") from None
    name = "/".join(path)
    _check_supported(model, target, name, found=layer is None)
    return _clone_with_twin(model, target, lam, accumulate, recursive=len(path) > 1), name


class _Preconditioning:
    """Optimizer mixin: before clipping, every accumulating TrAct layer's kernel gradient
    becomes the preconditioned sums of its statistics weight, whose gradient becomes zero
    (so the statistics stay zero). Keras averages gradients over
    ``gradient_accumulation_steps`` first: all entries alike, which keeps the system exact."""

    def _backend_apply_gradients(self, grads, trainable_variables):
        # A plain attribute (no tracking): the variables whose gradients _clip_gradients gets.
        vars(self)["_tract_variables"] = tuple(trainable_variables)
        return super()._backend_apply_gradients(grads, trainable_variables)

    def _clip_gradients(self, grads):
        grads, variables = list(grads), vars(self).get("_tract_variables", ())
        position = {id(v): i for i, v in enumerate(variables)}
        for i, variable in enumerate(variables):
            kernel_and_groups = getattr(variable, "_tract_kernel", None)
            if kernel_and_groups is None or grads[i] is None:
                continue
            kernel, groups = kernel_and_groups
            j = position.get(id(kernel))
            if j is not None and grads[j] is not None:  # else the kernel is frozen
                grad = _kernel_grad(grads[i], tuple(kernel.shape), groups)
                grads[j] = ops.cast(grad, grads[j].dtype)
            grads[i] = ops.zeros_like(grads[i])
        return super()._clip_gradients(grads)


def exact_accumulation(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """Let ``optimizer`` precondition the layers made with ``accumulate=True``.

    Each update, before clipping and weight decay, the kernel gradient of every such layer
    becomes TrAct's on all rows since the last update, ``(sum G^T X) (sum X^T X / sum b +
    lam I)^-1``: over the ``gradient_accumulation_steps`` micro-batches (exactly the large
    batch's gradient), or over one batch without accumulation. The statistics weight's
    gradient becomes zero, so the weight stays zero; if it is not zero (an optimizer
    without this stepped it) the layer's output is NaN rather than trained on a zero
    kernel gradient.

    Args:
        optimizer: a Keras 3 optimizer, or a ``LossScaleOptimizer`` (its inner optimizer
            is changed), before or after ``model.compile``.

    Returns:
        ``optimizer`` itself, its class now a subclass of its class that does the above
        (saved as its plain class: call this again after loading a model).
    """
    target = getattr(optimizer, "inner_optimizer", optimizer)
    if not isinstance(target, keras.optimizers.Optimizer):
        raise TypeError(f"exact_accumulation() takes a Keras optimizer, got "
                        f"{type(optimizer).__name__}")
    cls = type(target)
    if not issubclass(cls, _Preconditioning):
        target.__class__ = type(cls.__name__, (_Preconditioning, cls),
                                {"__module__": cls.__module__})
    return optimizer
