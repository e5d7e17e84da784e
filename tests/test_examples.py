"""The training comparison in examples/: loaders on fake files, models, resume, report.

The torch trainer is tested first; then the JAX (Flax NNX) and Keras trainers: tiny runs
through the command line, resume, identical starts for both methods, and one step's
first-layer gradient against TrAct's formula in float64.
"""

import dataclasses
import gzip
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import need

import tract_core

torch = need("torch")
need("sklearn")
need("matplotlib")
need("tqdm")
tt = pytest.importorskip("tract_core.torch")

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
from tract_compare import cli, config, data, loop, models, results, speedup, train  # noqa: E402


def write_idx(path, array):
    """An unsigned-byte IDX file, gzipped, like the Fashion-MNIST files."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                      *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder, n_train=64, n_test=32, side=28):
    """Random Fashion-MNIST-format files in ``folder``; returns (train, test) labels."""
    rng = np.random.default_rng(0)
    labels = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, side, side)))
        labels[split] = rng.integers(0, 10, n)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels[split])
    return labels["train"], labels["t10k"]


def write_cifar_batch(path, images, labels, label_key):
    """A CIFAR python batch: a dict with bytes keys, rows of 3072 uint8 (R, G, B planes)."""
    with open(path, "wb") as file:
        pickle.dump({b"data": images.reshape(len(images), -1),
                     label_key.encode(): labels.tolist()}, file)


def test_fashion_mnist_reads_idx_gz_files(tmp_path):
    train_labels, test_labels = fake_fashion_mnist(tmp_path, n_train=6, n_test=4)
    dataset = data.load_dataset("fashion-mnist", tmp_path)
    assert dataset.x_train.shape == (6, 1, 28, 28) and dataset.x_test.shape == (4, 1, 28, 28)
    assert dataset.x_train.dtype == np.float32 and dataset.classes == 10
    assert dataset.y_train.dtype == np.int64
    np.testing.assert_array_equal(dataset.y_train, train_labels)
    np.testing.assert_array_equal(dataset.y_test, test_labels)
    # Standardized with the training set's statistics.
    assert abs(dataset.x_train.mean()) < 1e-4
    assert abs(dataset.x_train.std() - 1) < 1e-3


def test_inputs_unstandardized_and_padded(tmp_path):
    fake_fashion_mnist(tmp_path, n_train=6, n_test=4)
    pixels = data.read_idx(tmp_path / "train-images-idx3-ubyte.gz").astype(np.float32)
    raw = data.load_dataset("fashion-mnist", tmp_path, inputs="0-255")
    np.testing.assert_array_equal(raw.x_train[:, 0], pixels)
    unit = data.load_dataset("fashion-mnist", tmp_path, inputs="0-1")
    np.testing.assert_allclose(unit.x_train[:, 0], pixels / 255, rtol=1e-6)
    digits = data.load_dataset("digits", inputs="0-255")  # 0..16 pixels, scaled to 0..255
    assert digits.x_train.min() == 0 and digits.x_train.max() == 255
    padded = data.load_dataset("fashion-mnist", tmp_path, inputs="0-255", pad_to=32)
    assert padded.x_train.shape == (6, 1, 32, 32) and padded.x_test.shape == (4, 1, 32, 32)
    np.testing.assert_array_equal(padded.x_train[:, 0, 2:30, 2:30], pixels)
    assert not padded.x_train[:, :, :2].any() and not padded.x_train[..., 30:].any()
    # Standardized after padding: the border is a black pixel's standardized value.
    standard = data.load_dataset("fashion-mnist", tmp_path, pad_to=32)
    framed = np.pad(pixels, ((0, 0), (2, 2), (2, 2)))
    black = -framed.mean() / framed.std()
    np.testing.assert_allclose(standard.x_train[:, 0, 0], black, rtol=1e-5)
    with pytest.raises(ValueError, match="pad_to"):
        data.load_dataset("fashion-mnist", tmp_path, pad_to=20)
    with pytest.raises(ValueError, match="inputs"):
        data.load_dataset("fashion-mnist", tmp_path, inputs="0-65535")


@pytest.mark.parametrize("name, files, label_key, classes", [
    ("cifar10", data.CIFAR10_FILES, "labels", 10),
    ("cifar100", data.CIFAR100_FILES, "fine_labels", 100),
])
def test_cifar_reads_python_pickles(tmp_path, name, files, label_key, classes):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (len(files), 2, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, classes, (len(files), 2))
    for path, batch_images, batch_labels in zip(files, images, labels):
        write_cifar_batch(tmp_path / path, batch_images, batch_labels, label_key)
    dataset = data.load_dataset(name, tmp_path)
    n_train = 2 * (len(files) - 1)
    assert dataset.x_train.shape == (n_train, 3, 32, 32) and dataset.classes == classes
    assert dataset.x_test.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(dataset.y_train, labels[:-1].ravel())
    np.testing.assert_array_equal(dataset.y_test, labels[-1])
    # Channel planes land in channels: standardizing per channel is an affine map each.
    train = images[:-1].reshape(n_train, 3, 32, 32).astype(np.float32)
    for channel in range(3):
        plain = train[:, channel]
        expected = (plain - plain.mean()) / plain.std()
        np.testing.assert_allclose(dataset.x_train[:, channel], expected, atol=1e-4)


def test_missing_data_names_the_folder_and_the_files(tmp_path, capsys):
    with pytest.raises(data.DataNotFoundError) as error:
        data.load_fashion_mnist(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "dataset-fashion-mnist" in message and "--data-dir" in message
    (tmp_path / "data_batch_1").touch()
    with pytest.raises(data.DataNotFoundError, match=r"data_batch_2.*test_batch"):
        data.load_cifar10(tmp_path)
    with pytest.raises(data.DataNotFoundError, match="--data-dir"):
        data.load_cifar100(None)
    # The command line says it in one line, without a traceback.
    with pytest.raises(SystemExit) as stop:
        cli.main(["--dataset", "cifar100", "--data-dir", str(tmp_path)])
    assert "train, test" in str(stop.value) and str(tmp_path) in str(stop.value)


def test_resnet_width_scales_its_channels():
    model = models.build_model("resnet18", 1, 32, classes=10, width=16)
    assert model.stem.out_channels == 16 and model.head.in_features == 128
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name, channels, side", [
    ("cnn", 1, 28), ("cnn", 3, 32), ("cnn", 1, 8),
    ("resnet18", 3, 32), ("resnet18", 1, 28),
    ("vit", 3, 32), ("vit", 1, 28), ("vit", 1, 8),
])
def test_models_take_each_data_sets_shape(name, channels, side):
    model = models.build_model(name, channels, side, classes=7)
    assert model(torch.randn(2, channels, side, side)).shape == (2, 7)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_tract_model_trains_its_first_layer_with_tract(name):
    torch.manual_seed(0)
    model = models.build_model(name, 3, 32, classes=10)
    first = getattr(model, model.first_layer)
    assert type(first) is torch.nn.Conv2d
    models.wrap_first_layer(model, lam=0.1)
    wrapped = getattr(model, model.first_layer)
    assert isinstance(wrapped, tt.TrActConv2d) and wrapped.lam == 0.1
    assert wrapped.weight is first.weight  # same Parameter: the optimizer sees no change
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert wrapped.weight.grad is not None


def test_augment_shifts_and_flips_within_the_image():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = train.augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    # Every non-padding pixel comes from the same image and channel.
    for i in range(2):
        for c in range(3):
            kept = out[i, c][out[i, c] != 0]
            assert set(kept.tolist()) <= set(images[i, c].flatten().tolist())


TINY = ["--epochs", "1", "--seeds", "2", "--train-limit", "64", "--test-limit", "32",
        "--batch-size", "32", "--threads", "1", "--no-progress"]


def test_interrupted_comparison_resumes_where_it_stopped(tmp_path, monkeypatch):
    calls = []

    def train_then_stop(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if stopped during the fourth run
        calls.append(args[1:3])
        return train.train_run(*args, **kwargs)

    monkeypatch.setattr(cli, "train_run", train_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*TINY, "--out", str(tmp_path)])
    assert calls == [("vanilla", 0), ("tract", 0), ("vanilla", 1)]
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 3
    with (tmp_path / "runs.jsonl").open("a") as file:
        file.write('{"method": "tract", "se')  # a record cut short by a kill

    calls.clear()
    comparisons = cli.main([*TINY, "--out", str(tmp_path)])
    assert calls == [("tract", 1)]  # only the missing run trains
    stored = [json.loads(line) for line in lines]
    assert comparisons[0].runs["vanilla"][1]["test_acc"] == stored[2]["test_acc"]

    calls.clear()
    cli.main([*TINY, "--out", str(tmp_path), "--lam", "0.2"])
    assert calls == [("tract", 0), ("tract", 1)]  # a new lambda: vanilla runs are reused


def test_tiny_comparison_writes_table_and_plot(tmp_path):
    fake_fashion_mnist(tmp_path)
    out = tmp_path / "out"
    comparisons = cli.main([*TINY, "--dataset", "fashion-mnist", "--data-dir", str(tmp_path),
                            "--epochs", "1", "2", "--out", str(out)])
    assert [c.epochs for c in comparisons] == [1, 2]
    for c in comparisons:
        for method in train.METHODS:
            assert [r["seed"] for r in c.runs[method]] == [0, 1]
            assert len(c.runs[method][0]["history"]) == c.epochs
    report = (out / "results.md").read_text()
    assert "| epochs | lr | lam | vanilla (%) | TrAct (%)" in report and "accuracy.png" in report
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "runs.jsonl").read_text().splitlines()) == 8


def test_lr_sweep_gives_tract_the_baselines_best_lr(tmp_path):
    comparisons = cli.main([*TINY, "--seeds", "1", "--lr-sweep", "0.5", "0.001",
                            "--out", str(tmp_path)])
    store = results.ResultStore(tmp_path / "runs.jsonl")
    assert len(store) == 3  # vanilla at each lr, TrAct at the best one
    best = comparisons[0].lr
    config = train.RunConfig(dataset="digits", model="cnn", optimizer="sgd", lr=0.5,
                             epochs=1, batch_size=32, train_limit=64, test_limit=32)
    accs = {lr: store.get(train.run_key(dataclasses.replace(config, lr=lr),
                                        "vanilla", 0))["test_acc"] for lr in (0.5, 0.001)}
    assert best == max(accs, key=accs.get)
    assert comparisons[0].runs["tract"][0]["lr"] == best
    assert "* |" in (tmp_path / "results.md").read_text()


def test_train_digits_is_compare_with_digits_defaults():
    import train_digits

    args = cli.parse_args(["--seeds", "1"], train_digits.DIGITS_DEFAULTS)
    assert (args.dataset, args.epochs, args.seeds, args.batch_size) == ("digits", [1, 2, 4],
                                                                         1, 64)
    assert args.baseline_epochs == [8]
    assert train_digits.main is cli.main


# --------------------------------------------------------------------------- speed-up


def test_vanilla_epochs_are_interpolated_in_log_epochs():
    budgets, accuracies = [1, 2, 4, 8], [80.0, 85.0, 88.0, 90.0]
    assert speedup.vanilla_epochs_to_reach(budgets, accuracies, 86.5) == pytest.approx(
        2 ** 1.5, rel=1e-12)  # halfway from 85 to 88: halfway from 2 to 4 in log2
    assert speedup.vanilla_epochs_to_reach(budgets, accuracies, 88.0) == 4
    assert speedup.vanilla_epochs_to_reach(budgets, accuracies, 79.0) == 1  # a bound
    assert speedup.vanilla_epochs_to_reach(budgets, accuracies, 90.5) == float("inf")
    # Not monotone: the first budget that gets there counts.
    assert speedup.vanilla_epochs_to_reach([1, 2, 4, 8], [80, 86, 84, 90], 85) == (
        pytest.approx(2 ** (5 / 6), rel=1e-12))
    with pytest.raises(ValueError, match="increase"):
        speedup.vanilla_epochs_to_reach([2, 1], [1, 2], 1.5)


def test_speed_up_factor_its_bounds_and_its_bootstrap_interval():
    # Vanilla gains 4 points per doubling; TrAct at E is vanilla at 2E, seed by seed:
    # the factor is exactly 2 for every resample, in epochs.
    offsets = [0.3, -0.2, 0.5, -0.4, 0.1]
    vanilla = {e: [80 + 4 * np.log2(e) + o for o in offsets] for e in (1, 2, 4, 8, 16)}
    tract = {e: [80 + 4 * np.log2(2 * e) + o for o in offsets] for e in (1, 2, 4)}
    rows = speedup.speed_ups(vanilla, tract, time_ratios=[1.2, 1.25, 1.3, 1.25, 1.2])
    assert [s.epochs for s in rows] == [1, 2, 4]
    for s in rows:
        assert s.factor == pytest.approx(2, rel=1e-12) and s.bound == ""
        assert s.interval == pytest.approx((2, 2), rel=1e-12)
        assert s.time_ratio == 1.25 and s.time_factor == pytest.approx(1.6, rel=1e-12)
        low, high = s.time_interval  # 2 over the median of resampled rounds
        assert 2 / 1.3 - 1e-12 <= low <= 1.6 <= high <= 2 / 1.2 + 1e-12
    # Noise in TrAct's seeds widens the interval around the point estimate.
    noisy = {e: [v + d for v, d in zip(runs, [1.0, -1.0, 0.6, -0.2, -0.4])]
             for e, runs in tract.items()}
    for s in speedup.speed_ups(vanilla, noisy):
        assert s.interval[0] < s.factor < s.interval[1] and s.time_factor is None
    # Vanilla never reaches TrAct's 8-epoch accuracy: a lower bound, an open interval.
    beyond = speedup.speed_ups(vanilla, {8: [97.0 + o for o in offsets]})[0]
    assert beyond.bound == ">" and beyond.interval[1] == float("inf")
    text = speedup.factor_text(beyond)
    assert text.startswith("> 2.00x") and text.endswith("∞]")
    below = speedup.speed_ups(vanilla, {2: [70.0] * 5})[0]
    assert below.bound == "<=" and speedup.factor_text(below).startswith("<= 0.50x")
    with pytest.raises(ValueError, match="same seeds"):
        speedup.speed_ups(vanilla, {1: [80.0, 81.0]})
    # One seed: a factor, and no interval pretending to be one.
    (single,) = speedup.speed_ups({1: [80.0], 2: [84.0]}, {1: [82.0]}, time_ratios=[1.1])
    assert single.factor == pytest.approx(2 ** 0.5, rel=1e-12)
    assert speedup.factor_text(single).endswith("[no interval: one seed]")
    assert speedup.factor_text(single, time=True).endswith("[no interval: one seed]")


def test_the_bootstrap_keeps_a_seeds_runs_together():
    # Seed 1 is good for both methods at every budget: resampled together, the factor
    # stays 2 (TrAct at 1 epoch = vanilla at 2, seed by seed); resampled apart, it would not.
    vanilla = {1: [80.0, 90.0], 2: [84.0, 94.0], 4: [88.0, 98.0]}
    tract = {1: [84.0, 94.0]}
    (row,) = speedup.speed_ups(vanilla, tract)
    assert row.factor == pytest.approx(2, rel=1e-12)
    assert row.interval == pytest.approx((2, 2), rel=1e-12)


def test_paired_step_timing_alternates_and_pairs_rounds(monkeypatch):
    clock, calls = [0.0], []

    def fake_step(method, cost):
        def step(idx):
            assert len(idx) == 8
            calls.append(method)
            clock[0] += cost
        return step

    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    timing = loop.paired_step_seconds({"vanilla": fake_step("vanilla", 1.0),
                                       "tract": fake_step("tract", 1.5)}, count=100,
                                      batch_size=8, rounds=4, steps=3)
    assert timing["vanilla"] == 1.0 and timing["tract"] == 1.5
    assert timing["ratios"] == [1.5] * 4
    timed = calls[4:]  # after two warm-up steps each
    assert timed == (["vanilla"] * 3 + ["tract"] * 3 + ["tract"] * 3 + ["vanilla"] * 3) * 2


def test_budget_sweep_reports_the_factor_and_ends_with_its_line(tmp_path, capsys):
    comparisons = cli.main([*TINY, "--epochs", "1", "2", "--baseline-epochs", "4",
                            "--lam", "0.1", "0.5", "--timing-rounds", "2",
                            "--out", str(tmp_path)])
    assert [(c.epochs, c.lam) for c in comparisons] == [
        (1, 0.1), (1, 0.5), (2, 0.1), (2, 0.5), (4, None)]
    assert comparisons[-1].runs["tract"] == [] and len(comparisons[-1].runs["vanilla"]) == 2
    assert comparisons[0].runs["vanilla"] is comparisons[1].runs["vanilla"]
    report = (tmp_path / "results.md").read_text()
    assert "| 4 | 0.05 | — |" in report  # vanilla alone at 4 epochs
    assert "speed-up in epochs [95% CI] | speed-up in time [95% CI] |" in report
    assert "| 0.5 | 2 |" in report and "--baseline-epochs 4" in report
    timing = json.loads((tmp_path / "timing.json").read_text())
    (entry,) = timing.values()
    assert len(entry["ratios"]) == 2 and entry["vanilla"] > 0 and entry["tract"] > 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    # The factor at the largest budget, recomputed from the runs.
    vanilla = {c.epochs: [r["test_acc"] for r in c.runs["vanilla"]]
               for c in comparisons if c.lam in (None, 0.1)}
    tract = {c.epochs: [r["test_acc"] for r in c.runs["tract"]]
             for c in comparisons if c.lam == 0.1}
    expected = speedup.speed_ups(vanilla, tract, entry["ratios"])[-1]
    assert last == speedup.summary_line(expected)
    assert last.startswith("TrAct speed-up [95% CI] at 2 epochs: ") and "in time" in last
    # A resumed run reuses the timing: the line is the same.
    cli.main([*TINY, "--epochs", "1", "2", "--baseline-epochs", "4", "--lam", "0.1",
              "0.5", "--timing-rounds", "2", "--out", str(tmp_path)])
    assert capsys.readouterr().out.strip().splitlines()[-1] == last


def test_command_line_rejects_bad_budgets_and_options(capsys):
    for argv in (["--epochs", "0"], ["--baseline-epochs", "-1"], ["--lam", "0"],
                 ["--width", "16"], ["--model", "resnet18", "--framework", "jax",
                                     "--width", "16"]):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
    assert "--width applies to the torch ResNet-18" in capsys.readouterr().err


# --------------------------------------------------------------------------- all frameworks


def test_the_command_line_imports_no_framework_until_it_trains():
    code = ("import sys; from tract_compare import cli, data, loop, results; "
            "print(sorted({'torch', 'jax', 'keras'} & set(sys.modules)))")
    examples = pathlib.Path(__file__).parents[1] / "examples"
    out = subprocess.run([sys.executable, "-c", code], cwd=examples, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_framework_builds_every_model_name():
    assert tuple(models.MODELS) == config.MODEL_NAMES


def test_records_from_before_the_framework_field_are_torch_runs(tmp_path):
    base = config.RunConfig(dataset="digits", model="cnn", optimizer="sgd", lr=0.05,
                            epochs=1)
    old = config.run_key(base, "tract", 0)
    del old["framework"]  # as written before JAX and Keras runs existed
    (tmp_path / "runs.jsonl").write_text(json.dumps({**old, "test_acc": 50.0}) + "\n")
    store = results.ResultStore(tmp_path / "runs.jsonl")
    assert store.get(config.run_key(base, "tract", 0))["test_acc"] == 50.0
    for framework in ("jax", "keras-jax"):
        other = dataclasses.replace(base, framework=framework)
        assert store.get(config.run_key(other, "tract", 0)) is None
    with pytest.raises(ValueError, match="framework"):
        config.run_key(dataclasses.replace(base, framework="mxnet"), "tract", 0)


def test_numpy_batches_and_augmentation_are_the_seeds():
    first, again = (loop.epoch_batches(10, 4, np.random.default_rng(3)) for _ in range(2))
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(np.concatenate(first)) == list(range(10))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    images = np.arange(2 * 32 * 32 * 3, dtype=np.float32).reshape(2, 32, 32, 3) + 1
    out = loop.augment(images, np.random.default_rng(0))
    assert out.shape == images.shape and not np.array_equal(out, images)
    for i in range(2):
        for c in range(3):
            kept = out[i, ..., c][out[i, ..., c] != 0]  # the rest is zero padding
            assert set(kept.tolist()) <= set(images[i, ..., c].ravel().tolist())


# Every run: 4 steps of one batch shape (one compile), one test batch. (With fewer steps
# or a smaller lr the two methods' losses can agree to float32 precision.)
SMALL = ["--train-limit", "128", "--test-limit", "64", "--batch-size", "32", "--lr", "0.2",
         "--epochs", "1", "--seeds", "1", "--threads", "1", "--no-progress"]


def small_digits():
    return data.load_dataset("digits", train_limit=128, test_limit=64)


def one_batch(n=32):
    """n digits, channels-last, and their labels: one step's batch."""
    digits = data.load_dataset("digits", train_limit=n)
    return loop.channels_last(digits.x_train), digits.y_train, digits


