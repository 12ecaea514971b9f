#!/usr/bin/env bash
# Train the previous bundled model (configs/default.toml; the bundled model now is the direct preset of
# README "The bundled default model", stages 1-7) and its baseline without mask memory
# (configs/no_memory.toml) side by side on one machine, as that model's table was made.
#
#   scripts/train_default_models.sh OUT_DIR [--set KEY=VALUE ...]
#
# Each run writes OUT_DIR/<name>/ (checkpoint-last/, log.jsonl, eval.jsonl) and OUT_DIR/<name>.out
# (its terminal output). Both recipes stop on their time budget (time_limit_s), so the two runs
# share the machine for the same wall time. Extra arguments go to both `segllm train` calls.
set -u
out=${1:?usage: $0 OUT_DIR [--set KEY=VALUE ...]}
shift
mkdir -p "$out"
pids=()
for name in default no_memory; do
    python -m segllm.cli train "configs/$name.toml" --set "output_dir=$out/$name" "$@" >"$out/$name.out" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
exit $status
