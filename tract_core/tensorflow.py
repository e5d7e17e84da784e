"""TensorFlow adapter: ``dense`` and ``conv`` whose kernel gradient is TrAct's.

    >>> import tensorflow as tf, tract_core.tensorflow as ttf
    >>> z = ttf.conv(images, kernel, bias, strides=1, padding="SAME", lam=0.1)

Same signatures and layouts as `tract_core.jax`: channels-last inputs, kernels
``(n, m)`` for dense and ``(*window, C / groups, M)`` for conv.

How it hooks into autograd: the plain op (``tf.matmul``/``tf.tensordot`` or
``tf.nn.convolution``, then the bias add) runs on a ``tf.stop_gradient`` of the kernel,
so forward values, input gradients and bias gradients are those of exactly the ops a
plain layer runs. The output then passes through an identity ``tf.custom_gradient`` node
that owns the kernel; its gradient function receives G = dL/dz and returns TrAct's kernel
gradient from `tract_core.weight_grad` or `tract_core.conv_weight_grad`
(one system per feature group), its statistics and solve in float64 on TF's own ops.

Everything works eagerly and inside ``tf.function`` (with or without ``jit_compile``).
Shapes must be static except the batch axis; with a batch size known only at run time
(as Keras traces) the kernel gradient solves the n x n system.
"""

from __future__ import annotations

import dataclasses
import functools

import tensorflow as tf

import tract_core as _tc
from tract_core._args import check_bias_shape, conv_padding, is_int, per_axis, resolve_pads
from tract_core._tf_namespace import TF, compiling_with_xla

__all__ = ["conv", "dense"]


def _replica_sum(sync):
    """The core's ``replica_sum``: the Gram and row count summed over the replicas of the
    tf.distribute replica context, or None (``sync`` off, or a single replica)."""
    context = tf.distribute.get_replica_context() if sync else None
    if context is None or context.num_replicas_in_sync == 1:
        return None

    def replica_sum(gram, count):
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(count, gram.dtype))
        return context.all_reduce(tf.distribute.ReduceOp.SUM, gram), total

    return replica_sum


def _with_kernel_grad(z, kernel, kernel_grad):
    """Identity on ``z`` whose gradient with respect to ``kernel`` is ``kernel_grad(dz)``.

    ``z`` was computed from ``tf.stop_gradient(kernel)``, so this is the kernel's only path.
    """

    @tf.custom_gradient
    def tract_kernel_grad(z, kernel):
        def grad(grad_z):
            return grad_z, kernel_grad(grad_z)

        return tf.identity(z), grad

    return tract_kernel_grad(z, kernel)


def _operands(x, kernel, bias):
    """x, kernel and bias (or None) as tensors of the kernel's floating dtype.

    Tensors must have it already, as TF's own ops do not mix dtypes; numpy arrays and
    Python numbers are converted to it. TypeError for integer, bool or complex ones.
    """
    kernel = tf.convert_to_tensor(kernel)
    if not _is_float(kernel.dtype):
        raise TypeError(f"kernel must have a floating dtype (float16, bfloat16, float32 or "
                        f"float64), got {kernel.dtype.name}")

    def operand(value, name):
        if value is None:
            return None
        dtype = getattr(value, "dtype", None)
        if tf.is_tensor(value) and dtype != kernel.dtype:
            raise TypeError(f"{name} must have the kernel's dtype {kernel.dtype.name}, got "
                            f"{tf.as_dtype(dtype).name}")
        if dtype is not None and not _is_float(dtype):
            raise TypeError(f"{name} must have a floating dtype (converted to the kernel's "
                            f"{kernel.dtype.name}), got {dtype}")
        return tf.convert_to_tensor(value, dtype=kernel.dtype)

    return operand(x, "x"), kernel, operand(bias, "bias")


def _is_float(dtype):
    try:
        return tf.as_dtype(dtype).is_floating
    except TypeError:  # numpy dtypes TF has no counterpart for (object, str)
        return False


# --------------------------------------------------------------------------- dense


def _dense_kernel_grad(x, grad_z, kernel, lam, sync):
    n, m = kernel.shape
    dtype = _tc.statistics_dtype(TF, x.dtype)
    rows = tf.reshape(tf.cast(x, dtype), (-1, n))
    grads = tf.reshape(tf.cast(grad_z, dtype), (-1, m))
    grad_w = _tc.weight_grad(rows, grads, lam, replica_sum=_replica_sum(sync), xp=TF)
    return tf.cast(tf.transpose(grad_w), kernel.dtype)  # (m, n) -> (n, m)