def tract_reference(plain_grad, images, lam, padding):
    """TrAct's kernel gradient in float64 from the plain one, G^T X: (G^T X) (X^T X/b +
    lam I)^-1, X the conv's patch rows. plain_grad: (kh, kw, C, M); images: (N, H, W, C)."""
    kh, kw, channels, filters = plain_grad.shape
    padded = np.pad(images.astype(np.float64).transpose(0, 3, 1, 2),
                    ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    rows = np.asarray(tract_core.conv_patches(padded, (kh, kw), (1, 1), (1, 1)))[0]
    grad = plain_grad.astype(np.float64).transpose(3, 2, 0, 1).reshape(filters, -1)
    system = rows.T @ rows / len(rows) + lam * np.eye(rows.shape[1])
    tract = np.linalg.solve(system, grad.T).T  # (M, C kh kw); the system is symmetric
    core = tract_core.precondition(grad, tract_core.gram(rows), len(rows), lam)
    np.testing.assert_allclose(core, tract, rtol=1e-10, atol=1e-14)  # the core's formula
    return tract.reshape(filters, channels, kh, kw).transpose(2, 3, 1, 0)


def relative_error(actual, expected):
    return np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected)


def check_small_comparison(tmp_path, framework, version_fields, monkeypatch):
    """A 1-seed comparison through the command line, then its resume: nothing trains."""
    comparisons = cli.main([*SMALL, "--framework", framework, "--out", str(tmp_path)])
    vanilla, tract = (comparisons[0].runs[m][0] for m in train.METHODS)
    for record in (vanilla, tract):
        cfg = config.RunConfig(dataset="digits", model="cnn", optimizer="sgd", lr=0.2,
                               epochs=1, batch_size=32, lam=0.1, train_limit=128,
                               test_limit=64, framework=record["framework"])
        key = config.run_key(cfg, record["method"], 0)
        assert {k: record[k] for k in key} == key
        assert set(record) == {*key, "test_acc", "history", "train_loss", "seconds",
                               "threads", *version_fields}
        assert record["history"] == [record["test_acc"]] and 0 <= record["test_acc"] <= 100
        assert len(record["train_loss"]) == 1 and 0 < record["train_loss"][0] < 10
    assert vanilla["framework"] == tract["framework"] != "torch"
    # Same start and batches, different first-layer gradients: close losses, not equal.
    assert vanilla["train_loss"] != tract["train_loss"]
    assert abs(vanilla["train_loss"][0] - tract["train_loss"][0]) < 0.01
    assert "| 1 | 0.2 |" in (tmp_path / "results.md").read_text()

    def must_not_train(*args, **kwargs):
        raise AssertionError(f"trained {args[1:3]} again")

    with monkeypatch.context() as patch:
        patch.setattr(cli, "train_run", must_not_train)
        again = cli.main([*SMALL, "--framework", framework, "--out", str(tmp_path)])
    assert again[0].runs["tract"][0] == tract
    # The torch runs of the same settings are other runs: they train, next to these.
    calls = []
    monkeypatch.setattr(cli, "train_run", lambda *a, **k: calls.append(a[1:3]) or
                        train.train_run(*a, **k))
    cli.main([*SMALL, "--framework", "torch", "--out", str(tmp_path)])
    assert calls == [("vanilla", 0), ("tract", 0)]
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 4


