"""TensorFlow adapter: ``dense`` and ``conv`` whose kernel gradient is TrAct's.

    >>> import tensorflow as tf, tract_core.tensorflow as ttf
    >>> z = ttf.conv(images, kernel, bias, strides=1, padding="SAME", lam=0.1)

Same signatures and layouts as `tract_core.jax`: channels-last inputs, kernels ``(n, m)``
for dense and ``(*window, C / groups, M)`` for conv. The plain op, as Keras runs it, runs
on a ``tf.stop_gradient`` of the kernel, so forward values, input and bias gradients are
exactly a plain layer's; a ``tf.custom_gradient`` identity that owns the kernel returns
TrAct's kernel gradient (statistics in float64).

Works eagerly and in ``tf.function`` (with or without ``jit_compile``). Shapes must be
static but for the batch size; where it is known only at run time (as Keras traces) the
kernel gradient solves the n x n system.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from tract_core._requires import requires

with requires("tensorflow", "TensorFlow"):
    import tensorflow as tf

import tract_core as _tc
from tract_core._args import check_bias_shape, conv_padding, is_int, per_axis, resolve_pads
from tract_core._tf_namespace import TF, compiling_with_xla

__all__ = ["conv", "dense"]


def _replica_sum(sync):
    """The core's ``replica_sum`` over the tf.distribute replicas, or None (one replica)."""
    context = tf.distribute.get_replica_context() if sync else None
    if context is None or context.num_replicas_in_sync == 1:
        return None
    total = functools.partial(context.all_reduce, tf.distribute.ReduceOp.SUM)
    return lambda gram, count: (total(gram), total(tf.cast(count, gram.dtype)))


def _tract_output(z, bias, kernel, kernel_grad, statistics=None, moments=None):
    """``z + bias`` with ``kernel_grad(dz)`` as its gradient with respect to ``kernel``; or,
    given ``statistics``, a zero kernel gradient and ``moments(dz)`` (the packed sums) as
    the statistics' gradient, the output NaN once the statistics are not zero (an
    optimizer stepped them: the sums were not preconditioned)."""
    if bias is not None:
        z = z + bias
    if statistics is None:

        @tf.custom_gradient
        def tract_kernel_grad(z, kernel):
            return tf.identity(z), lambda grad_z: (grad_z, kernel_grad(grad_z))

        return tract_kernel_grad(z, kernel)

    @tf.custom_gradient
    def accumulated(z, kernel, statistics):
        skipped = tf.reduce_any(tf.not_equal(statistics, 0))
        out = z + tf.cast(tf.where(skipped, float("nan"), 0.0), z.dtype)
        return out, lambda grad_z: (grad_z, tf.zeros_like(kernel),
                                    tf.cast(moments(grad_z), statistics.dtype))

    return accumulated(z, kernel, tf.convert_to_tensor(statistics))


def _check_statistics(statistics, kernel, groups):
    if statistics is not None:
        _tc.check_packed_shape(statistics.shape, kernel.shape[-1],
                               kernel.shape[:-1].num_elements(), groups)


def _operands(x, kernel, bias):
    """x, kernel, bias (or None) as tensors of the kernel's dtype (numpy arrays converted)."""
    kernel = tf.convert_to_tensor(kernel)
    if not kernel.dtype.is_floating:
        raise TypeError(f"kernel must have a floating dtype (float16, bfloat16, float32 or "
                        f"float64), got {kernel.dtype.name}")

    def operand(value, name):
        dtype = getattr(value, "dtype", kernel.dtype)
        if tf.is_tensor(value) and dtype != kernel.dtype:
            raise TypeError(f"{name} must have the kernel's dtype {kernel.dtype.name}, got "
                            f"{tf.as_dtype(dtype).name}")
        try:
            floating = tf.as_dtype(dtype).is_floating
        except TypeError:  # numpy dtypes TF has no counterpart for (object, str)
            floating = False
        if not floating:
            raise TypeError(f"{name} must have a floating dtype (converted to the kernel's "
                            f"{kernel.dtype.name}), got {dtype}")
        return tf.convert_to_tensor(value, dtype=kernel.dtype)

    return operand(x, "x"), kernel, None if bias is None else operand(bias, "bias")


