"""The JAX adapter's mapped axes: examples pooled over ``jax.vmap``, devices named.

Under ``jax.vmap`` the op runs once per example, yet the Gram must sum over the vmapped
batch. So the backward's kernel step takes arrays with a leading segment axis S and is a
``custom_vmap`` function whose rule merges the vmapped axis into S and calls it once (an
enclosing vmap merges further); each segment's output is its share of the pooled result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _check_axes_bound(axis_name):
    """The vmap rule runs outside the vmap: ``axis_name`` must be bound outside it."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", None)
    if axis_name is not None and manual is not None and any(n not in manual for n in names):
        raise NotImplementedError(
            f"tract_core.jax: under jax.vmap, axis_name={axis_name!r} must name an axis of "
            f"an enclosing jax.shard_map or jax.pmap; syncing over a vmap's own named axis is "
            f"not supported (vmapped examples are pooled without an axis_name)")


def _merging(fn, merged_fn, unbatched_outputs, axis_name):
    """``fn(x, grad_z, kernel, *more)`` as a custom_vmap function whose rule pools: with an
    unbatched kernel the vmapped axis B joins the segments, (B, S) -> B * S, for one call
    of ``merged_fn()``, whose outputs are split back into (B, S, ...) but those at
    ``unbatched_outputs`` (kernel cotangents: zero, the shares do not depend on the
    kernel's values). A vmapped kernel is a stack of layers: plain vmap, own statistics."""
    pooled = jax.custom_batching.custom_vmap(fn)

    @pooled.def_vmap
    def _rule(axis_size, in_batched, *args):
        _check_axes_bound(axis_name)
        if in_batched[2]:
            out = jax.vmap(fn, in_axes=[0 if b else None for b in in_batched])(*args)
            return out, jax.tree.map(lambda _: True, out)

        def merge(value, batched):
            if not batched:
                value = jnp.broadcast_to(value, (axis_size, *value.shape))
            return jnp.reshape(value, (value.shape[0] * value.shape[1], *value.shape[2:]))

        segments = args[0].shape[int(in_batched[0])]  # S, before the merge
        out = merged_fn()(*(a if i == 2 else merge(a, b)
                            for i, (a, b) in enumerate(zip(args, in_batched))))
        outs = out if isinstance(out, tuple) else (out,)
        batched = tuple(i not in unbatched_outputs for i in range(len(outs)))
        # Sizes spelled out: B or S may be 0 (an empty vmap).
        outs = tuple(jnp.reshape(o, (axis_size, segments, *o.shape[1:])) if b else o
                     for o, b in zip(outs, batched))
        return (outs, batched) if isinstance(out, tuple) else (outs[0], True)

    return pooled


def pooled_over_vmap(fn, axis_name=None):
    """``fn(x, grad_z, kernel)`` (leading segment axis S but on the kernel) pooling vmapped
    examples into the segments, and differentiable (custom_vmap has no reverse-mode rule;
    gradient penalties differentiate the backward): its vjp pools the same way."""

    def fn_vjp(x, grad_z, kernel, cotangent):
        return jax.vjp(fn, x, grad_z, kernel)[1](cotangent)

    forward = _merging(fn, lambda: pooled, (), axis_name)
    backward = _merging(fn_vjp, lambda: backward, (2,), axis_name)

    @jax.custom_vjp
    def pooled(x, grad_z, kernel):
        return forward(x, grad_z, kernel)

    pooled.defvjp(lambda *args: (forward(*args), args),
                  lambda args, cotangent: backward(*args, cotangent))
    return pooled


def _varying_axes(array):
    """The shard_map axes an array varies over (empty outside shard_map)."""
    aval = jax.typeof(array)
    mat = getattr(aval, "mat", None)  # newer jax: the manual axis type
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def varying_alike(*arrays):
    """Every array cast to vary over the same shard_map axes (None stays None): a
    custom_vjp's cotangents have their primals' types, and the kernel's varies with x, so
    a replicated kernel is cast before the op, as lax's ops do implicitly. The cast
    transposes to a psum: its gradient comes out summed over the devices."""
    union = frozenset().union(*(_varying_axes(a) for a in arrays if a is not None))

    def cast(a):
        missing = () if a is None else tuple(sorted(union - _varying_axes(a), key=str))
        return lax.pcast(a, missing, to="varying") if missing else a

    return tuple(cast(a) for a in arrays) if union else arrays
