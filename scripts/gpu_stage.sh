#!/bin/bash
# One training stage of the bundled model on a lent GPU machine, as one prepared command
# (README "The bundled default model", stage 7). Run from the repository root; writes what should
# come back (the float16 model, the logs, GPU utilisation) to $OUT, at most 8 files.
#
#   OUT=/tmp/out TRAIN_S=450 bash scripts/gpu_stage.sh                 # from the bundled model
#   OUT=/tmp/out INIT=path/to/fp16-model LR=1e-4 TRAIN_S=225 bash scripts/gpu_stage.sh
#   OUT=/tmp/out PAIR=1 TRAIN_S=420 bash scripts/gpu_stage.sh         # memory model and text-only twin
#
# PAIR=1 trains two runs side by side with the same settings and seed, half the workers each: the
# memory model (INIT) and its text-only twin (TWIN_INIT, default INIT, with model.memory = false),
# the comparison issue 13's memory-lead target needs. Back come $OUT/memory/ and $OUT/twin/
# (model.safetensors each) and $OUT/rest.tgz (every log, config and GPU sample); one run gives
# $OUT/model/ and the logs beside it.
#
# Environment knobs: INIT (model.init; default the bundled model; a model folder that came back from
# an earlier call will do: the bundled tokenizer files are copied into it), TRAIN_S (training budget, s),
# HARD_S (hard stop of the train command, s: the last checkpoint is still bundled), BATCH, WORKERS,
# LR, WARM (warm-up steps), SEED, SAVE (checkpoint every N steps), START (data.start: the first world
# position read; default 294912, past every position the bundled model's stages 4-7 read, so the
# stage sees fresh conversations), MEMORY (false: the text-only twin),
# EXTRA (more --set options), RECIPE, PY (python), SCRATCH (where the runs are written, default /tmp; no spaces), WHEELS (a folder of wheels to install first with
# --no-deps into /tmp/site, for a machine without this package's pinned dependencies: e.g.
# transformers 4.57, huggingface_hub < 1, tokenizers 0.22, pycocotools), SITE (instead of WHEELS: a folder
# where an earlier call on the same, still warm, machine installed them, /tmp/site: nothing installed; in
# session 40, the repository then 49 MB, it and the wheels (16 MB) and a model that came back (11 MB) were
# over a call's 64 MiB, so stage 10's second run carried the model and not the wheels).
set -u
OUT=${OUT:?set OUT to the folder that comes back}
mkdir -p "$OUT/model"
T0=$(date +%s)
PY=${PY:-python3}
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 3
  SITE=/tmp/site
fi
export PYTHONPATH=${SITE:+$SITE:}$PWD
export PYTHONUNBUFFERED=1
echo "set-up done after $(( $(date +%s) - T0 )) s"
$PY -c "import torch, transformers, segllm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" || exit 4
SMI=
if command -v nvidia-smi >/dev/null; then
  nvidia-smi dmon -s u -d 5 > "$OUT/smi.log" 2>&1 &
  SMI=$!
fi
with_tokenizer() {  # a model folder that came back without the tokenizer files: its tokenizer is the bundled one
  [ -f "$1/tokenizer.json" ] || cp segllm/assets/default_model/{tokenizer.json,tokenizer_config.json,special_tokens_map.json} "$1/" || exit 5
}
S=${SCRATCH:-/tmp}  # the runs and what is gathered before it goes to $OUT
INIT=${INIT:-segllm/assets/default_model}
with_tokenizer "$INIT"
train() {  # $1: run folder, $2: init, $3: model.memory, $4: workers, $5: console log
  rm -rf "$1"
  # eval_every far beyond the run: the trainer still validates once when the time budget ends
  timeout -k 15 "${HARD_S:-520}" $PY -c "import sys; from segllm.cli import main; sys.exit(main())" train "${RECIPE:-configs/direct_refine.toml}" \
    --set model.init="\"$2\"" --set output_dir="\"$1\"" --set model.memory="$3" \
    --set batch_size="${BATCH:-256}" --set workers="$4" --set threads=1 \
    --set eval_every=100000 --set save_every="${SAVE:-40}" --set log_every=10 \
    --set optim.lr="${LR:-2e-4}" --set optim.warmup_steps="${WARM:-40}" --set time_limit_s="${TRAIN_S:-450}" \
    --set model.loss.own_ref_prob=0.5 --set seed="${SEED:-7}" --set data.start="${START:-294912}" ${EXTRA:-} > "$5" 2>&1
  echo "train $1 exit $? after $(( $(date +%s) - T0 )) s"
}
bundle() {  # $1: run folder, $2: where the float16 model goes
  $PY scripts/bundle_model.py "$1/checkpoint-last" --out "$2"
}
W=${WORKERS:-14}
if [ "${PAIR:-0}" = 1 ]; then
  TWIN_INIT=${TWIN_INIT:-$INIT}
  with_tokenizer "$TWIN_INIT"
  mkdir -p $S/segllm-pair && rm -rf "$OUT/model"
  train $S/segllm-stage-memory "$INIT" true $(( W / 2 )) $S/segllm-pair/memory_console.log &
  P1=$!
  train $S/segllm-stage-twin "$TWIN_INIT" false $(( W - W / 2 )) $S/segllm-pair/twin_console.log &
  P2=$!
  wait $P1 $P2
  [ -n "$SMI" ] && kill "$SMI" 2>/dev/null
  for side in memory twin; do
    tail -c 400 $S/segllm-pair/${side}_console.log
    for f in log.jsonl eval.jsonl checkpoint-last/trainer_state.json; do
      cp "$S/segllm-stage-$side/$f" "$S/segllm-pair/${side}_$(basename "$f")" 2>/dev/null
    done
    bundle $S/segllm-stage-$side $S/segllm-pair/$side && mkdir -p "$OUT/$side" && mv $S/segllm-pair/$side/model.safetensors "$OUT/$side/"
  done
  [ -f "$OUT/smi.log" ] && mv "$OUT/smi.log" $S/segllm-pair/
  tar -czf "$OUT/rest.tgz" -C $S/segllm-pair .
else
  RUN=${RUN:-$S/segllm-stage}
  train "$RUN" "$INIT" "${MEMORY:-true}" "$W" "$OUT/console.log"
  [ -n "$SMI" ] && kill "$SMI" 2>/dev/null
  tail -c 600 "$OUT/console.log"
  cp "$RUN/log.jsonl" "$RUN/eval.jsonl" "$RUN/checkpoint-last/trainer_state.json" "$OUT/" 2>/dev/null
  # the tokenizer files are the bundled model's; only what changed comes back
  bundle "$RUN" $S/segllm-stage-fp16 \
    && cp $S/segllm-stage-fp16/model.safetensors $S/segllm-stage-fp16/segllm.json $S/segllm-stage-fp16/config.json "$OUT/model/"
fi
echo "all done after $(( $(date +%s) - T0 )) s"
ls -laR "$OUT"