def dense(x: tf.types.experimental.TensorLike, kernel: tf.Tensor | tf.Variable,
          bias: tf.types.experimental.TensorLike | None = None, *, lam: float = 0.1,
          sync: bool = False, statistics: tf.Variable | None = None) -> tf.Tensor:
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
        statistics: for exact accumulation, a variable of `tract_core.packed_size` zeros
            (float64): its gradient receives the call's `tract_core.pack_statistics` and
            the kernel's gradient is zero; sums of such gradients go to
            `tract_core.unpack_and_precondition` (as `tract_core.keras` does).

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
    n, m = kernel.shape
    if x.shape.rank is None or x.shape.rank < 1 or x.shape[-1] != n:
        raise ValueError(f"x must have shape (..., {n}) to match kernel "
                         f"{tuple(kernel.shape)}, got shape {tuple(x.shape)}")
    check_bias_shape(None if bias is None else bias.shape, m)
    # The ops Keras's TensorFlow backend runs for Dense: matmul for 2-D x, else tensordot.
    frozen = tf.stop_gradient(kernel)
    z = (tf.matmul(x, frozen) if x.shape.rank == 2
         else tf.tensordot(x, frozen, axes=[[x.shape.rank - 1], [0]]))

    def rows_and_grads(grad_z):
        return tf.reshape(x, (-1, n)), tf.reshape(grad_z, (-1, m))

    def kernel_grad(grad_z):  # the core's (m, n) statistics in float64, transposed
        return tf.transpose(_tc.weight_grad(*rows_and_grads(grad_z), lam,
                                            replica_sum=_replica_sum(sync), xp=TF))

    def moments(grad_z):
        rows, grads = rows_and_grads(grad_z)
        grad_w, gram = _tc.moments(rows, grads, xp=TF)
        return _tc.pack_statistics(grad_w[None], gram[None], tf.shape(rows)[0], lam, xp=TF)

    _check_statistics(statistics, kernel, 1)
    return _tract_output(z, bias, kernel, kernel_grad, statistics, moments)


def _convolution(x, kernel, strides, padding, dilation):
    # The data format named, as Keras's TensorFlow backend names it: with the default
    # (None), TF 2.21's eager gradient of the 3-D convolution fails.
    return tf.nn.convolution(x, kernel, strides, padding, dilations=dilation,
                             data_format="N" + "DHW"[5 - x.shape.rank:] + "C")


# TF's CPU kernels lack grouped convolutions: as in Keras, those run through XLA.
_xla_convolution = tf.function(_convolution, jit_compile=True, autograph=False)


def _plain_conv(x, kernel, padding, pads, out, strides, dilation, groups):
    """The plain channels-last convolution as Keras runs it: ``tf.nn.convolution`` with
    'SAME'/'VALID', or ``tf.pad`` then 'VALID' for pairs and 'SAME_LOWER'. Strides > 1
    with dilation > 1 (which it refuses) run at stride 1, keeping every stride-th output.
    ``out``: the output's shape past the batch axis, (*out_spatial, M)."""
    subsample = max(strides) > 1 and max(dilation) > 1
    if padding not in ("SAME", "VALID") or subsample:
        x = tf.pad(x, [(0, 0), *pads, (0, 0)])
        padding = "VALID"
    conv_strides = (1,) * len(strides) if subsample else strides
    run = _xla_convolution if groups > 1 else _convolution
    z = run(x, kernel, conv_strides, padding, dilation)
    if subsample:
        z = z[(slice(None), *(slice(None, None, s) for s in strides))]
    # TF's CPU convolution gives an empty batch the input's shape. Eagerly, a reshape of
    # no entries mends it and keeps the gradient; in a graph grappler would drop that
    # reshape, so a cond picks an empty output.
    if x.shape[0] == 0 and tf.executing_eagerly():
        z = tf.reshape(z, (0, *out))
    elif x.shape[0] in (0, None) and not compiling_with_xla():
        empty = tf.zeros([0, *out], z.dtype)
        z = tf.cond(tf.shape(x)[0] > 0, lambda: z, lambda: empty)
    return z


