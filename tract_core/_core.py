"""TrAct's weight gradient, written once for every array library.

Paper (Petersen, Borgelt, Ermon, NeurIPS 2024), torch layout, W of shape (m, n)::

    dW = G^T X (X^T X / b + lam I)^-1                     (eq. 11)

X: (b, n), one row per patch or token; G = dL/dz: (b, m). The matrix
A = X^T X / b + lam I is symmetric positive definite, so it is factored with Cholesky,
never inverted. When b < n the push-through identity
X (X^T X / b + lam I)^-1 = (X X^T / b + lam I)^-1 X gives the same result from a
b x b system::

    dW = G^T (X X^T / b + lam I)^-1 X

Products and solve run in float64 where the library has it (`statistics_dtype`). With
A = L L^T and the rows whitened, Z = X L^-T, the same gradient is::

    dW = (G^T Z) L^-1

Z's columns have comparable scales whatever A's condition, so its product with G keeps
float32's relative accuracy where G^T X would not: for a float32 layer with many more
outputs than inputs (m >= 4 n) and rows that are cheap to form twice (dense rows,
patches that do not overlap) this takes the large product in float32, with no float64
copy of G.

Leading batch axes are one system each (conv groups). The one rule every adapter
follows is here: which form to solve, how a conv's statistics are gathered, and where
statistics are summed over replicas.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from . import _conv_gram, _patches
from ._backends import Array, Namespace, backend, namespace, statistics_dtype

# replica_sum(gram, count) -> (gram, count), each summed over the data-parallel replicas.
ReplicaSum = Callable[[Array, Any], tuple[Array, Any]]


def check_lam(lam: float) -> float:
    """``lam`` as a float; ValueError unless it is a finite real number > 0."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise ValueError(f"lam must be a finite real number > 0, got {lam!r}")
    value = float(lam)
    if not 0 < value < math.inf:  # comparisons only: torch.compile traces them
        raise ValueError(f"lam must be a finite real number > 0, got {lam!r}")
    return value


def _mT(xp, a):
    return xp.linalg.matrix_transpose(a)


def _in_statistics_dtype(xp, *arrays):
    dtype = statistics_dtype(xp, arrays[0].dtype, backend(xp).device(arrays[0]))
    return [xp.astype(a, dtype, copy=False) for a in arrays]


def gram(x: Array, *, xp: Namespace | None = None) -> Array:
    """Gram matrix of the rows, ``X^T X``.

    Args:
        x: (..., b, n) rows (patches or tokens).

    Returns:
        (..., n, n) in `statistics_dtype`.
    """
    xp = xp or namespace(x)
    (x,) = _in_statistics_dtype(xp, x)
    return _patches.rows_gram(xp, x)


def moments(x: Array, grad_z: Array, *, xp: Namespace | None = None) -> tuple[Array, Array]:
    """``G^T X`` and ``X^T X`` of rows, in `statistics_dtype`: what TrAct sums over rows
    (micro-batches, replicas) before it preconditions once (see `precondition`).

    Args:
        x: (..., b, n) input rows. grad_z: (..., b, m) the loss gradient of the output.

    Returns:
        ``(grad_w, gram)``: (..., m, n) and (..., n, n).
    """
    xp = xp or namespace(x, grad_z)
    xs, gs = _in_statistics_dtype(xp, x, grad_z)
    return xp.matmul(_mT(xp, gs), xs), _patches.rows_gram(xp, xs)


def precondition(grad_w: Array, gram: Array, count: int | Array, lam: float, *,
                 xp: Namespace | None = None) -> Array:
    """Turn a plain weight gradient into TrAct's: ``grad_w (gram / count + lam I)^-1``.

    Args:
        grad_w: (..., m, n) the plain weight gradient ``G^T X``; the solve amplifies its
            rounding too, so compute it in `statistics_dtype`.
        gram: (..., n, n) ``X^T X`` (possibly summed over replicas).
        count: b, the rows the Gram sums over: a number or a 0-d array. With no rows
            (b = 0) grad_w and the Gram are zero, and so is the result.
        lam: finite float > 0.

    Returns:
        (..., m, n) in grad_w's dtype.
    """
    lam = check_lam(lam)
    xp = xp or namespace(grad_w, gram)
    gw, gram = _in_statistics_dtype(xp, grad_w, gram)
    # grad_w A^-1 = (A^-1 grad_w^T)^T since A is symmetric.
    out = _mT(xp, backend(xp).spd_solve(_system(xp, gram, count, lam), _mT(xp, gw)))
    return xp.astype(out, grad_w.dtype, copy=False)


