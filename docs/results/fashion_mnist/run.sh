#!/bin/bash
# Re-creates docs/results/fashion_mnist in stages, so that a reduced result exists early:
# budgets 1 and 2 with seeds 0-1, then seed 2, then the 4-epoch budget. Each stage resumes
# from runs.jsonl. Uses the python on PATH (torch installed); run from anywhere. Extra
# options go to every stage, e.g. --data-dir DIR for data outside the default folder.
set -eu
cd "$(dirname "$0")/../../.."
common=(--dataset fashion-mnist --model cnn --optimizer sgd --lr 0.05 --lam 0.1
        --batch-size 128 --threads 2 --out docs/results/fashion_mnist)
for stage in "--epochs 1 2 --seeds 2" "--epochs 1 2 --seeds 3" "--epochs 1 2 4 --seeds 3"; do
  echo "=== stage: $stage"
  # shellcheck disable=SC2086  # $stage is a list of options
  PYTHONPATH=. python examples/compare.py "${common[@]}" $stage "$@"
done