def _conv_options(x, kernel, strides, padding, kernel_dilation, feature_group_count):
    """The checked options of `conv`: the padding as named, per spatial axis the (lo, hi)
    pads, the output's shape past the batch axis (*out_spatial, M), then per spatial axis
    strides and dilation, then the groups."""
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
        raise ValueError(f"x channels ({x.shape[-1]}) must equal kernel input channels ({c_g}) "
                         f"x feature_group_count ({feature_group_count}), and kernel output "
                         f"channels ({m}) must be divisible by it")
    strides = per_axis(strides, d, "strides")
    dilation = per_axis(kernel_dilation, d, "kernel_dilation")
    padding = conv_padding(padding, d, minimum=0)
    size = tuple(x.shape[1:-1])
    pads = resolve_pads(padding, size, window, strides, dilation)
    padded = tuple(s + lo + hi for s, (lo, hi) in zip(size, pads))
    out = _tc.conv_output_shape(padded, window, strides, dilation)
    if min(out) < 1:
        # tf.nn.convolution would return an empty output, and Keras refuses it.
        raise ValueError(f"kernel window {tuple(window)} with kernel_dilation {dilation} does "
                         f"not fit x's spatial shape {size} padded to {padded}")
    return padding, pads, (*out, m), strides, dilation, int(feature_group_count)


def conv(x: tf.types.experimental.TensorLike, kernel: tf.Tensor | tf.Variable,
         bias: tf.types.experimental.TensorLike | None = None, *,
         strides: int | Sequence[int] = 1,
         padding: str | int | Sequence[int | tuple[int, int]] = "VALID",
         kernel_dilation: int | Sequence[int] = 1, feature_group_count: int = 1,
         lam: float = 0.1, sync: bool = False,
         statistics: tf.Variable | None = None) -> tf.Tensor:
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
        sync, statistics: as for `dense` (statistics per group).

    Returns:
        (N, *out_spatial, M), exactly ``tf.nn.convolution`` plus bias as Keras runs ConvND
        (explicit pads: ``tf.pad`` then 'VALID'; groups through XLA). Under a GradientTape
        the kernel gradient is TrAct's, per group, with b = N x output positions rows.

    Raises:
        ValueError: lam, options or shapes that do not match, or a kernel window that
            does not fit the padded input. TypeError: non-floating dtypes.
    """
    lam = _tc.check_lam(lam)
    x, kernel, bias = _operands(x, kernel, bias)
    padding, pads, out, *geometry = _conv_options(x, kernel, strides, padding,
                                                  kernel_dilation, feature_group_count)
    check_bias_shape(None if bias is None else bias.shape, kernel.shape[-1])
    z = _plain_conv(x, tf.stop_gradient(kernel), padding, pads, out, *geometry)
    window = kernel.shape[:-2]
    d = len(window)
    first = (0, d + 1, *range(1, d + 1))  # the core's layout: channels first

    def channels_first(grad_z):
        # Padded after the transpose, where rows are long (padding a channels-last
        # tensor of 3 channels is slow).
        padded = tf.pad(tf.transpose(x, first), [(0, 0), (0, 0), *pads])
        return padded, tf.transpose(grad_z, first)

    def kernel_grad(grad_z):  # statistics in float64, the result in x's dtype
        grad_w = _tc.conv_weight_grad(*channels_first(grad_z), tuple(window), *geometry, lam,
                                      replica_sum=_replica_sum(sync), xp=TF)
        return _tc.to_channels_last_kernel(grad_w, kernel.shape, xp=TF)

    def moments(grad_z):
        padded, grad_z = channels_first(grad_z)
        grad_w, gram = _tc.conv_moments(padded, grad_z, tuple(window), *geometry, xp=TF)
        rows = tf.shape(grad_z)[0] * grad_z.shape[2:].num_elements()
        return _tc.pack_statistics(grad_w, gram, rows, lam, xp=TF)

    _check_statistics(statistics, kernel, geometry[-1])
    return _tract_output(z, bias, kernel, kernel_grad, statistics, moments)
