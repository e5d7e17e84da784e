"""Vanilla vs TrAct training comparisons (PyTorch), offline.

- ``data``: sklearn digits, Fashion-MNIST (IDX .gz), CIFAR-10/100 (python pickles), all read
  from local files and standardized per channel.
- ``models``: a small CNN, a CIFAR ResNet-18 and a small ViT, each naming its first layer.
- ``train``: one (method, seed, config) run: same init, batches and lr for both methods.
- ``results``: the resumable JSONL store, the markdown table and the accuracy plot.
- ``cli``: the command line (``examples/compare.py``, ``examples/train_digits.py``).
"""
