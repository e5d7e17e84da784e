"""TrAct's weight gradient, written once for every array library.

Paper (Petersen, Borgelt, Ermon, NeurIPS 2024), torch layout, W of shape (m, n)::

    dW = G^T X (X^T X / b + lam I)^-1                     (eq. 11)

X: (b, n), one row per patch or token; G = dL/dz: (b, m). The matrix
A = X^T X / b + lam I is symmetric positive definite, so it is factored with Cholesky,
never inverted. When b < n the push-through identity
X (X^T X / b + lam I)^-1 = (X X^T / b + lam I)^-1 X gives the same result from a
b x b system::

    dW = G^T (X X^T / b + lam I)^-1 X                     (Woodbury form)

Every function takes optional leading batch dimensions (one system per conv group).
The Gram, the system and its solve are computed in float64 wherever the array library
has it on the arrays' device (see :func:`statistics_dtype`); results come back in the
input's dtype, on the input's device.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers

import array_api_compat
import numpy as np

from ._backends import backend

__all__ = [
    "check_lam",
    "conv_gram",
    "conv_moments",
    "conv_output_shape",
    "conv_patches",
    "disjoint_patches",
    "gram",
    "precondition",
    "precondition_rows",
    "statistics_dtype",
    "weight_grad",
]


def check_lam(lam) -> float:
    """``lam`` as a float; ValueError unless it is a finite real number > 0."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise ValueError(f"lam must be a finite real number > 0, got {lam!r}")
    value = float(lam)
    if not 0 < value < math.inf:  # comparisons only: torch.compile traces them
        raise ValueError(f"lam must be a finite real number > 0, got {lam!r}")
    return value


def _namespace(*arrays, xp=None):
    return xp if xp is not None else array_api_compat.array_namespace(*arrays)


def _compute_dtype(xp, dtype, name="x"):
    """The dtype of the plain products (G^T X): float16/bfloat16 -> float32, else dtype."""
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype, got {dtype}")
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


def statistics_dtype(xp, dtype, device=None, name="x"):
    """The dtype TrAct's Gram, system and solve are computed in: float64 wherever the
    array library has it on ``device``, else float32 (float64 input stays float64).

    Pixel-scale patches (entries up to 255, neighbours strongly correlated) give
    systems ``X^T X / b + lam I`` of condition 1e7-1e8 at lam = 0.1. A Gram summed in
    float32 loses their small eigenvalues (weight gradients off by 1e-2 to 1e-1, or a
    failed Cholesky); products of float32 entries are exact in float64, so a float64
    sum keeps them.
    """
    _compute_dtype(xp, dtype, name)
    if backend(xp).has_float64(device):
        return xp.float64
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


def _check_lam_fits(xp, lam, dtype):
    largest = float(xp.finfo(dtype).max)
    if lam >= largest:
        raise ValueError(f"lam must be below the largest {dtype} ({largest}), "
                         f"the dtype of the solve; got {lam!r}")


def _eye(xp, size, like):
    return xp.eye(size, dtype=like.dtype, device=array_api_compat.device(like))


def _mT(xp, a):
    return xp.linalg.matrix_transpose(a)


def gram(x, *, xp=None):
    """Gram matrix of the rows, ``X^T X``.

    Args:
        x: (..., b, n) rows (patches or tokens).

    Returns:
        (..., n, n) in :func:`statistics_dtype` (float64 where the library has it).
    """
    xp = _namespace(x, xp=xp)
    x = xp.astype(x, statistics_dtype(xp, x.dtype, array_api_compat.device(x)), copy=False)
    if getattr(backend(xp), "gram_by_halves", False):
        return _halving_gram(xp, x)
    n = x.shape[-1]
    if n < 2 * _GRAM_BLOCK:
        return xp.matmul(_mT(xp, x), x)
    # Wide rows (ViT patches): the Gram is symmetric, so compute only the blocks on and
    # above the diagonal, (k + 1) / (2 k) of the flops of one big matmul.
    edges = [*range(0, n, _GRAM_BLOCK), n]
    cols = [x[..., a:b] for a, b in itertools.pairwise(edges)]
    upper = {(i, j): xp.matmul(_mT(xp, cols[i]), cols[j])
             for i in range(len(cols)) for j in range(i, len(cols))}
    return xp.concat([xp.concat([upper[(i, j)] if i <= j else _mT(xp, upper[(j, i)])
                                 for j in range(len(cols))], axis=-1)
                      for i in range(len(cols))], axis=-2)


_GRAM_BLOCK = 192  # columns per block of a wide Gram


def _halving_gram(xp, x):
    """X^T X as [[L^T L, L^T R], [R^T L, R^T R]] for X = [L R], the off-diagonal block
    computed once and each diagonal one the same way (a recursive SYRK): for wide rows
    (ViT patches, n = 768) 56% of one big matmul's flops, in fewer and larger products
    than blocks of 192 columns. Splits at multiples of 32 columns, which BLAS multiplies
    fastest.
    """
    n = x.shape[-1]
    if n <= _GRAM_LEAF:
        return xp.matmul(_mT(xp, x), x)
    half = max(32, round(n / 64) * 32)
    left, right = x[..., :half], x[..., half:]
    cross = xp.matmul(_mT(xp, left), right)
    return xp.concat([xp.concat([_halving_gram(xp, left), cross], axis=-1),
                      xp.concat([_mT(xp, cross), _halving_gram(xp, right)], axis=-1)],
                     axis=-2)


_GRAM_LEAF = 128  # columns up to which a Gram is one plain matmul


