#!/usr/bin/env bash
# The GPU path, proven on one machine with one NVIDIA GPU and only this repository (issue 25):
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--report FILE] [--images N] [--budget-s S]
#
# Steps, each under `timeout`, all within --budget-s (default 480 s); a failed step is
# recorded in the report and the others still run:
#   install        make install (creates .venv); a dry run skips it when .venv/.installed exists
#   cuda           whether torch sees a CUDA device, and which
#   families       the registered model families (`rayseg models`)
#   cuda-tests     pytest on the test files holding CUDA-only tests (skipped without CUDA)
#   parity         every family on CUDA against the CPU (benchmarks/gpu_parity.py)
#   gpu-decode     nvJPEG against the CPU decode: rows, pixels, speed (benchmarks/gpu_decode_parity.py)
#   harness        benchmarks.harness --models unet,maskrcnn,sam --device cuda: rayseg ÷ bare forward
# --dry-run runs only what needs no CUDA; the CUDA steps say "skipped: no CUDA" (or "skipped:
# dry run" on a machine that has CUDA). Writes one Markdown report, FILE (default
# build/gpu_check/report.md), with each step's logs beside it. Exit 0 when no step failed.
set -u

cd "$(dirname "$0")/.."
DRY_RUN=0
REPORT=build/gpu_check/report.md
IMAGES=48
BUDGET_S=480
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --report) REPORT="$2"; shift ;;
        --images) IMAGES="$2"; shift ;;
        --budget-s) BUDGET_S="$2"; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$IMAGES$BUDGET_S" in *[!0-9]*) echo "gpu_check.sh: --images and --budget-s take whole numbers" >&2; exit 2 ;; esac
if [ "$IMAGES" -le 16 ]; then echo "gpu_check.sh: --images must exceed the harness's 16 start-up images" >&2; exit 2; fi

PYTHON=.venv/bin/python
WORK=$(dirname "$REPORT")
LOGS="$WORK/logs"
mkdir -p "$LOGS" || exit 2
rm -f "$LOGS"/*.log "$WORK/parity.md" "$WORK/decode.md" "$WORK/bench/report.md"  # a report of this run only
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
CUDA=no
FAILED=0
ROWS=()      # the summary table's rows
DETAILS=()   # each step's section

# step NAME NEEDS_CUDA LIMIT_S COMMAND...: runs COMMAND under `timeout` (LIMIT_S, or what is
# left of the budget), its output in $LOGS/NAME.log; records the outcome.
step() {
    local name=$1 needs_cuda=$2 limit=$3
    shift 3
    local result
    if [ "$needs_cuda" = 1 ] && [ "$CUDA" != yes ]; then
        result="skipped: no CUDA"
    elif [ "$needs_cuda" = 1 ] && [ "$DRY_RUN" = 1 ]; then
        result="skipped: dry run"
    else
        local left=$((DEADLINE - $(date +%s) - 5))
        [ "$limit" -gt "$left" ] && limit=$left
        if [ "$limit" -lt 5 ]; then
            result="skipped: out of time (budget ${BUDGET_S} s)"
            FAILED=1
        else
            local began=$(date +%s) code
            timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
            code=$?
            local took=$(( $(date +%s) - began ))
            case $code in
                0) result="ok (${took} s)" ;;
                124|137) result="**failed**: timed out after ${limit} s"; FAILED=1 ;;
                *) result="**failed**: exit ${code} (${took} s)"; FAILED=1 ;;
            esac
            DETAILS+=("### ${name}"$'\n\n'"\`$*\` — log: ${LOGS}/${name}.log"$'\n\n''```'$'\n'"$(tail -n 25 "$LOGS/$name.log")"$'\n''```'$'\n')
        fi
    fi
    ROWS+=("| ${name} | ${result} |")
    echo "gpu_check: ${name}: ${result}" >&2
}

# install: `make install` is a no-op once .venv/.installed is newer than pyproject.toml.
if [ "$DRY_RUN" = 1 ] && [ -f .venv/.installed ]; then
    ROWS+=("| install | ok: .venv installed (make install skipped in a dry run) |")
else
    step install 0 240 make install
fi

step cuda 0 60 "$PYTHON" -c 'import torch; print(torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", torch.__version__, torch.version.cuda)'
[ -f "$LOGS/cuda.log" ] && [ "$(head -c 4 "$LOGS/cuda.log")" = True ] && CUDA=yes

step families 0 60 "$PYTHON" -m benchmarks.gpu_parity --list
FAMILIES=$(tr '\n' ' ' <"$LOGS/families.log" 2>/dev/null)

# The CUDA-only tests are those skipped without CUDA: their files are run whole.
CUDA_TESTS=$(grep -l 'skipif(not torch.cuda.is_available()' tests/test_*.py | tr '\n' ' ')
# shellcheck disable=SC2086  # one argument per file
step cuda-tests 1 90 "$PYTHON" -m pytest $CUDA_TESTS -q -rs -p no:cacheprovider
step parity 1 150 "$PYTHON" -m benchmarks.gpu_parity --workdir "$WORK/parity" --report "$WORK/parity.md"
step gpu-decode 1 60 "$PYTHON" -m benchmarks.gpu_decode_parity --workdir "$WORK/decode" --report "$WORK/decode.md"
step harness 1 240 "$PYTHON" -m benchmarks.harness --models unet,maskrcnn,sam --device cuda --images "$IMAGES" \
    --startup-images 16 --workdir "$WORK/bench" --report "$WORK/bench/report.md"

{
    echo "# GPU check (issue 25)"
    echo
    echo "Run $(date '+%Y-%m-%d %H:%M:%S %Z') on $(hostname), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([ "$DRY_RUN" = 1 ] && echo ', dry run'); CUDA: ${CUDA} ($(head -n 1 "$LOGS/cuda.log" 2>/dev/null)); $(( $(date +%s) - START )) s of a ${BUDGET_S} s budget."
    echo
    echo "Model families: ${FAMILIES:-unknown}"
    echo
    echo "CUDA-only test files: ${CUDA_TESTS:-none}"
    echo
    echo "| step | result |"
    echo "|---|---|"
    printf '%s\n' "${ROWS[@]}"
    if [ -f "$WORK/parity.md" ] && [ "$CUDA" = yes ] && [ "$DRY_RUN" = 0 ]; then
        printf '\n## Model families: CUDA against the CPU\n\n'; cat "$WORK/parity.md"
    fi
    if [ -f "$WORK/decode.md" ] && [ "$CUDA" = yes ] && [ "$DRY_RUN" = 0 ]; then
        printf '\n## JPEG decode: nvJPEG against the CPU decode\n\n'; cat "$WORK/decode.md"
    fi
    if [ -f "$WORK/bench/report.md" ] && [ "$CUDA" = yes ] && [ "$DRY_RUN" = 0 ]; then
        printf '\n## Harness: rayseg ÷ bare forward on the GPU (full report: %s)\n\n' "$WORK/bench/report.md"
        grep -E '^## |^rayseg/ceiling' "$WORK/bench/report.md" | grep -v '^## Goals'
    fi
    printf '\n## Step logs\n\n'
    printf '%s\n' "${DETAILS[@]}"
} >"$REPORT"
echo "gpu_check: report: $REPORT" >&2
exit "$FAILED"
