#!/usr/bin/env bash
# One prepared benchmark run for a lent CUDA machine (never CI): the scan and training benchmarks
# on the GPU, impl=kernel (Triton + flash-linear-attention) beside impl=chunk, JSON into $OUT.
#
#   OUT=/path/to/results bash benchmarks/gpu.sh          # from the repository root
#
# Installs nothing beyond `pip install -e .[torch,cuda]`, and only when torch/triton/fla are missing.
# Budget: a lent machine has ~15 minutes in all. Each command has its own timeout (200 + 240 + 240 s,
# so at most ~11.5 minutes plus start-up) so that a slow or hung one does not eat the rest; a command
# cut off by its timeout writes no JSON, the log says which. Logs go beside the JSON.
set -uo pipefail

OUT="${OUT:-benchmarks/results/gpu}"
PY="${PY:-python}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1

echo "== $(date -Iseconds) $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no GPU visible"; exit 1; }

if ! "$PY" -c "import torch, triton, fla, click" 2>/dev/null; then
    echo "== installing the package with the torch and cuda extras"
    "$PY" -m pip install -q -e ".[torch,cuda]" || exit 1
fi
"$PY" - <<'EOF'
import torch, triton, fla
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "fla", getattr(fla, "__version__", "?"), "device", torch.cuda.get_device_name())
EOF

run() {  # run NAME TIMEOUT_S ARGS...: one benchmark, its exit code reported, never fatal
    local name=$1 limit=$2
    shift 2
    echo "== lmsleep bench $*"
    timeout "$limit" "$PY" -m lmsleep bench "$@" --device cuda --json "$OUT/$name.json"
    echo "== $name exit $?"
}

# Scan: ref / chunk / kernel (fla chunk kernels; our recurrent Triton kernel below T=16 without grad).
run scan-cuda 200 scan --backend torch
# Training on CUDA: the trainers' default scan "auto" is the kernel on CUDA; chunk for comparison.
for impl in kernel chunk; do
    run "train-cuda-$impl" 240 train --backend torch --scan-impl "$impl" --preset paper-rule110 --preset paper-depo \
        --passes 1 --passes 4 --repeats 3
done

echo "== done $(date -Iseconds); results:"
ls -l "$OUT"