def precondition(grad_w, gram, count, lam, *, xp=None):
    """Turn a standard weight gradient into TrAct's: ``grad_w (gram / count + lam I)^-1``.

    Args:
        grad_w: (..., m, n) the plain layer's weight gradient, ``G^T X``. The solve
            amplifies its rounding errors too: for pixel-range data compute it in
            :func:`statistics_dtype`.
        gram: (..., n, n) ``X^T X`` from :func:`gram` (possibly summed over replicas).
        count: b, the number of rows the Gram sums over (a number, or a 0-d array > 0).
            With no rows (b = 0) grad_w and the Gram are zero, and so is the result.
        lam: finite float > 0.

    Returns:
        (..., m, n) in grad_w's dtype.
    """
    lam = check_lam(lam)
    xp = _namespace(grad_w, gram, xp=xp)
    dtype = statistics_dtype(xp, gram.dtype, array_api_compat.device(gram), "gram")
    _check_lam_fits(xp, lam, dtype)
    if isinstance(count, numbers.Number):
        count = max(count, 1)  # b = 0: a zero Gram over one row, lam I, a zero result
    gram = xp.astype(gram, dtype, copy=False)
    system = gram / count + lam * _eye(xp, gram.shape[-1], gram)
    # grad_w A^-1 = (A^-1 grad_w^T)^T since A is symmetric.
    rhs = _mT(xp, xp.astype(grad_w, dtype, copy=False))
    out = _mT(xp, backend(xp).spd_solve(system, rhs))
    return xp.astype(out, grad_w.dtype, copy=False)


def precondition_rows(grad_w, x, lam, *, xp=None):
    """:func:`precondition` with the Gram of ``x``, picking the smaller system.

    Args:
        grad_w: (..., m, n) the plain layer's weight gradient, ``G^T X``.
        x: (..., b, n) the rows it was computed from.
        lam: finite float > 0.

    Returns:
        (..., m, n) in grad_w's dtype. For b >= n this solves the n x n system; for
        b < n the b x b Woodbury form
        ``(grad_w - (grad_w X^T)(X X^T + b lam I)^-1 X) / lam``.
    """
    lam = check_lam(lam)
    xp = _namespace(grad_w, x, xp=xp)
    b, n = x.shape[-2], x.shape[-1]
    if b >= n:
        return precondition(grad_w, gram(x, xp=xp), b, lam, xp=xp)
    dtype = statistics_dtype(xp, x.dtype, array_api_compat.device(x))
    _check_lam_fits(xp, lam, dtype)
    x = xp.astype(x, dtype, copy=False)
    gw = xp.astype(grad_w, dtype, copy=False)
    system = xp.matmul(x, _mT(xp, x)) + (b * lam) * _eye(xp, b, x)
    coef = backend(xp).spd_solve(system, xp.matmul(x, _mT(xp, gw)))  # (..., b, m)
    out = (gw - xp.matmul(_mT(xp, coef), x)) / lam
    return xp.astype(out, grad_w.dtype, copy=False)


def weight_grad(x, grad_z, lam=0.1, *, xp=None):
    """TrAct's weight gradient ``G^T X (X^T X / b + lam I)^-1`` (torch layout).

    Args:
        x: (..., b, n) input rows: one per patch or token (leading dims: one system each,
            e.g. conv groups).
        grad_z: (..., b, m) the loss gradient with respect to the layer's output.
        lam: finite float > 0 (paper: 0.1; 0.2 for long runs).

    Returns:
        (..., m, n), the dtype and device of ``x``. Uses the b x b Woodbury form when
        b < n.
    """
    lam = check_lam(lam)
    xp = _namespace(x, grad_z, xp=xp)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., b, n), got shape {tuple(x.shape)}")
    if grad_z.ndim != x.ndim or grad_z.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"grad_z must have shape (..., b, m) matching x {tuple(x.shape)} in all but "
            f"the last axis, got shape {tuple(grad_z.shape)}"
        )
    _compute_dtype(xp, grad_z.dtype, "grad_z")
    if x.dtype != grad_z.dtype:
        raise TypeError(f"x and grad_z must share a dtype, got {x.dtype} and {grad_z.dtype}")
    b, n = x.shape[-2], x.shape[-1]
    device = array_api_compat.device(x)
    dtype = statistics_dtype(xp, x.dtype, device)
    _check_lam_fits(xp, lam, dtype)
    if b == 0:  # no rows: G^T X, and so TrAct's gradient, is zero
        return xp.zeros((*x.shape[:-2], grad_z.shape[-1], n), dtype=x.dtype, device=device)
    xc = xp.astype(x, dtype, copy=False)
    gc = xp.astype(grad_z, dtype, copy=False)
    if b >= n:
        out = precondition(xp.matmul(_mT(xp, gc), xc), gram(xc, xp=xp), b, lam, xp=xp)
    else:
        # Push-through form: no cancellation, b x b system.
        system = xp.matmul(xc, _mT(xp, xc)) / b + lam * _eye(xp, b, xc)
        coef = backend(xp).spd_solve(system, gc)  # (..., b, m)
        out = xp.matmul(_mT(xp, coef), xc)
    return xp.astype(out, x.dtype, copy=False)


def conv_output_shape(spatial, kernel_size, stride, dilation):
    """Output positions per spatial axis of an unpadded ('VALID') convolution."""
    return tuple(
        (s - d * (k - 1) - 1) // st + 1
        for s, k, st, d in zip(spatial, kernel_size, stride, dilation)
    )


