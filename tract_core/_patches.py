"""A convolution's patches (its rows X) and their explicit products.

This is the reference the structured Gram (`tract_core._conv_gram`) is tested
against, and the fast path wherever a patch has few entries (stems: 3 channels), since
matmuls on explicit patches then beat a framework's conv weight-gradient kernel.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from ._backends import Array, Namespace, backend, namespace, statistics_dtype


def conv_output_shape(spatial: Sequence[int], kernel_size: Sequence[int],
                      stride: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """Output positions per spatial axis of an unpadded ('VALID') convolution."""
    return tuple((s - d * (k - 1) - 1) // st + 1
                 for s, k, st, d in zip(spatial, kernel_size, stride, dilation))


def disjoint_patches(kernel_size: Sequence[int], stride: Sequence[int],
                     dilation: Sequence[int]) -> bool:
    """True when no two receptive fields share an input element (ViT patch embeddings)."""
    return all(k <= st and (k == 1 or d == 1) for k, st, d in zip(kernel_size, stride, dilation))


def conv_patches(x: Array, kernel_size: Sequence[int], stride: Sequence[int],
                 dilation: Sequence[int], groups: int = 1, *,
                 xp: Namespace | None = None) -> Array:
    """Rows X of a convolution: every receptive field, one row each, per group.

    Args:
        x: (N, C, *spatial) channels-first input, already padded.
        kernel_size, stride, dilation: one int per spatial axis.
        groups: feature groups; C must be divisible by it.

    Returns:
        (groups, N * L, (C / groups) * prod(kernel_size)), L output positions. Rows are
        ordered (N, *out_spatial) and columns (channel, *kernel offsets), so that row r
        of group g dotted with ``weight[g-th block].reshape(M / groups, -1)`` is the
        output. It may be a transposed view of a contiguous (groups, n_g, N * L) array.
    """
    xp = xp or namespace(x)
    columns = _image_patches(xp, x, kernel_size, stride, dilation, groups)  # (N, g, n_g, L)
    columns = xp.reshape(xp.permute_dims(columns, (1, 2, 0, 3)), (groups, columns.shape[2], -1))
    return xp.linalg.matrix_transpose(columns)


def _image_patches(xp, x, kernel_size, stride, dilation, groups):
    """Each image's patches as columns, (N, groups, n_g, L), rows (channel, *offsets).

    Disjoint patches that tile the input are a reshape and one transposed copy;
    otherwise the taps' strided slices are stacked (one copy).
    """
    _, channels, *spatial = x.shape
    out = conv_output_shape(spatial, kernel_size, stride, dilation)
    if any(o <= 0 for o in out):
        raise ValueError(f"kernel_size {tuple(kernel_size)} with dilation {tuple(dilation)} "
                         f"does not fit the padded input of spatial shape {tuple(spatial)}")
    per_group = channels // groups * math.prod(kernel_size)
    d = len(out)
    if disjoint_patches(kernel_size, stride, dilation) and all(
            n * st <= size for n, st, size in zip(out, stride, spatial)):
        tiles = x[(slice(None), slice(None), *(slice(0, n * st) for n, st in zip(out, stride)))]
        split = [v for n, st in zip(out, stride) for v in (n, st)]
        tiles = xp.reshape(tiles, (-1, channels, *split))  # (N, C, L0, s0, ...), N maybe unknown
        tiles = tiles[(slice(None), slice(None),
                       *(v for k in kernel_size for v in (slice(None), slice(0, k))))]
        order = (0, 1, *(3 + 2 * a for a in range(d)), *(2 + 2 * a for a in range(d)))
        return xp.reshape(xp.permute_dims(tiles, order),
                          (-1, groups, per_group, math.prod(out)))
    taps = []
    for offsets in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(slice(o * dl, o * dl + st * (n - 1) + 1, st)
                       for o, dl, st, n in zip(offsets, dilation, stride, out))
        taps.append(x[(slice(None), slice(None), *window)])
    patches = xp.stack(taps, axis=2)  # (N, C, K, *out)
    return xp.reshape(patches, (-1, groups, per_group, math.prod(out)))


def patch_moments(x, grad_z, kernel_size, stride, dilation, groups=1, *, xp=None):
    """``G^T X`` and ``X^T X`` of a convolution from its explicit patches.

    Images go in chunks of about the backend's ``patch_chunk`` patch and gradient
    entries, each chunk's products summed, so that memory stays bounded.

    Args:
        x: (N, C, *spatial) channels-first input, already padded.
        grad_z: (N, M, *out) the gradient of the layer's output.
        kernel_size, stride, dilation: one int per spatial axis. groups: feature groups.

    Returns:
        ``(grad_w, gram)``: (groups, M/g, n_g) and (groups, n_g, n_g), statistics dtype.
    """
    xp = xp or namespace(x, grad_z)
    m = grad_z.shape[1]
    n_g = x.shape[1] // groups * math.prod(kernel_size)
    positions = math.prod(grad_z.shape[2:])
    geometry = (kernel_size, stride, dilation, groups)
    dtype = statistics_dtype(xp, x.dtype, backend(xp).device(x))

    def products(x, grad_z):
        if disjoint_patches(kernel_size, stride, dilation):
            columns, grads = _disjoint_columns(xp, x, grad_z, *geometry, dtype)
            grads = xp.astype(grads, dtype, copy=False)
            return (xp.matmul(columns, xp.linalg.matrix_transpose(grads)),
                    rows_gram(xp, xp.linalg.matrix_transpose(columns)))
        # Cast here, a chunk at a time: a float64 copy of the whole input and gradient
        # would cost more memory than the chunk's patches.
        patches = _image_patches(xp, xp.astype(x, dtype, copy=False), *geometry)
        # Overlapping: per-image products, no transposed copy of patches or gradients.
        flat = xp.reshape(patches, (-1, n_g, positions))  # one batch axis: (images g)
        grads = xp.astype(xp.reshape(grad_z, (-1, m // groups, positions)), dtype, copy=False)
        moment = xp.matmul(flat, xp.linalg.matrix_transpose(grads))  # X^T G: faster
        gram = xp.matmul(flat, xp.linalg.matrix_transpose(flat))
        return (xp.sum(xp.reshape(moment, (-1, groups, n_g, m // groups)), axis=0),
                xp.sum(xp.reshape(gram, (-1, groups, n_g, n_g)), axis=0))

    found = backend(xp)
    images = images_per_chunk(found, x, grad_z, kernel_size)
    moment, gram = found.sum_over_chunks(products, (x, grad_z), images)
    return xp.linalg.matrix_transpose(moment), gram


def disjoint_patch_gram(x, kernel_size, stride, dilation, groups=1, *, xp=None):
    """``X^T X`` (groups, n_g, n_g) of a convolution whose patches do not overlap, in the
    statistics dtype, by chunks of images of about ``patch_chunk`` patch entries."""
    xp = xp or namespace(x)
    geometry = (kernel_size, stride, dilation, groups)
    dtype = statistics_dtype(xp, x.dtype, backend(xp).device(x))

    def gram(x):
        columns = _disjoint_columns(xp, x, None, *geometry, dtype)[0]
        return (rows_gram(xp, xp.linalg.matrix_transpose(columns)),)

    found = backend(xp)
    images = max(1, found.patch_chunk // max(1, math.prod(x.shape[1:])))
    return found.sum_over_chunks(gram, (x,), images)[0]


def disjoint_whitened_product(x, grad_z, factor, kernel_size, stride, dilation, groups=1, *,
                              xp=None):
    """``Z^T G`` (groups, n_g, M/g) of a convolution whose patches do not overlap, with
    Z = X L^-T the rows whitened by ``factor`` L (groups, n_g, n_g), the lower Cholesky
    factor of the system. Z is formed in L's dtype (float64) and the product, the large
    one, taken in float32: Z's columns have comparable scales whatever the system's
    condition, so float32 keeps its relative accuracy there. Summed over chunks of
    images in L's dtype."""
    xp = xp or namespace(x, grad_z)
    geometry = (kernel_size, stride, dilation, groups)

    def product(x, grad_z):
        columns, grads = _disjoint_columns(xp, x, grad_z, *geometry, factor.dtype)
        return (whitened_product(xp, columns, xp.linalg.matrix_transpose(grads), factor),)

    found = backend(xp)
    images = images_per_chunk(found, x, grad_z, kernel_size)
    return found.sum_over_chunks(product, (x, grad_z), images)[0]