# --------------------------------------------------------------------------- JAX


@pytest.fixture(scope="module")
def train_jax():
    for name in ("jax", "flax", "optax"):
        need(name)
    from tract_compare import train_jax

    return train_jax


@pytest.mark.parametrize("name", list(config.MODEL_NAMES))
def test_jax_models_take_the_shape_and_train_with_a_wrapped_first_layer(train_jax, name):
    import jax
    from flax import nnx

    import tract_core.flax as tflax

    model = train_jax.build_model(name, 1, 8, classes=7, seed=0)
    images, labels = np.ones((2, 8, 8, 1), np.float32), np.arange(2)
    assert nnx.eval_shape(lambda m, x: m(x), model, images).shape == (2, 7)
    first = getattr(model, model.first_layer)
    train_jax.wrap_first_layer(model, lam=0.1)
    wrapped = getattr(model, model.first_layer)
    assert isinstance(wrapped, tflax.TrActConv) and wrapped.lam == 0.1
    assert wrapped.kernel is first.kernel  # the same Param: same start for both methods
    # One jitted training step: a finite loss; batch norm's running statistics move.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = train_jax.make_optimizer("sgd", 0.1, 10, 0.0)
    params, new_rest, _, loss = train_jax.train_step(graphdef, optimizer)(
        params, rest, optimizer.init(params), images, labels, 0.0)
    assert np.isfinite(float(loss))
    before, after = jax.tree.leaves(rest), jax.tree.leaves(new_rest)
    if name == "resnet18":
        assert before and any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_jax_tract_gradient_is_the_formula_and_only_the_first_layers(train_jax):
    import jax
    from flax import nnx

    images, labels, _ = one_batch()
    losses, grads = {}, {}
    for method in train.METHODS:
        model = train_jax.build_model("cnn", 1, 8, 10, seed=0)
        if method == "tract":
            train_jax.wrap_first_layer(model, 0.1)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        value_and_grad = jax.value_and_grad(train_jax.loss_fn, argnums=1, has_aux=True)
        (loss, _), grad = jax.jit(value_and_grad, static_argnums=0)(
            graphdef, params, rest, images, labels)
        losses[method] = float(loss)
        grads[method] = jax.tree.map(np.asarray, nnx.to_pure_dict(grad))
    assert losses["vanilla"] == losses["tract"]  # same init, same forward
    plain, tract = grads["vanilla"], grads["tract"]
    for layer in plain:
        for name in plain[layer]:
            if (layer, name) != ("conv1", "kernel"):
                np.testing.assert_array_equal(plain[layer][name], tract[layer][name])
    expected = tract_reference(plain["conv1"]["kernel"], images, lam=0.1, padding=2)
    assert relative_error(tract["conv1"]["kernel"], expected) < 1e-5
    assert relative_error(plain["conv1"]["kernel"], expected) > 0.1  # the test can fail


