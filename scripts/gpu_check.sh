#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command: install dpfast for this GPU, run the whole test
# suite on it (kernels natively, the GPU-only tests included), compile-check the kernels for its
# architecture, then the kernel microbenchmarks and the engine benchmarks (ANCHORS.md, DPDM).
#
#   scripts/gpu_check.sh [OUT]                  # all stages; OUT defaults to benchmarks/results/<date>-<gpu>
#   STAGES="install tests" scripts/gpu_check.sh # some stages: install tests compile kernels anchors dpdm
#   PIP_ARGS="--no-index --find-links wheels/" scripts/gpu_check.sh   # offline: a carried wheelhouse
#
# Uses the Python on PATH (or $PYTHON) and its torch/triton as they are: it never installs torch.
# Every stage logs to OUT/<stage>.log; a failing stage is reported and the next one still runs; the
# exit status is the number of failed stages. Timings are only comparable within one run (ratios).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA GPU here; use scripts/test.sh on CPU machines" >&2
    exit 2
fi
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
arch=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)")
OUT=${1:-benchmarks/results/$(date -u +%Y%m%d-%H%M)-$gpu}
STAGES=${STAGES:-"install tests compile kernels anchors dpdm"}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
unset TRITON_INTERPRET

dpfast_cli() {  # the installed dpfast (with its compiled _C), never the source tree in the cwd
    (cd "$OUT" && "$PY" -c 'import sys; from dpfast.cli import main; sys.exit(main(sys.argv[1:]))' "$@")
}
failed=0

run() {  # run STAGE CMD...: log to OUT/STAGE.log, report, keep going
    local stage=$1; shift
    echo "== $stage: $*"
    local t0=$SECONDS
    if "$@" >"$OUT/$stage.log" 2>&1; then
        echo "   ok ($((SECONDS - t0)) s)"
    else
        echo "   FAILED ($((SECONDS - t0)) s); last lines of $OUT/$stage.log:"
        tail -n 15 "$OUT/$stage.log" | sed 's/^/   | /'
        failed=$((failed + 1))
    fi
}

for stage in $STAGES; do
    case $stage in
    install)
        # _C's CUDA code for this GPU only (faster build); --no-build-isolation: use the torch,
        # pybind11 and scikit-build-core already installed (no network on lent machines)
        run install env DPFAST_CUDA_ARCHS="$arch" "$PY" -m pip install --no-build-isolation \
            ${PIP_ARGS:-} ".[test,bench,triton]" ;;
    tests)
        run tests bash -c "cd tests && DPFAST_REQUIRE_EXT=1 '$PY' -m pytest -q -p no:cacheprovider \
            --rootdir=.. -c ../pyproject.toml -rs --junitxml='$OUT/tests.xml' ." ;;
    compile)
        run compile dpfast_cli check-kernels --arch "$arch" --json "$OUT/compile.json" ;;
    kernels)  # from the checkout, as benchmarks/README.md says (the kernels are the same code)
        run kernels "$PY" -m pytest benchmarks/test_kernels.py --benchmark-only -q \
            --benchmark-group-by=group --benchmark-columns=median,iqr \
            --benchmark-json="$OUT/kernels.json" ;;
    anchors)
        run anchors dpfast_cli bench --preset anchors --out "$OUT/anchors" ;;
    dpdm)
        run dpdm dpfast_cli bench --preset dpdm --out "$OUT/dpdm" ;;
    *)
        echo "gpu_check: unknown stage '$stage' (install tests compile kernels anchors dpdm)" >&2
        failed=$((failed + 1)) ;;
    esac
done
for table in "$OUT"/anchors/results.md "$OUT"/dpdm/results.md; do
    [ -f "$table" ] && { echo; echo "== $table"; cat "$table"; }
done
echo
echo "gpu_check: $failed stage(s) failed; logs and results in $OUT"
exit "$failed"
