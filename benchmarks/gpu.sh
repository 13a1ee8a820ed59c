#!/usr/bin/env bash
# One prepared benchmark run for a lent CUDA machine (never CI): the scan and training benchmarks
# on the GPU, impl=kernel (Triton + flash-linear-attention) beside impl=chunk, JSON into $OUT.
#
#   OUT=/path/to/results bash benchmarks/gpu.sh          # from the repository root
#   PARTS=recipe OUT=/path/to/results bash benchmarks/gpu.sh   # only the retrofit recipe's checks (~5 min)
#
# PARTS (default "bench recipe"): bench = the scan and training benchmarks (~11.5 min at most);
# recipe = experiments/gpu/recipe.py on the GPU: its dry run (every command validated, the tiny profile
# end to end) and a calibration of its memory estimate with the recipe's exact sequence (T = 3300,
# L = 2000, bf16, windows recomputed) on the bundled SmolLM2-135M (a lent machine reaches no Hub):
# 2 steps of 8 sequences at N = 1 and 4, peak CUDA memory and s/step in OUT/recipe/n*/metrics.jsonl.
# Both parts together exceed a 15-minute loan: run them on separate loans.
#
# Installs nothing beyond `pip install -e .[torch,cuda]`, and only when torch/triton/fla are missing.
# Budget: a lent machine has ~15 minutes in all. Each command has its own timeout (200 + 240 + 240 s,
# so at most ~11.5 minutes plus start-up) so that a slow or hung one does not eat the rest; a command
# cut off by its timeout writes no JSON, the log says which. Logs go beside the JSON.
set -uo pipefail

OUT="${OUT:-benchmarks/results/gpu}"
PY="${PY:-python}"
PARTS="${PARTS:-bench recipe}"
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

if [[ " $PARTS " == *" bench "* ]]; then
    # Scan: ref / chunk / kernel (fla chunk kernels; our recurrent Triton kernel below T=16 without grad).
    run scan-cuda 200 scan --backend torch
    # Training on CUDA: the trainers' default scan "auto" is the kernel on CUDA; chunk for comparison.
    for impl in kernel chunk; do
        run "train-cuda-$impl" 240 train --backend torch --scan-impl "$impl" --preset paper-rule110 --preset paper-depo \
            --passes 1 --passes 4 --repeats 3
    done
fi

if [[ " $PARTS " == *" recipe "* ]]; then
    echo "== experiments.gpu.recipe --dry-run (on the GPU)"
    timeout 120 "$PY" -m experiments.gpu.recipe --dry-run
    echo "== recipe dry run exit $?"
    echo "== experiments.gpu.recipe --profile smollm2-135m --run (calibration)"
    timeout 300 "$PY" -m experiments.gpu.recipe --profile smollm2-135m --run --root "$OUT/recipe"
    echo "== recipe calibration exit $?"
    "$PY" -m experiments.gpu.recipe --profile smollm2-135m --estimate
    for f in "$OUT"/recipe/n*/metrics.jsonl; do echo "$f"; tail -n 1 "$f"; done
fi

echo "== done $(date -Iseconds); results:"
ls -l "$OUT"
