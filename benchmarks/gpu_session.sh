#!/usr/bin/env bash
# One GPU session, one command (run it from the repository root):
#   bash benchmarks/gpu_session.sh            # BUDGET=330 seconds by default
# 1. benchmarks/gpu_check.py: the kernel against the XLA path on the device
#    (and the row statistics reduction="none" takes from it),
#    the public API on the device (shard_map, bad labels, empty batch),
#    launch-configuration tuning, then benchmarks/bench.py at full size
#    (mean; a profile and the compiled HLO of each jaxloss step; then
#    reduction="none", and, if under 150 s have passed, probability targets
#    and label_smoothing=0.1, all three without PyTorch);
# 2. benchmarks/mosaic_probe.py (at most 90 s): the Mosaic GPU prototypes of
#    the kernel (both layouts) on the device, against jaxloss and the copy floor;
# 3. if over 150 s are left, 45 s of tests/fuzz.py (random configurations
#    through the real kernel against PyTorch);
# 4. with the time left, the test files that reach the kernel through the
#    public API, on the device.
# Everything lands in $OUT (default /tmp/jaxloss-gpu). Nothing is installed:
# the package runs from the tree.
set -u
OUT=${OUT:-/tmp/jaxloss-gpu}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=.
BUDGET=${BUDGET:-330}
timeout $((BUDGET - 90)) python3 benchmarks/gpu_check.py "$@" > "$OUT/gpu_check.log" 2>&1
echo "gpu_check rc=$?"
grep -E '"all_ok"|"tuned"' "$OUT/gpu_check.log" | head -4
grep '"ok": false' "$OUT/gpu_check.log" | head -3
timeout 90 python3 benchmarks/mosaic_probe.py --reps 10 > "$OUT/mosaic_probe.log" 2>&1
echo "mosaic_probe rc=$?"
grep -E "^seg|^interpret" "$OUT/mosaic_probe.log" | cut -c1-300
if [ $((BUDGET - SECONDS)) -gt 150 ]; then
    # Random configurations through the real kernel against PyTorch (float64).
    timeout 60 python3 tests/fuzz.py --mode oracle --seconds 45 --max-logits 4000000 \
        > "$OUT/fuzz.log" 2>&1
    echo "fuzz rc=$?"
    grep -E "FAILED|configurations from" "$OUT/fuzz.log" | cut -c1-300 | tail -6
fi
left=$((BUDGET - SECONDS))
if [ "$left" -gt 30 ]; then
    # XLA's default LLVM level (tests/conftest.py sets level 0 otherwise, a
    # CPU compile-time measure never tried on a GPU's code generation).
    JAXLOSS_TEST_FULL_OPT=1 XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$left" python3 -m pytest -q -n 12 \
        -p no:benchmark -p no:cacheprovider --maxfail=30 \
        tests/test_functional.py tests/test_transforms.py tests/test_torch_compat.py \
        tests/test_linen.py tests/test_nnx.py tests/test_seed_examples.py tests/test_kernels.py \
        tests/test_generic_xla.py \
        > "$OUT/pytest.log" 2>&1
    echo "pytest rc=$?"
    grep -E "passed|failed|FAILED" "$OUT/pytest.log" | tail -15
fi
