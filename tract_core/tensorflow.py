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
gradient computed by :mod:`tract_core` (one Gram per feature group). For a convolution
the plain gradient G^T X comes from TF's own filter-gradient kernel
(``Conv2DBackpropFilter`` / ``Conv3DBackpropFilterV2``, called directly; through XLA for
dilation or groups, which TF's CPU kernels lack) and the Gram from the core's structured
``conv_gram``, with FFT correlations: no patch matrix, except for the b x b form (b < n).

TensorFlow tensors are outside array-api-compat, so the core runs on ``_TFNamespace``, a
shim giving the handful of array-API functions it calls plus a Cholesky ``spd_solve``.
Everything works eagerly and inside ``tf.function`` (with or without ``jit_compile``).
Shapes must be static except the batch axis: under ``tf.function`` with an unknown batch
size the kernel gradient picks the n x n or the b x b system at run time, and the conv
Gram sums over fixed-size chunks of images.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import types

import numpy as np
import tensorflow as tf

import tract_core as _tc
from tract_core._args import check_bias_shape, conv_padding, fft_size, is_int, per_axis
from tract_core._core import channel_major

try:  # TF's own test for tracing under jit_compile (internal, long-lived; see its use)
    from tensorflow.python.ops.control_flow_util import (
        GraphOrParentsInXlaContext as _graph_in_xla_context,
    )
except ImportError:  # pragma: no cover
    _graph_in_xla_context = None

__all__ = ["conv", "dense"]


# --------------------------------------------------------------------------- namespace


def _compiling_with_xla():
    """Whether the ops being built will be compiled by XLA (inside a
    ``tf.function(jit_compile=True)``, also nested), where other algorithms are faster."""
    if tf.executing_eagerly():
        return False
    if _graph_in_xla_context is None:  # no way to tell: what suits XLA is right anywhere
        return True
    return _graph_in_xla_context(tf.compat.v1.get_default_graph())


def _unit_batch(x):
    """Whether x is a stack of one matrix (leading axes, all of size 1), at most one of
    its two sizes unknown, in a graph XLA compiles (see _TFNamespace.matmul)."""
    return (x.shape.rank > 2 and all(size == 1 for size in x.shape[:-2])
            and x.shape[-2:].as_list().count(None) <= 1 and _compiling_with_xla())


def _matrix_view(x):
    return tf.reshape(x, [-1 if size is None else size for size in x.shape[-2:]])


def _stack_view(x, batch):
    return tf.reshape(x, [*batch, *(-1 if size is None else size for size in x.shape)])


def _matrix_transpose(x, /):
    if _unit_batch(x):  # see _TFNamespace.matmul
        return _stack_view(tf.transpose(_matrix_view(x)), x.shape[:-2])
    return tf.linalg.matrix_transpose(x)


class _TFNamespace:
    """TensorFlow as the small array-API namespace the core calls (``xp=`` argument).

    Only what ``tract_core._core`` uses: dtype queries, ``astype``, ``eye``, ``zeros``,
    ``asarray``, ``matmul``, ``linalg.matrix_transpose``, ``where``, ``stack``/``concat``/
    ``reshape``/``permute_dims``/``take`` (conv patches and the structured conv Gram), and
    ``spd_solve`` and ``constant``, which make this namespace its own backend.
    """

    float32 = tf.float32
    float64 = tf.float64
    linalg = types.SimpleNamespace(matrix_transpose=_matrix_transpose)
    where = staticmethod(tf.where)

    def __init__(self):
        self._constants = {}  # see constant()

    @staticmethod
    def matmul(x1, x2, /):
        # The XLA that TF 2.21 bundles runs a dot with batch axes, and a transpose it
        # cannot fold into a dot, several times slower on CPU than a 2-D dot of a
        # transposed operand. Under XLA a stack of one matrix (one group) is multiplied,
        # and transposed (_matrix_transpose), as 2-D views. (Outside XLA, grappler folds
        # a transpose into the matmul; views in between would stop it.)
        if _unit_batch(x1) and _unit_batch(x2) and x1.shape.rank == x2.shape.rank:
            product = tf.linalg.matmul(_matrix_view(x1), _matrix_view(x2))
            return _stack_view(product, x1.shape[:-2])
        return tf.linalg.matmul(x1, x2)

    @staticmethod
    def isdtype(dtype, kind):
        if kind != "real floating":
            raise NotImplementedError(f"isdtype kind {kind!r} is not needed by the core")
        dtype = tf.as_dtype(dtype)
        return dtype.is_floating

    @staticmethod
    def finfo(dtype):
        dtype = tf.as_dtype(dtype)
        return types.SimpleNamespace(bits=dtype.size * 8, max=dtype.max)

    @staticmethod
    def has_float64(device):
        return True

    @staticmethod
    def astype(x, dtype, /, *, copy=True):
        return tf.cast(x, dtype)  # a no-op for the same dtype; TF tensors are immutable

    @staticmethod
    def eye(n_rows, /, *, dtype=None, device=None):
        # device: TF places the op next to its consumers.
        return tf.eye(n_rows, dtype=dtype or tf.float32)

    @staticmethod
    def zeros(shape, /, *, dtype=None, device=None):
        return tf.zeros(shape, dtype=dtype or tf.float32)

    @staticmethod
    def asarray(obj, /, *, dtype=None, device=None, copy=None):
        return tf.convert_to_tensor(obj) if dtype is None else tf.cast(obj, dtype)

    @staticmethod
    def stack(arrays, /, *, axis=0):
        return tf.stack(arrays, axis=axis)

    @staticmethod
    def concat(arrays, /, *, axis=0):
        return tf.concat(arrays, axis=axis)

    @staticmethod
    def take(x, indices, /, *, axis=None):
        return tf.gather(x, indices, axis=axis)

    @staticmethod
    def reshape(x, /, shape):
        return tf.reshape(x, shape)

    @staticmethod
    def permute_dims(x, /, axes):
        moved = [axis for axis in axes if x.shape[axis] != 1]
        if moved == sorted(moved) and x.shape.num_elements() is not None:
            # Only axes of size 1 move (e.g. the group axis of one group): a reshape.
            return tf.reshape(x, [x.shape[axis] for axis in axes])
        return tf.transpose(x, axes)

    def constant(self, key, array, dtype, device):
        """The core's numpy index/mask ``array`` as a tensor: a graph constant when
        tracing; eagerly, made once per device and kept (as the torch backend does)."""
        if not tf.executing_eagerly():
            return tf.constant(array, dtype=dtype)
        cache_key = (key, dtype, device)
        found = self._constants.get(cache_key)
        if found is None:
            if len(self._constants) >= 256:
                self._constants.clear()
            with tf.device(device or None):
                found = self._constants[cache_key] = tf.constant(array, dtype=dtype)
        return found

    @staticmethod
    def spd_solve(a, rhs):
        """Solve ``a X = rhs`` for SPD ``a``, batched over leading axes.

        ``tf.linalg.cholesky`` raises on a non-finite matrix outside XLA, so such a matrix
        is swapped for the identity and its solution poisoned with NaN afterwards: NaN/Inf
        in the data flow on as NaN gradients, without a host round trip.
        """
        finite = tf.reduce_all(tf.math.is_finite(a), axis=[-2, -1], keepdims=True)
        safe = tf.where(finite, a, tf.eye(a.shape[-1], dtype=a.dtype))
        factor = _cholesky(safe) if _compiling_with_xla() else tf.linalg.cholesky(safe)
        solution = tf.linalg.cholesky_solve(factor, rhs)
        return tf.where(finite, solution, tf.constant(math.nan, dtype=rhs.dtype))


_CHOLESKY_BLOCK = 64


def _cholesky(a):
    """Lower Cholesky factor of SPD ``a`` (..., n, n), by halves above _CHOLESKY_BLOCK.

    For XLA, whose own Cholesky is slow on CPU beyond a few dozen rows (60 ms at n = 768,
    TF's kernel outside XLA: 8 ms): factoring the leading half, solving for the panel and
    factoring the Schur complement puts nearly all the work in matmuls.
    """
    n = a.shape[-1]
    if n <= _CHOLESKY_BLOCK:
        return tf.linalg.cholesky(a)
    half = n // 2
    lead = _cholesky(a[..., :half, :half])
    # panel = A21 L11^-T, from L11 X = A21^T
    panel = tf.linalg.matrix_transpose(tf.linalg.triangular_solve(
        lead, tf.linalg.matrix_transpose(a[..., half:, :half]), lower=True))
    rest = _cholesky(a[..., half:, half:] - tf.linalg.matmul(panel, panel, transpose_b=True))
    upper = tf.concat([lead, tf.zeros_like(a[..., :half, half:])], axis=-1)
    return tf.concat([upper, tf.concat([panel, rest], axis=-1)], axis=-2)


_TF = _TFNamespace()


def _compute_dtype(dtype):
    """The dtype of TrAct's products, G^T X and the Gram, and of the solve: the core's
    statistics dtype (float64), since the solve amplifies their rounding errors."""
    return _tc.statistics_dtype(_TF, tf.as_dtype(dtype))


# --------------------------------------------------------------------------- backward


def _replica_context(sync):
    """The tf.distribute replica context to reduce over, or None (single replica)."""
    if not sync:
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def _weight_grad(plain_and_gram, rows_and_grads, count, n, lam, sync=False):
    """TrAct's weight gradient per group, torch layout, from the core.

    Args:
        plain_and_gram: () -> (G^T X (g, m, n), X^T X (g, n, n)), compute dtype.
        rows_and_grads: () -> (X (g, b, n), G (g, b, m)); called only where b < n may
            hold, for the b x b push-through form.
        count: b, an int, or a 0-d int tensor when the batch size is not static.
        n: the row width. lam: finite float > 0.

    Returns:
        (g, m, n). With b static the form is picked now (n x n solve for b >= n, b x b
        push-through for b < n); with b unknown (``tf.function`` over a batch of unknown
        size, as Keras traces) a ``tf.cond`` picks it at run time. With ``sync`` inside a
        tf.distribute replica context of several replicas, the Gram and the row count
        are summed over the replicas (always the n x n form), so the strategy's gradient
        sum yields the full-batch TrAct gradient.
    """
    context = _replica_context(sync)

    def many_rows(plain, gram):
        rows = count if isinstance(count, int) else tf.cast(count, gram.dtype)
        if context is not None:
            gram = context.all_reduce(tf.distribute.ReduceOp.SUM, gram)
            rows = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(count, gram.dtype))
        if not isinstance(rows, int):
            # No rows (an empty batch, known only at run time): G^T X and the Gram are
            # zero, and dividing by 1, not 0, keeps the gradient zero, not 0/0 = NaN.
            rows = tf.maximum(rows, 1)
        return _tc.precondition(plain, gram, rows, lam, xp=_TF)

    if context is not None or n == 1 or (isinstance(count, int) and count >= n):
        return many_rows(*plain_and_gram())
    if isinstance(count, int):
        return _tc.weight_grad(*rows_and_grads(), lam, xp=_TF)
    # b unknown: the n x n statistics are made outside the tf.cond, since XLA runs a
    # convolution of a batch of unknown size inside a conditional very slowly (seconds,
    # TF 2.21 on CPU). With b < n they are small: b < n rows of n entries.
    plain, gram = plain_and_gram()

    def few_rows():
        # The core's b x b form needs a static b. Zero rows up to n - 1 (still < n, so the
        # core keeps the push-through form) add a decoupled lam I block and nothing else;
        # scaling X up and G down by sqrt((n - 1) / b) turns the core's count n - 1 back
        # into b: (s X)(s X)^T / (n - 1) = X X^T / b, and the s cancels in G^T ... X.
        rows, grads = rows_and_grads()
        padded = n - 1
        # count 0: every row is fill, X = G = 0, and a finite scale keeps the result zero.
        scale = tf.sqrt(tf.cast(padded, rows.dtype)
                        / tf.cast(tf.maximum(count, 1), rows.dtype))

        def fill(a):
            # Static pad then cut: valid for any count, as XLA compiles the untaken branch.
            cut = tf.pad(a, [[0, 0], [0, padded], [0, 0]])[:, :padded]
            return tf.reshape(cut, (a.shape[0], padded, a.shape[-1]))

        return _tc.weight_grad(fill(rows) * scale, fill(grads) / scale, lam, xp=_TF)

    return tf.cond(count >= n, lambda: many_rows(plain, gram), few_rows)


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


