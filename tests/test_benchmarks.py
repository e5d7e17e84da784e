"""The benchmarks' plumbing: each whole-step script, in a fresh process as a user runs it,
trains one round of the small CNN per variant and prints a table row per variant that
agrees with the per-round ratios it writes; bench_all.py runs a framework's tables in one
command. Nothing here is timed or compared to a goal.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import need

ROOT = pathlib.Path(__file__).parents[1]
SCRIPTS = [  # script, the variants besides plain, the modules it needs
    ("whole_step_torch.py", ["tract", "public"], ["torch"]),
    ("whole_step_jax.py", ["tract"], ["jax", "flax", "optax"]),
    ("whole_step_keras.py", ["tract"], ["keras", "jax"]),
]


def run_benchmark(script, json_path):
    """stdout of ``script --rounds 1 --models cnn``, which writes its ratios to json_path."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--rounds", "1",
               "--models", "cnn", "--threads", "1", "--json", str(json_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": "jax"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("script, variants, modules", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_whole_step_benchmark_prints_the_ratios_it_writes(script, variants, modules,
                                                          tmp_path):
    for module in modules:
        need(module)
    stdout = run_benchmark(script, tmp_path / "ratios.json")
    ratios = json.loads((tmp_path / "ratios.json").read_text())
    assert sorted(ratios) == sorted(f"cnn/{variant}" for variant in variants)
    for variant in variants:
        (ratio,) = ratios[f"cnn/{variant}"]  # one paired round: one ratio
        assert 0 < ratio < float("inf")
        rows = [line for line in stdout.splitlines() if line.startswith(f"| cnn | {variant} |")]
        assert len(rows) == 1, stdout
        median, plain_ms, variant_ms = (rows[0].split("|")[i].split()[0] for i in (3, 4, 5))
        assert float(median) == pytest.approx(ratio, abs=5e-4)
        # Each time is one step's; their ratio is the round's (to the cells' rounding).
        assert float(variant_ms) / float(plain_ms) == pytest.approx(ratio, rel=0.02, abs=0.02)


def test_cuda_graphs_need_a_cuda_device(capsys):
    need("torch")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import whole_step_torch
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    with pytest.raises(SystemExit):
        whole_step_torch.parse(["--cuda-graphs", "--device", "cpu"])
    assert "--cuda-graphs needs --device cuda" in capsys.readouterr().err


def test_bench_all_runs_each_frameworks_layer_and_whole_steps(tmp_path):
    """One command for every table: PyTorch's first-layer benchmark, its whole steps and
    Keras's on torch, each table printed under its name and written to --out; a
    framework not installed is skipped with a message, not a failure."""
    need("torch")
    need("keras")
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_all.py"), "--rounds", "1",
               "--threads", "1", "--frameworks", "torch", "--whole-steps", "--models", "cnn",
               "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    sections = result.stdout.split("\n## ")[1:]
    assert [s.split("\n")[0] for s in sections] == [
        "torch", "torch-whole-step", "keras-torch-whole-step"]
    assert "| cifar_vit_patch4 |" in sections[0]
    for section in sections[1:]:
        assert "| cnn | tract |" in section
    for name in ("torch", "torch-whole-step", "keras-torch-whole-step"):
        assert (tmp_path / f"{name}.md").read_text() in result.stdout
    assert "cnn/tract" in json.loads((tmp_path / "torch-whole-step.json").read_text())
    if importlib.util.find_spec("tensorflow") is None:
        skipped = subprocess.run([*command[:6], "--frameworks", "tensorflow"],
                                 capture_output=True, text=True, timeout=60,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert skipped.returncode == 0, skipped.stderr[-3000:]
        assert "tensorflow not installed here: skipped" in skipped.stdout
