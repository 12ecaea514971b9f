#!/bin/bash
# The bundled model's training on this project's 2-core CPU machine, in the background, resumed
# across sessions (issue 13: "on this 2-core CPU in the background, resuming across sessions").
# Stage 8 of README "The bundled default model": the stage-7 recipe (configs/direct_refine.toml,
# half of the references fed the model's own masks) from the bundled weights, on fresh world
# positions (data.start past every position stages 1-7 and scripts/gpu_stage.sh read), two
# processes of one thread each (torchrun, gloo), batches of 16 per process, the learning rate
# warmed up to LR and decayed on a cosine over a budget of TRAIN_S seconds of training (a
# resumed run counts its earlier seconds; stopped early, it resumes on the same schedule). One
# cycle fits a session; the next session's cycle starts from this one's weights (INIT).
# LR 3.5e-5 at 32 conversations a step is stage 7's 1e-4 at 256 scaled by the square root of
# the batch: at 1e-4 the validation cIoU fell from 71.2 to 65.2 in 250 steps (session 29).
#
#   RUN=/work/runs/cpu8a TRAIN_S=6300 bash scripts/cpu_stage.sh   # starts, or resumes RUN where it stopped
#   pkill -STOP -f -- RUN; pkill -CONT -f -- RUN                   # pause for a measurement, go on
#
# Each start appends to RUN/console.log and writes the launcher's process id to RUN/pid (torchrun
# starts each worker in a process group of its own, so pause and stop by RUN, as above). A session
# that ends kills it; the next resumes from RUN/checkpoint-last (saved every SAVE steps, so at most
# that much is lost). Validation (oracle history, the same 64 conversations as every stage) every
# EVAL steps goes to RUN/eval.jsonl; python scripts/bundle_model.py RUN/checkpoint-last makes the
# float16 copy that would be bundled.
#
# Precision: bf16 autocast where the CPU computes bfloat16 natively (AVX-512 BF16 or AMX; session 29's
# machine), float32 elsewhere: on an AVX2-only CPU bf16 is emulated and a step took about 6x longer
# than in float32 (session 30, segllm/precision.py). MP=bf16|no overrides the choice.
#
# ACCUM micro-batches per optimizer step (1): ACCUM=8 LR=1e-4 is stage 7's batch of 256 at its rate, with
# 8x fewer steps for the same conversations (session 36's third cycle: level with session 35's batches of 32).
#
# WORLD replaces the recipe's data.world table (a TOML inline table), e.g. to drill the weak relation families:
#   WORLD='{multi_target_prob = 0.15, family_weights = {ordinal = 2.5, comparison = 1.5, attribute = 0.6}}'
# (the in-training validation then draws from that world too, so its figures are not comparable with other runs';
# segllm eval --split uses the default world).
#
# Knobs: RUN, TRAIN_S (6300), WORLD (the recipe's), MP (auto), PROCS (2), THREADS (1 per process), BATCH (16 per process), ACCUM (1), LR (3.5e-5),
# WARM (50 steps), SAVE (25), EVAL (250), START (2000000), SEED (29), INIT (segllm/assets/default_model: the weights
# the run started from; a resumed run reads its checkpoint instead), PY (python).
set -eu
WORLD_SET=()
[ -n "${WORLD:-}" ] && WORLD_SET=(--set data.world="$WORLD")
RUN=${RUN:?set RUN to the run folder}
PY=${PY:-python}
mkdir -p "$RUN"
RESUME=
[ -f "$RUN/checkpoint-last/trainer_state.json" ] && RESUME=--resume
cd "$(dirname "$0")/.."
MP=${MP:-auto}
[ "$MP" = auto ] && MP=$("$PY" -c 'from segllm.precision import cpu_bfloat16_is_native as native; print("bf16" if native() else "no")')
setsid nice -n 5 "$PY" -m torch.distributed.run --nproc-per-node "${PROCS:-2}" -m segllm.cli train configs/direct_refine.toml $RESUME \
  --set model.init="\"${INIT:-segllm/assets/default_model}\"" --set output_dir="\"$RUN\"" \
  --set steps=1000000 --set time_limit_s="${TRAIN_S:-6300}" --set batch_size="${BATCH:-16}" --set grad_accum="${ACCUM:-1}" --set threads="${THREADS:-1}" \
  --set optim.lr="${LR:-3.5e-5}" --set optim.warmup_steps="${WARM:-50}" --set model.loss.own_ref_prob=0.5 --set mixed_precision="\"$MP\"" \
  --set seed="${SEED:-29}" --set data.start="${START:-2000000}" --set save_every="${SAVE:-25}" \
  --set eval_every="${EVAL:-250}" --set eval_size=64 --set keep_checkpoints=3 "${WORLD_SET[@]}" >> "$RUN/console.log" 2>&1 &
echo $! > "$RUN/pid"
echo "training in $RUN (launcher $(cat "$RUN/pid"), mixed_precision $MP${RESUME:+, resumed})"
