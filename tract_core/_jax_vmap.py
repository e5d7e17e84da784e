"""The JAX adapter's mapped axes: examples pooled over ``jax.vmap``, devices named.

The backward's kernel step takes arrays with a leading segment axis S; its vmap rule merges
the vmapped axis into S and calls it once, so the Gram sums over the vmapped batch and each
segment's output is its share of the pooled result (an enclosing vmap merges further).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def merge_leading(a):
    """(S, N, ...) -> (S * N, ...), sizes spelled out (S or N may be 0)."""
    return jnp.reshape(a, (a.shape[0] * a.shape[1], *a.shape[2:]))


def _merging(fn, merged_fn, unbatched_outputs, axis_name):
    """``fn(kernel, x, grad_z, *more)`` -> tuple whose vmap rule, for an unbatched kernel,
    merges the vmapped axis B into the segments, (B, S) -> B * S, calls ``merged_fn()``
    once and splits its outputs back but those at ``unbatched_outputs`` (kernel
    cotangents: zero, the shares do not depend on the kernel's values)."""
    pooled = jax.custom_batching.custom_vmap(fn)

    @pooled.def_vmap
    def _rule(axis_size, in_batched, kernel, *args):
        # The rule runs outside the vmap: axis_name must be bound outside it.
        names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
        manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", None)
        if axis_name is not None and manual is not None and not set(names) <= set(manual):
            raise NotImplementedError(
                f"tract_core.jax: under jax.vmap, axis_name={axis_name!r} must name an axis "
                f"of an enclosing jax.shard_map or jax.pmap, not a vmap's own (vmapped "
                f"examples are pooled without an axis_name)")
        if in_batched[0]:  # a stack of kernels (an ensemble): own statistics each
            out = jax.vmap(fn, in_axes=[0 if b else None for b in in_batched])(kernel, *args)
            return out, (True,) * len(out)
        segments = args[0].shape[int(in_batched[1])]  # S, before the merge
        outs = merged_fn()(kernel, *(
            merge_leading(a if b else jnp.broadcast_to(a, (axis_size, *a.shape)))
            for a, b in zip(args, in_batched[1:])))
        batched = tuple(i not in unbatched_outputs for i in range(len(outs)))
        # Sizes spelled out: B or S may be 0 (an empty vmap).
        return tuple(jnp.reshape(o, (axis_size, segments, *o.shape[1:])) if b else o
                     for o, b in zip(outs, batched)), batched

    return pooled


def pooled_over_vmap(fn, axis_name=None):
    """``fn(kernel, x, grad_z)`` -> 1-tuple (x, grad_z with a leading segment axis S)
    pooling vmapped examples into the segments, and differentiable (custom_vmap has no
    reverse-mode rule; gradient penalties differentiate the backward): its vjp pools too."""

    def fn_vjp(kernel, x, grad_z, cotangent):
        return jax.vjp(fn, kernel, x, grad_z)[1]((cotangent,))

    forward = _merging(fn, lambda: pooled, (), axis_name)
    backward = _merging(fn_vjp, lambda: backward, (0,), axis_name)

    @jax.custom_vjp
    def pooled(kernel, x, grad_z):
        return forward(kernel, x, grad_z)

    pooled.defvjp(lambda *args: (forward(*args), args),
                  lambda args, cotangent: backward(*args, *cotangent))
    return pooled


def _varying_axes(array):
    """The shard_map axes an array varies over (empty outside shard_map)."""
    aval = jax.typeof(array)  # newer jax: the manual axis type, older: vma
    return frozenset(aval.mat.varying if hasattr(aval, "mat") else aval.vma)


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
