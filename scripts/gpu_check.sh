#!/usr/bin/env bash
# The GPU check (issue 13): correctness, kernels vs cuDNN, whole model, each stage under its own time limit.
#
#   bash scripts/gpu_check.sh OUTDIR              # on a GPU machine: about 6 minutes, at most 8 (H100/H200)
#   bash scripts/gpu_check.sh --dry-run OUTDIR    # anywhere: tiny shapes under TRITON_INTERPRET=1
#
# Writes OUTDIR/gpucheck.json, OUTDIR/gpucheck.md and OUTDIR/gpucheck.log. Python: $PYTHON, else python3.
# The package is made importable without network: an installed fastdeeplab is used as it is; otherwise (on a
# GPU machine) `pip install --no-build-isolation --no-deps --no-index -e .` is tried, and if that fails too,
# scripts/gpu_check.py maps the source checkout itself (kernels/ -> fastdeeplab.kernels). See that file.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY=0
OUTDIR=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --dry-run) DRY=1 ;;
        -h|--help) exec "$PY" "$ROOT/scripts/gpu_check.py" --help ;;
        --stages) i=$((i + 1)) ;;  # its value is not the output folder
        -*) ;;
        *) OUTDIR="${args[$i]}" ;;
    esac
done
if [ -z "$OUTDIR" ]; then
    echo "usage: bash scripts/gpu_check.sh [--dry-run] [--stages correctness,kernels,model] OUTDIR" >&2
    exit 2
fi
mkdir -p "$OUTDIR" || exit 2
LOG="$OUTDIR/gpucheck.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

installed() {  # is fastdeeplab importable from outside the checkout? (finds it without importing torch)
    (cd / && "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('fastdeeplab') is None)") \
        2>/dev/null
}

if [ "$DRY" = 0 ] && ! installed; then
    echo "[gpu_check] fastdeeplab is not installed: trying pip install --no-build-isolation --no-deps --no-index -e ." \
        | tee -a "$LOG"
    (cd "$ROOT" && timeout 30 "$PY" -m pip install --no-build-isolation --no-deps --no-index -q -e . >>"$LOG" 2>&1) \
        && echo "[gpu_check] pip install -e . worked" | tee -a "$LOG" \
        || echo "[gpu_check] pip install -e . failed (see the log); using the source-checkout path shim" | tee -a "$LOG"
fi

exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
