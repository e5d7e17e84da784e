"""Vanilla vs TrAct on any of the offline data sets, over seeds and epoch budgets.

    python examples/compare.py --dataset fashion-mnist --epochs 1 2 4 --seeds 3 \
        --out runs/fashion-mnist
    python examples/compare.py --dataset cifar10 --data-dir ~/data/cifar-10-batches-py \
        --model resnet18 --augment --optimizer adam --lr-sweep --epochs 10 --out runs/c10
    python examples/compare.py --framework jax --epochs 2 --seeds 2 --out runs/digits-jax
    python examples/compare.py --framework keras --epochs 2 --seeds 2 --out runs/digits-keras

``--framework`` is torch (default), jax (Flax NNX + optax) or keras (Keras 3 on
KERAS_BACKEND, jax if unset).

Every finished run is appended to OUT/runs.jsonl at once; re-running the same command
skips those and (re)writes OUT/results.md and OUT/accuracy.png. ``--help`` lists the
options; the code is in ``examples/tract_compare/``.
"""

from tract_compare.cli import main

if __name__ == "__main__":
    main()
