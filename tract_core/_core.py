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
Inputs in float16/bfloat16 are accumulated and solved in float32; results come back in
the input's dtype, on the input's device.
"""

from __future__ import annotations

import itertools
import math
import numbers

import array_api_compat
import numpy as np

from ._backends import backend

__all__ = [
    "check_lam",
    "conv_gram",
    "conv_output_shape",
    "conv_patches",
    "gram",
    "precondition",
    "precondition_rows",
    "weight_grad",
]


def check_lam(lam) -> float:
    """``lam`` as a float; ValueError unless it is a finite real number > 0."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise ValueError(f"lam must be a finite real number > 0, got {lam!r}")
    value = float(lam)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"lam must be a finite real number > 0, got {lam!r}")
    return value


def _namespace(*arrays, xp=None):
    return xp if xp is not None else array_api_compat.array_namespace(*arrays)


def _compute_dtype(xp, dtype):
    """float16/bfloat16 -> float32; float32/float64 stay."""
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"expected a real floating dtype, got {dtype}")
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


def _eye(xp, size, like):
    return xp.eye(size, dtype=like.dtype, device=array_api_compat.device(like))


def _mT(xp, a):
    return xp.linalg.matrix_transpose(a)


def gram(x, *, xp=None):
    """Gram matrix of the rows, ``X^T X``.

    Args:
        x: (..., b, n) rows (patches or tokens).

    Returns:
        (..., n, n) in the compute dtype (float32 for float16/bfloat16 input).
    """
    xp = _namespace(x, xp=xp)
    x = xp.astype(x, _compute_dtype(xp, x.dtype), copy=False)
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