def whitened_product(xp, columns, grads, factor):
    """``Z^T G`` (..., n, m) of rows given as ``columns`` X^T (..., n, b) in ``factor``
    L's dtype and grads G (..., b, m): Z^T = L^-1 X^T in L's dtype, the product taken in
    float32 and returned in L's dtype."""
    whitened = xp.astype(backend(xp).solve_triangular(factor, columns), xp.float32)
    product = xp.matmul(whitened, xp.astype(grads, xp.float32, copy=False))
    return xp.astype(product, factor.dtype)


def _disjoint_columns(xp, x, grad_z, kernel_size, stride, dilation, groups, dtype):
    """A chunk's disjoint patches as (groups, n_g, b) columns in ``dtype`` (the patches
    already a transposed copy) and, with ``grad_z``, its gradient as (groups, M/g, b),
    reordered before any cast: the copy moves half the bytes."""
    n_g = x.shape[1] // groups * math.prod(kernel_size)
    patches = _image_patches(xp, xp.astype(x, dtype, copy=False), kernel_size, stride,
                             dilation, groups)
    columns = xp.reshape(xp.permute_dims(patches, (1, 2, 0, 3)), (groups, n_g, -1))
    if grad_z is None:
        return columns, None
    m = grad_z.shape[1]
    grads = xp.reshape(grad_z, (-1, groups, m // groups, math.prod(grad_z.shape[2:])))
    return columns, xp.reshape(xp.permute_dims(grads, (1, 2, 0, 3)), (groups, m // groups, -1))


def images_per_chunk(found, x, grad_z, kernel_size):
    """Images per chunk of explicit patches and their output gradient: about the backend
    ``found``'s ``patch_chunk`` entries of both (a 3x3 stem's gradient is 2.4 times its
    patches, so the bound counts it too)."""
    entries = (x.shape[1] * math.prod(kernel_size) + grad_z.shape[1]) * math.prod(grad_z.shape[2:])
    return max(1, found.patch_chunk // max(1, entries))


def rows_gram(xp, x, leaf=128):
    """X^T X of rows x (..., b, n) as [[L^T L, L^T R], [R^T L, R^T R]] for X = [L R], the
    off-diagonal block computed once and each diagonal one the same way: for wide rows
    (ViT patches, n = 768) 56% of one matmul's flops. Splits at multiples of 32 columns."""
    n = x.shape[-1]
    if n <= leaf:
        return xp.matmul(xp.linalg.matrix_transpose(x), x)
    half = max(32, round(n / 64) * 32)
    left, right = x[..., :half], x[..., half:]
    cross = xp.matmul(xp.linalg.matrix_transpose(left), right)
    upper = xp.concat([rows_gram(xp, left), cross], axis=-1)
    lower = xp.concat([xp.linalg.matrix_transpose(cross), rows_gram(xp, right)], axis=-1)
    return xp.concat([upper, lower], axis=-2)