def dense(x, kernel, bias=None, *, lam=0.1, sync=False):
    """``x @ kernel + bias`` with TrAct's kernel gradient.

    Args:
        x: (..., n); every leading position is a row of the Gram (tokens count as rows).
        kernel: (n, m), Keras layout, floating (float16, bfloat16, float32, float64). A
            ``tf.Variable`` works too.
        bias: (m,) or None. A tensor x or bias must have the kernel's dtype; numpy
            arrays and Python numbers are converted to it.
        lam: finite float > 0 (0.1 in the paper, 0.2 for long runs).
        sync: inside ``strategy.run`` of a tf.distribute strategy with several replicas
            (e.g. MirroredStrategy), sum the Gram and row count over the replicas in
            backward, so the summed replica gradients are the full-batch TrAct gradient.
            Off (default): each replica uses its own rows' statistics.

    Returns:
        (..., m), exactly the plain ``tf.matmul`` (2-D x) or ``tf.tensordot`` plus bias,
        as Keras computes Dense. Under a GradientTape the kernel gradient is
        ``(G^T X (X^T X / b + lam I)^-1)^T`` with X = x.reshape(-1, n), b its row count
        (zero for no rows).

    Raises:
        ValueError: lam, or shapes that do not match. TypeError: non-floating dtypes.
    """
    lam = _tc.check_lam(lam)
    x, kernel, bias = _operands(x, kernel, bias)
    if kernel.shape.rank != 2:
        raise ValueError(f"kernel must have shape (n, m), got shape {tuple(kernel.shape)}")
    if x.shape.rank is None or x.shape.rank < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"x must have shape (..., {kernel.shape[0]}) to match kernel "
                         f"{tuple(kernel.shape)}, got shape {tuple(x.shape)}")
    check_bias_shape(None if bias is None else bias.shape, kernel.shape[1])
    # The ops Keras's TensorFlow backend runs for Dense: matmul for 2-D x, else tensordot.
    frozen = tf.stop_gradient(kernel)
    z = (tf.matmul(x, frozen) if x.shape.rank == 2
         else tf.tensordot(x, frozen, axes=[[x.shape.rank - 1], [0]]))
    if bias is not None:
        z = z + bias
    return _with_kernel_grad(
        z, kernel, lambda grad_z: _dense_kernel_grad(x, grad_z, kernel, lam, sync))


# --------------------------------------------------------------------------- conv


@dataclasses.dataclass(frozen=True)
class _ConvGeometry:
    """The static options of one conv call, per spatial axis; pads as (lo, hi) pairs."""

    strides: tuple
    pads: tuple
    dilation: tuple
    groups: int


_DATA_FORMATS = {3: "NWC", 4: "NHWC", 5: "NDHWC"}


@functools.cache
def _xla_convolution(strides, padding, dilation):
    """``tf.nn.convolution`` compiled by XLA: TF's own CPU kernels (and their gradients)
    lack grouped convolutions, so, as Keras does, grouped ones run through XLA."""

    def convolution(x, kernel):
        return tf.nn.convolution(x, kernel, strides, padding,
                                 data_format=_DATA_FORMATS[x.shape.rank], dilations=dilation)

    return tf.function(convolution, jit_compile=True, autograph=False)


def _plain_conv(x, kernel, padding, geometry):
    """The plain channels-last convolution as Keras runs it: ``tf.nn.convolution`` with
    'SAME'/'VALID', or ``tf.pad`` then 'VALID' for pairs and 'SAME_LOWER'.

    The data format is named, as Keras's TensorFlow backend names it: with the default
    (None), TF 2.21's eager gradient of the 3-D convolution fails. ``tf.nn.convolution``
    refuses strides > 1 together with dilation > 1; that case runs at stride 1 and keeps
    every stride-th output, the same sums at the same positions.
    """
    strides, dilation = geometry.strides, geometry.dilation
    subsample = max(strides) > 1 and max(dilation) > 1
    if padding not in ("SAME", "VALID") or subsample:
        x = tf.pad(x, [(0, 0), *geometry.pads, (0, 0)])
        padding = "VALID"
    conv_strides = (1,) * len(strides) if subsample else strides
    if geometry.groups > 1:
        z = _xla_convolution(conv_strides, padding, dilation)(x, kernel)
    else:
        z = tf.nn.convolution(x, kernel, conv_strides, padding,
                              data_format=_DATA_FORMATS[x.shape.rank], dilations=dilation)
    if subsample:
        z = z[(slice(None), *(slice(None, None, s) for s in strides))]
    if x.shape[0] is None and z.shape[1:].is_fully_defined() and not compiling_with_xla():
        # TF's CPU convolution gives an empty batch of unknown size the input's shape
        # (grappler drops a reshape to the static shape): pick an empty output then.
        empty = tf.zeros([0, *z.shape[1:]], z.dtype)
        z = tf.cond(tf.shape(x)[0] > 0, lambda: z, lambda: empty)
    return z


