"""The training comparison in examples/: loaders on fake files, models, resume, report."""

import dataclasses
import gzip
import json
import pathlib
import pickle
import struct
import sys

import numpy as np
import pytest
from conftest import need

torch = need("torch")
need("sklearn")
need("matplotlib")
need("tqdm")
tt = pytest.importorskip("tract_core.torch")

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
from tract_compare import cli, data, models, results, train  # noqa: E402


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
    dataset = data.load_fashion_mnist(tmp_path)
    assert dataset.x_train.shape == (6, 1, 28, 28) and dataset.x_test.shape == (4, 1, 28, 28)
    assert dataset.x_train.dtype == torch.float32 and dataset.classes == 10
    np.testing.assert_array_equal(dataset.y_train.numpy(), train_labels)
    np.testing.assert_array_equal(dataset.y_test.numpy(), test_labels)
    # Standardized with the training set's statistics.
    assert abs(dataset.x_train.mean().item()) < 1e-4
    assert abs(dataset.x_train.std(unbiased=False).item() - 1) < 1e-3


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
    np.testing.assert_array_equal(dataset.y_train.numpy(), labels[:-1].ravel())
    np.testing.assert_array_equal(dataset.y_test.numpy(), labels[-1])
    # Channel planes land in channels: standardizing per channel is an affine map each.
    train = images[:-1].reshape(n_train, 3, 32, 32).astype(np.float32)
    for channel in range(3):
        plain = train[:, channel]
        expected = (plain - plain.mean()) / plain.std()
        np.testing.assert_allclose(dataset.x_train[:, channel].numpy(), expected, atol=1e-4)


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
    assert "| epochs | lr | vanilla (%) | TrAct (%)" in report and "accuracy.png" in report
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
    assert (args.dataset, args.epochs, args.seeds, args.batch_size) == ("digits", [3], 1, 64)
    assert train_digits.main is cli.main
