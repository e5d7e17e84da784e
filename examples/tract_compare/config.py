"""What identifies a run: its settings, method, seed and framework (no framework imported).

The command line and the results file use only this module, so a JAX or Keras comparison
never imports torch, and a torch one never imports JAX.
"""

from __future__ import annotations

import dataclasses

METHODS = ("vanilla", "tract")
FRAMEWORKS = ("torch", "jax", "keras")  # the command line's choices
KERAS_BACKENDS = ("jax", "torch", "tensorflow")
# A run's ``framework``: Keras's backend is part of it, since it changes the numbers.
RUN_FRAMEWORKS = ("torch", "jax", *(f"keras-{backend}" for backend in KERAS_BACKENDS))
MODEL_NAMES = ("cnn", "resnet18", "vit")  # every framework builds each of them


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run besides method and seed (the resume key's fields).

    A field added later must default to the behaviour from before it existed: records
    written before then lack it and are read with its default (see ``results``).
    """

    dataset: str
    model: str
    optimizer: str  # "sgd" (momentum 0.9) or "adam"; both with a cosine schedule
    lr: float
    epochs: int
    batch_size: int = 128
    lam: float = 0.1  # TrAct's lambda; not part of a vanilla run's key
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = False  # random 4-pixel shifts and horizontal flips (CIFAR)
    patch: int = 4  # the ViT's patch size
    train_limit: int | None = None  # first N training examples only (smoke runs)
    test_limit: int | None = None
    framework: str = "torch"  # torch, jax (Flax NNX + optax) or keras-BACKEND (Keras 3)
    inputs: str = "standardized"  # or "0-1", "0-255": pixel scaling (see data.scale_inputs)
    pad_to: int | None = None  # images zero-padded to pad_to x pad_to (e.g. 28 -> 32)
    width: int = 64  # the ResNet's stem channels (torch's ResNet only)


KEY_DEFAULTS = {field.name: field.default for field in dataclasses.fields(RunConfig)
                if field.default is not dataclasses.MISSING}


def run_key(config: RunConfig, method: str, seed: int) -> dict:
    """The fields that identify a finished run in the results file."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if config.framework not in RUN_FRAMEWORKS:
        raise ValueError(f"framework must be one of {RUN_FRAMEWORKS}, "
                         f"got {config.framework!r}")
    key = dataclasses.asdict(config)
    if method == "vanilla":
        key["lam"] = None  # lambda does not change a vanilla run: share it across lams
    return {"method": method, "seed": seed, **key}
