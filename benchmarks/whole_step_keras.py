"""What TrAct costs in a whole Keras 3 training step: ``train_on_batch``, on any backend.

    KERAS_BACKEND=jax python benchmarks/whole_step_keras.py [--rounds 30]
        [--models cnn resnet18 vit] [--threads 2] [--steps 1] [--json F]

KERAS_BACKEND picks the backend (jax if unset; tensorflow, torch). Every model runs
plain and with its first layer wrapped by ``tract_core.keras`` (same initial weights),
each compiled with SGD (momentum 0.9), the sparse cross-entropy and Keras's default
``jit_compile="auto"``, which the table shows as Keras resolved it: XLA on JAX; on
TensorFlow a ``tf.function`` graph, compiled by XLA only with a GPU; eager on torch. One
step is one ``train_on_batch`` call, as a user's loop makes it, on a fixed random batch
held as backend tensors. The variants take turns within each round, in an order reversed
every round; each round's time is divided by the plain model's time in that same round,
and the table shows the median of these paired ratios, their interquartile range and the
median milliseconds per step. Compiling happens in a warm-up step before the timing.

Threads: ``--threads N`` pins the process to N cores before the backend starts (XLA
sizes its CPU pools from them) and sets torch's and TensorFlow's thread counts.

Models (the first layer is the one TrAct trains), channels-last:
- cnn: conv 5x5 1->32, pool, conv 3x3 32->64, pool, FC 128, FC 10; 28x28 inputs, b128.
- resnet18: CIFAR ResNet-18 (3x3 stem, 64 channels); 32x32 inputs, b64.
- vit: CIFAR ViT, patch 4, dim 384, depth 7, 12 heads, MLP 2x; 32x32 inputs, b64.
"""

import argparse
import json
import os
import sys
from pathlib import Path

# Before Keras is imported: it reads its backend once.
os.environ.setdefault("KERAS_BACKEND", "jax")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import _harness
from tract_compare import loop  # numpy only: the cores are pinned before a backend starts

MODELS = _harness.CHANNELS_LAST_MODELS


def build(name, lam):
    """Model ``name`` compiled for training; its first layer TrAct's where lam is given.
    Weights from seed 0 in both variants (Keras's own draws too, e.g. the attention's)."""
    import keras
    from tract_compare import train_keras

    shape, options = MODELS[name]
    keras.utils.set_random_seed(0)
    inputs, outputs = train_keras.MODELS[name](train_keras._Seeds(0), shape[-1], shape[1],
                                               10, lam=lam, **options)
    model = keras.Model(inputs, outputs, name=name)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def variants(name, count):
    """{variant: (run(), model)}: ``count`` ``train_on_batch`` steps of each variant."""
    import numpy as np
    from keras import ops

    shape, _ = MODELS[name]
    rng = np.random.default_rng(1)
    x = ops.convert_to_tensor(rng.standard_normal(shape, dtype=np.float32))
    y = ops.convert_to_tensor(rng.integers(0, 10, shape[0]))
    made = {"plain": build(name, None), "tract": build(name, 0.1)}

    def runner(model):
        def run():
            for _ in range(count):
                model.train_on_batch(x, y)  # returns the loss as numpy: waits for the step

        return run

    return {key: (runner(model), model) for key, model in made.items()}


def header(args):
    import keras

    backend = keras.backend.backend()
    version = __import__({"tensorflow": "tensorflow", "torch": "torch"}.get(backend, "jax"))
    print(f"keras {keras.__version__} on {backend} {version.__version__}, "
          f"{loop.cpu_cores()} cores, {args.steps} step(s) per round")
    _harness.print_whole_step_header(args.rounds, "jit_compile (plain/TrAct)")


def main(argv=None):
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--rounds", type=int, default=30)
    options.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    options.add_argument("--threads", type=int, default=2, help="CPU cores (pinned)")
    options.add_argument("--steps", type=int, default=1, help="training steps per round")
    options.add_argument("--json", help="write the ratios here too")
    args = options.parse_args(argv)
    loop.limit_cpu_threads(args.threads)
    from tract_compare import train_keras

    train_keras.set_threads(args.threads)
    header(args)
    results = {}
    for name in args.models:
        made = variants(name, args.steps)
        seconds = _harness.paired_times({key: (run,) for key, (run, _) in made.items()},
                                        args.rounds, lambda run: run())
        jit = "/".join(str(made[key][1].jit_compile) for key in ("plain", "tract"))
        _harness.print_whole_step_rows(name, seconds, args.steps, results, jit)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