# --------------------------------------------------------------------------- arguments


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
    count = rows.shape[1] if rows.shape[1] is not None else tf.shape(rows)[1]

    def plain_and_gram():
        return tf.matmul(grads, rows, transpose_a=True), _tc.gram(rows, xp=_TF)  # G^T X

    grad_w = _weight_grad(plain_and_gram, lambda: (rows, grads), count, n, lam, sync)
    return tf.cast(tf.transpose(grad_w[0]), kernel.dtype)  # (1, m, n) -> (n, m)


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
        return tf.nn.convolution(x, kernel, strides, padding,
                                 data_format=_DATA_FORMATS[x.shape.rank], dilations=dilation)

    return tf.function(convolution, jit_compile=True, autograph=False)


_DATA_FORMATS = {3: "NWC", 4: "NHWC", 5: "NDHWC"}


def _plain_conv(x, kernel, geometry):
    """The plain channels-last convolution: ``tf.nn.convolution``, padded explicitly for
    (lo, hi) pairs and 'SAME_LOWER', which it does not take.

    The data format is named, as Keras's TensorFlow backend names it: with the default
    (None), TF 2.21's eager gradient of the 3-D convolution fails (it reads the op's
    data_format attribute, recorded as None).

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
        z = tf.nn.convolution(x, kernel, conv_strides, padding,
                              data_format=_DATA_FORMATS[x.shape.rank],
                              dilations=geometry.dilation)
    if subsample:
        z = z[(slice(None), *(slice(None, None, s) for s in strides))]
    if x.shape[0] is None and z.shape[1:].is_fully_defined() and not _compiling_with_xla():
        # TF's CPU convolution gives an empty batch of unknown size the input's shape
        # (grappler drops a reshape to the static shape): pick an empty output then.
        empty = tf.zeros([0, *z.shape[1:]], z.dtype)
        z = tf.cond(tf.shape(x)[0] > 0, lambda: z, lambda: empty)
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


def _filter_grad_op(strides, dilation, groups):
    """``op(x, grad_z, kernel_shape, pads)``: TF's own filter-gradient kernel for the
    convolution of channels-last x zero-padded by ``pads`` ((lo, hi) per axis), kernel
    (*window, C/g, M). TF's CPU kernels lack dilation and groups, so those run through
    XLA, which has both (and stride with dilation)."""
    if groups > 1 or max(dilation) > 1:
        return _xla_filter_grad(strides, dilation)
    return functools.partial(_filter_grad, strides=strides, dilation=dilation)


def _filter_grad(x, grad_z, kernel_shape, pads, strides, dilation):
    if len(strides) == 1:  # as 2-D over a singleton axis
        return _filter_grad(x[:, None], grad_z[:, None], (1, *kernel_shape), ((0, 0), *pads),
                            (1, *strides), (1, *dilation))[0]
    options = dict(filter_sizes=kernel_shape, out_backprop=grad_z, strides=(1, *strides, 1),
                   dilations=(1, *dilation, 1))
    if len(strides) == 3:  # Conv3D takes no explicit pads
        x = tf.pad(x, [(0, 0), *pads, (0, 0)]) if any(map(any, pads)) else x
        return tf.raw_ops.Conv3DBackpropFilterV2(input=x, padding="VALID", **options)
    if not any(map(any, pads)):
        return tf.raw_ops.Conv2DBackpropFilter(input=x, padding="VALID", **options)
    # Explicit pads inside the kernel: no padded copy of channels-last x, which is slow.
    explicit = [0, 0, *(p for lo_hi in pads for p in lo_hi), 0, 0]
    return tf.raw_ops.Conv2DBackpropFilter(input=x, padding="EXPLICIT",
                                           explicit_paddings=explicit, **options)


@functools.cache
def _xla_filter_grad(strides, dilation):
    def filter_grad(x, grad_z, kernel_shape, pads):
        return _filter_grad(x, grad_z, kernel_shape, pads, strides, dilation)

    compiled = tf.function(filter_grad, jit_compile=True, autograph=False)
    return lambda x, grad_z, kernel_shape, pads: compiled(x, grad_z, tuple(kernel_shape),
                                                         tuple(pads))


_RFFT = {1: (tf.signal.rfft, tf.signal.irfft), 2: (tf.signal.rfft2d, tf.signal.irfft2d),
         3: (tf.signal.rfft3d, tf.signal.irfft3d)}


def _correlate(g, y, shifts):
    """out[i, j, u] = sum_{n, q} g[n, i, q] y[n, j, q + u] for u < shifts, the correlation
    the core's conv_gram asks for. g (N, I, *inner), y (N, J, *outer), outer = inner +
    shifts - 1.

    By FFTs: TF's filter-gradient kernels (and XLA's convolutions) are slow on a window as
    large as the image. The images go in chunks of about _CORRELATE_CHUNK entries of y,
    which bounds the spectra's memory.
    """
    step = max(1, _CORRELATE_CHUNK // math.prod(y.shape[1:]))
    parts = [_correlate_by_fft(g[lo:lo + step], y[lo:lo + step], shifts)
             for lo in range(0, g.shape[0], step)]
    return tf.add_n(parts) if len(parts) > 1 else parts[0]


_CORRELATE_CHUNK = 1 << 21  # 8 MiB of float32


def _correlate_by_fft(g, y, shifts):
    # Transforms at least y's size, so no lag u < shifts wraps around; lengths with small
    # prime factors only. The sum over n is one product per frequency.
    d = len(shifts)
    size = [fft_size(s) for s in y.shape[2:]]
    rfft, irfft = _RFFT[d]
    axes = "xyz"[:d]
    spectrum = tf.einsum(f"ni{axes},nj{axes}->ij{axes}",
                         tf.math.conj(rfft(g, fft_length=size)), rfft(y, fft_length=size))
    out = irfft(spectrum, fft_length=size)
    return out[(slice(None), slice(None), *(slice(0, k) for k in shifts))]


_GRAM_CHUNK = 8  # images per step of the Gram when the batch size is not static
_ORDERED_SIZE = 1 << 22  # padded input entries from which the Gram goes first (16 MiB)


def _conv_gram(x, window, geometry):
    """(g, n_g, n_g) Gram of the patches of channels-first padded x (N, C, *spatial), by
    the core's structured conv Gram.

    The core needs static shapes: with N unknown it sums the Grams of chunks of
    _GRAM_CHUNK images, zero images filling the last chunk (their patches add nothing).
    """
    def chunk_gram(part):
        return _tc.conv_gram(part, window, geometry.strides, geometry.dilation,
                             geometry.groups, correlate=_correlate, xp=_TF)

    if x.shape[0] is not None:
        return chunk_gram(x)
    return _sum_over_chunks(chunk_gram, (x,), _GRAM_CHUNK)


def _sum_over_chunks(statistics, arrays, images):
    """``statistics(*chunk)`` summed over chunks of at most ``images`` images of
    ``arrays`` (same batch size, static or not). A static batch goes in equal chunks;
    zero images fill the last one where needed (an unknown batch), so ``statistics``
    must give zeros for them. A ``tf.while_loop``, not chunks unrolled into the graph:
    XLA runs those several times slower (measured, 3x3 stem: 37-53 ms vs 16-22 ms)."""
    count = arrays[0].shape[0]
    if count is None:
        count = tf.shape(arrays[0])[0]
        chunks = tf.maximum((count + images - 1) // images, 1)  # the first is unrolled
    else:
        chunks = max(1, -(-count // images))
        images = -(-count // chunks)  # balanced: 128 images in 2 chunks of 64, not 75 + 53
        if chunks == 1:
            return statistics(*arrays)
    fill = chunks * images - count
    filled = [tf.reshape(a if isinstance(fill, int) and not fill else
                         tf.pad(a, [(0, fill)] + [(0, 0)] * (a.shape.rank - 1)),
                         (-1, images, *a.shape[1:])) for a in arrays]
    first = statistics(*(a[0] for a in filled))
    return tf.while_loop(
        lambda i, total: i < chunks,
        lambda i, total: (i + 1, tf.nest.map_structure(
            tf.add, total, statistics(*(a[i] for a in filled)))),
        (tf.constant(1), first))[1]


def _disjoint_gram(x, window, geometry, pads):
    """(g, n_g, n_g) Gram of disjoint patches (ViT) from channels-last x (N, *spatial, C),
    any N. The patch rows are x reordered to (N, *L | *window, C), a copy that keeps runs
    of a window row times C (TF transposes them faster than the channels-first rows);
    the Gram's columns are then put in torch order, (C/g, *window) per group."""
    d, g = len(window), geometry.groups
    spatial = [size + lo + hi for size, (lo, hi) in zip(x.shape[1:-1], pads)]
    out = _tc.conv_output_shape(spatial, window, geometry.strides, geometry.dilation)
    # Each axis split into out blocks of a stride: cropped to out x stride, or, where that
    # exceeds it (kernel < stride), zero-filled up to it. The fill lies at offsets >= the
    # kernel within the last block, which are cut away below.
    pads = [(lo, hi + max(n * s - size, 0))
            for (lo, hi), n, s, size in zip(pads, out, geometry.strides, spatial)]
    x = tf.pad(x, [(0, 0), *pads, (0, 0)]) if any(map(any, pads)) else x
    x = x[(slice(None), *(slice(0, n * s) for n, s in zip(out, geometry.strides)))]
    x = tf.reshape(x, (-1, *(v for n, s in zip(out, geometry.strides) for v in (n, s)),
                       x.shape[-1]))  # (N, L0, s0, L1, s1, ..., C)
    x = x[(slice(None), *(v for k in window for v in (slice(None), slice(0, k))))]
    order = (0, *(1 + 2 * a for a in range(d)), *(2 + 2 * a for a in range(d)), 2 * d + 1)
    taps, c_g = math.prod(window), x.shape[-1] // g
    rows = tf.reshape(tf.transpose(x, order), (-1, taps, g, c_g))
    rows = (tf.reshape(rows, (1, -1, taps * c_g)) if g == 1
            else tf.reshape(tf.transpose(rows, (2, 0, 1, 3)), (g, -1, taps * c_g)))
    return channel_major(_tc.gram(rows, xp=_TF), taps, (1, 2), xp=_TF)


