"""TrAct in Equinox: a per-example model, vmapped over the batch, trained with optax.

Equinox models are written for one example and ``jax.vmap``-ed over the batch. TrAct's
statistics are over the whole batch, and ``tract_core.equinox``'s layers (through
``tract_core.jax.conv``) pool them across the vmap, so the stem below gets exactly the
gradient a batched call would give. Runs in a few seconds on a CPU:

    python examples/equinox_example.py
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tract_core.equinox as teqx


class SmallNet(eqx.Module):
    """TrAct stem on raw pixels, ReLU, global average pool, linear head."""

    stem: teqx.TrActConv2d
    head: eqx.nn.Linear

    def __init__(self, *, channels=3, width=16, classes=10, lam=0.1, dtype=jnp.float32, key):
        stem_key, head_key = jax.random.split(key)
        self.stem = teqx.TrActConv2d(channels, width, 3, padding=1, dtype=dtype, lam=lam,
                                     key=stem_key)
        self.head = eqx.nn.Linear(width, classes, dtype=dtype, key=head_key)

    def __call__(self, image):
        features = jax.nn.relu(self.stem(image)).mean(axis=(1, 2))
        return self.head(features)


def loss_fn(model, images, labels):
    logits = jax.vmap(model)(images)  # per-example model, batched by vmap
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_step(optimizer):
    @eqx.filter_jit
    def step(model, opt_state, images, labels):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    return step


def random_batches(seed, steps, batch=32, size=16, classes=10):
    """Random images in [0, 1) and labels, from numpy (no XLA compile for the data)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        images = rng.random((batch, 3, size, size), dtype=np.float32)
        yield jnp.asarray(images), jnp.asarray(rng.integers(0, classes, batch))


def main(steps=5, seed=0):
    """Train for a few steps on random batches; returns the losses."""
    model = SmallNet(key=jax.random.key(seed))
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    step = make_step(optimizer)
    losses = []
    for i, (images, labels) in enumerate(random_batches(seed + 1, steps)):
        model, opt_state, loss = step(model, opt_state, images, labels)
        losses.append(float(loss))
        print(f"step {i}: loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
