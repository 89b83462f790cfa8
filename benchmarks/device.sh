#!/usr/bin/env bash
# The one prepared accelerator run (issue 13, item 9): everything a lent GPU should measure, in one command
# that ends well inside one device call (about 5 minutes on an H200; the device time is 15 minutes in all).
#
#   bash benchmarks/device.sh            # on the device machine, from the repo root; results under $OUT
#   QUICK=1 bash benchmarks/device.sh    # tiny dims, any machine: a smoke test of this script (CPU here)
#
# It runs, each under its own timeout so one failure leaves the others' results:
#   1. the device facts (nvidia-smi, jax devices);
#   2. bf16 and float32 parity of the committed tiny cases on the device (cosyjax parity check; tiny-b's
#      bf16 tts groups are expected to fail at ~12 dB, the known gap of tests/test_bf16_parity.py);
#   3. the stage and end-to-end benchmark rows in float32 and bf16 at batch sizes 1, 16, 64, with the first
#      stream chunk (python -m benchmarks; no upstream: its torch would need the reference checkout);
#   4. the serving benchmark (16 streamed requests at concurrency 1, 4, 16 against one at a time).
# Record what comes back in BENCHMARKS.md with the device and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${TMPDIR:-/tmp}/cosyjax-device}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY="${PYTHON:-python3}"
QUICK="${QUICK:-}"
status=0

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, remember a failure
  local name=$1 seconds=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${seconds} s)"
  timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "   $name FAILED (exit $rc), see $OUT/$name.log"; tail -n 5 "$OUT/$name.log"; status=1
  fi
}

{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$PY" -c "import jax; print(jax.__version__, jax.devices())"; } \
  >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

for case in tiny-a tiny-b; do
  for dtype in float32 bfloat16; do
    step "parity-$case-$dtype" 120 "$PY" -m cosyjax.cli parity check --case "tests/data/$case" --dtype "$dtype" \
      --out "$OUT/parity-$case-$dtype"
  done
done

if [ -n "$QUICK" ]; then
  step bench 300 "$PY" -m benchmarks --quick --stages llm,flow,hift,e2e,stream --dtypes float32,bfloat16 \
    --batch-sizes 1,2 --json "$OUT/bench.json" --markdown "$OUT/bench.md"
else
  step bench 240 "$PY" -m benchmarks --stages llm,flow,hift,e2e,stream --dtypes float32,bfloat16 \
    --batch-sizes 1,16,64 --json "$OUT/bench.json" --markdown "$OUT/bench.md"
  step serve 150 "$PY" -m benchmarks --stages serve --json "$OUT/serve.json" --markdown "$OUT/serve.md"
fi
echo "== done ($(date -u +%H:%M:%S)); results in $OUT"
exit $status
