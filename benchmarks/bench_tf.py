"""First-layer cost of TrAct vs the plain layer in TensorFlow, measured side by side.

    python benchmarks/bench_tf.py [--repeats 7] [--threads 2] [--no-jit-compile] [--memory]

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
import json
import os
import subprocess
import sys
import time

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


def time_case(case, repeats, jit_compile):
    runs = {v: make(case, v, jit_compile) for v in ("plain", "tract")}
    best = {v: float("inf") for v in runs}
    for v in runs:
        run(*runs[v])  # trace, compile and warm up
    for _ in range(repeats):
        for v, args in runs.items():
            start = time.perf_counter()
            run(*args)
            best[v] = min(best[v], time.perf_counter() - start)
    return best


def _peak_growth_in_child(case, variant, threads, jit_compile):
    """Peak RSS during one forward+backward minus RSS before it, in MiB (Linux)."""
    set_threads(threads)
    step, args = make(case, variant, jit_compile)
    run(step, args)  # traced, compiled, buffers allocated once, as in training

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    run(step, args)
    return (status("VmHWM:") - before) / 1024


def peak_rss_growth(case, variant, threads, jit_compile):
    """Run :func:`_peak_growth_in_child` in a fresh process."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import bench_tf as b; "
            f"print(b._peak_growth_in_child({case!r}, {variant!r}, {threads}, {jit_compile}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(GOALS))
    parser.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="XLA-compile the steps (default: yes)")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS growth")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import tensorflow as tf

    mode = "XLA" if args.jit_compile else "graph"
    print(f"tensorflow {tf.__version__} ({mode}), {args.threads} threads, "
          f"min of {args.repeats} runs")
    memory_column = " extra peak MiB |" if args.memory else ""
    print("| case | plain ms | TrAct ms | ratio | goal |" + memory_column)
    print("|---|---|---|---|---|" + ("---|" if args.memory else ""))
    results = {}
    for case in args.cases:
        best = time_case(case, args.repeats, args.jit_compile)
        ratio = best["tract"] / best["plain"]
        row = (f"| {case} | {best['plain'] * 1e3:.1f} | {best['tract'] * 1e3:.1f} | "
               f"{ratio:.2f}x | <= {GOALS[case]}x |")
        results[case] = {"plain_s": best["plain"], "tract_s": best["tract"], "ratio": ratio}
        if args.memory:
            extra = (peak_rss_growth(case, "tract", args.threads, args.jit_compile)
                     - peak_rss_growth(case, "plain", args.threads, args.jit_compile))
            results[case]["extra_peak_mib"] = extra
            row += f" {extra:.0f} |"
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
