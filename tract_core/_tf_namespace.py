"""TensorFlow as the array namespace and backend the core runs on.

TensorFlow tensors are outside array-api-compat, so `TF` gives the core the part of
the array API it calls (dtype queries, ``astype``, ``matmul``, ``reshape``, ``take``,
``fft.rfftn`` ...) and, being a namespace with its own ``spd_solve``, is its own backend
(see `tract_core._backends`): the Cholesky solve, TF's conv filter-gradient kernels,
FFT correlations, and chunked sums for a batch size known only at run time.
"""

from __future__ import annotations

import functools
import math
import types

import tensorflow as tf

from . import _conv_gram, _patches

try:  # TF's own test for tracing under jit_compile (internal, long-lived)
    from tensorflow.python.ops.control_flow_util import (
        GraphOrParentsInXlaContext as _graph_in_xla_context,
    )
except ImportError:  # pragma: no cover
    _graph_in_xla_context = None


def compiling_with_xla():
    """Whether the ops being built will be compiled by XLA (inside a
    ``tf.function(jit_compile=True)``, also nested), where other algorithms are faster."""
    if tf.executing_eagerly():
        return False
    if _graph_in_xla_context is None:  # no way to tell: what suits XLA is right anywhere
        return True
    return _graph_in_xla_context(tf.compat.v1.get_default_graph())


def _unit_batch(x):
    """Whether x is a stack of one matrix (leading axes all of size 1, at most one of its
    two sizes unknown) in a graph XLA compiles: see `_TFNamespace.matmul`."""
    return (x.shape.rank > 2 and all(size == 1 for size in x.shape[:-2])
            and x.shape[-2:].as_list().count(None) <= 1 and compiling_with_xla())


def _matrix_view(x):
    return tf.reshape(x, [-1 if size is None else size for size in x.shape[-2:]])


def _stack_view(x, batch):
    return tf.reshape(x, [*batch, *(-1 if size is None else size for size in x.shape)])


def _matrix_transpose(x, /):
    if _unit_batch(x):
        return _stack_view(tf.transpose(_matrix_view(x)), x.shape[:-2])
    return tf.linalg.matrix_transpose(x)


_RFFT = {1: (tf.signal.rfft, tf.signal.irfft), 2: (tf.signal.rfft2d, tf.signal.irfft2d),
         3: (tf.signal.rfft3d, tf.signal.irfft3d)}


def _fft_over_trailing_axes(inverse, x, /, s, axes):
    if tuple(axes) != tuple(range(x.shape.rank - len(axes), x.shape.rank)):
        raise NotImplementedError("TF's real FFTs transform the trailing axes only")
    return _RFFT[len(axes)][inverse](x, fft_length=list(s))


def _filter_grad(x, grad_z, kernel_shape, strides):
    if len(strides) == 1:  # as 2-D over a singleton axis
        return _filter_grad(x[:, None], grad_z[:, None], (1, *kernel_shape), (1, *strides))[0]
    op = (tf.raw_ops.Conv2DBackpropFilter if len(strides) == 2
          else tf.raw_ops.Conv3DBackpropFilterV2)
    return op(input=x, filter_sizes=kernel_shape, out_backprop=grad_z, padding="VALID",
              strides=(1, *strides, 1))


def _patch_filter_grad(xp, kernel_size, stride, dilation, groups, x, grad_z):
    patches = _patches.conv_patches(x, kernel_size, stride, dilation, groups, xp=xp)
    m_g, positions = grad_z.shape[1] // groups, math.prod(grad_z.shape[2:])
    grads = tf.reshape(grad_z, (-1, groups, m_g, positions))
    grads = tf.reshape(xp.permute_dims(grads, (1, 2, 0, 3)), (groups, m_g, -1))
    return (xp.matmul(grads, patches),)  # (groups, M/g, n_g)


_PATCH_CHUNK = 1 << 22  # patch entries extracted at once (32 MiB in float64)
_CHOLESKY_BLOCK = 64