def _system(xp, gram, count, lam):
    """A = X^T X / b + lam I from the Gram and the row count b (0 rows: lam I)."""
    _check_lam_fits(xp, lam, gram.dtype)
    if isinstance(count, numbers.Number):
        count = max(count, 1)  # b = 0: a zero Gram over one row, lam I, a zero result
    else:
        count = xp.where(count > 0, xp.astype(count, gram.dtype), 1.0)
    eye = xp.eye(gram.shape[-1], dtype=gram.dtype, device=backend(xp).device(gram))
    return gram / count + lam * eye


def pack_statistics(grad_w: Array, gram: Array, count: int | Array, lam: float, *,
                    xp: Namespace | None = None) -> Array:
    """``[G^T X, X^T X + lam b I, b]`` as one flat vector: what exact gradient accumulation
    adds up over micro-batches (and all-reduces over replicas) before
    `unpack_and_precondition`.

    Every entry is linear in the rows' contributions, ``lam b I`` included, so any sum or
    mean of such vectors (a scaled loss too) gives the union batch's system
    ``sum (X^T X + lam b I) / sum b = X^T X / b + lam I`` and its TrAct gradient.

    Args:
        grad_w: (g, m/g, n_g) per group. gram: (g, n_g, n_g). count: b, the rows.
        lam: finite float > 0.

    Returns:
        (m n_g + g n_g^2 + 1,) in the Gram's dtype.
    """
    lam = check_lam(lam)
    xp = xp or namespace(grad_w, gram)
    device = backend(xp).device(gram)
    count = xp.asarray(count, dtype=gram.dtype, device=device)
    system = gram + (lam * count) * xp.eye(gram.shape[-1], dtype=gram.dtype, device=device)
    return xp.concat([xp.reshape(xp.astype(grad_w, gram.dtype), (-1,)),
                      xp.reshape(system, (-1,)), xp.reshape(count, (1,))], axis=0)


def packed_size(m: int, n_g: int, groups: int = 1) -> int:
    """The length of `pack_statistics`'s vector for m outputs, g groups of n_g inputs."""
    return m * n_g + groups * n_g * n_g + 1


def check_packed_shape(shape: Sequence[int], m: int, n_g: int, groups: int = 1) -> None:
    """ValueError unless ``shape`` is ``(packed_size(m, n_g, groups),)``: statistics given
    to a layer for exact accumulation must match its weight and groups."""
    size = packed_size(m, n_g, groups)
    if tuple(shape) != (size,):
        raise ValueError(f"statistics must have shape ({size},), tract_core.packed_size of "
                         f"this weight and groups; got {tuple(shape)}")


