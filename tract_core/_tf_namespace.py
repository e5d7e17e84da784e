"""`TF`: the part of the array API the core calls, on TensorFlow tensors (outside
array-api-compat), and, having its own ``spd_solve``, TF's backend primitives (see
`tract_core._backends`)."""

from __future__ import annotations

import functools
import math
import types

import tensorflow as tf
from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext  # internal

from . import _backends, _patches


def compiling_with_xla():
    """Whether the ops being built will be compiled by XLA (``jit_compile``, also nested)."""
    return not tf.executing_eagerly() and GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph())


def _matrices(*arrays):
    """2-D views of stacks of one matrix (leading axes of size 1) in a graph XLA compiles,
    else None: see `_TFNamespace.matmul`."""
    if compiling_with_xla() and all(a.shape.rank > 2 and set(a.shape[:-2]) == {1}
                                    for a in arrays):
        return [tf.squeeze(a, list(range(a.shape.rank - 2))) for a in arrays]
    return None


def _matrix_transpose(x, /):
    views = _matrices(x)
    if views is None:
        return tf.linalg.matrix_transpose(x)
    return tf.transpose(views[0])[(tf.newaxis,) * (x.shape.rank - 2)]


def _real_fft(name, x, /, s, axes):
    """tf.signal's real FFT over ``axes``, which must be the trailing ones (as the core's)."""
    return getattr(tf.signal, name + ("", "2d", "3d")[len(axes) - 1])(x, fft_length=list(s))


def _filter_grad(x, grad_z, kernel_shape, strides):
    """TF's filter-gradient kernel on channels-last operands, 'VALID'."""
    if len(strides) == 1:  # as 2-D over a singleton axis
        return _filter_grad(x[:, None], grad_z[:, None], (1, *kernel_shape), (1, *strides))[0]
    op = tf.raw_ops.Conv3DBackpropFilterV2 if len(strides) == 3 else tf.raw_ops.Conv2DBackpropFilter
    return op(input=x, filter_sizes=kernel_shape, out_backprop=grad_z, padding="VALID",
              strides=(1, *strides, 1))


def _patch_filter_grad(kernel_size, stride, dilation, groups, x, grad_z):
    patches = _patches.conv_patches(x, kernel_size, stride, dilation, groups, xp=TF)
    m_g, positions = grad_z.shape[1] // groups, math.prod(grad_z.shape[2:])
    grads = tf.reshape(grad_z, (-1, groups, m_g, positions))
    grads = tf.reshape(TF.permute_dims(grads, (1, 2, 0, 3)), (groups, m_g, -1))
    return (TF.matmul(grads, patches),)  # (groups, M/g, n_g)


def _cholesky(a, block=64):
    """Lower Cholesky factor of SPD ``a`` (..., n, n), by halves above ``block`` rows: for
    XLA, whose own Cholesky is slow on CPU beyond a few dozen rows, nearly all the work
    goes into matmuls (the Schur complement of the leading half)."""
    n = a.shape[-1]
    if n <= block:
        return tf.linalg.cholesky(a)
    half = n // 2
    lead = _cholesky(a[..., :half, :half])
    # panel = A21 L11^-T, from L11 X = A21^T
    panel = tf.linalg.matrix_transpose(tf.linalg.triangular_solve(
        lead, tf.linalg.matrix_transpose(a[..., half:, :half]), lower=True))
    rest = _cholesky(a[..., half:, half:] - tf.linalg.matmul(panel, panel, transpose_b=True))
    upper = tf.concat([lead, tf.zeros_like(a[..., :half, half:])], axis=-1)
    return tf.concat([upper, tf.concat([panel, rest], axis=-1)], axis=-2)