def precondition(grad_w, gram, count, lam, *, xp=None):
    """Turn a standard weight gradient into TrAct's: ``grad_w (gram / count + lam I)^-1``.

    Args:
        grad_w: (..., m, n) the plain layer's weight gradient, ``G^T X``.
        gram: (..., n, n) ``X^T X`` from :func:`gram` (possibly summed over replicas).
        count: b, the number of rows the Gram sums over (a number or a 0-d array).
        lam: finite float > 0.

    Returns:
        (..., m, n) in grad_w's dtype.
    """
    lam = check_lam(lam)
    xp = _namespace(grad_w, gram, xp=xp)
    dtype = _compute_dtype(xp, gram.dtype)
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
    dtype = _compute_dtype(xp, x.dtype)
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
    if x.dtype != grad_z.dtype:
        raise TypeError(f"x and grad_z must share a dtype, got {x.dtype} and {grad_z.dtype}")
    b, n = x.shape[-2], x.shape[-1]
    dtype = _compute_dtype(xp, x.dtype)
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
    """
    xp = _namespace(x, xp=xp)
    n_batch, channels, *spatial = x.shape
    out = conv_output_shape(spatial, kernel_size, stride, dilation)
    if any(o <= 0 for o in out):
        raise ValueError(f"kernel_size {tuple(kernel_size)} with dilation {tuple(dilation)} "
                         f"does not fit the padded input of spatial shape {tuple(spatial)}")
    per_group = channels // groups * math.prod(kernel_size)
    positions = math.prod(out)
    if all(k <= st and (k == 1 or d == 1) and n * st <= size
           for k, st, d, n, size in zip(kernel_size, stride, dilation, out, spatial)):
        # Disjoint patches (ViT): a reshape, no gather. (N, C, L0, s0, L1, s1, ...)
        split = [v for n, st in zip(out, stride) for v in (n, st)]
        tiles = x[(slice(None), slice(None), *(slice(0, n * st) for n, st in zip(out, stride)))]
        tiles = xp.reshape(tiles, (n_batch, channels, *split))
        tiles = tiles[(slice(None), slice(None),
                       *(v for k in kernel_size for v in (slice(None), slice(0, k))))]
        d = len(out)
        order = (0, *(2 + 2 * a for a in range(d)), 1, *(3 + 2 * a for a in range(d)))
        patches = xp.reshape(xp.permute_dims(tiles, order),
                             (n_batch * positions, groups, per_group))
        return xp.permute_dims(patches, (1, 0, 2))
    taps = []
    for offsets in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(
            slice(o * d, o * d + st * (n - 1) + 1, st)
            for o, d, st, n in zip(offsets, dilation, stride, out)
        )
        taps.append(x[(slice(None), slice(None), *window)])
    patches = xp.stack(taps, axis=2)  # (N, C, K, *out)
    patches = xp.reshape(patches, (n_batch, groups, per_group, positions))
    patches = xp.permute_dims(patches, (1, 0, 3, 2))
    return xp.reshape(patches, (groups, n_batch * positions, per_group))


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


def _tap_phases(kernel_size, stride, dilation):
    """Per axis, each tap t's (phase, offset): input t * dilation = stride * offset + phase."""
    return [[((t * d) % s, (t * d) // s) for t in range(k)]
            for k, s, d in zip(kernel_size, stride, dilation)]


def conv_gram(x, kernel_size, stride, dilation, groups=1, *, correlate=None, xp=None):
    """Gram ``X^T X`` of a convolution's patches without extracting every patch.

    Overlapping patches share their products: split x into its stride phases, so that
    tap t of an axis reads phase (t d mod s) at offset e_t = floor(t d / s) with unit
    stride. Entry ((c1, t1), (c2, t2)) is then a correlation of two phase images at the
    shift e_t2 - e_t1 summed over the window [e_t1, e_t1 + L) of each axis. The part of
    every window common to all taps, [E, L) with E the largest offset, is one
    correlation per shift for all entries at once (``correlate``, a framework's conv
    weight-gradient kernel); the rest lies on a frame of output positions at most E
    wide, whose patches are extracted and added with a mask. Disjoint patches (ViT,
    E = 0) are a reshape and one symmetric matmul.

    Args:
        x: (N, C, *spatial) channels-first, already padded.
        kernel_size, stride, dilation: one int per spatial axis. groups: feature groups.
        correlate: ``correlate(g, y, kernel_shape)`` -> (I, J, *kernel_shape) with
            ``out[i, j, u] = sum_{n, q} g[n, i, q] y[n, j, q + u]``; default: one matmul
            per shift.

    Returns:
        (groups, n_g, n_g) in the compute dtype, equal to ``gram(conv_patches(x, ...))``.
    """
    xp = _namespace(x, xp=xp)
    x = xp.astype(x, _compute_dtype(xp, x.dtype), copy=False)
    if groups > 1:
        size = x.shape[1] // groups
        return xp.concat([conv_gram(x[:, i * size:(i + 1) * size], kernel_size, stride,
                                    dilation, 1, correlate=correlate, xp=xp)
                          for i in range(groups)], axis=0)
    n_batch, channels, *spatial = x.shape
    out = conv_output_shape(spatial, kernel_size, stride, dilation)
    taps = _tap_phases(kernel_size, stride, dilation)
    reach = [max(e for _, e in axis) for axis in taps]  # E per axis
    if not any(reach) or any(n <= e for n, e in zip(out, reach)):
        # No overlap between taps' windows (e.g. ViT patches), or no common window.
        return gram(conv_patches(x, kernel_size, stride, dilation, 1, xp=xp), xp=xp)
    span = [n + e for n, e in zip(out, reach)]  # phase-image length every tap fits in
    phases = [sorted({p for p, _ in axis}) for axis in taps]
    images = []
    for phase in itertools.product(*phases):
        image = x[(slice(None), slice(None),
                   *(slice(p, None, s) for p, s in zip(phase, stride)))]
        for axis, length in enumerate(span):  # crop or zero-fill each axis to its span
            have = image.shape[2 + axis]
            image = image[(slice(None),) * (2 + axis) + (slice(0, length),)]
            if have < length:
                fill = list(image.shape)
                fill[2 + axis] = length - have
                zeros = xp.zeros(tuple(fill), dtype=x.dtype, device=array_api_compat.device(x))
                image = xp.concat([image, zeros], axis=2 + axis)
        images.append(image)
    stacked = xp.concat(images, axis=1) if len(images) > 1 else images[0]  # (N, P*C, *span)
    width = stacked.shape[1]
    common = stacked[(slice(None), slice(None), *(slice(e, n) for e, n in zip(reach, out)))]
    shifts = tuple(2 * e + 1 for e in reach)
    core = (correlate or (lambda g, y, k: _correlate_by_slices(xp, g, y, k)))(
        common, stacked, shifts)
    # Gather core[(phase1, c1), (phase2, c2), e2 - e1 + E] for every pair of columns.
    phase_of = {p: i for i, p in enumerate(itertools.product(*phases))}
    tap_list = list(itertools.product(*taps))  # row-major over kernel offsets
    tap_phase = np.array([phase_of[tuple(p for p, _ in tap)] for tap in tap_list])
    tap_offset = np.array([[e for _, e in tap] for tap in tap_list]).reshape(len(tap_list), -1)
    chan = np.arange(channels)
    row_index = (tap_phase[None, :] * channels + chan[:, None]).reshape(-1)  # (c, t) order
    offset = np.broadcast_to(tap_offset[None], (channels, *tap_offset.shape)).reshape(
        -1, len(out))
    flat = row_index[:, None] * width + row_index[None, :]
    for axis, e in enumerate(reach):
        flat = flat * (2 * e + 1) + (offset[None, :, axis] - offset[:, None, axis] + e)
    core_flat = xp.reshape(core, (-1,))
    index = xp.asarray(flat.reshape(-1), device=array_api_compat.device(x))
    result = xp.reshape(xp.take(core_flat, index, axis=0), flat.shape)
    # The frame: output positions some of whose taps read outside the common window.
    for box in _frame_boxes(out, reach):
        start = [lo * s for (lo, _), s in zip(box, stride)]
        stop = [(hi - 1) * s + (k - 1) * d + 1
                for (_, hi), s, k, d in zip(box, stride, kernel_size, dilation)]
        crop = x[(slice(None), slice(None), *(slice(a, b) for a, b in zip(start, stop)))]
        patches = conv_patches(crop, kernel_size, stride, dilation, 1, xp=xp)[0]
        mask = _frame_mask(box, out, tap_offset)  # (positions, taps)
        mask = xp.asarray(mask[:, None, :], dtype=x.dtype, device=array_api_compat.device(x))
        per_image = (n_batch, mask.shape[0], channels, mask.shape[2])
        masked = xp.reshape(xp.reshape(patches, per_image) * mask, patches.shape)
        result = result + xp.matmul(_mT(xp, masked), patches)
    result = (result + _mT(xp, result)) / 2
    return result[None, ...]


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


def _frame_mask(box, out, tap_offset):
    """mask[p, t] = 1 where tap t at output p reads outside the common window [E, L)."""
    reach = tap_offset.max(axis=0)
    grids = np.meshgrid(*(np.arange(lo, hi) for lo, hi in box), indexing="ij")
    positions = np.stack([g.reshape(-1) for g in grids], axis=1)  # (P, d)
    q = positions[:, None, :] + tap_offset[None, :, :]  # (P, taps, d)
    outside = (q < reach) | (q >= np.asarray(out))
    return outside.any(axis=-1).astype(np.float64)
