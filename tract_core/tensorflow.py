"""TensorFlow adapter: ``dense`` and ``conv`` whose kernel gradient is TrAct's.

    >>> import tensorflow as tf, tract_core.tensorflow as ttf
    >>> z = ttf.conv(images, kernel, bias, strides=1, padding="SAME", lam=0.1)

Same signatures and layouts as :mod:`tract_core.jax`: channels-last inputs, kernels
``(n, m)`` for dense and ``(*window, C / groups, M)`` for conv.

How it hooks into autograd: the plain op (``tf.matmul``/``tf.tensordot`` or
``tf.nn.convolution``, then the bias add) runs on a ``tf.stop_gradient`` of the kernel,
so forward values, input gradients and bias gradients are those of exactly the ops a
plain layer runs. The output then passes through an identity ``tf.custom_gradient`` node
that owns the kernel; its gradient function receives G = dL/dz and returns TrAct's kernel
gradient computed by :mod:`tract_core` (one Gram per feature group). The plain gradient
G^T X inside it comes from the patches the Gram needs anyway, not from TF's filter
gradient: reaching that from a gradient function takes a nested GradientTape that re-runs
the forward eagerly, and eager TF 2.21 cannot differentiate an undilated Conv3D at all
(its gradient finds no ``data_format`` attribute; the plain op fails the same way).

TensorFlow tensors are outside array-api-compat, so the core runs on ``_TFNamespace``, a
shim giving the handful of array-API functions it calls plus a Cholesky ``spd_solve``.
Everything works eagerly and inside ``tf.function`` (with or without ``jit_compile``).
Shapes must be static except the batch axis: under ``tf.function`` with an unknown batch
size the kernel gradient picks the n x n or the b x b system at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types

import numpy as np
import tensorflow as tf

import tract_core as _tc
from tract_core._args import check_bias_shape, conv_padding, is_int, per_axis

__all__ = ["conv", "dense"]


# --------------------------------------------------------------------------- namespace


class _TFNamespace:
    """TensorFlow as the small array-API namespace the core calls (``xp=`` argument).

    Only what ``tract_core._core`` uses: dtype queries, ``astype``, ``eye``, ``matmul``,
    ``linalg.matrix_transpose``, ``stack``/``reshape``/``permute_dims`` (conv patches) and
    ``spd_solve``, which makes this namespace its own Cholesky backend.
    """

    float32 = tf.float32
    linalg = types.SimpleNamespace(matrix_transpose=tf.linalg.matrix_transpose)
    matmul = staticmethod(tf.linalg.matmul)

    @staticmethod
    def isdtype(dtype, kind):
        if kind != "real floating":
            raise NotImplementedError(f"isdtype kind {kind!r} is not needed by the core")
        dtype = tf.as_dtype(dtype)
        return dtype.is_floating

    @staticmethod
    def finfo(dtype):
        return types.SimpleNamespace(bits=tf.as_dtype(dtype).size * 8)

    @staticmethod
    def astype(x, dtype, /, *, copy=True):
        return tf.cast(x, dtype)  # a no-op for the same dtype; TF tensors are immutable

    @staticmethod
    def eye(n_rows, /, *, dtype=None, device=None):
        # device: TF places the op next to its consumers.
        return tf.eye(n_rows, dtype=dtype or tf.float32)

    @staticmethod
    def stack(arrays, /, *, axis=0):
        return tf.stack(arrays, axis=axis)

    @staticmethod
    def reshape(x, /, shape):
        return tf.reshape(x, shape)

    @staticmethod
    def permute_dims(x, /, axes):
        return tf.transpose(x, axes)

    @staticmethod
    def spd_solve(a, rhs):
        """Solve ``a X = rhs`` for SPD ``a``, batched over leading axes.

        ``tf.linalg.cholesky`` raises on a non-finite matrix outside XLA, so such a matrix
        is swapped for the identity and its solution poisoned with NaN afterwards: NaN/Inf
        in the data flow on as NaN gradients, without a host round trip.
        """
        finite = tf.reduce_all(tf.math.is_finite(a), axis=[-2, -1], keepdims=True)
        safe = tf.where(finite, a, tf.eye(a.shape[-1], dtype=a.dtype))
        solution = tf.linalg.cholesky_solve(tf.linalg.cholesky(safe), rhs)
        return tf.where(finite, solution, tf.constant(math.nan, dtype=rhs.dtype))


_TF = _TFNamespace()


def _compute_dtype(dtype):
    """float16/bfloat16 -> float32 (the Gram and the solve); float32/float64 stay."""
    return tf.float32 if tf.as_dtype(dtype).size < 4 else tf.as_dtype(dtype)


# --------------------------------------------------------------------------- backward


def _replica_context(sync):
    """The tf.distribute replica context to reduce over, or None (single replica)."""
    if not sync:
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def _rows_weight_grad(rows, grads, lam, sync=False):
    """TrAct's weight gradient per group, torch layout, from the core.

    Args:
        rows: (g, b, n) inputs X, compute dtype. grads: (g, b, m) output gradients G.
        lam: finite float > 0.

    Returns:
        (g, m, n). With b known statically the core picks its form (n x n solve for
        b >= n, b x b push-through for b < n); with b unknown (``tf.function`` over a
        batch of unknown size, as Keras traces) a ``tf.cond`` picks it at run time.
        With ``sync`` inside a tf.distribute replica context of several replicas, the
        Gram and the row count are summed over the replicas (always the n x n form), so
        the strategy's gradient sum yields the full-batch TrAct gradient.
    """
    context = _replica_context(sync)
    if context is not None:
        plain = tf.matmul(grads, rows, transpose_a=True)  # G^T X of this replica's rows
        gram = context.all_reduce(tf.distribute.ReduceOp.SUM, _tc.gram(rows, xp=_TF))
        count = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                   tf.cast(tf.shape(rows)[-2], gram.dtype))
        return _tc.precondition(plain, gram, count, lam, xp=_TF)
    b, n = rows.shape[-2], rows.shape[-1]
    if b is not None:
        return _tc.weight_grad(rows, grads, lam, xp=_TF)
    count = tf.shape(rows)[-2]

    def many_rows():
        plain = tf.matmul(grads, rows, transpose_a=True)  # G^T X
        gram = _tc.gram(rows, xp=_TF)
        return _tc.precondition(plain, gram, tf.cast(count, gram.dtype), lam, xp=_TF)

    if n == 1:
        return many_rows()

    def few_rows():
        # The core's b x b form needs a static b. Zero rows up to n - 1 (still < n, so the
        # core keeps the push-through form) add a decoupled lam I block and nothing else;
        # scaling X up and G down by sqrt((n - 1) / b) turns the core's count n - 1 back
        # into b: (s X)(s X)^T / (n - 1) = X X^T / b, and the s cancels in G^T ... X.
        padded = n - 1
        scale = tf.sqrt(tf.cast(padded, rows.dtype) / tf.cast(count, rows.dtype))

        def fill(a):
            # Static pad then cut: valid for any count, as XLA compiles the untaken branch.
            cut = tf.pad(a, [[0, 0], [0, padded], [0, 0]])[:, :padded]
            return tf.reshape(cut, (a.shape[0], padded, a.shape[-1]))

        return _tc.weight_grad(fill(rows) * scale, fill(grads) / scale, lam, xp=_TF)

    return tf.cond(count >= n, many_rows, few_rows)


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


# --------------------------------------------------------------------------- dense


def _plain_dense(x, kernel):
    # The ops Keras's TensorFlow backend runs for Dense: matmul for 2-D x, else tensordot.
    if x.shape.rank == 2:
        return tf.matmul(x, kernel)
    return tf.tensordot(x, kernel, axes=[[x.shape.rank - 1], [0]])


def _dense_kernel_grad(x, grad_z, kernel, lam, sync):
    n, m = kernel.shape
    dtype = _compute_dtype(x.dtype)
    rows = tf.reshape(tf.cast(x, dtype), (1, -1, n))
    grads = tf.reshape(tf.cast(grad_z, dtype), (1, -1, m))
    grad_w = _rows_weight_grad(rows, grads, lam, sync)  # (1, m, n)
    return tf.cast(tf.transpose(grad_w[0]), kernel.dtype)


def dense(x, kernel, bias=None, *, lam=0.1, sync=False):
    """``x @ kernel + bias`` with TrAct's kernel gradient.

    Args:
        x: (..., n); every leading position is a row of the Gram (tokens count as rows).
        kernel: (n, m), Keras layout. A ``tf.Variable`` works too.
        bias: (m,) or None.
        lam: finite float > 0 (0.1 in the paper, 0.2 for long runs).
        sync: inside ``strategy.run`` of a tf.distribute strategy with several replicas
            (e.g. MirroredStrategy), sum the Gram and row count over the replicas in
            backward, so the summed replica gradients are the full-batch TrAct gradient.
            Off (default): each replica uses its own rows' statistics.

    Returns:
        (..., m), exactly the plain ``tf.matmul`` (2-D x) or ``tf.tensordot`` plus bias,
        as Keras computes Dense. Under a GradientTape the kernel gradient is
        ``(G^T X (X^T X / b + lam I)^-1)^T`` with X = x.reshape(-1, n), b its row count.
    """
    lam = _tc.check_lam(lam)
    kernel = tf.convert_to_tensor(kernel)
    x = tf.convert_to_tensor(x, dtype=kernel.dtype)
    if kernel.shape.rank != 2:
        raise ValueError(f"kernel must have shape (n, m), got shape {tuple(kernel.shape)}")
    if x.shape.rank is None or x.shape.rank < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"x must have shape (..., {kernel.shape[0]}) to match kernel "
                         f"{tuple(kernel.shape)}, got shape {tuple(x.shape)}")
    if bias is not None:
        bias = tf.convert_to_tensor(bias, dtype=kernel.dtype)
    check_bias_shape(None if bias is None else bias.shape, kernel.shape[1])
    z = _plain_dense(x, tf.stop_gradient(kernel))
    if bias is not None:
        z = z + bias
    return _with_kernel_grad(
        z, kernel, lambda grad_z: _dense_kernel_grad(x, grad_z, kernel, lam, sync))


# --------------------------------------------------------------------------- conv


def _resolve_pads(padding, spatial, window, strides, dilation):
    """(lo, hi) per spatial axis; 'SAME' as TF/XLA resolve it (the odd pixel goes high)."""
    if not isinstance(padding, str):
        return padding
    if padding == "VALID":
        return ((0, 0),) * len(spatial)
    pads = []
    for size, k, s, d in zip(spatial, window, strides, dilation):
        total = max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
        low = total // 2 if padding == "SAME" else total - total // 2
        pads.append((low, total - low))
    return tuple(pads)


@dataclasses.dataclass(frozen=True)
class _ConvGeometry:
    """The static options of one conv call, already per axis."""

    strides: tuple
    padding: str | tuple  # 'SAME'/'VALID'/'SAME_LOWER' or ((lo, hi), ...)
    dilation: tuple
    groups: int


@functools.cache
def _xla_convolution(strides, padding, dilation):
    """``tf.nn.convolution`` compiled by XLA: TF's own CPU kernels (and their gradients)
    lack grouped convolutions, so, as Keras does, grouped ones run through XLA."""

    def convolution(x, kernel):
        return tf.nn.convolution(x, kernel, strides, padding, dilations=dilation)

    return tf.function(convolution, jit_compile=True, autograph=False)


def _plain_conv(x, kernel, geometry):
    """The plain channels-last convolution: ``tf.nn.convolution``, padded explicitly for
    (lo, hi) pairs and 'SAME_LOWER', which it does not take.

    ``tf.nn.convolution`` refuses strides > 1 together with dilation > 1; that case runs
    at stride 1 and keeps every stride-th output, the same sums at the same positions.
    """
    padding, strides = geometry.padding, geometry.strides
    subsample = max(strides) > 1 and max(geometry.dilation) > 1
    if padding not in ("SAME", "VALID") or subsample:
        spatial = tuple(x.shape[1:-1])
        window = tuple(kernel.shape[:-2])
        pads = _resolve_pads(padding, spatial, window, strides, geometry.dilation)
        x = tf.pad(x, [(0, 0), *pads, (0, 0)])
        padding = "VALID"
    conv_strides = (1,) * len(strides) if subsample else strides
    if geometry.groups > 1:
        z = _xla_convolution(conv_strides, padding, geometry.dilation)(x, kernel)
    else:
        z = tf.nn.convolution(x, kernel, conv_strides, padding, dilations=geometry.dilation)
    if subsample:
        z = z[(slice(None), *(slice(None, None, s) for s in strides))]
    return z


@functools.lru_cache(maxsize=16)
def _patch_index(shape, window, strides, dilation, groups):
    """(g, L, n_g) positions in one flattened channels-first sample of every patch entry:
    the core's conv_patches layout, to gather when the batch size is not static."""
    flat = np.arange(math.prod(shape)).reshape((1, *shape))
    return _tc.conv_patches(flat, window, strides, dilation, groups)