def _sum_over_chunks(function, arrays, images):
    """``function(*chunk)`` summed over chunks of at most ``images`` images of ``arrays``
    (equal batch sizes, static or not; zero images fill the last chunk, so ``function``
    must give zeros for them) in a ``tf.while_loop``: XLA runs unrolled chunks slower."""
    count = arrays[0].shape[0]
    if count is None:
        count = tf.shape(arrays[0])[0]
        # Zero images fill the last chunk, so one much larger than the batch would mostly
        # sum zeros (and under XLA small chunks run no slower than one large one).
        images = min(images, 8)
        chunks = tf.maximum((count + images - 1) // images, 1)  # the first is unrolled
    else:
        chunks = max(1, -(-count // images))
        images = -(-count // chunks)  # balanced: 128 images in 2 chunks of 64, not 75 + 53
        if chunks == 1:
            return function(*arrays)
    fill = chunks * images - count
    filled = [tf.reshape(tf.pad(a, [(0, fill)] + [(0, 0)] * (a.shape.rank - 1)),
                         (-1, images, *a.shape[1:])) for a in arrays]
    first = function(*(a[0] for a in filled))
    return tf.while_loop(
        lambda i, total: i < chunks,
        lambda i, total: (i + 1, tf.nest.map_structure(
            tf.add, total, function(*(a[i] for a in filled)))),
        (tf.constant(1), first))[1]


class _TFNamespace:
    """The array-API functions the core calls (``device`` ignored: TF places ops next to
    their consumers), and the backend primitives of TF."""

    __name__ = __name__  # the module's: array-api-compat's namespace tests read it
    float16, float32, float64, int32, int64 = (tf.float16, tf.float32, tf.float64, tf.int32,
                                               tf.int64)
    linalg = types.SimpleNamespace(matrix_transpose=_matrix_transpose)
    fft = types.SimpleNamespace(rfftn=functools.partial(_real_fft, "rfft"),
                                irfftn=functools.partial(_real_fft, "irfft"))
    conj = staticmethod(tf.math.conj)
    stack = staticmethod(tf.stack)
    concat = staticmethod(tf.concat)
    take = staticmethod(tf.gather)
    reshape = staticmethod(tf.reshape)
    permute_dims = staticmethod(tf.transpose)
    sum = staticmethod(tf.reduce_sum)
    where = staticmethod(tf.where)  # a Python scalar x2 takes x1's dtype
    # Up to 96 entries per patch, explicit patches beat TF's filter gradient + structured Gram.
    few_patch_entries = 96
    # Larger chunks than elsewhere: each is an iteration of a tf.while_loop.
    patch_chunk = 1 << 22

    @staticmethod
    def isdtype(dtype, kind):  # the core asks for "real floating" only
        return kind == "real floating" and tf.as_dtype(dtype).is_floating

    @staticmethod
    def finfo(dtype):
        dtype = tf.as_dtype(dtype)
        return types.SimpleNamespace(bits=dtype.size * 8, max=dtype.max)

    @staticmethod
    def astype(x, dtype, /, *, copy=True):
        return tf.cast(x, dtype)  # a no-op for the same dtype; TF tensors are immutable

    @staticmethod
    def eye(n_rows, /, *, dtype, device=None):
        return tf.eye(n_rows, dtype=dtype)

    @staticmethod
    def zeros(shape, /, *, dtype, device=None):
        return tf.zeros(shape, dtype=dtype)

    @staticmethod
    def asarray(obj, /, *, dtype=None, device=None, copy=None):
        return tf.convert_to_tensor(obj) if dtype is None else tf.cast(obj, dtype)

    @staticmethod
    def matmul(x1, x2, /):
        # On CPU, XLA runs a dot with batch axes, or a transpose it cannot fold into one,
        # slower than a 2-D dot: there a stack of one matrix (one group) is multiplied, and
        # transposed, as 2-D views. Elsewhere grappler folds transposes into the matmul.
        views = _matrices(x1, x2) if x1.shape.rank == x2.shape.rank else None
        if views is None:
            return tf.linalg.matmul(x1, x2)
        return tf.linalg.matmul(*views)[(tf.newaxis,) * (x1.shape.rank - 2)]

    # ----------------------------------------------------------------- backend primitives

    has_float64 = staticmethod(lambda device: True)
    device = staticmethod(lambda a: None)  # TF places ops next to their inputs
    sum_over_chunks = staticmethod(_sum_over_chunks)

    @staticmethod
    def constant(key, array, dtype, device):
        """The core's numpy index or mask ``array`` as a tensor."""
        return tf.constant(array, dtype=dtype)

    spd_solve = _backends._Generic.spd_solve

    @staticmethod
    def cholesky(a):
        """Lower factor of SPD ``a`` (..., n, n). A non-finite ``a`` (on which
        ``tf.linalg.cholesky`` raises outside XLA) gives NaN, with no host round trip."""
        finite = tf.reduce_all(tf.math.is_finite(a), axis=[-2, -1], keepdims=True)
        safe = tf.where(finite, a, tf.eye(a.shape[-1], dtype=a.dtype))
        factor = _cholesky(safe) if compiling_with_xla() else tf.linalg.cholesky(safe)
        return tf.where(finite, factor, tf.constant(math.nan, dtype=a.dtype))

    @staticmethod
    def solve_triangular(factor, rhs, transpose=False):
        return tf.linalg.triangular_solve(factor, rhs, lower=True, adjoint=transpose)

    @staticmethod
    def filter_grad(x, grad_z, kernel_size, stride, dilation, groups):
        """The conv's ``G^T X`` as (M, C / groups, *kernel_size); x (N, C, *spatial)
        already padded, grad_z (N, M, *out)."""
        if groups > 1 or max(dilation) > 1 or compiling_with_xla():
            # TF's CPU kernels lack groups and dilation, and XLA's float64 CPU convolutions
            # are plain loops (slow on a 7x7 stem): explicit patches' matmuls, chunked.
            (plain,) = _sum_over_chunks(functools.partial(
                _patch_filter_grad, kernel_size, stride, dilation, groups), (x, grad_z),
                _patches.images_per_chunk(TF, x, grad_z, kernel_size))
            return tf.reshape(plain, (grad_z.shape[1], x.shape[1] // groups, *kernel_size))
        d = len(kernel_size)
        last = (0, *range(2, d + 2), 1)  # TF's CPU kernels take channels-last operands only
        kernel = _filter_grad(tf.transpose(x, last), tf.transpose(grad_z, last),
                              (*kernel_size, x.shape[1], grad_z.shape[1]), stride)
        return tf.transpose(kernel, (d + 1, d, *range(d)))

    @staticmethod
    def correlate(g, y, shifts):
        # FFTs: TF's filter-gradient kernels and XLA's convolutions are slow on such windows.
        return _backends.correlate_by_fft(TF, g, y, shifts)

    @staticmethod
    def batch_size(x):  # a 0-d int32 tensor where it is known only at run time
        return x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]


TF = _TFNamespace()