# Patches of at most this many entries per group (C/g * prod(window)) take
# _explicit_statistics (disjoint ones only under XLA). Measured, CIFAR 3x3 stem, whole
# step, 2 threads: 1.07-1.16x the plain step (XLA and graph), against 1.11-1.30x with
# the filter-gradient op and conv_gram.
_FEW_PATCH_ENTRIES = 96
# Patch entries extracted at once (16 MiB of float32): a CIFAR stem's batch in one go.
# Measured under XLA, 3x3 stem: one chunk 1.07-1.10x the plain step, two chunks in a
# while_loop 1.2-1.3x.
_PATCH_CHUNK = 1 << 22


def _explicit_statistics(x, grad_z, window, geometry, pads):
    """(G^T X (g, m_g, n_g), X^T X (g, n_g, n_g)) of a conv from explicit patches of x
    (N, *spatial, C), any N, in chunks of about _PATCH_CHUNK entries.

    For stems (few channels) two 2-D matmuls on the patches beat TF's filter-gradient
    kernel, and give the Gram as well.
    """
    g, d = geometry.groups, len(window)
    x = tf.pad(x, [(0, 0), *pads, (0, 0)]) if any(map(any, pads)) else x
    out = _tc.conv_output_shape(x.shape[1:-1], window, geometry.strides, geometry.dilation)
    taps, c_g, m = math.prod(window), x.shape[-1] // g, grad_z.shape[-1]
    n_all = taps * x.shape[-1]
    tap_slices = [tuple(slice(t * dl, t * dl + s * (o - 1) + 1, s)
                        for t, dl, s, o in zip(offsets, geometry.dilation, geometry.strides, out))
                  for offsets in itertools.product(*(range(k) for k in window))]

    # Overlapping patches of one group: channel-major patches (n, N * L). Measured, 3x3
    # stem, both products: 24.3-25.6 ms against 26.9-28.0 from channels-last rows
    # (N * L, n), under XLA and outside it; for disjoint ones (ViT-4) rows measured
    # 0.6 ms faster.
    by_channel = g == 1 and not _tc.disjoint_patches(window, geometry.strides,
                                                      geometry.dilation)

    def statistics(x, grad_z):
        """X^T G (g, n_g, m_g) and X^T X, columns (channel, tap) if by_channel, else
        (tap, channel)."""
        if by_channel:
            channels_first = tf.transpose(x, (d + 1, 0, *range(1, d + 1)))  # (C, N, ...)
            columns = tf.reshape(tf.stack([channels_first[(slice(None), slice(None), *taps)]
                                           for taps in tap_slices], axis=1), (n_all, -1))
            return (tf.linalg.matmul(columns, tf.reshape(grad_z, (-1, m)))[None],
                    tf.linalg.matmul(columns, columns, transpose_b=True)[None])
        patches = tf.stack([x[(slice(None), *taps)] for taps in tap_slices], axis=-2)
        rows = tf.reshape(patches, (-1, len(tap_slices), g, c_g))  # (N * L, taps, g, c_g)
        if g == 1:  # 2-D products: XLA runs dots with batch axes slowly (see matmul)
            rows, grads = tf.reshape(rows, (-1, n_all)), tf.reshape(grad_z, (-1, m))
            return (tf.linalg.matmul(rows, grads, transpose_a=True)[None],
                    tf.linalg.matmul(rows, rows, transpose_a=True)[None])
        rows = tf.reshape(tf.transpose(rows, (2, 0, 1, 3)), (g, -1, n_all // g))
        grads = tf.transpose(tf.reshape(grad_z, (-1, g, m // g)), (1, 0, 2))
        return (tf.linalg.matmul(rows, grads, transpose_a=True),
                tf.linalg.matmul(rows, rows, transpose_a=True))

    images = max(1, _PATCH_CHUNK // (math.prod(out) * n_all))
    plain, gram = _sum_over_chunks(statistics, (x, grad_z), images)
    # X^T G, transposed here: a transposed copy of G would cost more.
    plain = tf.linalg.matrix_transpose(plain)
    if by_channel:
        return plain, gram
    return (channel_major(plain, taps, (2,), xp=_TF),
            channel_major(gram, taps, (1, 2), xp=_TF))


def _conv_kernel_grad(x, grad_z, kernel, lam, geometry, sync):
    d = kernel.shape.rank - 2
    *window, c_g, m = kernel.shape
    window = tuple(window)
    g, m_g, n = geometry.groups, m // geometry.groups, c_g * math.prod(window)
    dtype = _compute_dtype(x.dtype)
    x = tf.cast(x, dtype)
    grad_z = tf.cast(grad_z, dtype)
    pads = _resolve_pads(geometry.padding, tuple(x.shape[1:-1]), window, geometry.strides,
                         geometry.dilation)
    positions = math.prod(grad_z.shape[1:-1])
    count = (x.shape[0] * positions if x.shape[0] is not None
             else tf.shape(x)[0] * positions)

    def padded_channels_first(x):
        """(N, C, *padded): the core's layout. Padded after the transpose, where rows are
        long (padding a channels-last tensor of 3 channels is slow)."""
        x = tf.transpose(x, (0, d + 1, *range(1, d + 1)))
        return tf.pad(x, [(0, 0), (0, 0), *pads]) if any(map(any, pads)) else x

    def plain_and_gram():
        disjoint = _tc.disjoint_patches(window, geometry.strides, geometry.dilation)
        if n <= _FEW_PATCH_ENTRIES and (not disjoint or _compiling_with_xla()):
            # Disjoint patches only under XLA. Measured, CIFAR ViT-4: 0.78-0.83x the plain
            # step there (1.0-1.1x the way below); outside XLA 1.5x (1.05-1.13x below).
            return _explicit_statistics(x, grad_z, window, geometry, pads)
        if disjoint:
            gram = _disjoint_gram(x, window, geometry, pads)
        else:
            gram = _conv_gram(padded_channels_first(x), window, geometry)
        dz, after = grad_z, []
        # The Gram works on the whole batch, or on chunks of _GRAM_CHUNK images.
        gram_images = _GRAM_CHUNK if x.shape[0] is None else x.shape[0]
        if x.shape[1:].num_elements() * gram_images >= _ORDERED_SIZE:
            # Large inputs: the Gram first, then the filter gradient, else (side by side)
            # their temporaries add up. XLA drops control dependencies, so there a data
            # dependency orders them: grad_z + 0 x a Gram entry (NaN/Inf in it would
            # poison the result anyway). Small ones run side by side: faster.
            after = [gram]
            if _compiling_with_xla():
                dz = grad_z + 0 * gram[0, 0, 0]
        with tf.control_dependencies(after):
            # The plain kernel gradient from TF's own kernel, in torch layout per group.
            plain = _filter_grad_op(geometry.strides, geometry.dilation, g)(
                x, dz, (*window, c_g, m), pads)
        plain = tf.reshape(tf.transpose(plain, (d + 1, d, *range(d))), (g, m_g, n))
        return plain, gram

    def rows_and_grads():
        # b < n: fewer than n / L images, the only ones the b x b form can get.
        images, dz = x, grad_z
        if x.shape[0] is None:
            keep = max(1, (n - 1) // positions)
            images, dz = x[:keep], grad_z[:keep]
        rows = _conv_rows(padded_channels_first(images), window, geometry)
        grads = tf.transpose(tf.reshape(dz, (-1, g, m_g)), (1, 0, 2))  # (g, N*L, m_g)
        return rows, grads

    grad_w = _weight_grad(plain_and_gram, rows_and_grads, count, n, lam, sync)
    grad_w = tf.reshape(grad_w, (m, c_g, *window))  # (g, M/g, C/g * K) -> torch weight
    return tf.cast(tf.transpose(grad_w, (*range(2, d + 2), 1, 0)), kernel.dtype)


def conv(x, kernel, bias=None, *, strides=1, padding="VALID", kernel_dilation=1,
         feature_group_count=1, lam=0.1, sync=False):
    """Channels-last convolution (1-D, 2-D or 3-D) with TrAct's kernel gradient.

    Args:
        x: (N, *spatial, C); spatial and channel sizes static, N may be unknown.
        kernel: (*window, C / feature_group_count, M), Keras / TF layout, floating. A
            ``tf.Variable`` works too.
        bias: (M,) or None. Dtypes as for :func:`dense`.
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

    Raises:
        ValueError: lam, options or shapes that do not match, or a kernel window that
            does not fit the padded input. TypeError: non-floating dtypes.
    """
    lam = _tc.check_lam(lam)
    x, kernel, bias = _operands(x, kernel, bias)
    rank = kernel.shape.rank
    if (rank not in (3, 4, 5) or not kernel.shape.is_fully_defined()
            or 0 in kernel.shape):
        raise ValueError(f"kernel must have a static shape (*window, C/groups, M) with 1 to 3 "
                         f"spatial axes and no size 0, got shape {tuple(kernel.shape)}")
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
    check_bias_shape(None if bias is None else bias.shape, m)
    geometry = _ConvGeometry(
        strides=per_axis(strides, spatial, "strides"),
        padding=conv_padding(padding, spatial, minimum=0),
        dilation=per_axis(kernel_dilation, spatial, "kernel_dilation"),
        groups=int(feature_group_count),
    )
    window, size = tuple(kernel.shape[:-2]), tuple(x.shape[1:-1])
    pads = _resolve_pads(geometry.padding, size, window, geometry.strides, geometry.dilation)
    padded = tuple(s + lo + hi for s, (lo, hi) in zip(size, pads))
    if min(_tc.conv_output_shape(padded, window, geometry.strides, geometry.dilation)) < 1:
        # tf.nn.convolution would return an empty output, and Keras refuses it.
        raise ValueError(f"kernel window {window} with kernel_dilation {geometry.dilation} "
                         f"does not fit x's spatial shape {size} padded to {padded}: no "
                         f"output position")
    z = _plain_conv(x, tf.stop_gradient(kernel), geometry)
    if bias is not None:
        z = z + bias
    return _with_kernel_grad(
        z, kernel, lambda grad_z: _conv_kernel_grad(x, grad_z, kernel, lam, geometry, sync)
    )