def _conv_rows(x_padded, window, geometry):
    """Channels-first padded x (N, C, *spatial) -> core patches (g, N * L, C/g * K)."""
    g = geometry.groups
    if x_padded.shape[0] is not None:
        return _tc.conv_patches(x_padded, window, geometry.strides, geometry.dilation, g, xp=_TF)
    index = _patch_index(tuple(x_padded.shape[1:]), window, geometry.strides,
                         geometry.dilation, g)
    per_sample = tf.reshape(x_padded, (-1, math.prod(x_padded.shape[1:])))
    patches = tf.gather(per_sample, index, axis=1)  # (N, g, L, n_g)
    return tf.reshape(tf.transpose(patches, (1, 0, 2, 3)), (g, -1, index.shape[-1]))


def _conv_kernel_grad(x, grad_z, kernel, lam, geometry, sync):
    d = kernel.shape.rank - 2
    *window, c_g, m = kernel.shape
    window = tuple(window)
    g = geometry.groups
    dtype = _compute_dtype(x.dtype)
    x = tf.cast(x, dtype)
    grad_z = tf.cast(grad_z, dtype)
    pads = _resolve_pads(geometry.padding, tuple(x.shape[1:-1]), window, geometry.strides,
                         geometry.dilation)
    padded = tf.pad(x, [(0, 0), *pads, (0, 0)])
    rows = _conv_rows(tf.transpose(padded, (0, d + 1, *range(1, d + 1))), window, geometry)
    grads = tf.transpose(tf.reshape(grad_z, (-1, g, m // g)), (1, 0, 2))  # (g, N*L, m_g)
    grad_w = _rows_weight_grad(rows, grads, lam, sync)  # (g, M/g, C/g * K)
    grad_w = tf.reshape(grad_w, (m, c_g, *window))
    return tf.cast(tf.transpose(grad_w, (*range(2, d + 2), 1, 0)), kernel.dtype)


def conv(x, kernel, bias=None, *, strides=1, padding="VALID", kernel_dilation=1,
         feature_group_count=1, lam=0.1, sync=False):
    """Channels-last convolution (1-D, 2-D or 3-D) with TrAct's kernel gradient.

    Args:
        x: (N, *spatial, C); spatial and channel sizes static, N may be unknown.
        kernel: (*window, C / feature_group_count, M), Keras / TF layout. A
            ``tf.Variable`` works too.
        bias: (M,) or None.
        strides: int or one int per spatial axis.
        padding: 'SAME', 'VALID', 'SAME_LOWER', an int (same on both sides of every
            axis), or per spatial axis an int or a (lo, hi) pair.
        kernel_dilation: int or one int per spatial axis.
        feature_group_count: number of feature groups; one Gram per group.
        lam: finite float > 0 (0.1 in the paper, 0.2 for long runs).
        sync: as for :func:`dense`.

    Returns:
        (N, *out_spatial, M), exactly ``tf.nn.convolution`` plus bias, as Keras computes
        ConvND (explicit pads: ``tf.pad`` then 'VALID'; grouped convolutions through XLA
        as Keras runs them). Under a GradientTape the kernel gradient is TrAct's, per
        group, with b = N x output positions rows (receptive fields).
    """
    lam = _tc.check_lam(lam)
    kernel = tf.convert_to_tensor(kernel)
    x = tf.convert_to_tensor(x, dtype=kernel.dtype)
    rank = kernel.shape.rank
    if rank not in (3, 4, 5) or not kernel.shape.is_fully_defined():
        raise ValueError(f"kernel must have a static shape (*window, C/groups, M) with 1 to 3 "
                         f"spatial axes, got shape {tuple(kernel.shape)}")
    spatial = rank - 2
    if x.shape.rank != rank or not x.shape[1:].is_fully_defined():
        raise ValueError(f"x must have shape (N, *spatial, C) with {spatial} static spatial "
                         f"axes and static C to match kernel {tuple(kernel.shape)}, got shape "
                         f"{tuple(x.shape)}")
    if not is_int(feature_group_count) or feature_group_count < 1:
        raise ValueError(f"feature_group_count must be an int >= 1, got {feature_group_count!r}")
    *_, c_g, m = kernel.shape
    if x.shape[-1] != c_g * feature_group_count or m % feature_group_count:
        raise ValueError(
            f"x channels ({x.shape[-1]}) must equal kernel input channels ({c_g}) x "
            f"feature_group_count ({feature_group_count}), and kernel output channels ({m}) "
            f"must be divisible by it"
        )
    if bias is not None:
        bias = tf.convert_to_tensor(bias, dtype=kernel.dtype)
    check_bias_shape(None if bias is None else bias.shape, m)
    geometry = _ConvGeometry(
        strides=per_axis(strides, spatial, "strides"),
        padding=conv_padding(padding, spatial, minimum=0),
        dilation=per_axis(kernel_dilation, spatial, "kernel_dilation"),
        groups=int(feature_group_count),
    )
    z = _plain_conv(x, tf.stop_gradient(kernel), geometry)
    if bias is not None:
        z = z + bias
    return _with_kernel_grad(
        z, kernel, lambda grad_z: _conv_kernel_grad(x, grad_z, kernel, lam, geometry, sync)
    )