def _conv_kernel_grad(x, grad_z, kernel, lam, geometry, sync):
    d = kernel.shape.rank - 2
    *window, c_g, m = kernel.shape
    # The core's layout, channels-first and padded; padded after the transpose, where
    # rows are long (padding a channels-last tensor of 3 channels is slow).
    first = (0, d + 1, *range(1, d + 1))
    x = tf.transpose(x, first)
    if any(map(any, geometry.pads)):
        x = tf.pad(x, [(0, 0), (0, 0), *geometry.pads])
    dtype = _tc.statistics_dtype(TF, x.dtype)
    grad_w = _tc.conv_weight_grad(
        tf.cast(x, dtype), tf.cast(tf.transpose(grad_z, first), dtype), tuple(window),
        geometry.strides, geometry.dilation, geometry.groups, lam,
        replica_sum=_replica_sum(sync), xp=TF)
    grad_w = tf.reshape(grad_w, (m, c_g, *window))  # (g, M/g, C/g * K) -> torch weight
    return tf.cast(tf.transpose(grad_w, (*range(2, d + 2), 1, 0)), kernel.dtype)


def _conv_geometry(x, kernel, strides, padding, kernel_dilation, feature_group_count):
    """The checked options of `conv` as a `_ConvGeometry`, and the padding
    as it was named ('SAME', 'VALID', 'SAME_LOWER' or pairs)."""
    rank = kernel.shape.rank
    if rank not in (3, 4, 5) or not kernel.shape.is_fully_defined() or 0 in kernel.shape:
        raise ValueError(f"kernel must have a static shape (*window, C/groups, M) with 1 to 3 "
                         f"spatial axes and no size 0, got shape {tuple(kernel.shape)}")
    d = rank - 2
    if x.shape.rank != rank or not x.shape[1:].is_fully_defined():
        raise ValueError(f"x must have shape (N, *spatial, C) with {d} static spatial "
                         f"axes and static C to match kernel {tuple(kernel.shape)}, got shape "
                         f"{tuple(x.shape)}")
    if not is_int(feature_group_count) or feature_group_count < 1:
        raise ValueError(f"feature_group_count must be an int >= 1, got {feature_group_count!r}")
    *window, c_g, m = kernel.shape
    if x.shape[-1] != c_g * feature_group_count or m % feature_group_count:
        raise ValueError(
            f"x channels ({x.shape[-1]}) must equal kernel input channels ({c_g}) x "
            f"feature_group_count ({feature_group_count}), and kernel output channels ({m}) "
            f"must be divisible by it")
    strides = per_axis(strides, d, "strides")
    dilation = per_axis(kernel_dilation, d, "kernel_dilation")
    padding = conv_padding(padding, d, minimum=0)
    size = tuple(x.shape[1:-1])
    pads = resolve_pads(padding, size, window, strides, dilation)
    padded = tuple(s + lo + hi for s, (lo, hi) in zip(size, pads))
    if min(_tc.conv_output_shape(padded, window, strides, dilation)) < 1:
        # tf.nn.convolution would return an empty output, and Keras refuses it.
        raise ValueError(f"kernel window {tuple(window)} with kernel_dilation {dilation} does "
                         f"not fit x's spatial shape {size} padded to {padded}: no output "
                         f"position")
    return _ConvGeometry(strides, pads, dilation, int(feature_group_count)), padding


def conv(x, kernel, bias=None, *, strides=1, padding="VALID", kernel_dilation=1,
         feature_group_count=1, lam=0.1, sync=False):
    """Channels-last convolution (1-D, 2-D or 3-D) with TrAct's kernel gradient.

    Args:
        x: (N, *spatial, C); spatial and channel sizes static, N may be unknown.
        kernel: (*window, C / feature_group_count, M), Keras / TF layout, floating. A
            ``tf.Variable`` works too.
        bias: (M,) or None. Dtypes as for `dense`.
        strides: int or one int per spatial axis.
        padding: 'SAME', 'VALID', 'SAME_LOWER', an int (same on both sides of every
            axis), or per spatial axis an int or a (lo, hi) pair.
        kernel_dilation: int or one int per spatial axis.
        feature_group_count: number of feature groups; one Gram per group.
        lam: finite float > 0 (0.1 in the paper, 0.2 for long runs).
        sync: as for `dense`.

    Returns:
        (N, *out_spatial, M), exactly ``tf.nn.convolution`` plus bias, as Keras computes
        ConvND (explicit pads: ``tf.pad`` then 'VALID'; grouped convolutions through XLA
        as Keras runs them). Under a GradientTape the kernel gradient is TrAct's, per
        group, with b = N x output positions rows (receptive fields).

    Raises:
        ValueError: lam, options or shapes that do not match, or a kernel window that
            does not fit the padded input. TypeError: non-floating dtypes.
    """
    lam = _tc.check_lam(lam)
    x, kernel, bias = _operands(x, kernel, bias)
    geometry, padding = _conv_geometry(x, kernel, strides, padding, kernel_dilation,
                                       feature_group_count)
    check_bias_shape(None if bias is None else bias.shape, kernel.shape[-1])
    z = _plain_conv(x, tf.stop_gradient(kernel), padding, geometry)
    if bias is not None:
        z = z + bias
    return _with_kernel_grad(
        z, kernel, lambda grad_z: _conv_kernel_grad(x, grad_z, kernel, lam, geometry, sync))
