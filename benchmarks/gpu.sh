#!/usr/bin/env bash
# The GPU checks of a session that is lent a GPU, in one call (a lent machine has PyTorch, Triton and
# transformers, but not smollm's other needs: they travel as wheels in .whl/, which `prepare` downloads here).
#
#   bash benchmarks/gpu.sh prepare     # here, on the CPU machine, once: pure-Python wheels into .whl/ (git-ignored)
#   bash benchmarks/gpu.sh run         # there: install the wheels, then the checks in order, each under a timeout
#
# The checks, in the order of what has never run on a GPU: the fused kernels (benchmarks/kernels.py: correctness,
# then the table against eager, torch.compile and Liger-Kernel), the mixers' flash-linear-attention paths against
# smollm's references forward and backward (pytest -k fla), then TinyLlama-1.1B under FSDP2 (benchmarks/fsdp_gpu.py).
# Logs go to $OUT (the device tool brings them back) or to gpu-logs/ when OUT is unset.
set -u
cd "$(dirname "$0")/.."
WHEELS=(hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 fla-core==0.6.0
        flash-linear-attention==0.6.0 liger-kernel==0.8.5)

case "${1:-}" in
prepare)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    # pip wheel, not download: antlr4's 4.9.3 (omegaconf's pin) is a source release; all of these are pure Python
    python3 -m pip wheel -q --no-deps -w .whl "${WHEELS[@]}" || exit 1
    ls .whl
    ;;
run)
    out="${OUT:-gpu-logs}"; mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed: run 'bash benchmarks/gpu.sh prepare' here and carry .whl"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
    timeout 240 python3 benchmarks/kernels.py 2>&1 | tee "$out/kernels.txt"
    timeout 150 python3 -m pytest -q -p no:cacheprovider -k fla tests/test_delta_rule.py tests/test_ssd.py \
        tests/test_gla.py 2>&1 | tee "$out/fla.txt"
    timeout 150 python3 benchmarks/fsdp_gpu.py 2>&1 | tee "$out/fsdp.txt"
    ;;
*)
    echo "usage: bash benchmarks/gpu.sh prepare|run"; exit 2
    ;;
esac