def unpack_and_precondition(packed: Array, m: int, n_g: int, groups: int = 1, *,
                            xp: Namespace | None = None) -> Array:
    """TrAct's gradient from summed `pack_statistics` vectors, per group:
    ``(sum G^T X) (sum (X^T X + lam b I) / sum b)^-1``, (g, m/g, n_g), in packed's dtype.
    With no rows (sum b = 0) everything is zero, and so is the result."""
    xp = xp or namespace(packed)
    (sums,) = _in_statistics_dtype(xp, packed)
    split, count = m * n_g, sums[-1]
    grad_w = xp.reshape(sums[:split], (groups, m // groups, n_g))
    system = xp.reshape(sums[split:-1], (groups, n_g, n_g))
    empty = xp.astype(count == 0, sums.dtype)  # b = 0: the identity, a zero result
    eye = xp.eye(n_g, dtype=sums.dtype, device=backend(xp).device(sums))
    system = system / (count + empty) + empty * eye
    out = _mT(xp, backend(xp).spd_solve(system, _mT(xp, grad_w)))
    return xp.astype(out, packed.dtype, copy=False)


def to_channels_last_kernel(grad_w: Array, kernel_shape: Sequence[int], *,
                            xp: Namespace | None = None) -> Array:
    """A per-group weight gradient in the kernel layout of Flax, Keras and TensorFlow.

    Args:
        grad_w: (g, M/g, C/g * prod(window)), each row in torch's (C/g, *window) order
            (as `unpack_and_precondition` returns it).
        kernel_shape: (n, m) for a dense kernel, or (*window, C/g, M).

    Returns:
        grad_w with shape ``kernel_shape``.
    """
    xp = xp or namespace(grad_w)
    *window, c_g, m = kernel_shape
    groups = grad_w.shape[0]
    if not window:  # dense: (1, m, n) -> (n, m)
        return xp.permute_dims(xp.reshape(grad_w, (m, c_g)), (1, 0))
    out = xp.reshape(grad_w, (groups, m // groups, c_g, *window))
    out = xp.permute_dims(out, (*range(3, 3 + len(window)), 2, 0, 1))
    return xp.reshape(out, tuple(kernel_shape))


def _check_lam_fits(xp, lam, dtype):
    if lam >= float(xp.finfo(dtype).max):
        raise ValueError(f"lam must be below the largest {dtype}, the solve's dtype; got {lam!r}")


def _push_through(xp, x, grad_z, lam):
    """``G^T (X X^T / b + lam I)^-1 X``: the b x b form, for b < n rows."""
    x, grad_z = _in_statistics_dtype(xp, x, grad_z)
    _check_lam_fits(xp, lam, x.dtype)
    b = x.shape[-2]
    eye = xp.eye(b, dtype=x.dtype, device=backend(xp).device(x))
    coef = backend(xp).spd_solve(xp.matmul(x, _mT(xp, x)) / b + lam * eye, grad_z)
    return xp.matmul(_mT(xp, coef), x)


def uses_push_through(rows: int | Array, n: int, replica_sum: ReplicaSum | None = None) -> bool:
    """The one rule for the form: the b x b system when this replica has fewer rows b
    than columns n (b known now) and nothing is summed over replicas (that would need
    every replica's rows); else the n x n system."""
    return replica_sum is None and isinstance(rows, int) and 0 < rows < n


def _uses_whitened_rows(xp, n, m, dtype):
    """The rule for the n x n form's product: G^T Z in float32 (see above) for a layer of
    float32 or narrower ``dtype`` whose statistics are float64, when m >= 4 n: half the
    cost of a float64 G^T X, and its float64 copy of G, then clearly outweigh forming the
    rows a second time and Z's triangular solve (b n^2 / 2). Else G^T X in the
    statistics dtype."""
    return (m >= 4 * n and xp.finfo(dtype).bits <= 32
            and xp.finfo(statistics_dtype(xp, dtype)).bits == 64)


def _tract(xp, rows, n, lam, moments, rows_and_grads, replica_sum, whitened=None):
    """TrAct's gradient by the rules above, from ``moments()`` = (G^T X, X^T X) for the
    n x n form, or, where the rows are cheap to form twice, ``whitened`` = (gram,
    product): ``gram()`` and ``product(L)`` = Z^T G. The Gram and row count are summed
    by ``replica_sum(gram, count)`` (data parallelism: the replicas' gradients are then
    summed as a plain layer's are)."""
    if uses_push_through(rows, n, replica_sum):
        return _push_through(xp, *rows_and_grads(), lam)
    if whitened is None:
        plain, gram_ = moments()
        if replica_sum is not None:
            gram_, rows = replica_sum(gram_, rows)
        return precondition(plain, gram_, rows, lam, xp=xp)
    gram_fn, product = whitened
    gram_ = gram_fn()
    if replica_sum is not None:
        gram_, rows = replica_sum(gram_, rows)
    found = backend(xp)
    factor = found.cholesky(_system(xp, gram_, rows, lam))
    # dW^T = L^-T Z^T G
    return _mT(xp, found.solve_triangular(factor, product(factor), transpose=True))


def weight_grad(x: Array, grad_z: Array, lam: float = 0.1, *,
                replica_sum: ReplicaSum | None = None, xp: Namespace | None = None) -> Array:
    """TrAct's weight gradient ``G^T X (X^T X / b + lam I)^-1`` (torch layout).

    Args:
        x: (..., b, n) input rows, one per patch or token (leading axes: one system each).
        grad_z: (..., b, m) the loss gradient with respect to the layer's output.
        lam: finite float > 0 (paper: 0.1; 0.2 for long runs).
        replica_sum: ``(gram, count) -> (gram, count)`` summed over data-parallel
            replicas, or None (one replica).

    Returns:
        (..., m, n) in x's dtype and on its device. Statistics in float64 where the
        library has it; a float32 x with m >= 4 n takes the product of its whitened
        rows in float32 (module docstring): within a few float32 roundings either way.
    """
    lam = check_lam(lam)
    xp = xp or namespace(x, grad_z)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., b, n), got shape {tuple(x.shape)}")
    if grad_z.ndim != x.ndim or grad_z.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"grad_z must have shape (..., b, m) matching x {tuple(x.shape)} in "
                         f"all but the last axis, got shape {tuple(grad_z.shape)}")
    statistics_dtype(xp, grad_z.dtype, name="grad_z")
    if x.dtype != grad_z.dtype:
        raise TypeError(f"x and grad_z must share a dtype, got {x.dtype} and {grad_z.dtype}")
    rows = backend(xp).batch_size(x) if x.ndim == 2 else x.shape[-2]
    n, m = x.shape[-1], grad_z.shape[-1]
    whitened = None
    if _uses_whitened_rows(xp, n, m, x.dtype):
        whitened = (lambda: gram(x, xp=xp),
                    lambda factor: _patches.whitened_product(
                        xp, _mT(xp, xp.astype(x, factor.dtype)), grad_z, factor))
    out = _tract(xp, rows, n, lam, lambda: moments(x, grad_z, xp=xp),
                 lambda: _in_statistics_dtype(xp, x, grad_z), replica_sum, whitened)
    return xp.astype(out, x.dtype, copy=False)


def conv_moments(x: Array, grad_z: Array, kernel_size: Sequence[int], stride: Sequence[int],
                 dilation: Sequence[int], groups: int = 1, *,
                 xp: Namespace | None = None) -> tuple[Array, Array]:
    """A convolution's ``G^T X`` and ``X^T X``, per group, in `statistics_dtype`.

    Explicit patches where they have few entries (stems) or do not overlap (ViT);
    otherwise the library's conv weight-gradient kernel and the structured Gram.

    Args:
        x: (N, C, *spatial) channels-first input, already padded.
        grad_z: (N, M, *out) the loss gradient with respect to the output.
        kernel_size, stride, dilation: one int per spatial axis. groups: feature groups.

    Returns:
        ``(grad_w, gram)``: (groups, M/g, n_g) and (groups, n_g, n_g).
    """
    xp = xp or namespace(x, grad_z)
    n_g = x.shape[1] // groups * math.prod(kernel_size)
    found, geometry = backend(xp), (kernel_size, stride, dilation, groups)
    if n_g <= found.few_patch_entries or _patches.disjoint_patches(*geometry[:3]):
        return _patches.patch_moments(x, grad_z, *geometry, xp=xp)  # cast chunk by chunk
    x, grad_z = _in_statistics_dtype(xp, x, grad_z)
    plain = found.filter_grad(x, grad_z, *geometry)
    images = max(1, (1 << 24) // math.prod(x.shape[1:]))  # bounds the input per call
    (gram_,) = found.sum_over_chunks(
        lambda part: (_conv_gram.conv_gram(part, *geometry, xp=xp),), (x,), images)
    return xp.reshape(plain, (groups, -1, n_g)), gram_


def conv_weight_grad(x: Array, grad_z: Array, kernel_size: Sequence[int],
                     stride: Sequence[int], dilation: Sequence[int], groups: int = 1,
                     lam: float = 0.1, *, replica_sum: ReplicaSum | None = None,
                     xp: Namespace | None = None) -> Array:
    """TrAct's weight gradient of a convolution, per group (torch layout).

    Args:
        x: (N, C, *spatial) channels-first input, already padded.
        grad_z: (N, M, *out) the loss gradient with respect to the output.
        kernel_size, stride, dilation: one int per spatial axis. groups: feature groups.
        lam, replica_sum: as for `weight_grad`; b = N x output positions.

    Returns:
        (groups, M/g, n_g), n_g = C/g x prod(kernel_size), in x's dtype:
        ``weight.reshape(groups, M/g, n_g)``'s layout. Patches that do not overlap take
        the whitened rows' product as `weight_grad` does.
    """
    lam = check_lam(lam)
    xp = xp or namespace(x, grad_z)
    m, positions = grad_z.shape[1], math.prod(grad_z.shape[2:])
    n_g = x.shape[1] // groups * math.prod(kernel_size)
    rows = backend(xp).batch_size(x) * positions

    def rows_and_grads():
        patches = _patches.conv_patches(x, kernel_size, stride, dilation, groups, xp=xp)
        grads = xp.reshape(grad_z, (-1, groups, m // groups, positions))
        grads = xp.reshape(xp.permute_dims(grads, (1, 0, 3, 2)), (groups, -1, m // groups))
        return patches, grads

    def moments():
        return conv_moments(x, grad_z, kernel_size, stride, dilation, groups, xp=xp)

    geometry = (kernel_size, stride, dilation, groups)
    whitened = None
    if _patches.disjoint_patches(*geometry[:3]) and _uses_whitened_rows(xp, n_g, m // groups,
                                                                        x.dtype):
        whitened = (lambda: _patches.disjoint_patch_gram(x, *geometry, xp=xp),
                    lambda factor: _patches.disjoint_whitened_product(x, grad_z, factor,
                                                                      *geometry, xp=xp))
    out = _tract(xp, rows, n_g, lam, moments, rows_and_grads, replica_sum, whitened)
    return xp.astype(out, x.dtype, copy=False)
