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

from ._backends import backend

__all__ = [
    "check_lam",
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
    return xp.matmul(_mT(xp, x), x)


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
    taps = []
    for offsets in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(
            slice(o * d, o * d + st * (n - 1) + 1, st)
            for o, d, st, n in zip(offsets, dilation, stride, out)
        )
        taps.append(x[(slice(None), slice(None), *window)])
    patches = xp.stack(taps, axis=2)  # (N, C, K, *out)
    positions = math.prod(out)
    per_group = channels // groups * len(taps)
    patches = xp.reshape(patches, (n_batch, groups, per_group, positions))
    patches = xp.permute_dims(patches, (1, 0, 3, 2))
    return xp.reshape(patches, (groups, n_batch * positions, per_group))
