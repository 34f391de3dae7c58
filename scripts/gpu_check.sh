#!/usr/bin/env bash
# The GPU check (issues 13, 19, 22): correctness, kernels vs cuDNN, whole model (DeepLabv3-ResNet-50 and
# -MobileNetV3-Large), each stage under its own time limit.
#
#   bash scripts/gpu_check.sh OUTDIR              # on a GPU machine: about 7 minutes, at most 8 (H100/H200)
#   bash scripts/gpu_check.sh --plan OUTDIR       # anywhere, no GPU: per-stage counts and estimates
#   bash scripts/gpu_check.sh --dry-run OUTDIR    # anywhere: tiny shapes under TRITON_INTERPRET=1
#
# Writes OUTDIR/gpucheck.json, OUTDIR/gpucheck.md, OUTDIR/gpucheck.plan.json and OUTDIR/gpucheck.log.
# Python: $PYTHON, else python3. Nothing is installed: an installed fastdeeplab is used as it is, otherwise
# scripts/gpu_check.py maps this source checkout itself (kernels/ -> fastdeeplab.kernels). See that file.
# The stages run the kernels' autotuner with FASTDEEPLAB_AUTOTUNE_MS=5,20 unless it is already set.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY=0
PLAN=0
OUTDIR=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --dry-run) DRY=1 ;;
        --plan) PLAN=1 ;;
        -h|--help) exec "$PY" "$ROOT/scripts/gpu_check.py" --help ;;
        --stages) i=$((i + 1)) ;;  # its value is not the output folder
        -*) ;;
        *) OUTDIR="${args[$i]}" ;;
    esac
done
if [ -z "$OUTDIR" ]; then
    echo "usage: bash scripts/gpu_check.sh [--plan [--measure-compile] | --dry-run] [--stages precompile,correctness,kernels,model] OUTDIR" >&2
    exit 2
fi
mkdir -p "$OUTDIR" || exit 2
if [ "$PLAN" = 0 ]; then
    : > "$OUTDIR/gpucheck.log"
fi
export PYTHONUNBUFFERED=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