def conv_patches(x, kernel_size, stride, dilation, groups=1, *, xp=None):
    """Rows X of a convolution: every receptive field, one row each, per group.

    Args:
        x: (N, C, *spatial) channels-first input, already padded.
        kernel_size, stride, dilation: one int per spatial axis.
        groups: number of feature groups; C must be divisible by it.

    Returns:
        (groups, N * L, (C / groups) * prod(kernel_size)), L = output positions. Rows are
        ordered (N, *out_spatial) and columns (channel, *kernel offsets), so that row r of
        group g dotted with ``weight[g-th block].reshape(M / groups, -1)`` is the output.
        The result may be a transposed view of a (groups, n_g, N * L) array: the copy
        into that layout keeps long contiguous runs, and matmuls take either.
    """
    xp = _namespace(x, xp=xp)
    return _mT(xp, _patch_matrix(xp, x, kernel_size, stride, dilation, groups))


def disjoint_patches(kernel_size, stride, dilation) -> bool:
    """True when no two receptive fields share an input element (ViT patch embeddings)."""
    return all(k <= st and (k == 1 or d == 1)
               for k, st, d in zip(kernel_size, stride, dilation))


def _patch_matrix(xp, x, kernel_size, stride, dilation, groups, per_image=False):
    """:func:`conv_patches` transposed, (groups, n_g, N * L): a contiguous array or the
    transposed view of one, whichever copy keeps the longer contiguous runs. With
    ``per_image``: each image's patches as columns, (N, groups, n_g, L), contiguous."""
    _, channels, *spatial = x.shape
    out = conv_output_shape(spatial, kernel_size, stride, dilation)
    if any(o <= 0 for o in out):
        raise ValueError(f"kernel_size {tuple(kernel_size)} with dilation {tuple(dilation)} "
                         f"does not fit the padded input of spatial shape {tuple(spatial)}")
    per_group = channels // groups * math.prod(kernel_size)
    d = len(out)
    if disjoint_patches(kernel_size, stride, dilation) and all(
            n * st <= size for n, st, size in zip(out, stride, spatial)):
        # A reshape, no gather: (N, C, L0, s0, L1, s1, ...), then a transposed copy.
        split = [v for n, st in zip(out, stride) for v in (n, st)]
        tiles = x[(slice(None), slice(None), *(slice(0, n * st) for n, st in zip(out, stride)))]
        tiles = xp.reshape(tiles, (-1, channels, *split))  # N may be unknown (TF graphs)
        tiles = tiles[(slice(None), slice(None),
                       *(v for k in kernel_size for v in (slice(None), slice(0, k))))]
        positions = tuple(2 + 2 * a for a in range(d))
        offsets = tuple(3 + 2 * a for a in range(d))
        if per_image:
            return xp.reshape(xp.permute_dims(tiles, (0, 1, *offsets, *positions)),
                              (-1, groups, per_group, math.prod(out)))
        if kernel_size[-1] >= 8:
            # Rows (N, *L | C, *k) copy runs of a kernel row (ViT-16: 64 bytes).
            rows = xp.reshape(xp.permute_dims(tiles, (0, *positions, 1, *offsets)),
                              (-1, groups, per_group))
            return xp.permute_dims(rows, (1, 2, 0))
        # Narrow kernels (CIFAR ViT-4): columns (C, *k | N, *L) copy faster.
        return xp.reshape(xp.permute_dims(tiles, (1, *offsets, 0, *positions)),
                          (groups, per_group, -1))
    patches = _image_patches(xp, x, kernel_size, stride, dilation, groups, out)
    if per_image:
        return patches
    patches = xp.permute_dims(patches, (1, 2, 0, 3))  # runs of L: (g, n_g, N, L)
    return xp.reshape(patches, (groups, per_group, -1))


