#!/bin/bash
# Stage 1 (must fit the hour): budgets 1 and 2, seeds 0-1. Then widen while time allows.
cd /work/main
COMMON="--dataset fashion-mnist --model cnn --optimizer sgd --lr 0.05 --lam 0.1 --batch-size 128 --threads 2 --out docs/results/fashion_mnist"
for stage in "--epochs 1 2 --seeds 2" "--epochs 1 2 --seeds 3" "--epochs 1 2 4 --seeds 3"; do
  echo "=== stage: $stage ($(date -u +%H:%M:%S))"
  PYTHONPATH=. /work/devenv/bin/python examples/compare.py $COMMON $stage || exit 1
done
