#!/bin/bash
# Every figure README "The bundled default model" states, for a model folder (default: the bundled
# one), in one command: what a newly bundled model needs before its README table is rewritten.
#
#   bash scripts/bundled_figures.sh                          # the bundled model -> docs/results
#   MODEL=runs/cpu8a/fp16 OUT=/tmp/figs bash scripts/bundled_figures.sh   # a candidate, elsewhere
#
# Writes to OUT (default docs/results), NAME defaulting to the README's names:
#   NAME.{json,csv,own.rank0.jsonl,oracle.rank0.jsonl}          test split, 200 conversations, with the
#                                                                question-blind baseline (the table)
#   heldout_NAME.*                                               heldout split, 200 conversations
#   s19_NAME_{test,heldout}1000.*                                1,000 conversations, own and oracle history
#   multi_target_NAME.*                                          40 test conversations, half the rounds asking for several objects
#   lead_{test,heldout}{,1000}.txt                               the memory lead against the text-only
#                                                                twin (TWIN_*: its logs), paired bootstrap
#   examples.txt (and EXAMPLES_FIGURE, default OUT/examples.png)  the bundled examples, round by round
#   NAME_tables.md                                               the README's two tables (scripts/bundled_tables.py)
# and, for the bundled model only, docs/results/bundled_slice.json (the figures tests pin).
# About 5 minutes on this 2-core CPU.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-python}
MODEL=${MODEL:-}
OUT=${OUT:-docs/results}
NAME=${NAME:-memory}
TWIN_TEST=${TWIN_TEST:-docs/results/s14_twin_test.own.rank0.jsonl}
TWIN_HELDOUT=${TWIN_HELDOUT:-docs/results/s14_twin_heldout.own.rank0.jsonl}
TWIN_TEST1000=${TWIN_TEST1000:-docs/results/s19_twin_test1000.own.rank0.jsonl}
TWIN_HELDOUT1000=${TWIN_HELDOUT1000:-docs/results/s19_twin_heldout1000.own.rank0.jsonl}
mkdir -p "$OUT"
CK=()
[ -n "$MODEL" ] && CK=(--checkpoint "$MODEL")
eval_() {  # split size name [more segllm eval options]
  local split=$1 size=$2 name=$3
  shift 3
  $PY -m segllm.cli eval "${CK[@]}" --split "$split" --size "$size" --out "$OUT" --name "$name" "$@"
}
eval_ test 200 "$NAME" --protocol own oracle --baseline union
eval_ heldout 200 "heldout_$NAME" --protocol own oracle
eval_ test 1000 "s19_${NAME}_test1000" --protocol own oracle        # oracle too: scripts/compare_cycle.sh reads both
eval_ heldout 1000 "s19_${NAME}_heldout1000" --protocol own oracle
eval_ test 40 "multi_target_$NAME" --protocol own oracle --multi-target-prob 0.5   # README "Several targets in one answer"
lead() {  # memory-log twin-log out
  if [ -f "$2" ]; then $PY scripts/memory_lead_ci.py "$1" "$2" > "$3"; cat "$3"; else echo "no twin log at $2: $3 not written"; fi
}
lead "$OUT/$NAME.own.rank0.jsonl" "$TWIN_TEST" "$OUT/lead_test.txt"
lead "$OUT/heldout_$NAME.own.rank0.jsonl" "$TWIN_HELDOUT" "$OUT/lead_heldout.txt"
lead "$OUT/s19_${NAME}_test1000.own.rank0.jsonl" "$TWIN_TEST1000" "$OUT/lead_test1000.txt"
lead "$OUT/s19_${NAME}_heldout1000.own.rank0.jsonl" "$TWIN_HELDOUT1000" "$OUT/lead_heldout1000.txt"
$PY scripts/score_examples.py ${MODEL:+"$MODEL"} --figure "${EXAMPLES_FIGURE:-$OUT/examples.png}" | tee "$OUT/examples.txt"
if [ -z "$MODEL" ]; then $PY scripts/bundled_slice.py; fi
$PY scripts/bundled_tables.py --results "$OUT" --name "$NAME" | tee "$OUT/${NAME}_tables.md"   # the README's two tables
