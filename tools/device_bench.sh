#!/usr/bin/env bash
# Every speed measurement of the paper preset's training step on one GPU, before and after each
# change, in one run (about 10 minutes on an H200, compilation included). Each tools/bench.py run
# writes its JSON to $OUT as soon as it ends, so a run cut short keeps what it measured.
#
#   OUT=/tmp/bench bash tools/device_bench.sh
#
# Rows, each the one before plus one change (tools/bench.py's switches):
#   1 batched     the step as train.py runs it: the batch's cost matrices copied to the host at once
#   2 frozen      + the audio network frozen, as train.py runs it with --audio-weights
#   3 amp         + bf16 autocast
#   4 cl          + the ResNet in channels_last
#   5 compile     + torch.compile (default mode)
#   6 cudagraphs  + torch.compile mode reduce-overhead (CUDA graphs)
#   7             row 4 with the evaluation throughput and the profiler's top-10 table
# then the compiled-vs-eager check of the loss (tools/compile_check.py).
set -u
OUT=${OUT:?set OUT to a folder}
mkdir -p "$OUT"
# PRESET, DEVICE, STEPS: for a dry run on a CPU (PRESET=cpu DEVICE=cpu STEPS=1)
PRESET=${PRESET:-paper}; DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-20}
B="python tools/bench.py --preset $PRESET --device $DEVICE --steps $STEPS --warmup $(( STEPS < 5 ? 0 : 5 ))"
run() {  # name, flags...
  local name=$1; shift
  echo "== $name: $*"
  timeout 300 $B "$@" --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
  echo "   exit $? $(grep -E 'clips/s|peak memory' "$OUT/$name.txt" | tr -s ' ' | tr '\n' ';')"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
run 1-batched
run 2-frozen --freeze-audio
run 3-amp --freeze-audio --amp
run 4-cl --freeze-audio --amp --channels-last
run 5-compile --freeze-audio --amp --channels-last --compile
run 6-cudagraphs --freeze-audio --amp --channels-last --compile --compile-mode reduce-overhead
run 7-eval-profile --freeze-audio --amp --channels-last --eval-steps 20 --profile 3
echo "== compile check (inductor): eager vs compiled loss, fp32 and bf16"
timeout 300 python tools/compile_check.py --preset $PRESET --device $DEVICE --json "$OUT/compile-check.json" \
  > "$OUT/compile-check.txt" 2>&1; echo "   exit $?"; cat "$OUT/compile-check.txt" | tail -3
echo "done"
