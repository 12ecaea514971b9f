#!/bin/bash
# Is a training run better than the bundled model? Its float16 copy evaluated on 1,000 conversations
# of the test and heldout splits, both protocols, and compared record for record with the bundled
# model's logs of the same conversations (docs/results/s19_memory_{test,heldout}1000.{own,oracle}.rank0.jsonl,
# written by scripts/bundled_figures.sh) by a paired bootstrap over conversations
# (scripts/memory_lead_ci.py --min-round 1: all rounds; and round 1 alone, own history). Why 1,000: a CPU cycle's gain, about a
# point, is under the noise of 200 conversations (95% intervals of about +-2) and about twice
# the width of 1,000's (session 39, docs/bundled_model_log.md). About 4 minutes on 2 cores.
#
#   bash scripts/compare_cycle.sh /work/runs/cycle7           # RUN/checkpoint-last -> RUN/fp16 -> RUN/compare
#   MODEL=/tmp/gpu-model OUT=/tmp/cmp bash scripts/compare_cycle.sh   # a model folder instead of a run
#
# Knobs: MODEL (RUN/fp16, made from RUN/checkpoint-last when absent), OUT (RUN/compare), SIZE (1000),
# BASE (docs/results/s19_memory: the bundled model's logs), THREADS (2), PY (python).
# Also scores the three bundled examples (OUT/examples.png), about 15 s more.
set -eu
RUN=${1:-}
PY=${PY:-python}
cd "$(dirname "$0")/.."
MODEL=${MODEL:-${RUN:?give a run folder, or set MODEL}/fp16}
OUT=${OUT:-${RUN:?set OUT when MODEL is given without a run}/compare}
SIZE=${SIZE:-1000}
BASE=${BASE:-docs/results/s19_memory}
if [ ! -f "$MODEL/model.safetensors" ]; then
  [ -n "$RUN" ] || { echo "no model at $MODEL" >&2; exit 2; }
  "$PY" scripts/bundle_model.py "$RUN/checkpoint-last" --out "$MODEL"
fi
mkdir -p "$OUT"
for split in test heldout; do
  "$PY" -m segllm.cli eval --checkpoint "$MODEL" --split "$split" --size "$SIZE" --protocol own oracle \
    --threads "${THREADS:-2}" --out "$OUT" --name "cand_$split" > "$OUT/cand_$split.txt" 2>&1
done
for split in test heldout; do
  for protocol in own oracle; do
    base="${BASE}_${split}${SIZE}.$protocol.rank0.jsonl"
    echo "== $split, $protocol history"
    if [ -f "$base" ]; then
      "$PY" scripts/memory_lead_ci.py "$OUT/cand_$split.$protocol.rank0.jsonl" "$base" --min-round 1 --names candidate bundled | sed -n 1p  # (head would close the pipe on its later lines)
      # round 1 alone as well (issue 13's first target), own history only
      if [ "$protocol" = own ]; then
        "$PY" scripts/memory_lead_ci.py "$OUT/cand_$split.$protocol.rank0.jsonl" "$base" --min-round 1 --max-round 1 --names candidate bundled | sed -n 1p
      fi
    else
      echo "no bundled log at $base (bash scripts/bundled_figures.sh writes it)"
    fi
  done
done | tee "$OUT/comparison.txt"
# the three bundled examples, round by round, as segllm chat plays them (issue 13: the README's `shapes` must
# stay right in every round of a model that is bundled); the figure beside them
{
  echo "== the bundled examples (IoU per round; scripts/score_examples.py)"
  "$PY" scripts/score_examples.py "$MODEL" --figure "$OUT/examples.png" | grep -v '^wrote '
} | tee -a "$OUT/comparison.txt"
