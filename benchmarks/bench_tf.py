"""First-layer cost of TrAct vs the plain layer in TensorFlow, measured side by side.

    python benchmarks/bench_tf.py [--rounds 15] [--threads 2] [--no-jit-compile] [--memory]

Each case times one ``tf.function`` step (XLA-compiled unless --no-jit-compile, as Keras
compiles by default) of the first layer alone: forward under a GradientTape, then the
gradients with respect to kernel and bias pulled back with a fixed output gradient (the
input needs no gradient, as for a stem). Plain is ``tf.nn.convolution`` plus bias, as
Keras runs ConvND (explicit pads: ``tf.pad`` then 'VALID'); TrAct is
``tract_core.tensorflow.conv`` with the same arguments. Both run interleaved in one
process; the table shows the ratio of the minimum times. Peak memory (--memory) is the
growth of the peak RSS over one warm step, each variant in a fresh subprocess; the table
shows TrAct's growth minus the plain layer's.

Threads: ``tf.config.threading`` sets the intra-op and inter-op pools to ``--threads``;
XLA-compiled steps run on the intra-op pool.

The whole-network case of bench_torch.py (resnet18_cifar_step) is not repeated here: it
measures the same stem inside a model whose definition exists only in PyTorch.
"""

import argparse

import _harness

# name: (input shape (N, H, W, C), kernel shape (kh, kw, C, M), strides, padding)
CASES = {
    "cifar_stem_3x3": ((128, 32, 32, 3), (3, 3, 3, 64), (1, 1), "SAME"),
    "imagenet_stem_7x7s2": ((32, 224, 224, 3), (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3))),
    "vit_patch16": ((32, 224, 224, 3), (16, 16, 3, 384), (16, 16), "VALID"),
    "cifar_vit_patch4": ((128, 32, 32, 3), (4, 4, 3, 384), (4, 4), "VALID"),
}
GOALS = {"cifar_stem_3x3": 1.10, "imagenet_stem_7x7s2": 1.6, "vit_patch16": 2.05,
         "cifar_vit_patch4": 1.08}


def set_threads(threads):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def make(case, variant, jit_compile, seed=0):
    """(step, its arguments): step(x, kernel, bias, grad_z) -> (z, dkernel, dbias)."""
    import numpy as np
    import tensorflow as tf

    import tract_core.tensorflow as ttf

    x_shape, kernel_shape, strides, padding = CASES[case]
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.standard_normal(x_shape, dtype=np.float32))
    fan_in = np.prod(kernel_shape[:-1])
    kernel = tf.constant((rng.standard_normal(kernel_shape) / np.sqrt(fan_in)).astype(np.float32))
    bias = tf.zeros(kernel_shape[-1:], tf.float32)

    def plain(x, kernel, bias):
        if isinstance(padding, str):
            return tf.nn.convolution(x, kernel, strides, padding) + bias
        return tf.nn.convolution(tf.pad(x, [(0, 0), *padding, (0, 0)]), kernel, strides,
                                 "VALID") + bias

    def tract(x, kernel, bias):
        return ttf.conv(x, kernel, bias, strides=strides, padding=padding, lam=0.1)

    layer = plain if variant == "plain" else tract

    @tf.function(jit_compile=jit_compile)
    def step(x, kernel, bias, grad_z):
        with tf.GradientTape() as tape:
            tape.watch([kernel, bias])
            z = layer(x, kernel, bias)
        return z, *tape.gradient(z, [kernel, bias], output_gradients=grad_z)

    grad_z = tf.constant(rng.standard_normal(plain(x, kernel, bias).shape, dtype=np.float32))
    return step, (x, kernel, bias, grad_z)


def run(step, args):
    for value in step(*args):
        value.numpy()  # wait for the results


def time_case(case, rounds, jit_compile):
    runs = {v: make(case, v, jit_compile) for v in ("plain", "tract")}
    return _harness.paired_times(runs, rounds, run)


def peak_growth_in_child(case, variant, threads, jit_compile):
    """Peak RSS growth of one warm step in MiB; see _harness.peak_growth_mib."""
    set_threads(threads)
    step, args = make(case, variant, jit_compile)
    run(step, args)  # traced, compiled, buffers allocated once, as in training
    return _harness.peak_growth_mib(lambda: run(step, args))


def main(argv=None):
    parser = _harness.parser(__doc__.splitlines()[0], GOALS)
    parser.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="XLA-compile the steps (default: yes)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import tensorflow as tf

    mode = "XLA" if args.jit_compile else "graph"
    print(f"tensorflow {tf.__version__} ({mode}), {args.threads} threads, "
          f"{args.rounds} paired rounds")
    _harness.print_header(*_harness.TIMING_COLUMNS, *["extra peak MiB"] * args.memory)
    results = {}
    for case in args.cases:
        best = time_case(case, args.rounds, args.jit_compile)
        cells, results[case] = _harness.timing_cells(case, best, GOALS)
        if args.memory:
            growth = {v: _harness.in_fresh_process("bench_tf", "peak_growth_in_child", case, v,
                                                   args.threads, args.jit_compile)
                      for v in ("plain", "tract")}
            extra = growth["tract"] - growth["plain"]
            results[case]["extra_peak_mib"] = extra
            cells.append(f"{extra:.0f}")
        _harness.print_row(*cells)
    _harness.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
