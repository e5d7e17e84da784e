"""TrAct in Flax NNX: a TrAct stem on raw pixels, trained with optax.

``tract_core.flax.TrActConv`` is an ``nnx.Conv`` (same parameters, same forward) whose
kernel gradient is TrAct's; ``tract_core.flax.wrap`` turns an existing first layer into
one. Runs in a few seconds on a CPU:

    python examples/flax_example.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import tract_core.flax as tflax


class SmallNet(nnx.Module):
    """TrAct stem on raw pixels, ReLU, global average pool, linear head."""

    def __init__(self, *, channels=3, width=16, classes=10, lam=0.1, rngs):
        self.stem = tflax.TrActConv(channels, width, (3, 3), padding="SAME", lam=lam, rngs=rngs)
        self.head = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, images):  # (N, H, W, C)
        return self.head(jax.nn.relu(self.stem(images)).mean(axis=(1, 2)))


def loss_fn(model, images, labels):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model, optimizer, images, labels):
    loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
    optimizer.update(model, grads)
    return loss


def random_batches(seed, steps, batch=32, size=16, classes=10):
    """Random images in [0, 1) and labels, from numpy (no XLA compile for the data)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        images = rng.random((batch, size, size, 3), dtype=np.float32)
        yield jnp.asarray(images), jnp.asarray(rng.integers(0, classes, batch))


def main(steps=5, seed=0):
    """Train for a few steps on random batches; returns the losses."""
    model = SmallNet(rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    losses = []
    for i, (images, labels) in enumerate(random_batches(seed + 1, steps)):
        losses.append(float(train_step(model, optimizer, images, labels)))
        print(f"step {i}: loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
