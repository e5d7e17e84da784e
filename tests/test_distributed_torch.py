"""Exact distributed TrAct in PyTorch: 2 gloo processes, each with part of a batch.

With sync=True every replica preconditions with the all-reduced Gram and row count, so
DDP's gradient averaging yields the single-process full-batch gradient of the fixtures.
One spawn runs every scenario (process start-up dominates the cost).
"""

import os

import numpy as np
import pytest
from conftest import CASES, assert_close, need

torch = need("torch")
tt = pytest.importorskip("tract_core.torch")
from test_torch import plain_layer, tract_reference, widened  # noqa: E402

WORLD = 2
CASE_NAMES = ["linear_rows", "linear_tokens", "conv2d_cifar_stem", "conv1d_stride_dilation",
              "conv3d_stride_groups", "linear_b_lt_n", "conv2d_stride2_pixels"]
# (case, sync, mode) scenarios each replica runs
SCENARIOS = ([(name, True, "ddp") for name in CASE_NAMES]
             + [("conv2d_cifar_stem", False, "ddp"), ("linear_rows", True, "no_sync"),
                ("conv2d_cifar_stem", True, "fsdp"),
                ("conv2d_stride2_pixels", True, "many_entries")]
             + [(name, sync, "accumulate") for name, sync in [
                 ("conv2d_cifar_stem", True), ("linear_tokens", True),
                 ("conv2d_cifar_stem", False)]])


def split_rows(n):
    """Unequal parts on purpose: the row count must be reduced, not assumed."""
    first = max(1, (2 * n) // 3)
    return [slice(0, first), slice(first, n)]


def _gradient(rank, case, sync, mode):
    if mode == "many_entries":  # seeded: the same layer and data in every process
        plain, x, grad_z = widened(case)
    else:
        plain, x, grad_z = plain_layer(case), torch.tensor(case.x), torch.tensor(case.grad_z)
    layer = tt.wrap(plain, lam=case.lam, sync=sync, accumulate=mode == "accumulate")
    part = split_rows(len(x))[rank]
    # Full-batch z.backward(G) splits into replica losses scaled by the world size,
    # since data parallelism averages the replicas' gradients.
    x, grad_z = x[part], grad_z[part] * WORLD
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(layer)
        layer(x).backward(grad_z)
        return layer.weight.grad.full_tensor()
    model = torch.nn.parallel.DistributedDataParallel(layer)
    if mode == "accumulate":  # micro-batches of unequal size; finalize all-reduces once
        for i, micro in enumerate(split_rows(len(x))):
            if i == 0:
                with model.no_sync():
                    model(x[micro]).backward(grad_z[micro])
            else:
                model(x[micro]).backward(grad_z[micro])
        tt.finalize(model)
        return layer.weight.grad
    if mode == "no_sync":  # accumulate two micro-batches, all-reduce on the second
        with model.no_sync():
            model(x).backward(grad_z)
        model(x).backward(grad_z)
        return layer.weight.grad / 2
    model(x).backward(grad_z)
    return layer.weight.grad


def _replica(rank, init_file, result_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}",
                                         rank=rank, world_size=WORLD)
    results = {}
    try:
        for i, (name, sync, mode) in enumerate(SCENARIOS):
            case = next(c for c in CASES if c.name == name)
            try:
                results[str(i)] = _gradient(rank, case, sync, mode).detach().numpy()
            except Exception as error:  # reported by the test that reads it
                results[f"{i}_error"] = np.array(repr(error))
    finally:
        torch.distributed.destroy_process_group()
    if rank == 0:
        np.savez(result_file, **results)
    # Leave without interpreter finalization: gloo's worker threads can still be releasing
    # the last collective's tensors then, which aborts the process (SIGABRT).
    os._exit(0)


@pytest.fixture(scope="module")
def replica_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo")
    result = folder / "grads.npz"
    torch.multiprocessing.spawn(_replica, args=(str(folder / "init"), str(result)),
                                nprocs=WORLD, join=True)
    with np.load(result) as data:
        return {key: data[key] for key in data.files}


def result_of(results, scenario):
    i = SCENARIOS.index(scenario)
    assert f"{i}_error" not in results, str(results.get(f"{i}_error"))
    return results[str(i)]


@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_ddp_sync_equals_full_batch(replica_results, case_name):
    case = next(c for c in CASES if c.name == case_name)
    grad = result_of(replica_results, (case_name, True, "ddp"))
    assert_close(grad, case.grad_weight, 1e-9)


def test_unsynced_replicas_use_local_statistics(replica_results):
    """sync=False keeps per-replica semantics: not the full-batch gradient."""
    case = next(c for c in CASES if c.name == "conv2d_cifar_stem")
    grad = result_of(replica_results, (case.name, False, "ddp"))
    error = np.linalg.norm(grad - case.grad_weight) / np.linalg.norm(case.grad_weight)
    assert error > 1e-3


def test_no_sync_accumulation_preconditions_each_micro_batch(replica_results):
    """Under DDP's no_sync each backward still reduces its own statistics: two identical
    micro-batches average to the gradient of one."""
    case = next(c for c in CASES if c.name == "linear_rows")
    assert_close(result_of(replica_results, (case.name, True, "no_sync")),
                 case.grad_weight, 1e-9)


def test_fsdp_sharded_weight_sync_equals_full_batch(replica_results):
    case = next(c for c in CASES if c.name == "conv2d_cifar_stem")
    assert_close(result_of(replica_results, (case.name, True, "fsdp")),
                 case.grad_weight, 1e-9)


def test_ddp_sync_with_many_patch_entries_equals_full_batch(replica_results):
    """Patches of many entries (torch's conv kernel and the structured Gram), one replica
    with fewer rows than columns: the full-batch gradient of the float64 reference."""
    case = next(c for c in CASES if c.name == "conv2d_stride2_pixels")
    plain, x, grad_z = widened(case)
    assert_close(result_of(replica_results, (case.name, True, "many_entries")),
                 tract_reference(plain, x, grad_z, case.lam), 1e-9)


@pytest.mark.parametrize("case_name", ["conv2d_cifar_stem", "linear_tokens"])
def test_accumulated_micro_batches_under_ddp_equal_the_full_batch(replica_results,
                                                                  case_name):
    """Each replica: two micro-batches (the first under no_sync), then finalize: the
    gradient of every replica's every row at once, as one process computes it."""
    case = next(c for c in CASES if c.name == case_name)
    assert_close(result_of(replica_results, (case_name, True, "accumulate")),
                 case.grad_weight, 1e-9)


def test_accumulation_under_ddp_needs_sync(replica_results):
    """sync=False would precondition each replica alone after DDP averaged: refused."""
    i = SCENARIOS.index(("conv2d_cifar_stem", False, "accumulate"))
    assert "needs sync=True" in str(replica_results[f"{i}_error"])


def test_sync_without_process_group_is_local():
    case = next(c for c in CASES if c.name == "linear_rows")
    layer = tt.wrap(plain_layer(case), lam=case.lam, sync=True)
    layer(torch.tensor(case.x)).backward(torch.tensor(case.grad_z))
    assert_close(layer.weight.grad, case.grad_weight, 1e-9)