def _image_patches(xp, x, kernel_size, stride, dilation, groups, out):
    """Each image's patches as columns, (N, groups, n_g, L): one copy of the taps'
    strided slices, in the order they are stacked."""
    taps = []
    for offsets in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(
            slice(o * dl, o * dl + st * (n - 1) + 1, st)
            for o, dl, st, n in zip(offsets, dilation, stride, out)
        )
        taps.append(x[(slice(None), slice(None), *window)])
    patches = xp.stack(taps, axis=2)  # (N, C, K, *out)
    return xp.reshape(patches, (-1, groups, x.shape[1] // groups * len(taps), math.prod(out)))


def _tap_major_patches(xp, x, kernel_size, stride, dilation, groups, out):
    """Each image's patches as columns with a row of ones below, (N, groups, n_g + 1, L):
    rows (tap, channel), then ones. One copy (a concat of the taps' strided slices and
    the ones); the ones row turns X^T G into the bias gradient too."""
    n_batch, channels = x.shape[:2]
    x = xp.reshape(x, (n_batch, groups, channels // groups, *x.shape[2:]))
    taps = []
    for offsets in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(
            slice(o * dl, o * dl + st * (n - 1) + 1, st)
            for o, dl, st, n in zip(offsets, dilation, stride, out)
        )
        taps.append(x[(slice(None), slice(None), slice(None), *window)])
    one = xp.ones((1,) * (3 + len(out)), dtype=x.dtype, device=array_api_compat.device(x))
    taps.append(xp.broadcast_to(one, (n_batch, groups, 1, *out)))
    patches = xp.concat(taps, axis=2)  # (N, g, K * C/g + 1, *out)
    return xp.reshape(patches, (n_batch, groups, patches.shape[2], math.prod(out)))


def channel_major(a, taps, axes, *, xp=None):
    """``a`` with each axis in ``axes`` (non-negative) reordered from (tap, channel)
    entries, the order of tap-major patches, to (channel, tap), a conv weight's order."""
    xp = _namespace(a, xp=xp)
    for axis in axes:
        shape = tuple(a.shape)
        split = xp.reshape(a, (*shape[:axis], taps, shape[axis] // taps, *shape[axis + 1:]))
        order = list(range(len(shape) + 1))
        order[axis], order[axis + 1] = axis + 1, axis
        a = xp.reshape(xp.permute_dims(split, tuple(order)), shape)
    return a


def conv_moments(x, grad_z, kernel_size, stride, dilation, groups=1, *, xp=None):
    """The plain weight gradient ``G^T X``, the Gram ``X^T X`` and the bias gradient of a
    conv, from explicit patches.

    For disjoint patches (ViT patch embeddings) X is the input reordered, no larger:
    both products are then matmuls on one copy of x (XLA runs them faster than its conv
    transpose on CPU; PyTorch's conv kernel gives G^T X as fast or faster). For
    overlapping patches the images go in chunks of about ``_PATCH_CHUNK`` patch entries,
    each chunk's products summed per image: memory stays bounded, and where a patch has
    few entries (stems: 3 channels) these matmuls beat a framework's conv
    weight-gradient kernel on CPU. There a row of ones below the patches makes the bias
    gradient one more row of the first product.

    Args:
        x: (N, C, *spatial) channels-first input, already padded; N static.
        grad_z: (N, M, *out) the gradient of the layer's output.
        kernel_size, stride, dilation: one int per spatial axis. groups: feature groups.

    Returns:
        ``(grad_w, gram, grad_bias)``: (groups, M/g, n_g), (groups, n_g, n_g) and (M,),
        in :func:`statistics_dtype` (the solve amplifies the rounding of both products).
    """
    xp = _namespace(x, grad_z, xp=xp)
    dtype = statistics_dtype(xp, x.dtype, array_api_compat.device(x))
    x = xp.astype(x, dtype, copy=False)
    g, m = groups, grad_z.shape[1]
    n_g = x.shape[1] // g * math.prod(kernel_size)
    positions = math.prod(grad_z.shape[2:])
    grads = xp.reshape(xp.astype(grad_z, dtype, copy=False), (-1, g, m // g, positions))
    if not disjoint_patches(kernel_size, stride, dilation):
        out = conv_output_shape(x.shape[2:], kernel_size, stride, dilation)
        step = max(1, _PATCH_CHUNK // (g * (n_g + 1) * positions))
        moment = gram_ones = 0
        for lo in range(0, max(x.shape[0], 1), step):  # no images: one empty chunk, zeros
            patches = _tap_major_patches(xp, x[lo:lo + step], kernel_size, stride,
                                         dilation, g, out)  # (images, g, n_g + 1, L)
            # The Gram with the ones row too: 28 wide measured faster than 27 (3x3 stem).
            products = _image_products(xp, patches, grads[lo:lo + step])
            moment, gram_ones = moment + products[0], gram_ones + products[1]
        taps = math.prod(kernel_size)
        grad_w = channel_major(_mT(xp, moment[:, :n_g, :]), taps, (2,), xp=xp)
        patch_gram = channel_major(gram_ones[:, :n_g, :n_g], taps, (1, 2), xp=xp)
        return grad_w, patch_gram, xp.reshape(moment[:, n_g, :], (m,))
    if n_g <= positions and getattr(backend(xp), "prefers_batched_matmul", False):
        # G^T X = sum_n G_n^T X_n: per-image products, (N, M, n_g) no larger than G,
        # cost less than a transposed copy of G (in torch; XLA does better with one
        # dot over the copy), and the ones row saves a pass over G for the bias.
        # Measured, CIFAR ViT-4: 6.2-6.8 ms against 6.8-7.4 from the (g, n_g, N * L)
        # matrix, then 0.3 ms less with the ones row.
        per_image = _patch_matrix(xp, x, kernel_size, stride, dilation, groups,
                                  per_image=True)  # (N, g, n_g, L)
        patches = xp.concat([per_image, _ones_row(xp, per_image)], axis=2)
        moment, gram_ones = _image_products(xp, patches, grads)
        return (_mT(xp, moment[:, :n_g, :]), gram_ones[:, :n_g, :n_g],
                xp.reshape(moment[:, n_g, :], (m,)))
    # Innermost axis first: one reduction over (0, 3) runs several times slower in torch.
    grad_bias = xp.reshape(xp.sum(xp.sum(grads, axis=3), axis=0), (m,))
    matrix = _patch_matrix(xp, x, kernel_size, stride, dilation, groups)  # (g, n_g, N * L)
    rows = xp.reshape(xp.permute_dims(grads, (1, 2, 0, 3)), (g, m // g, -1))
    grad_w = xp.matmul(rows, _mT(xp, matrix))
    return grad_w, gram(_mT(xp, matrix), xp=xp), grad_bias


_PATCH_CHUNK = 1 << 22  # patch entries of overlapping patches extracted at once (16 MiB)


def _ones_row(xp, patches):
    """A row of ones to go below per-image patches (images, g, rows, L): (images, g, 1, L)."""
    one = xp.ones((1, 1, 1, 1), dtype=patches.dtype, device=array_api_compat.device(patches))
    return xp.broadcast_to(one, (*patches.shape[:2], 1, patches.shape[3]))


def _image_products(xp, patches, grads):
    """X^T G and X^T X summed over images, from per-image patches (images, g, rows, L) and
    gradients (images, g, M/g, L): (g, rows, M/g) and (g, rows, rows).

    X^T G rather than G^T X: the product with the patches on the left runs faster. One
    batch axis (images g): torch runs 3-D matmuls with less overhead.
    """
    images, g, rows, positions = patches.shape
    flat = xp.reshape(patches, (-1, rows, positions))
    moment = xp.matmul(flat, _mT(xp, xp.reshape(grads, (-1, grads.shape[2], positions))))
    gram_ones = xp.matmul(flat, _mT(xp, flat))
    return (xp.sum(xp.reshape(moment, (images, g, rows, grads.shape[2])), axis=0),
            xp.sum(xp.reshape(gram_ones, (images, g, rows, rows)), axis=0))


def _correlate_by_slices(xp, g, x, kernel_shape):
    """out[i, j, u] = sum_{n, q} g[n, i, q] x[n, j, q + u]: one matmul per shift u.

    The portable stand-in for a framework's conv weight-gradient kernel.
    """
    inner = g.shape[2:]
    rows = xp.reshape(xp.permute_dims(g, (1, 0, *range(2, g.ndim))), (g.shape[1], -1))
    out = []
    for shift in itertools.product(*(range(k) for k in kernel_shape)):
        window = tuple(slice(u, u + n) for u, n in zip(shift, inner))
        moved = xp.permute_dims(x[(slice(None), slice(None), *window)],
                                (1, 0, *range(2, x.ndim)))
        out.append(xp.matmul(rows, _mT(xp, xp.reshape(moved, (x.shape[1], -1)))))
    return xp.reshape(xp.stack(out, axis=-1), (g.shape[1], x.shape[1], *kernel_shape))


def _constant(xp, key, array, dtype, device):
    """A numpy constant on the arrays' device (dtype None: numpy's), cached when possible."""
    found = backend(xp)
    if hasattr(found, "constant"):
        return found.constant(key, array, dtype, device)
    return xp.asarray(array, dtype=dtype, device=device)


def _tap_phases(kernel_size, stride, dilation):
    """Per axis, each tap t's (phase, offset): input t * dilation = stride * offset + phase."""
    return [[((t * d) % s, (t * d) // s) for t in range(k)]
            for k, s, d in zip(kernel_size, stride, dilation)]


_FRAME_CHUNK = 1 << 21  # frame patch entries gathered at once (8 MiB in float32)


@dataclasses.dataclass(frozen=True)
class _GramPlan:
    """Index arithmetic of :func:`conv_gram` for one geometry, all numpy, computed once."""

    out: tuple  # output positions per axis, L
    reach: tuple  # the largest tap offset per axis, E
    span: tuple  # phase-image length per axis, L + E
    phases: tuple  # the stride phases read, as tuples of per-axis phases
    pair_index: np.ndarray  # (n, n) flat index into the correlations
    row_keyed: np.ndarray  # (n, n) bool: frame term of (r1, r2) keyed on r1's tap
    frame_index: np.ndarray  # (F, n) flat index into one image, for each frame position
    frame_mask: np.ndarray  # (F, n) 1 where that tap reads outside the common window
    frame_boxes: tuple  # (_SliceBox, ...) covering the frame, for _frame_by_slices


@dataclasses.dataclass(frozen=True)
class _SliceBox:
    """Frame positions for :func:`_frame_by_slices`: a box of output positions whose
    patches are copied at once, leading spatial axis first.

    A strip (the frame along one axis, inside the common window on every other) has at
    each of its positions on that axis the same taps reading outside, a range of kernel
    offsets on that axis: only those rows of X need enter the product (about half of
    them). A corner (the frame along several axes) takes every row, masked.
    """

    box: tuple  # (lo, hi) output positions per axis
    order: tuple  # spatial axes, the strip's first
    rows: tuple | None  # strips: per position on the strip's axis, (t_lo, t_hi, mask):
    #                     its kernel offsets [t_lo, t_hi) on that axis read outside where
    #                     mask (t_hi - t_lo,) is 1 (None: all of them)
    mask: np.ndarray  # (n, P) frame mask, rows (channel, offsets in `order`), positions
    #                   row-major in `order`


_PLANS = {}  # a plain memo (torch.compile traces dicts, but warns on lru_cache)


def _gram_plan(*geometry):
    """The cached :class:`_GramPlan` for (channels, spatial, kernel_size, stride, dilation)."""
    plan = _PLANS.get(geometry)
    if plan is None:
        if len(_PLANS) >= 64:
            _PLANS.clear()
        plan = _PLANS[geometry] = _make_gram_plan(*geometry)
    return plan


def _make_gram_plan(channels, spatial, kernel_size, stride, dilation):
    out = conv_output_shape(spatial, kernel_size, stride, dilation)
    taps = _tap_phases(kernel_size, stride, dilation)
    reach = tuple(max(e for _, e in axis) for axis in taps)
    span = tuple(n + e for n, e in zip(out, reach))
    phases = tuple(itertools.product(*(sorted({p for p, _ in axis}) for axis in taps)))
    phase_of = {p: i for i, p in enumerate(phases)}
    tap_list = list(itertools.product(*taps))  # row-major over kernel offsets
    tap_phase = np.array([phase_of[tuple(p for p, _ in tap)] for tap in tap_list])
    tap_offset = np.array([[e for _, e in tap] for tap in tap_list]).reshape(len(tap_list), -1)
    # Columns in (channel, tap) order; each reads channel `stacked_channel` of the phase
    # stack at offset `offset`.
    stacked_channel = (tap_phase[None, :] * channels
                       + np.arange(channels)[:, None]).reshape(-1)
    offset = np.tile(tap_offset, (channels, 1))  # (n, d)
    shift = offset[None, :, :] - offset[:, None, :]  # (n, n, d): e2 - e1
    # Correlations are computed for first-axis shifts >= 0 only; entry (r1, r2) with a
    # negative one is read from (r2, r1) at the opposite shift (the Gram is symmetric).
    row_keyed = shift[..., 0] >= 0
    first = np.where(row_keyed, stacked_channel[:, None], stacked_channel[None, :])
    second = np.where(row_keyed, stacked_channel[None, :], stacked_channel[:, None])
    shift = np.where(row_keyed[..., None], shift, -shift)
    width = len(phases) * channels
    pair_index = first * width + second
    pair_index = pair_index * (reach[0] + 1) + shift[..., 0]
    for axis in range(1, len(out)):
        pair_index = pair_index * (2 * reach[axis] + 1) + shift[..., axis] + reach[axis]
    # The frame: output positions some of whose taps read outside the common window.
    boxes = _frame_boxes(out, reach)
    positions = [np.stack([g.reshape(-1) for g in np.meshgrid(
        *(np.arange(lo, hi) for lo, hi in box), indexing="ij")], axis=1) for box in boxes]
    positions = np.concatenate(positions) if positions else np.zeros((0, len(out)), int)
    q = positions[:, None, :] + tap_offset[None, :, :]  # (F, taps, d) in phase coordinates
    mask = ((q < np.asarray(reach)) | (q >= np.asarray(out))).any(axis=-1)
    tap_start = np.array(list(itertools.product(
        *(range(0, k * d, d) for k, d in zip(kernel_size, dilation)))))
    read = positions[:, None, :] * np.asarray(stride) + tap_start[None, :, :]  # (F, taps, d)
    flat = read @ np.array([math.prod(spatial[a + 1:]) for a in range(len(spatial))])
    image = math.prod(spatial)
    frame_index = (np.arange(channels)[None, :, None] * image + flat[:, None, :])
    frame_index = frame_index.reshape(len(positions), -1)
    frame_mask = np.tile(mask, (1, channels)).astype(np.float64)
    frame_boxes = tuple(_slice_boxes(out, reach, taps, tap_offset, channels))
    return _GramPlan(out, reach, span, phases, _small_index(pair_index), row_keyed,
                     _small_index(frame_index), frame_mask, frame_boxes)


def _slice_boxes(out, reach, taps, tap_offset, channels):
    """The :class:`_SliceBox` es covering the frame: on each axis a low strip [0, E), a high
    one [max(E, L - E), L) and the interior [E, L - E); every combination but the
    interior's own. ``taps``: per axis, each kernel offset's (phase, offset e)."""
    d = len(out)
    segments = []  # per axis: (a strip, (lo, hi))
    for n, e in zip(out, reach):
        strips = [(True, (0, e)), (True, (max(e, n - e), n))] if e else []
        segments.append(strips + ([(False, (e, n - e))] if n - e > e else []))
    for parts in itertools.product(*segments):
        box = tuple(extent for _, extent in parts)
        strips = [axis for axis, (strip, _) in enumerate(parts) if strip]
        if not strips:
            continue
        order = (strips[0], *(a for a in range(d) if a != strips[0]))
        grids = np.meshgrid(*(np.arange(*box[a]) for a in order), indexing="ij")
        positions = np.stack([grids[order.index(a)].reshape(-1) for a in range(d)], axis=1)
        # Taps (kernel offsets in `order`, row-major) reading outside at each position.
        offsets = np.moveaxis(tap_offset.reshape(*(len(axis) for axis in taps), d),
                              order, range(d)).reshape(-1, d)
        q = positions[:, None, :] + offsets[None, :, :]  # phase coordinates
        outside = ((q < np.asarray(reach)) | (q >= np.asarray(out))).any(axis=-1)
        mask = np.ascontiguousarray(np.tile(outside, (1, channels)).astype(np.float64).T)
        rows = None
        if len(strips) == 1:
            axis = strips[0]
            offsets = np.array([e for _, e in taps[axis]])
            rows = []
            for position in range(*box[axis]):
                reads_out = ((position + offsets < reach[axis])
                             | (position + offsets >= out[axis]))
                t_lo, t_hi = np.flatnonzero(reads_out)[[0, -1]] + (0, 1)
                part = reads_out[t_lo:t_hi].astype(np.float64)
                rows.append((int(t_lo), int(t_hi), None if part.all() else part))
            rows = tuple(rows)
        yield _SliceBox(box, order, rows, mask)


def _small_index(index):
    """int32 indices where they fit (the default integer of JAX without x64)."""
    return index.astype(np.int32 if index.size == 0 or index.max() < 2**31 else np.int64)


def conv_gram(x, kernel_size, stride, dilation, groups=1, *, correlate=None, xp=None):
    """Gram ``X^T X`` of a convolution's patches without extracting every patch.

    Overlapping patches share their products: split x into its stride phases, so that
    tap t of an axis reads phase (t d mod s) at offset e_t = floor(t d / s) with unit
    stride. Entry ((c1, t1), (c2, t2)) is then a correlation of two phase images at the
    shift e_t2 - e_t1 summed over the window [e_t1, e_t1 + L) of each axis. The part of
    every window common to all taps, [E, L) with E the largest offset, is one
    correlation per shift for all entries at once (``correlate``, a framework's conv
    weight-gradient kernel; by symmetry only shifts >= 0 on the first axis); the rest
    lies on a frame of output positions at most E wide, whose patches are copied (a
    gather, or static slices where the backend prefers them) and added with a mask.
    Disjoint patches (ViT, E = 0) are a reshape and one symmetric matmul.

    Args:
        x: (N, C, *spatial) channels-first, already padded.
        kernel_size, stride, dilation: one int per spatial axis. groups: feature groups.
        correlate: ``correlate(g, y, kernel_shape)`` -> (I, J, *kernel_shape) with
            ``out[i, j, u] = sum_{n, q} g[n, i, q] y[n, j, q + u]``; default: one matmul
            per shift.

    Returns:
        (groups, n_g, n_g) in :func:`statistics_dtype`, equal to
        ``gram(conv_patches(x, ...))``.
    """
    xp = _namespace(x, xp=xp)
    x = xp.astype(x, statistics_dtype(xp, x.dtype, array_api_compat.device(x)), copy=False)
    if x.shape[0] == 0:  # no images, no patches: a zero Gram
        n_g = x.shape[1] // groups * math.prod(kernel_size)
        return xp.zeros((groups, n_g, n_g), dtype=x.dtype, device=array_api_compat.device(x))
    if groups > 1:
        size = x.shape[1] // groups
        return xp.concat([conv_gram(x[:, i * size:(i + 1) * size], kernel_size, stride,
                                    dilation, 1, correlate=correlate, xp=xp)
                          for i in range(groups)], axis=0)
    _, channels, *spatial = x.shape
    kernel_size, stride, dilation = tuple(kernel_size), tuple(stride), tuple(dilation)
    out = conv_output_shape(spatial, kernel_size, stride, dilation)
    reach = [max(e for _, e in axis) for axis in _tap_phases(kernel_size, stride, dilation)]
    if not any(reach) or any(n <= e for n, e in zip(out, reach)):
        # No overlap between taps' windows (e.g. ViT patches), or no common window.
        return gram(conv_patches(x, kernel_size, stride, dilation, 1, xp=xp), xp=xp)
    plan = _gram_plan(channels, tuple(spatial), kernel_size, stride, dilation)
    device = array_api_compat.device(x)
    stacked = _phase_stack(xp, x, plan, stride)  # (N, P*C, *span)
    common = stacked[(slice(None), slice(None), *(slice(e, n) for e, n in zip(reach, out)))]
    ahead = stacked[(slice(None), slice(None), slice(reach[0], None))]  # first-axis shift >= 0
    shifts = (reach[0] + 1, *(2 * e + 1 for e in reach[1:]))
    correlations = (correlate or (lambda g, y, k: _correlate_by_slices(xp, g, y, k)))(
        common, ahead, shifts)
    geometry = (channels, tuple(spatial), kernel_size, stride, dilation)
    index = _constant(xp, (geometry, "pairs"), plan.pair_index.reshape(-1), None, device)
    result = xp.reshape(xp.take(xp.reshape(correlations, (-1,)), index, axis=0),
                        plan.pair_index.shape)
    found = backend(xp)
    if getattr(found, "frame_by_slices", False):
        strips = found.frame_strips(x) if hasattr(found, "frame_strips") else True
        frame = _frame_by_slices(xp, x, plan, geometry, kernel_size, stride, dilation,
                                 strips)
    else:
        frame = _frame_by_gather(xp, x, plan, geometry)
    keyed = _constant(xp, (geometry, "keyed"), plan.row_keyed, None, device)
    result = result + xp.where(keyed, frame, _mT(xp, frame))
    result = (result + _mT(xp, result)) / 2
    return result[None, ...]


def _frame_by_gather(xp, x, plan, geometry):
    """:func:`conv_gram`'s frame term, sum_p mask[p, r1] X[p, r1] X[p, r2] over the frame
    positions p, their patches gathered in chunks of positions to bound memory."""
    n_batch, n_cols = x.shape[0], plan.frame_index.shape[1]
    device = array_api_compat.device(x)
    frame = xp.zeros((n_cols, n_cols), dtype=x.dtype, device=device)
    flat = xp.reshape(x, (n_batch, math.prod(x.shape[1:])))
    step = max(1, _FRAME_CHUNK // (max(n_batch, 1) * n_cols))
    for lo in range(0, plan.frame_index.shape[0], step):
        chunk = (geometry, lo, step)
        index = _constant(xp, (chunk, "frame"), plan.frame_index[lo:lo + step].reshape(-1),
                          None, device)
        rows = xp.reshape(xp.take(flat, index, axis=1), (n_batch, -1, n_cols))
        mask = _constant(xp, (chunk, "mask"), plan.frame_mask[lo:lo + step], x.dtype, device)
        frame = frame + xp.matmul(_mT(xp, xp.reshape(rows * mask, (-1, n_cols))),
                                  xp.reshape(rows, (-1, n_cols)))
    return frame


def _frame_by_slices(xp, x, plan, geometry, kernel_size, stride, dilation, strips=True):
    """:func:`_frame_by_gather`'s sum from static slices of x instead of a gather: per
    :class:`_SliceBox`, in chunks of images, the patches of the crop it reads, stacked
    one axis at a time (k0 + k1 + ... slices, not k0 k1 ...), as (channel, kernel
    offsets | positions on the leading axis, images, other positions). With ``strips``,
    a strip's product per position, on the rows reading outside; else per box, masked
    (fewer, larger operations)."""
    channels, n_cols = x.shape[1], plan.frame_mask.shape[1]
    device = array_api_compat.device(x)
    frame = xp.zeros((n_cols, n_cols), dtype=x.dtype, device=device)
    for number, piece in enumerate(plan.frame_boxes):
        key = (geometry, number)
        extents = [piece.box[a][1] - piece.box[a][0] for a in piece.order]
        lead_taps = kernel_size[piece.order[0]]
        inner_taps = n_cols // (channels * lead_taps)
        step = max(1, _FRAME_CHUNK // (n_cols * math.prod(extents)))
        total = 0  # X^T X over the box, rows and columns (channel, offsets in `order`)
        for lo in range(0, max(x.shape[0], 1), step):  # no images: one empty chunk
            patches = _box_patches(xp, x[lo:lo + step], piece, kernel_size, stride,
                                   dilation)
            if piece.rows is None or not strips:  # every row, masked
                mask = _constant(xp, (key, "mask"), np.reshape(
                    piece.mask, (n_cols, extents[0], 1, -1)), x.dtype, device)
                shaped = xp.reshape(patches, (n_cols, extents[0], -1, mask.shape[-1]))
                total = total + xp.matmul(xp.reshape(shaped * mask, (n_cols, -1)),
                                          _mT(xp, xp.reshape(shaped, (n_cols, -1))))
                continue
            lead = xp.reshape(patches, (channels, lead_taps, inner_taps, extents[0], -1))
            for position, (t_lo, t_hi, mask) in enumerate(piece.rows):
                every = xp.reshape(lead[:, :, :, position, :], (n_cols, -1))  # a view
                outside = lead[:, t_lo:t_hi, :, position, :]
                if mask is not None:
                    outside = outside * _constant(xp, (key, position), mask[:, None, None],
                                                  x.dtype, device)
                part = xp.matmul(xp.reshape(outside, (-1, every.shape[1])), _mT(xp, every))
                part = [xp.reshape(part, (channels, t_hi - t_lo, inner_taps, n_cols))]
                for width, where in ((t_lo, 0), (lead_taps - t_hi, 1)):
                    if width:  # rows that do not read outside here: zeros
                        part.insert(where * len(part), xp.zeros(
                            (channels, width, inner_taps, n_cols), dtype=x.dtype,
                            device=device))
                total = total + xp.reshape(xp.concat(part, axis=1), (n_cols, n_cols))
        if piece.order != tuple(range(len(piece.order))):  # back to (channel, k0, k1, ..)
            d = len(piece.order)
            taps = [kernel_size[a] for a in piece.order]
            back = [1 + piece.order.index(a) for a in range(d)]
            total = xp.reshape(xp.permute_dims(
                xp.reshape(total, (channels, *taps, channels, *taps)),
                (0, *back, d + 1, *(d + 1 + b for b in back))), (n_cols, n_cols))
        frame = frame + total
    return frame


def _box_patches(xp, x, piece, kernel_size, stride, dilation):
    """The patches of a :class:`_SliceBox` for images x (N, C, *spatial):
    (C, *kernel offsets, positions on the leading axis, N, *other positions), axes in
    ``piece.order``, each the taps' strided slices stacked one axis at a time."""
    crop = x[(slice(None), slice(None), *(
        slice(a * s, (b - 1) * s + (k - 1) * dl + 1)
        for (a, b), k, s, dl in zip(piece.box, kernel_size, stride, dilation)))]
    first, *rest = (2 + a for a in piece.order)
    patches = xp.permute_dims(crop, (1, first, 0, *rest))  # (C, crop_lead, N, crops...)
    if rest and rest[-1] != x.ndim - 1:
        # The innermost axis is not x's: one copy in this order, so that the taps' slices
        # below read contiguous runs (measured, 7x7/2 stem: the side strips' frame 2x faster).
        patches = xp.reshape(xp.reshape(patches, (-1,)), patches.shape)
    for i, axis in enumerate(piece.order):
        (a, b), k, s, dl = piece.box[axis], kernel_size[axis], stride[axis], dilation[axis]
        at = 1 if i == 0 else 2 + 2 * i  # where this axis's crop is now
        taps = [patches[(slice(None),) * at + (slice(t * dl, (b - a - 1) * s + t * dl + 1, s),)]
                for t in range(k)]
        patches = xp.stack(taps, axis=1 + i)  # its taps after the earlier axes' taps
    return patches


def _phase_stack(xp, x, plan, stride):
    """The stride phases of x side by side: (N, P * C, *span), phase-major channels.

    Phase p of an axis is x[p::s] cropped or zero-filled to the span. When every phase is
    used and the input covers s * span on every axis (the usual case), this is one
    reshape and transpose instead of P strided copies.
    """
    n_batch, channels, *spatial = x.shape
    d = len(spatial)
    whole = len(plan.phases) == math.prod(stride) and all(
        size >= s * n for size, s, n in zip(spatial, stride, plan.span))
    if whole and max(stride) > 1:
        x = x[(slice(None), slice(None), *(slice(0, s * n) for s, n in zip(stride, plan.span)))]
        split = [v for s, n in zip(stride, plan.span) for v in (n, s)]
        x = xp.reshape(x, (n_batch, channels, *split))  # (N, C, L0, s0, L1, s1, ...)
        order = (0, *(3 + 2 * a for a in range(d)), 1, *(2 + 2 * a for a in range(d)))
        return xp.reshape(xp.permute_dims(x, order),
                          (n_batch, len(plan.phases) * channels, *plan.span))
    device = array_api_compat.device(x)
    images = []
    for phase in plan.phases:
        image = x[(slice(None), slice(None),
                   *(slice(p, None, s) for p, s in zip(phase, stride)))]
        for axis, length in enumerate(plan.span):  # crop or zero-fill each axis to its span
            have = image.shape[2 + axis]
            image = image[(slice(None),) * (2 + axis) + (slice(0, length),)]
            if have < length:
                fill = list(image.shape)
                fill[2 + axis] = length - have
                zeros = xp.zeros(tuple(fill), dtype=x.dtype, device=device)
                image = xp.concat([image, zeros], axis=2 + axis)
        images.append(image)
    return xp.concat(images, axis=1) if len(images) > 1 else images[0]


def _frame_boxes(out, reach):
    """Disjoint boxes of output positions covering those outside [E, L - E) on some axis."""
    boxes = []
    for axis, (n, e) in enumerate(zip(out, reach)):
        if e == 0:
            continue
        inner = [(r, m - r) for m, r in zip(out[:axis], reach[:axis])]
        after = [(0, m) for m in out[axis + 1:]]
        if any(hi <= lo for lo, hi in inner):
            break  # the interior of an earlier axis is empty: its strips covered it all
        for lo, hi in ((0, min(e, n)), (max(e, n - e), n)):
            if hi > lo:
                boxes.append((*inner, (lo, hi), *after))
    return boxes
