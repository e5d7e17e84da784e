"""JAX adapter: ``dense`` and ``conv`` whose kernel gradient is TrAct's.

    >>> import jax, jax.numpy as jnp, tract_core.jax as tj
    >>> z = tj.conv(images, kernel, bias, strides=1, padding="SAME", lam=0.1)

Both functions are ``jax.custom_vjp`` primitives. Their forward value and their input and
bias cotangents come from ``jax.vjp`` of the plain op (``lax.dot_general`` or
``lax.conv_general_dilated`` plus a bias add, exactly as Flax calls them), so they are
bitwise what the plain layer gives. Only the kernel cotangent changes: it is
``G^T X (X^T X / b + lam I)^-1`` from :mod:`tract_core`, per feature group, translated
to the Flax kernel layout (``(n, m)`` for dense, ``(*window, C / groups, M)`` for conv).

Batch statistics: the Gram sums over every row of the batch the op is called on (every
token for dense, every receptive field for conv). A per-example function under
``jax.vmap`` (Equinox style) gets the same kernel gradient as one call on the stacked
batch: the backward's kernel step is a ``jax.custom_batching.custom_vmap`` function whose
batching rule pools the vmapped examples into one Gram. Under ``jax.vmap(jax.grad(...))``
each example's gradient is its own share ``G_i^T X_i A^-1``, with A from the whole vmapped
batch, so the per-example gradients sum to the batch gradient. A vmapped *kernel* (a
stack of separate layers, e.g. an ensemble) keeps separate statistics per kernel.

Data parallelism (``axis_name``): by default each device's statistics are its own shard's
(unsynced: the Gram and b are local, so the averaged gradient is *not* the full-batch
TrAct gradient). With ``axis_name`` naming the batch axis of an enclosing
``jax.shard_map`` or ``jax.pmap``, the backward ``psum``s the Gram (n x n per group) over
that axis and uses b = local rows x axis size (every device runs the same shapes), then
each device preconditions its own plain kernel gradient ``G_d^T X_d`` with that global
matrix (always the n x n form, whatever the local b). Each device's kernel cotangent is
thus its share of the full-batch gradient, and the shares *sum* to it. The forward and
the input/bias cotangents are untouched. Recipes, with each device's loss its part of the
full-batch loss (a global mean: local sum / global batch size)::

    # shard_map (check_vma=True, the default), kernel replicated: in_specs P().
    # The kernel is cast to device-varying before the op; that cast transposes to a
    # psum, so jax.grad of a replicated kernel is already the summed (full-batch)
    # gradient: do NOT psum it again (psum of a replicated value multiplies by the
    # number of devices).
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    def step(kernel, x):
        return jax.grad(lambda k: local_loss(tj.dense(x, k, axis_name="data")))(kernel)

    # Or differentiate outside: jax.grad of shard_map(lambda k, x:
    #     lax.psum(local_loss(...), "data"), out_specs=P()) gives the same.
    # shard_map(check_vma=False) and pmap: per-device gradients, psum them yourself:
    grads = jax.pmap(lambda k, x: lax.psum(jax.grad(local_loss_fn)(k, x), "data"),
                     axis_name="data", in_axes=(None, 0))(kernel, x_shards)

Under ``jax.vmap`` inside the shard_map the vmapped examples and the devices pool into
one Gram; ``axis_name`` naming a ``jax.vmap``'s own axis raises NotImplementedError.
Padding or masked rows are counted as rows, as in the unsynced case.

Everything is traceable: no host callbacks, shapes and options are static, ``lam`` is a
static Python float checked when the op is called.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

import tract_core as _tc
from tract_core._args import check_bias_shape, conv_padding, fft_size, is_int, per_axis

__all__ = ["conv", "dense"]



# --------------------------------------------------------------------------- layers
# A layer object holds the static options (hashable: one custom_vjp op is built per
# distinct configuration, see _tract_op) and translates between its arrays and the core's
# layout: per feature group g, rows X (b, n) and torch-layout weight gradients (m, n).
# Backward arrays carry a leading segment axis S (vmapped examples, see _pooled_over_vmap).


def _compute_dtype(*dtypes):
    """The dtype of TrAct's products, G^T X and the Gram, and of the solve: the core's
    statistics dtype (float64 while the backward is traced, see _tract_op), since the
    solve amplifies their rounding errors."""
    return _tc.statistics_dtype(jnp, jnp.result_type(*dtypes))


@dataclasses.dataclass(frozen=True)
class _Dense:
    """``x @ kernel + bias`` over the last axis; kernel (n, m)."""

    lam: float
    precision: object = None
    axis_name: object = None  # see _synced_statistics

    def apply(self, x, kernel, bias):
        # The very call nnx.Linear / nn.Dense make, so the forward is theirs bit for bit.
        z = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision)
        if bias is not None:
            z = z + jnp.reshape(bias, (1,) * (z.ndim - 1) + (-1,))
        return z

    def count(self, x, kernel):
        """(b, n): rows over all segments (every token is a row), row width."""
        return math.prod(x.shape[:-1]), kernel.shape[0]

    def rows(self, x, grad_z, kernel):
        """x (S, ..., n), grad_z (S, ..., m) -> rows (1, S, r, n), grads (1, S, r, m)."""
        n, m = kernel.shape
        segments = x.shape[0]
        dtype = _compute_dtype(x.dtype, grad_z.dtype)
        per_segment = math.prod(x.shape[1:-1])  # spelled out: it may be 0
        rows = jnp.reshape(x, (1, segments, per_segment, n)).astype(dtype)
        grads = jnp.reshape(grad_z, (1, segments, per_segment, m)).astype(dtype)
        return rows, grads

    def plain_grads(self, x, grad_z, kernel):
        """(1, S, m, n): each segment's plain weight gradient G_s^T X_s."""
        rows, grads = self.rows(x, grad_z, kernel)
        return jnp.einsum("gsrm,gsrn->gsmn", grads, rows)

    def gram(self, x, kernel):
        """(1, n, n): X^T X over the rows of all segments."""
        rows = jnp.reshape(x, (1, math.prod(x.shape[:-1]), kernel.shape[0]))
        # With the kernel's dtype: an integer x is promoted, as lax.dot_general does.
        return _tc.gram(rows.astype(_compute_dtype(x.dtype, kernel.dtype)))

    def statistics(self, x, grad_z, kernel):
        """(plain_grads, gram): each segment's G_s^T X_s and X^T X over all segments."""
        return self.plain_grads(x, grad_z, kernel), self.gram(x, kernel)

    def to_kernel_layout(self, grads, kernel):
        """(1, S, m, n) torch layout -> (S, n, m) Flax layout."""
        return jnp.swapaxes(grads[0], -1, -2)