def _cholesky(a):
    """Lower Cholesky factor of SPD ``a`` (..., n, n), by halves above _CHOLESKY_BLOCK.

    For XLA, whose own Cholesky is slow on CPU beyond a few dozen rows: factoring the
    leading half, solving for the panel and factoring the Schur complement puts nearly
    all the work in matmuls.
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


# Images per chunk where the batch size is known only at run time: zero images fill the
# last chunk, so a chunk much larger than the batch would mostly sum zeros (and under XLA
# small chunks run no slower than one large one).
_UNKNOWN_BATCH_CHUNK = 8


def _sum_over_chunks(function, arrays, images):
    """``function(*chunk)`` summed over chunks of at most ``images`` images of ``arrays``
    (equal batch sizes, static or not). Zero images fill the last chunk where needed, so
    ``function`` must give zeros for them. A ``tf.while_loop``, not chunks unrolled into
    the graph, which XLA runs several times slower."""
    count = arrays[0].shape[0]
    if count is None:
        count = tf.shape(arrays[0])[0]
        images = min(images, _UNKNOWN_BATCH_CHUNK)
        chunks = tf.maximum((count + images - 1) // images, 1)  # the first is unrolled
    else:
        chunks = max(1, -(-count // images))
        images = -(-count // chunks)  # balanced: 128 images in 2 chunks of 64, not 75 + 53
        if chunks == 1:
            return function(*arrays)
    fill = chunks * images - count
    filled = [tf.reshape(a if isinstance(fill, int) and not fill else
                         tf.pad(a, [(0, fill)] + [(0, 0)] * (a.shape.rank - 1)),
                         (-1, images, *a.shape[1:])) for a in arrays]
    first = function(*(a[0] for a in filled))
    return tf.while_loop(
        lambda i, total: i < chunks,
        lambda i, total: (i + 1, tf.nest.map_structure(
            tf.add, total, function(*(a[i] for a in filled)))),
        (tf.constant(1), first))[1]


class _TFNamespace:
    """The array-API functions the core calls, and the backend primitives of TF."""

    float32 = tf.float32
    float64 = tf.float64
    linalg = types.SimpleNamespace(matrix_transpose=_matrix_transpose)
    fft = types.SimpleNamespace(rfftn=functools.partial(_fft_over_trailing_axes, 0),
                                irfftn=functools.partial(_fft_over_trailing_axes, 1))
    conj = staticmethod(tf.math.conj)
    stack = staticmethod(tf.stack)
    # Patches of up to this many entries per group: two matmuls on explicit patches beat
    # TF's filter-gradient kernel with the structured Gram (CIFAR 3x3 stem, n = 27).
    few_patch_entries = 96

    def __init__(self):
        self._constants = {}

    @staticmethod
    def isdtype(dtype, kind):
        if kind != "real floating":
            raise NotImplementedError(f"isdtype kind {kind!r} is not needed by the core")
        return tf.as_dtype(dtype).is_floating

    @staticmethod
    def finfo(dtype):
        dtype = tf.as_dtype(dtype)
        return types.SimpleNamespace(bits=dtype.size * 8, max=dtype.max)

    @staticmethod
    def astype(x, dtype, /, *, copy=True):
        return tf.cast(x, dtype)  # a no-op for the same dtype; TF tensors are immutable

    # device: TF places ops next to their consumers.
    @staticmethod
    def eye(n_rows, /, *, dtype=None, device=None):
        return tf.eye(n_rows, dtype=dtype or tf.float32)

    @staticmethod
    def zeros(shape, /, *, dtype=None, device=None):
        return tf.zeros(shape, dtype=dtype or tf.float32)

    @staticmethod
    def asarray(obj, /, *, dtype=None, device=None, copy=None):
        return tf.convert_to_tensor(obj) if dtype is None else tf.cast(obj, dtype)

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
    def sum(x, /, *, axis=None):
        return tf.reduce_sum(x, axis=axis)

    @staticmethod
    def where(condition, x1, x2, /):
        # A Python scalar takes the other operand's dtype, as the array API promotes it.
        if not tf.is_tensor(x1):
            x1 = tf.cast(x1, x2.dtype)
        if not tf.is_tensor(x2):
            x2 = tf.cast(x2, x1.dtype)
        return tf.where(condition, x1, x2)

    @staticmethod
    def permute_dims(x, /, axes):
        moved = [axis for axis in axes if x.shape[axis] != 1]
        if moved == sorted(moved) and x.shape.num_elements() is not None:
            # Only axes of size 1 move (e.g. the group axis of one group): a reshape.
            return tf.reshape(x, [x.shape[axis] for axis in axes])
        return tf.transpose(x, axes)

    @staticmethod
    def matmul(x1, x2, /):
        # XLA (as TF 2.21 bundles it) runs a dot with batch axes, and a transpose it cannot
        # fold into a dot, several times slower on CPU than a 2-D dot: under XLA a stack
        # of one matrix (one group) is multiplied, and transposed, as 2-D views. Outside
        # XLA grappler folds a transpose into the matmul, which views would stop.
        if _unit_batch(x1) and _unit_batch(x2) and x1.shape.rank == x2.shape.rank:
            return _stack_view(tf.linalg.matmul(_matrix_view(x1), _matrix_view(x2)),
                               x1.shape[:-2])
        return tf.linalg.matmul(x1, x2)

    # ----------------------------------------------------------------- backend primitives

    @staticmethod
    def has_float64(device):
        return True

    def constant(self, key, array, dtype, device):
        """The core's numpy index or mask ``array`` as a tensor: a graph constant when
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
        """``a^-1 rhs`` for SPD ``a`` (..., n, n), rhs (..., n, k).

        ``tf.linalg.cholesky`` raises on a non-finite matrix outside XLA, so such a
        matrix is swapped for the identity and its solution made NaN afterwards: NaN/Inf
        in the data flow on as NaN, without a host round trip.
        """
        finite = tf.reduce_all(tf.math.is_finite(a), axis=[-2, -1], keepdims=True)
        safe = tf.where(finite, a, tf.eye(a.shape[-1], dtype=a.dtype))
        factor = _cholesky(safe) if compiling_with_xla() else tf.linalg.cholesky(safe)
        solution = tf.linalg.cholesky_solve(factor, rhs)
        return tf.where(finite, solution, tf.constant(math.nan, dtype=rhs.dtype))

    def filter_grad(self, x, grad_z, kernel_size, stride, dilation, groups):
        """The conv's ``G^T X`` as (M, C / groups, *kernel_size); x (N, C, *spatial)
        already padded, grad_z (N, M, *out)."""
        if groups > 1 or max(dilation) > 1 or compiling_with_xla():
            # TF's CPU kernels lack groups and dilation, and XLA's CPU convolutions in
            # float64 are plain loops (its fast kernels take float16 and float32 only),
            # seconds for a 7x7 stem: explicit patches' matmuls, in chunks of images.
            n_g = x.shape[1] // groups * math.prod(kernel_size)
            images = max(1, _PATCH_CHUNK // (groups * n_g * math.prod(grad_z.shape[2:])))
            (plain,) = _sum_over_chunks(functools.partial(
                _patch_filter_grad, self, kernel_size, stride, dilation, groups),
                (x, grad_z), images)
            return tf.reshape(plain, (grad_z.shape[1], x.shape[1] // groups, *kernel_size))
        d = len(kernel_size)
        last = (0, *range(2, d + 2), 1)  # TF's CPU kernels take channels-last operands only
        kernel = _filter_grad(tf.transpose(x, last), tf.transpose(grad_z, last),
                              (*kernel_size, x.shape[1], grad_z.shape[1]), stride)
        return tf.transpose(kernel, (d + 1, d, *range(d)))

    def correlate(self, g, y, shifts):
        # TF's filter-gradient kernels (and XLA's convolutions) are slow on a window as
        # large as the image; FFTs are not.
        return _conv_gram.correlate_by_fft(self, g, y, shifts)

    @staticmethod
    def batch_size(x):
        """N, an int, or a 0-d int32 tensor where it is known only at run time."""
        return x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]

    sum_over_chunks = staticmethod(_sum_over_chunks)


TF = _TFNamespace()
