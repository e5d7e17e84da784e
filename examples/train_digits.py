"""Vanilla vs TrAct on scikit-learn's 8x8 digits: a small CNN, first conv wrapped.

    python examples/train_digits.py [--epochs 3] [--seeds 3] [--lam 0.1] [--out DIR]

The data ship with scikit-learn (no download). Both methods use the same seeds, model
initialisation, batches and learning rate (SGD momentum 0.9, lr 0.05, cosine); only the
first layer's weight gradient differs. Prints each run's test accuracy, then a table with
the mean +- std per method. This is ``compare.py`` with digits defaults: any of its
options (``--help``) can be added, e.g. ``--out DIR`` for the table, the plot and the
resumable results file.
"""

from tract_compare.cli import main

# One thread: on 8x8 images a second one costs more in synchronisation than it saves.
DIGITS_DEFAULTS = {"dataset": "digits", "model": "cnn", "optimizer": "sgd", "lr": 0.05,
                   "epochs": [3], "seeds": 3, "batch_size": 64, "weight_decay": 5e-4,
                   "threads": 1}

if __name__ == "__main__":
    main(defaults=DIGITS_DEFAULTS)
