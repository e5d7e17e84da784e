"""Vanilla vs TrAct training comparisons in PyTorch, JAX (Flax NNX) and Keras 3, offline.

- ``data``: sklearn digits, Fashion-MNIST (IDX .gz), CIFAR-10/100 (python pickles), all read
  from local files and standardized per channel, as numpy arrays.
- ``config``: what identifies a run (settings, method, seed, framework): the resume key.
- ``models``: a small CNN, a CIFAR ResNet-18 and a small ViT (torch), each naming its first
  layer.
- ``train``: one torch (method, seed, config) run: same init, batches and lr for both
  methods. ``train_jax`` and ``train_keras``: the same loop in JAX and Keras, with the
  models written again there; ``loop``: the numpy parts they share.
- ``results``: the resumable JSONL store, the markdown table and the accuracy plot.
- ``cli``: the command line (``examples/compare.py``, ``examples/train_digits.py``).
"""
