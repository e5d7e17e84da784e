#!/bin/bash
# Every sweep of the training-comparison page (docs/training.md), one after another. Each
# resumes from its folder's runs.jsonl and timing.json: with those present it trains
# nothing and re-writes the folder's results.md and accuracy.png. Delete a folder's
# runs.jsonl (and timing.json) to train it again. Run from anywhere, with the examples'
# environment (backends/examples.txt) and Fashion-MNIST in /usr/share/datasets/fashion-mnist
# (Debian's dataset-fashion-mnist; or add --data-dir DIR to `common`).
set -eu
cd "$(dirname "$0")/../.."
export PYTHONPATH=.
common=(--dataset fashion-mnist --threads 2 --no-progress)
run() { python3 examples/compare.py "${common[@]}" "$@"; }
out=docs/results

# The small CNN, SGD: budgets 1-8 epochs for both methods, vanilla also at 16.
run --model cnn --optimizer sgd --lr 0.05 --epochs 1 2 4 8 --baseline-epochs 16 --seeds 3 \
    --out $out/fashion_mnist
# lambda from 0.01 to 1 at one budget (the paper's Fig. 6).
run --model cnn --optimizer sgd --lr 0.05 --epochs 1 --lam 0.1 0.01 0.03 0.3 1 --seeds 3 \
    --out $out/fashion_mnist_lam
# A small ViT, Adam with label smoothing, on the first 10000 training images.
run --model vit --optimizer adam --lr 1e-3 --label-smoothing 0.1 --epochs 1 2 4 \
    --baseline-epochs 8 --seeds 3 --train-limit 10000 --out $out/fashion_mnist_vit
# The CIFAR ResNet-18 (stem width 16) on Fashion-MNIST padded to 32x32, 10000 images.
run --model resnet18 --width 16 --pad-to 32 --optimizer sgd --lr 0.05 --epochs 1 2 \
    --baseline-epochs 4 --seeds 3 --train-limit 10000 --out $out/fashion_mnist_resnet18
# The small CNN on the first 10000 images, in PyTorch, then through the JAX (Flax NNX +
# optax) and Keras 3 (JAX backend) adapters.
run --model cnn --optimizer sgd --lr 0.05 --epochs 1 2 4 --baseline-epochs 8 --seeds 3 \
    --train-limit 10000 --out $out/fashion_mnist_10k
run --framework jax --model cnn --optimizer sgd --lr 0.05 --epochs 1 2 4 --baseline-epochs 8 \
    --seeds 3 --train-limit 10000 --out $out/fashion_mnist_jax
KERAS_BACKEND=jax run --framework keras --model cnn --optimizer sgd --lr 0.05 --epochs 1 2 4 \
    --baseline-epochs 8 --seeds 3 --train-limit 10000 --out $out/fashion_mnist_keras
# No standardization (the paper's Fig. 8): pixels in [0, 255] and in [0, 1], the ViT.
for inputs in 0-255 0-1; do
  run --model vit --optimizer adam --lr 1e-3 --label-smoothing 0.1 --inputs $inputs --epochs 2 \
      --lam 0.1 1 --seeds 3 --train-limit 10000 --out $out/fashion_mnist_vit_$inputs
done
