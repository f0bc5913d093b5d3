#!/usr/bin/env bash
# The GPU checks of a session that is lent a GPU, in one call (a lent machine has PyTorch, Triton and
# transformers, but not smollm's other needs: they travel as wheels in .whl/, which `prepare` downloads here).
#
#   bash benchmarks/gpu.sh prepare          # here, on the CPU machine, once: pure-Python wheels into .whl/ (git-ignored)
#   bash benchmarks/gpu.sh run [ARGS]       # there: install the wheels, then benchmarks/gpu.py ARGS, then, if time is
#                                           # left, the fla parity tests and fsdp_gpu.py
#   bash benchmarks/gpu.sh extra            # there: install the wheels, then only the fla tests and fsdp_gpu.py
#
# `run` fits one 10-minute call of the device tool: GPU_SH_BUDGET seconds in all (default 560), of which gpu.py gets
# at most 480 (its parts, in order: the Triton kernels' correctness, the kernel benchmarks, TinyLlama-1.1B
# throughput; see its docstring); then the mixers' flash-linear-attention paths against smollm's references
# forward and backward (pytest -k fla) and TinyLlama-1.1B under FSDP2 (benchmarks/fsdp_gpu.py), each only when at
# least a minute is left, each under a timeout cut to what is left.
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
run|extra)
    mode=$1; shift
    out="${OUT:-gpu-logs}"; mkdir -p "$out"
    budget=${GPU_SH_BUDGET:-560}
    left() { echo $(( budget - SECONDS )); }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed: run 'bash benchmarks/gpu.sh prepare' here and carry .whl"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
    status=0
    if [ "$mode" = run ]; then
        b=$(( $(left) - 20 )); [ "$b" -gt 480 ] && b=480
        timeout $(( b + 30 )) python3 benchmarks/gpu.py --budget "$b" --logs "$out" "$@" 2>&1 | tee "$out/gpu.py.txt"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    fi
    t=$(( $(left) - 5 )); [ "$t" -gt 150 ] && t=150
    if [ "$t" -ge 60 ]; then
        timeout "$t" python3 -m pytest -q -p no:cacheprovider -k fla tests/test_delta_rule.py tests/test_ssd.py \
            tests/test_gla.py 2>&1 | tee "$out/fla.txt"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    else
        echo "gpu.sh: fla tests skipped, $(left) s of GPU_SH_BUDGET=$budget left" | tee "$out/fla.txt"
    fi
    t=$(( $(left) - 5 )); [ "$t" -gt 150 ] && t=150
    if [ "$t" -ge 60 ]; then
        timeout $(( t + 10 )) python3 benchmarks/fsdp_gpu.py --timeout "$t" 2>&1 | tee "$out/fsdp.txt"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    else
        echo "gpu.sh: fsdp_gpu.py skipped, $(left) s of GPU_SH_BUDGET=$budget left" | tee "$out/fsdp.txt"
    fi
    # the figures again at the very end, where the device tool's output tail keeps them
    echo; echo "==== gpu.sh $mode: ${SECONDS} s in all"
    [ -f "$out/summary.txt" ] && cat "$out/summary.txt"
    echo "fla: $(tail -n 1 "$out/fla.txt")"
    grep '^| \|^fsdp_gpu' "$out/fsdp.txt" || echo "fsdp: $(tail -n 1 "$out/fsdp.txt")"
    exit $status
    ;;
*)
    echo "usage: bash benchmarks/gpu.sh prepare|run [gpu.py arguments]|extra"; exit 2
    ;;
esac
