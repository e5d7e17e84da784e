"""What TrAct costs in a whole JAX training step: Flax NNX model, loss, gradient, optax SGD.

    python benchmarks/whole_step_jax.py [--rounds 30] [--models cnn resnet18 vit]
                                        [--threads 2] [--steps 1] [--json F]

The step is the examples' (``tract_compare.train_jax.train_step``): one ``jax.jit`` of the
forward pass in training mode, the mean cross-entropy, its gradient and optax's SGD with
momentum 0.9; the outputs are waited for (``block_until_ready``) after ``--steps`` steps.
Every model runs plain and with its first layer wrapped by ``tract_core.flax`` (same
initial weights), on fixed random data, on JAX's default device (a GPU where jaxlib has
one). The variants take turns within each round, in an order reversed every round; each
round's time is divided by the plain model's time in that same round, and the table
shows the median of these paired ratios, their interquartile range and the median
milliseconds per step. Compiling happens in a warm-up step before the timing.

Threads: XLA sizes its CPU thread pools from the cores the process may run on, so
``--threads N`` pins the process to N cores before JAX starts.

Models (the first layer is the one TrAct trains), channels-last as Flax's convs take them:
- cnn: conv 5x5 1->32, pool, conv 3x3 32->64, pool, FC 128, FC 10; 28x28 inputs, b128.
- resnet18: CIFAR ResNet-18 (3x3 stem, 64 channels); 32x32 inputs, b64.
- vit: CIFAR ViT, patch 4, dim 384, depth 7, 12 heads, MLP 2x; 32x32 inputs, b64.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import _harness
from tract_compare import loop  # numpy only: the cores are pinned before JAX starts

MODELS = _harness.CHANNELS_LAST_MODELS


def variants(name, count):
    """{variant: run()}: plain and TrAct, each ``count`` jitted training steps on fixed
    data, then waiting for their outputs."""
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from tract_compare import train_jax

    shape, options = MODELS[name]
    rng = np.random.default_rng(1)
    x = jax.numpy.asarray(rng.standard_normal(shape, dtype=np.float32))
    y = jax.numpy.asarray(rng.integers(0, 10, shape[0]))
    optimizer = optax.sgd(0.01, momentum=0.9)
    steps = {}
    for variant in ("plain", "tract"):
        model = train_jax.MODELS[name](train_jax.TorchInit(0), shape[-1], shape[1], 10,
                                       rngs=nnx.Rngs(0), **options)
        if variant == "tract":
            train_jax.wrap_first_layer(model, 0.1)
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        state = [params, rest, optimizer.init(params)]
        steps[variant] = _runner(train_jax.train_step(graphdef, optimizer), state, x, y,
                                 count)
    return steps


def _runner(step, state, x, y, count):
    """run(): ``count`` training steps, updating ``state`` [params, rest, optimizer
    state], then waiting for the last step's outputs."""
    import jax

    def run():
        for _ in range(count):
            state[0], state[1], state[2], loss = step(*state, x, y, 0.0)  # no smoothing
        jax.block_until_ready((state, loss))

    return run


def main(argv=None):
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--rounds", type=int, default=30)
    options.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    options.add_argument("--threads", type=int, default=2, help="CPU cores (pinned)")
    options.add_argument("--steps", type=int, default=1, help="training steps per round")
    options.add_argument("--json", help="write the ratios here too")
    args = options.parse_args(argv)
    loop.limit_cpu_threads(args.threads)
    import flax
    import jax

    device = jax.devices()[0]
    where = (f"{loop.cpu_cores()} cores" if device.platform == "cpu"
             else getattr(device, "device_kind", device.platform))
    print(f"jax {jax.__version__}, flax {flax.__version__}, {where}, jit, "
          f"{args.steps} step(s) per round")
    _harness.print_whole_step_header(args.rounds)
    results = {}
    for name in args.models:
        runs = {key: (run,) for key, run in variants(name, args.steps).items()}
        seconds = _harness.paired_times(runs, args.rounds, lambda run: run())
        _harness.print_whole_step_rows(name, seconds, args.steps, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