def _channels_last_dimension_numbers(ndim):
    """(N, *spatial, C) input, (*window, C/g, M) kernel: what Flax passes to lax."""
    lhs = (0, ndim - 1, *range(1, ndim - 1))
    rhs = (ndim - 1, ndim - 2, *range(ndim - 2))
    return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def _correlate(g, y, shifts):
    """out[i, j, u] = sum_{n, q} g[n, i, q] y[n, j, q + u] for u < shifts, the correlation
    the core's conv_gram asks for. g (N, I, *inner), y (N, J, *outer), outer = inner +
    shifts - 1.

    As a convolution this has a window as large as the image and N as the contracted
    feature axis, a shape XLA's CPU convolutions slow down on as N grows; past a few
    hundred images x shifts (measured) FFTs are faster there. GPUs take the convolution.
    """
    direct = jax.default_backend() != "cpu" or g.shape[0] * math.prod(shifts) <= 300
    return (_correlate_by_conv if direct else _correlate_by_fft)(g, y, shifts)


def _correlate_by_conv(g, y, shifts):
    d = len(shifts)
    spatial = tuple(range(2, 2 + d))
    # y as a batch of J images with N features, g as I filters of N features.
    numbers = lax.ConvDimensionNumbers((1, 0, *spatial), (1, 0, *spatial), (1, 0, *spatial))
    return lax.conv_general_dilated(y, g, (1,) * d, "VALID", dimension_numbers=numbers)


