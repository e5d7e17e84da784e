"""First-layer cost of TrAct vs the plain layer in JAX (XLA CPU), measured side by side.

    python benchmarks/bench_jax.py [--rounds 15] [--threads 2] [--memory] [--json out.json]

Each case times one jitted forward + backward of the first layer alone: ``jax.vjp`` of
the layer with respect to kernel and bias (the input needs no gradient, as for a stem),
pulled back with a fixed output gradient, outputs ready (``block_until_ready``). Plain is
``lax.conv_general_dilated`` plus bias with channels-last dimension numbers, as Flax calls
it; TrAct is ``tract_core.jax.conv`` with the same arguments. Both run interleaved in one
process; the table shows the ratio of the minimum times.

Peak memory (--memory) is XLA's own plan for the compiled step: its temporary plus output
buffers (``memory_analysis()``), TrAct's minus the plain layer's. Not peak RSS growth as
in bench_torch.py: XLA CPU sometimes keeps a step's temporaries allocated between calls,
so the RSS growth of the same step swings by their whole size from process to process.

Threads: XLA CPU sizes its thread pool from the CPUs the process may run on, so the
process pins itself to ``--threads`` CPUs (``os.sched_setaffinity``) before JAX starts;
for one thread ``--xla_cpu_multi_thread_eigen=false`` is added to ``XLA_FLAGS`` as well.

The whole-network case of bench_torch.py (resnet18_cifar_step) is not repeated here: it
measures the same stem inside a model whose definition exists only in PyTorch.
"""

import os

import _harness

# name: (input shape (N, H, W, C), kernel shape (kh, kw, C, M), strides, padding)
CASES = {
    "cifar_stem_3x3": ((128, 32, 32, 3), (3, 3, 3, 64), (1, 1), ((1, 1), (1, 1))),
    "imagenet_stem_7x7s2": ((32, 224, 224, 3), (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3))),
    "vit_patch16": ((32, 224, 224, 3), (16, 16, 3, 384), (16, 16), ((0, 0), (0, 0))),
    "cifar_vit_patch4": ((128, 32, 32, 3), (4, 4, 3, 384), (4, 4), ((0, 0), (0, 0))),
}
GOALS = {"cifar_stem_3x3": 1.10, "imagenet_stem_7x7s2": 1.6, "vit_patch16": 2.05,
         "cifar_vit_patch4": 1.08}


def limit_threads(threads):
    """Call before importing jax: XLA's CPU pool follows the process's CPU affinity."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:threads])
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()


def make(case, variant, seed=0):
    """(jitted step, its arguments): step(kernel, bias, x, grad_z) -> (z, dkernel, dbias)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    import tract_core.jax as tj

    x_shape, kernel_shape, strides, padding = CASES[case]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape, dtype=np.float32))
    fan_in = np.prod(kernel_shape[:-1])
    kernel = jnp.asarray((rng.standard_normal(kernel_shape) / np.sqrt(fan_in)).astype(np.float32))
    bias = jnp.zeros(kernel_shape[-1:], jnp.float32)

    def plain(x, kernel, bias):
        z = lax.conv_general_dilated(x, kernel, strides, padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return z + bias

    def tract(x, kernel, bias):
        return tj.conv(x, kernel, bias, strides=strides, padding=padding, lam=0.1)

    layer = plain if variant == "plain" else tract

    @jax.jit
    def step(kernel, bias, x, grad_z):
        z, pullback = jax.vjp(lambda k, b: layer(x, k, b), kernel, bias)
        return z, *pullback(grad_z)

    z_shape = jax.eval_shape(plain, x, kernel, bias).shape
    grad_z = jnp.asarray(rng.standard_normal(z_shape, dtype=np.float32))
    return step, (kernel, bias, x, grad_z)


def run(step, args):
    import jax

    jax.block_until_ready(step(*args))


def time_case(case, rounds):
    return _harness.paired_times({v: make(case, v) for v in ("plain", "tract")}, rounds, run)


def planned_peak(case, variant):
    """XLA's planned peak of one step in MiB: temporaries plus outputs."""
    step, args = make(case, variant)
    stats = step.lower(*args).compile().memory_analysis()
    return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20


def main(argv=None):
    args = _harness.parser(__doc__.splitlines()[0], GOALS).parse_args(argv)
    limit_threads(args.threads)
    import jax

    print(f"jax {jax.__version__} ({jax.default_backend()}), {args.threads} threads, "
          f"{args.rounds} paired rounds")
    _harness.print_header(*_harness.TIMING_COLUMNS, *["extra peak MiB"] * args.memory)
    results = {}
    for case in args.cases:
        cells, results[case] = _harness.timing_cells(case, time_case(case, args.rounds), GOALS)
        if args.memory:
            extra = planned_peak(case, "tract") - planned_peak(case, "plain")
            results[case]["extra_peak_mib"] = extra
            cells.append(f"{extra:.0f}")
        _harness.print_row(*cells)
    _harness.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
