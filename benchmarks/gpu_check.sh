#!/usr/bin/env bash
# The checks that need a GPU, as one command on a CUDA machine with torch, JAX and cupy:
#   bash benchmarks/gpu_check.sh OUT_DIR [STEP ...]
# (with STEP names, e.g. whole_step_jax_gpu, only those steps; all of them without)
# 1. tests/test_torch.py on CUDA (fixtures in float64/float32, autocast fp16/bf16, NaN,
#    torch.compile, CUDA graph replays, no host reads and no synchronizations in
#    backward);
# 2. the core's tests on cupy and on JAX's GPU backend, and tests/test_jax.py on the GPU;
# 3. bench_torch.py --device cuda (eager, then replayed from CUDA graphs) and
#    bench_jax.py, TrAct vs the plain layer side by side;
# 4. whole training steps, TrAct vs plain, of the small CNN, ResNet-18 and the CIFAR ViT:
#    whole_step_torch.py eager, under torch.compile and replayed from CUDA graphs, and
#    whole_step_jax.py (jit, flax and optax) on the GPU; 10 steps per round, as a
#    training loop that reads the loss only now and then.
# Each step has its own time limit, so that one slow step cannot hide the others.
set -u
out=${1:-gpu_check}
shift $(($# > 0 ? 1 : 0))
only=" $* "
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: log to OUT/NAME.log, print its tail
    local name=$1 limit=$2
    shift 2
    [[ $only == "  " || $only == *" $name "* ]] || return 0
    echo "== $name"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "exit $?" >>"$out/$name.log"
    tail -n 25 "$out/$name.log"
}
nvidia-smi -L
python3 -c "import torch, jax; print('torch', torch.__version__, torch.cuda.get_device_name(),
'jax', jax.__version__, jax.devices())"
pytest=(python3 -m pytest -q -rfE -p no:cacheprovider --maxfail=25)
step torch_cuda_tests 180 "${pytest[@]}" tests/test_torch.py -k cuda
step bench_torch_cuda 70 python3 benchmarks/bench_torch.py --device cuda --rounds 20 --memory
step bench_torch_cuda_graphs 60 python3 benchmarks/bench_torch.py --device cuda --rounds 20 \
    --cuda-graphs
whole=(python3 benchmarks/whole_step_torch.py --device cuda --rounds 20 --steps 10)
step whole_step_torch_cuda 150 "${whole[@]}"
step whole_step_torch_cuda_graphs 150 "${whole[@]}" --cuda-graphs
step whole_step_torch_cuda_compile 420 "${whole[@]}" --compile --variants tract
step whole_step_jax_gpu 240 python3 benchmarks/whole_step_jax.py --rounds 20 --steps 10 \
    --threads "$(nproc)"  # no core pinning: that is for XLA CPU
step bench_jax_gpu 120 python3 benchmarks/bench_jax.py --rounds 20 --memory
step core_cupy_tests 50 "${pytest[@]}" tests/test_core.py -k cupy
step jax_gpu_tests 70 "${pytest[@]}" tests/test_jax.py -k "fixture or float32"