def _correlate_by_fft(g, y, shifts):
    # Transforms at least y's size, so no lag u < shifts wraps around; sizes with small
    # prime factors only, which FFTs are fast on. The sum over n is one product per
    # frequency.
    size = tuple(fft_size(s) for s in y.shape[2:])
    axes = tuple(range(2, y.ndim))
    spectrum = jnp.einsum("ni...,nj...->ij...",
                          jnp.conj(jnp.fft.rfftn(g, s=size, axes=axes)),
                          jnp.fft.rfftn(y, s=size, axes=axes))
    out = jnp.fft.irfftn(spectrum, s=size, axes=axes)
    return out[(slice(None), slice(None), *(slice(0, k) for k in shifts))]


@dataclasses.dataclass(frozen=True)
class _Conv:
    """Channels-last ``lax.conv_general_dilated`` plus bias."""

    lam: float
    strides: tuple
    padding: str | tuple  # one of PAD_STRINGS, or ((lo, hi), ...) per spatial axis
    dilation: tuple
    groups: int
    precision: object = None
    axis_name: object = None  # see _synced_statistics

    def apply(self, x, kernel, bias, precision=None):
        z = lax.conv_general_dilated(
            x, kernel, self.strides, self.padding, rhs_dilation=self.dilation,
            dimension_numbers=_channels_last_dimension_numbers(x.ndim),
            feature_group_count=self.groups,
            precision=self.precision if precision is None else precision,
        )
        if bias is not None:
            z = z + jnp.reshape(bias, (1,) * (z.ndim - 1) + (-1,))
        return z

    def pads(self, spatial, window):
        """(lo, hi) per spatial axis, resolved the way lax resolves 'SAME' etc."""
        if isinstance(self.padding, str):
            dilated = [d * (k - 1) + 1 for k, d in zip(window, self.dilation)]
            return tuple(lax.padtype_to_pads(spatial, dilated, self.strides, self.padding))
        return self.padding

    def padded_channels_first(self, x, kernel):
        """x (S, N, *spatial, C) -> (S * N, C, *padded) in the compute dtype: the core's
        conv input layout."""
        segments, batch, *spatial, channels = x.shape
        dtype = _compute_dtype(x.dtype)
        x = jnp.reshape(x, (segments * batch, *spatial, channels)).astype(dtype)
        # lax.pad also takes negative (cropping) pads, as lax's conv does.
        pads = self.pads(spatial, kernel.shape[:-2])
        x = lax.pad(x, jnp.zeros((), dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads),
                                              (0, 0, 0)])
        return jnp.moveaxis(x, -1, 1)

    def count(self, x, kernel):
        """(b, n): receptive fields over all segments, row width C/g * prod(window)."""
        segments, batch, *spatial, _ = x.shape
        window = kernel.shape[:-2]
        padded = [s + lo + hi for s, (lo, hi) in zip(spatial, self.pads(spatial, window))]
        out = _tc.conv_output_shape(padded, window, self.strides, self.dilation)
        return segments * batch * math.prod(out), kernel.shape[-2] * math.prod(window)

    def rows(self, x, grad_z, kernel):
        """x (S, N, *spatial, C), grad_z (S, N, *out, M) -> rows (g, S, N*L, C/g*K), grads
        (g, S, N*L, M/g): the core's patch layout, torch weight column order."""
        segments = x.shape[0]
        g, m_g = self.groups, kernel.shape[-1] // self.groups
        patches = _tc.conv_patches(self.padded_channels_first(x, kernel), kernel.shape[:-2],
                                   self.strides, self.dilation, g)  # (g, S*N*L, n_g)
        per_segment = patches.shape[1] // max(segments, 1)  # spelled out: it may be 0
        rows = jnp.reshape(patches, (g, segments, per_segment, patches.shape[-1]))
        grads = jnp.reshape(grad_z.astype(patches.dtype), (segments, per_segment, g, m_g))
        return rows, jnp.transpose(grads, (2, 0, 1, 3))

    def plain_grads(self, x, grad_z, kernel):
        """(g, S, M/g, C/g*K): each segment's plain weight gradient, from lax's own conv
        transpose (in the compute dtype, full precision)."""
        dtype = _compute_dtype(x.dtype, grad_z.dtype)

        def one_segment(x, grad_z):
            conv = functools.partial(self.apply, x.astype(dtype), bias=None,
                                     precision=lax.Precision.HIGHEST)
            return jax.vjp(conv, kernel.astype(dtype))[1](grad_z.astype(dtype))[0]

        if x.shape[0] == 1:
            plain = one_segment(x[0], grad_z[0])[None]
        else:
            plain = jax.vmap(one_segment)(x, grad_z)
        return self.from_kernel_layout(plain)

    def gram(self, x, kernel):
        """(g, n, n): X^T X per group over the receptive fields of all segments, from the
        core's structured conv Gram (no patch matrix)."""
        return _tc.conv_gram(self.padded_channels_first(x, kernel), kernel.shape[:-2],
                             self.strides, self.dilation, self.groups, correlate=_correlate,
                             xp=jnp)

    def statistics(self, x, grad_z, kernel):
        """(plain_grads, gram) as those methods give them. Disjoint patches (ViT) with one
        segment take both from one patch matrix, the input reordered: two matmuls, which
        XLA's CPU runs several times faster than its conv transpose (no dilation or
        cropping there, so the plain gradient is the same sum)."""
        window = kernel.shape[:-2]
        if x.shape[0] > 1 or not _tc.disjoint_patches(window, self.strides, self.dilation):
            return self.plain_grads(x, grad_z, kernel), self.gram(x, kernel)
        grad_z = jnp.moveaxis(grad_z[0], -1, 1).astype(_compute_dtype(x.dtype, grad_z.dtype))
        plain, gram, _ = _tc.conv_moments(self.padded_channels_first(x, kernel), grad_z,
                                          window, self.strides, self.dilation, self.groups,
                                          xp=jnp)
        return plain[:, None], gram

    def from_kernel_layout(self, grads):
        """(S, *window, C/g, M) Flax layout -> (g, S, M/g, C/g*K) torch layout per group."""
        segments, *window, c_g, m = grads.shape
        g, d = self.groups, len(window)
        grads = jnp.reshape(grads, (segments, *window, c_g, g, m // g))
        grads = jnp.transpose(grads, (d + 2, 0, d + 3, d + 1, *range(1, d + 1)))
        return jnp.reshape(grads, (g, segments, m // g, c_g * math.prod(window)))

    def to_kernel_layout(self, grads, kernel):
        """(g, S, M/g, C/g*K) torch layout per group -> (S, *window, C/g, M) Flax layout."""
        *window, c_g, m = kernel.shape
        g, segments, m_g, _ = grads.shape
        grads = jnp.reshape(grads, (g, segments, m_g, c_g, *window))
        d = len(window)
        # -> (S, *window, C/g, g, M/g); output channel = group * (M/g) + j, as in lax.
        grads = jnp.transpose(grads, (1, *range(4, 4 + d), 3, 0, 2))
        return jnp.reshape(grads, (segments, *window, c_g, m))


# --------------------------------------------------------------------------- backward


def _segment_weight_grads(layer, x, grad_z, kernel):
    """Each segment's share of TrAct's weight gradient, statistics pooled over all rows.

    Args:
        layer: a _Dense or _Conv.
        x, grad_z: the layer's input and output gradient, leading segment axis S
            (vmapped examples).
        kernel: the layer's kernel (for shapes).

    Returns:
        (g, S, m, n): ``G_s^T X_s (X^T X / b + lam I)^-1`` per group, X and b over the
        rows of all segments; the S shares sum to the core's ``weight_grad`` of all rows.
    """
    b, n = layer.count(x, kernel)
    # With an axis name the n x n form is used whatever the local b: the b x b
    # push-through form would need every device's rows.
    if b >= n or layer.axis_name is not None:
        plain, gram = layer.statistics(x, grad_z, kernel)  # (g, S, m, n), (g, n, n)
        g, segments, m, _ = plain.shape
        # The Gram and row count are explicit: summing both over devices is all that data
        # parallelism adds.
        gram, count = _synced_statistics(layer.axis_name, gram, b)
        out = _tc.precondition(jnp.reshape(plain, (g, segments * m, n)), gram, count,
                               layer.lam)
    else:
        # b < n: the b x b push-through form needs G itself. A block-diagonal G keeps
        # the segments' shares apart in its columns.
        rows, grads = layer.rows(x, grad_z, kernel)
        g, segments, _, m = grads.shape
        if segments > 1:
            grads = jnp.einsum("gsrm,st->gsrtm", grads, jnp.eye(segments, dtype=grads.dtype))
        out = _tc.weight_grad(jnp.reshape(rows, (g, b, n)),
                              jnp.reshape(grads, (g, b, segments * m)), layer.lam)
    return jnp.reshape(out, (g, segments, m, n))


def _synced_statistics(axis_name, gram, count):
    """The Gram and row count summed over the devices of ``axis_name`` (None: local).

    Every device along the axis has the same static shapes (shard_map and pmap run one
    program), so the global row count is the local one times the axis size.
    """
    if axis_name is None:
        return gram, count
    size = math.prod(lax.axis_size(name) for name in _axis_names(axis_name))
    return lax.psum(gram, axis_name), count * size


def _axis_names(axis_name):
    return () if axis_name is None else axis_name if isinstance(axis_name, tuple) else (
        axis_name,)


def _check_axes_bound(axis_name):
    """Called in the vmap rule: the axes must be shard_map's / pmap's (manual mesh axes),
    not the vmap's own, since the pooled statistics are computed outside the vmap."""
    manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", None)
    if manual is None:  # no way to tell on this jax version
        return
    for name in _axis_names(axis_name):
        if name not in manual:
            raise NotImplementedError(
                f"tract_core.jax: under jax.vmap, axis_name={axis_name!r} must name an axis "
                f"of an enclosing jax.shard_map or jax.pmap; syncing over a vmap's own named "
                f"axis is not supported (vmapped examples are pooled without an axis_name)"
            )


def _broadcast_front(value, batched, size):
    return value if batched else jnp.broadcast_to(value, (size, *value.shape))


def _pooled_over_vmap(segment_fn, pooled_fn, kernel_grad_output, axis_name=None):
    """``segment_fn(x, grad_z, kernel, *more)`` as a custom_vmap function that pools.

    Every argument but ``kernel`` carries a leading segment axis S. Under vmap with an
    unbatched kernel the vmapped axis B is merged into the segments, (B, S) -> B * S, and
    ``pooled_fn()`` is called on that one batch (so an enclosing vmap pools further); its
    outputs are split back into (B, S, ...), except those at positions
    ``kernel_grad_output``: cotangents for the kernel, which the shares never depend on
    (they are zero) and which stay unbatched. A vmapped kernel is a stack of separate
    layers: plain vmap, separate statistics.

    ``axis_name`` (the layer's) must name an axis bound outside this vmap: the rule runs
    outside the vmap, so a vmap that is itself the collective axis cannot be pooled.
    """
    pooled = jax.custom_batching.custom_vmap(segment_fn)

    @pooled.def_vmap
    def _rule(axis_size, in_batched, x, grad_z, kernel, *more):
        _check_axes_bound(axis_name)
        args = (x, grad_z, kernel, *more)
        if in_batched[2]:
            in_axes = [0 if batched else None for batched in in_batched]
            out = jax.vmap(segment_fn, in_axes=in_axes)(*args)
            return out, jax.tree.map(lambda _: True, out)

        def merge(value, batched):
            value = _broadcast_front(value, batched, axis_size)
            return jnp.reshape(value, (value.shape[0] * value.shape[1], *value.shape[2:]))

        segments = x.shape[1] if in_batched[0] else x.shape[0]  # S, before the merge
        args = [a if i == 2 else merge(a, b) for i, (a, b) in enumerate(zip(args, in_batched))]
        out = pooled_fn()(*args)

        def split(value):  # sizes spelled out: B or S may be 0 (an empty vmap)
            return jnp.reshape(value, (axis_size, segments, *value.shape[1:]))

        if not isinstance(out, tuple):
            return split(out), True
        batched = tuple(i not in kernel_grad_output for i in range(len(out)))
        return tuple(split(o) if b else o for o, b in zip(out, batched)), batched

    return pooled


@functools.cache
def _tract_op(layer):
    """The custom_vjp op for one static layer configuration."""

    def segment_kernel_grads(x, grad_z, kernel):
        """x (S, *x_shape), grad_z (S, *z_shape) -> (S, *kernel.shape) shares."""
        # The Gram and the solve in float64 (the core's statistics dtype, which JAX
        # turns into float32 unless 64-bit types are enabled) and full-precision
        # matmuls, whatever the global defaults (TF32 on GPUs loses the digits
        # [0, 255]-scale pixels need). Set here, where it is traced, since parts of it
        # (its vjp, the vmap rules) are traced late.
        with jax.enable_x64(True), jax.default_matmul_precision("highest"):
            shares = _segment_weight_grads(layer, x, grad_z, kernel)
            return layer.to_kernel_layout(shares, kernel).astype(kernel.dtype)

    def segment_kernel_grads_vjp(x, grad_z, kernel, cotangent):
        return jax.vjp(segment_kernel_grads, x, grad_z, kernel)[1](cotangent)

    # The kernel step and its vjp pool vmapped examples; the custom_vjp makes the kernel
    # step differentiable again (custom_vmap has no reverse-mode rule), e.g. for gradient
    # penalties on the input, and the pooled vjp keeps that right under vmap too.
    pooled_kernel_grads = _pooled_over_vmap(segment_kernel_grads, lambda: kernel_grads,
                                            kernel_grad_output=(), axis_name=layer.axis_name)
    pooled_kernel_grads_vjp = _pooled_over_vmap(segment_kernel_grads_vjp,
                                                lambda: pooled_kernel_grads_vjp,
                                                kernel_grad_output=(2,),
                                                axis_name=layer.axis_name)

    @jax.custom_vjp
    def kernel_grads(x, grad_z, kernel):
        return pooled_kernel_grads(x, grad_z, kernel)

    def kernel_grads_fwd(x, grad_z, kernel):
        return pooled_kernel_grads(x, grad_z, kernel), (x, grad_z, kernel)

    def kernel_grads_bwd(residuals, cotangent):
        return pooled_kernel_grads_vjp(*residuals, cotangent)

    kernel_grads.defvjp(kernel_grads_fwd, kernel_grads_bwd)

    @jax.custom_vjp
    def op(x, kernel, bias):
        return layer.apply(x, kernel, bias)

    def op_fwd(x, kernel, bias):
        return layer.apply(x, kernel, bias), (x, kernel, bias)

    def op_bwd(residuals, grad_z):
        x, kernel, bias = residuals
        # Input and bias cotangents: the plain op's own transpose.
        _, plain_vjp = jax.vjp(lambda x, bias: layer.apply(x, kernel, bias), x, bias)
        grad_x, grad_bias = plain_vjp(grad_z)
        grad_kernel = kernel_grads(x[None], grad_z[None], kernel)[0]
        return grad_x, grad_kernel, grad_bias

    op.defvjp(op_fwd, op_bwd)
    return op


# --------------------------------------------------------------------------- arguments


def _precision(precision):
    # Hashable, so it can be part of the static configuration.
    return tuple(precision) if isinstance(precision, list) else precision


def _axis_name(axis_name):
    """None, a hashable axis name, or a tuple / list of them (as a tuple): static."""
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)
    try:
        hash(axis_name)
    except TypeError:
        raise ValueError(f"axis_name must be None, a hashable axis name (e.g. a str) or a "
                         f"tuple of them, got {axis_name!r}") from None
    return axis_name


def _varying_axes(array):
    """The shard_map axes an array varies over (empty outside shard_map)."""
    aval = jax.typeof(array)
    mat = getattr(aval, "mat", None)  # jax >= 0.9: manual axis type
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _varying_alike(*arrays):
    """Cast every array to vary over the same shard_map axes (None stays None).

    Inside ``jax.shard_map`` (check_vma) a replicated kernel meets a batch-sharded x. A
    custom_vjp's cotangents must have their primals' types, and the kernel cotangent
    varies with x; so the kernel is cast to varying *before* the op, as lax's own ops do
    implicitly. The transpose of that cast is a psum: the gradient of a replicated kernel
    comes out summed over the devices. Outside shard_map this changes nothing.
    """
    vmas = [_varying_axes(a) for a in arrays if a is not None]
    union = frozenset().union(*vmas)
    if not union:
        return arrays

    def cast(a):
        if a is None:
            return a
        missing = union - _varying_axes(a)
        return lax.pcast(a, tuple(sorted(missing, key=str)), to="varying") if missing else a

    return tuple(cast(a) for a in arrays)


# --------------------------------------------------------------------------- public API


def _check_dtypes(x, kernel, bias, *, same_dtype):
    """TypeError naming the argument, at call time rather than in backward: TrAct's
    gradient is for a real floating kernel; x and bias must be real. ``same_dtype``:
    lax's conv takes one dtype (Flax layers promote before they call it), while
    lax.dot_general promotes an integer x itself."""
    kernel_dtype = jnp.result_type(kernel)
    if not jnp.issubdtype(kernel_dtype, jnp.floating):
        raise TypeError(f"kernel must have a real floating dtype (TrAct's gradient is a "
                        f"float solve), got dtype {kernel_dtype}")
    for name, array in (("x", x), ("bias", bias)):
        if array is not None and jnp.iscomplexobj(array):
            raise TypeError(f"{name} must be real (TrAct's gradient is defined for real "
                            f"layers), got dtype {jnp.result_type(array)}")
    if same_dtype and jnp.result_type(x) != kernel_dtype:
        raise TypeError(f"x (dtype {jnp.result_type(x)}) and kernel (dtype {kernel_dtype}) "
                        f"must have the same dtype, as lax.conv_general_dilated requires; "
                        f"cast x first")


def dense(x, kernel, bias=None, *, lam=0.1, precision=None, axis_name=None):
    """``x @ kernel + bias`` with TrAct's kernel gradient.

    Args:
        x: (..., n); every leading position is a row of the Gram (tokens count as rows).
            Real; an integer x is promoted to the kernel's dtype, as by lax.
        kernel: (n, m), Flax layout, a real floating dtype.
        bias: (m,) or None.
        lam: finite float > 0, static (0.1 in the paper, 0.2 for long runs).
        precision: passed to ``lax.dot_general`` for the forward and input gradient.
        axis_name: None (default) or a mapped axis name (or tuple of names) of an
            enclosing ``jax.shard_map`` or ``jax.pmap``; static. See "Data parallelism"
            in the module docstring.

    Returns:
        (..., m), exactly ``lax.dot_general(x, kernel, ...) + bias`` as ``nnx.Linear``
        computes it. Under differentiation the kernel cotangent is
        ``(G^T X (X^T X / b + lam I)^-1)^T`` with X = x.reshape(-1, n), b its row count
        (with ``axis_name``: the Gram and b over all devices of that axis, G and the
        first X still the device's own).
    """
    lam = _tc.check_lam(lam)
    if jnp.ndim(kernel) != 2:
        raise ValueError(f"kernel must have shape (n, m), got shape {tuple(jnp.shape(kernel))}")
    if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != jnp.shape(kernel)[0]:
        raise ValueError(f"x must have shape (..., {jnp.shape(kernel)[0]}) to match kernel "
                         f"{tuple(jnp.shape(kernel))}, got shape {tuple(jnp.shape(x))}")
    check_bias_shape(None if bias is None else jnp.shape(bias), jnp.shape(kernel)[1])
    _check_dtypes(x, kernel, bias, same_dtype=False)
    layer = _Dense(lam, _precision(precision), _axis_name(axis_name))
    return _tract_op(layer)(*_varying_alike(x, kernel, bias))


def conv(x, kernel, bias=None, *, strides=1, padding="VALID", kernel_dilation=1,
         feature_group_count=1, lam=0.1, precision=None, axis_name=None):
    """Channels-last convolution (1-D, 2-D or 3-D) with TrAct's kernel gradient.

    Args:
        x: (N, *spatial, C), the kernel's dtype (as ``lax.conv_general_dilated``
            requires).
        kernel: (*window, C / feature_group_count, M), Flax / ``lax`` HWIO layout, a
            real floating dtype; the (dilated) window must fit the padded input.
        bias: (M,) or None.
        strides: int or one int per spatial axis.
        padding: 'SAME', 'VALID', 'SAME_LOWER', an int (same on both sides of every
            axis), or per spatial axis an int or a (lo, hi) pair.
        kernel_dilation: int or one int per spatial axis.
        feature_group_count: number of feature groups; one Gram per group.
        lam: finite float > 0, static (0.1 in the paper, 0.2 for long runs).
        precision: passed to ``lax.conv_general_dilated`` for the forward and input
            gradient.
        axis_name: None (default) or a mapped axis name (or tuple of names) of an
            enclosing ``jax.shard_map`` or ``jax.pmap``; static. See "Data parallelism"
            in the module docstring.

    Returns:
        (N, *out_spatial, M), exactly ``lax.conv_general_dilated`` with channels-last
        dimension numbers plus bias, as ``nnx.Conv`` / ``nn.Conv`` compute it. Under
        differentiation the kernel cotangent is TrAct's, per group, with b = N x output
        positions rows (receptive fields); with ``axis_name`` the Gram and b are summed
        over that axis's devices.
    """
    lam = _tc.check_lam(lam)
    k_ndim = jnp.ndim(kernel)
    if k_ndim not in (3, 4, 5) or 0 in jnp.shape(kernel)[:-2]:
        raise ValueError(f"kernel must have shape (*window, C/groups, M) with 1 to 3 spatial "
                         f"axes, each window size >= 1, got shape {tuple(jnp.shape(kernel))}")
    spatial = k_ndim - 2
    if jnp.ndim(x) != k_ndim:
        raise ValueError(f"x must have shape (N, *spatial, C) with {spatial} spatial axes to "
                         f"match kernel {tuple(jnp.shape(kernel))}, got shape "
                         f"{tuple(jnp.shape(x))}")
    if not is_int(feature_group_count) or feature_group_count < 1:
        raise ValueError(f"feature_group_count must be an int >= 1, got {feature_group_count!r}")
    *_, c_g, m = jnp.shape(kernel)
    if jnp.shape(x)[-1] != c_g * feature_group_count or m % feature_group_count:
        raise ValueError(
            f"x channels ({jnp.shape(x)[-1]}) must equal kernel input channels ({c_g}) x "
            f"feature_group_count ({feature_group_count}), and kernel output channels ({m}) "
            f"must be divisible by it"
        )
    check_bias_shape(None if bias is None else jnp.shape(bias), m)
    layer = _Conv(
        lam=lam,
        strides=per_axis(strides, spatial, "strides"),
        padding=conv_padding(padding, spatial),
        dilation=per_axis(kernel_dilation, spatial, "kernel_dilation"),
        groups=int(feature_group_count),
        precision=_precision(precision),
        axis_name=_axis_name(axis_name),
    )
    _check_dtypes(x, kernel, bias, same_dtype=True)
    spatial, window = tuple(jnp.shape(x)[1:-1]), tuple(jnp.shape(kernel)[:-2])
    padded = [s + lo + hi for s, (lo, hi) in zip(spatial, layer.pads(spatial, window))]
    if any(o <= 0 for o in _tc.conv_output_shape(padded, window, layer.strides,
                                                   layer.dilation)):
        raise ValueError(f"kernel window {window} with kernel_dilation {layer.dilation} "
                         f"does not fit x's spatial shape {spatial} padded to "
                         f"{tuple(padded)}")
    return _tract_op(layer)(*_varying_alike(x, kernel, bias))