def test_jax_comparison_runs_and_resumes(train_jax, tmp_path, monkeypatch):
    check_small_comparison(tmp_path, "jax", {"jax", "flax", "optax"}, monkeypatch)


# --------------------------------------------------------------------------- Keras


@pytest.fixture(scope="module")
def train_keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = need("keras")
    need(keras.backend.backend())
    from tract_compare import train_keras

    return train_keras


@pytest.mark.parametrize("name", list(config.MODEL_NAMES))
def test_keras_models_take_the_shape_and_start_alike(train_keras, name):
    import tract_core.keras as tk

    plain = train_keras.build_model(name, 1, 8, classes=7, seed=0)
    tract = train_keras.build_model(name, 1, 8, classes=7, seed=0, lam=0.1)
    first = tract.get_layer(train_keras.FIRST_LAYER[name])
    assert isinstance(first, tk.TrActConv2D) and first.lam == 0.1
    assert type(plain.get_layer(first.name)) is train_keras.layers.Conv2D
    assert all(np.array_equal(a, b) for a, b in zip(plain.get_weights(), tract.get_weights()))
    assert len(plain.get_weights()) == len(tract.get_weights())
    assert tuple(plain(np.ones((2, 8, 8, 1), np.float32)).shape) == (2, 7)


def test_keras_tract_first_step_is_the_formula_and_only_the_first_layers(train_keras):
    # One SGD step from zero momentum at lr 1 (the cosine's first value): w0 - w1 = grad.
    images, labels, digits = one_batch()
    cfg = config.RunConfig(dataset="digits", model="cnn", optimizer="sgd", lr=1.0, epochs=1,
                           batch_size=len(labels), framework=train_keras.FRAMEWORK)
    one_hot = np.eye(10, dtype=np.float32)[labels]
    losses, steps = {}, {}
    for method in train.METHODS:
        model = train_keras.compiled_model(cfg, method, 0, digits)
        before = model.get_weights()
        losses[method] = model.train_on_batch(images, one_hot, return_dict=True)["loss"]
        steps[method] = [w0 - w1 for w0, w1 in zip(before, model.get_weights())]
    assert losses["vanilla"] == losses["tract"]  # same init, same forward
    plain, tract = steps["vanilla"], steps["tract"]  # conv1's kernel comes first
    for a, b in zip(plain[1:], tract[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    expected = tract_reference(plain[0], images, lam=0.1, padding=2)
    assert relative_error(tract[0], expected) < 2e-5
    assert relative_error(plain[0], expected) > 0.1  # the test can fail


def test_keras_comparison_runs_and_resumes(train_keras, tmp_path, monkeypatch):
    backend = train_keras.BACKEND
    check_small_comparison(tmp_path, "keras", {"keras", "keras_backend", backend},
                           monkeypatch)


def test_plot_draws_unbounded_factors_at_vanillas_ceiling(tmp_path):
    """Vanilla never reaches TrAct's 2-epoch accuracy, in no resample: the plot still
    draws, the table says the bound on both ends."""
    def runs(accuracies):
        return [{"test_acc": a, "seconds": 1.0} for a in accuracies]

    comparisons = [
        results.Comparison(1, 0.1, {"vanilla": runs([80, 81]), "tract": runs([82, 83])}, 0.1),
        results.Comparison(2, 0.1, {"vanilla": runs([84, 85]), "tract": runs([90, 91])}, 0.1),
        results.Comparison(4, 0.1, {"vanilla": runs([86, 87]), "tract": []}, None)]
    vanilla = {c.epochs: [r["test_acc"] for r in c.runs["vanilla"]] for c in comparisons}
    tract = {c.epochs: [r["test_acc"] for r in c.runs["tract"]] for c in comparisons[:2]}
    rows = speedup.speed_ups(vanilla, tract, time_ratios=[1.1, 1.2])
    assert speedup.factor_text(rows[1]) == "> 2.00x [> 2.00x, ∞]"
    results.plot_accuracy(comparisons, {0.1: rows}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
