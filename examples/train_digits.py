"""Vanilla vs TrAct on scikit-learn's 8x8 digits: a small CNN, first conv wrapped.

    python examples/train_digits.py [--epochs 1 2 4] [--seeds 5] [--lam 0.1] [--out DIR]

The data ship with scikit-learn (no download). Both methods use the same seeds, model
initialisation, batches and learning rate (SGD momentum 0.9, lr 0.05, cosine); only the
first layer's weight gradient differs. Each budget (1, 2 and 4 epochs; vanilla also 8) is
a full cosine run. Prints each run's test accuracy, a table with the mean +- std per
method, the speed-up factor per budget (the epochs vanilla needs to match TrAct, with a
bootstrap interval over seeds, in epochs and in time), and last one line: the factor at
the largest budget and both accuracies there. This is ``compare.py`` with digits
defaults: any of its options (``--help``) can be added, e.g. ``--out DIR`` for the
report, the plot and the resumable results file.
"""

from tract_compare.cli import main

# One thread: on 8x8 images a second one costs more in synchronisation than it saves.
DIGITS_DEFAULTS = {"dataset": "digits", "model": "cnn", "optimizer": "sgd", "lr": 0.05,
                   "epochs": [1, 2, 4], "baseline_epochs": [8], "seeds": 5,
                   "batch_size": 64, "weight_decay": 5e-4, "threads": 1}

if __name__ == "__main__":
    main(defaults=DIGITS_DEFAULTS)
