#!/usr/bin/env bash
# Train the shipped default model and its Table 3-4 comparison on Moving Shapes (docs/model_card.md,
# docs/results.md), on one GPU. Phases, each runnable on a fresh machine from what the last one returned:
#   vae   MIN        train the VAE for MIN minutes             -> runs/vae_moving_shapes/final/vae (float16),
#                    then scripts/check_vae.py: object/background error and the analyser on reconstructions;
#                    VAE_FROM=DIR fine-tunes that VAE (e.g. the shipped m4v/assets/default/vae) instead of a fresh one;
#                    with DECODER_ONLY=1 only its decoder (encoder and latent normalisation kept: latents prepared
#                    and transformers trained with VAE_FROM stay valid, so this can run beside phase train)
#   probe            steps/s of the five variants run side by side, and seconds per generated video
#   train STEPS MIN  prepare latents, train the five variants side by side for STEPS steps (at most MIN
#                    minutes each), evaluate each on the held-out split (m4v eval shapes --in-memory: the
#                    GPU machine has no FFmpeg)
#   ablate STEPS MIN paper Table 3 by its fast evaluation protocol (C.2: one initialisation, equal steps):
#                    scripts/make_ablation_seeds.py derives the control and the three ablations from SOURCE (default
#                    the shipped transformer), then phase train continues all four from there (KEEP: all four)
# Variants (paper Table 3 ablations and the Table 4 baseline): full_temp (shipped), full_attn,
# no_recomposition, no_registers, no_temporal (VARIANTS="full_temp full_attn" picks some). EXTRA="--set K=V ..."
# is added to every train command, EVAL_ARGS to every eval (GUIDANCE="FIRST LATER" sets the evaluated pipelines'
# default guidance, default the shipped model's "3 2"; runs before session 6 evaluated at PyramidFlow's 7 5); SAMPLES sets the number of prepared clips.
# FROM=DIR continues each variant from DIR/transformer_VARIANT (the EMA weights an earlier train phase brought
# back; model.pretrained, whose config then replaces the overrides), so steps add up over several GPU sessions.
# LATENTS=DIR trains on latents another run prepared with the same VAE and SAMPLES (phase train skips its prepare):
# two runs side by side on one GPU (e.g. a continued leg and the ablations from scratch) share one prepared set.
# Everything a phase reports (logs, metrics, eval JSON, the float16 EMA transformers of the variants in KEEP,
# default "full_temp full_attn") is packed into $OUT/PHASE.tar* when it ends, also when it fails (phase train
# also packs once before its evaluation). The shipped
# pipeline is then assembled where the files land:
#   python scripts/assemble_pipeline.py --transformer runs/report_train/transformer_full_temp --vae VAE \
#       -o m4v/assets/default --half
set -euo pipefail
PHASE=${1:?phase: vae, probe, train or ablate}
OUT=${OUT:-out}
M4V=${M4V:-python3 -m m4v}
DEVICE=${DEVICE:-cuda}
# At 128x128x17 (at most 192 visual tokens) the Triton kernels' compile and block tuning (tens of seconds per
# process, and five processes compiling side by side) cost more than they save: use the torch SSD path.
export M4V_SSD_BACKEND=${M4V_SSD_BACKEND:-torch} M4V_DISABLE_TRITON=${M4V_DISABLE_TRITON:-1}
VAE=${VAE:-runs/vae_moving_shapes/final/vae}  # VAE=m4v/assets/default/vae reuses the shipped one (skip phase vae)
CFG=configs/train_moving_shapes.yaml
W=runs/report_$PHASE
mkdir -p "$OUT" "$W"
pack() { rm -f "$OUT/$PHASE.tar."*; tar -cf - -C runs "report_$PHASE" | split -b 15M - "$OUT/$PHASE.tar."; }
trap pack EXIT
read -r -a VARIANTS <<<"${VARIANTS:-full_temp full_attn no_recomposition no_registers no_temporal}"
declare -A SET=(
  [full_temp]=""
  [full_attn]="--set model.overrides.layout=full_attn"
  [no_recomposition]="--set model.overrides.text_recomposition=false"
  [no_registers]="--set model.overrides.registers=false"
  [no_temporal]="--set model.overrides.layout=full"
)

side_by_side() {  # side_by_side SHARDS ARGS...: train every variant at once, one process each
  local shards=$1; shift
  for v in "${VARIANTS[@]}"; do
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=2 $M4V train --config $CFG --output-dir "runs/ms_$v" --resume none --set "data.source=$shards" \
      --set "vae=$VAE" ${SET[$v]} ${EXTRA:-} ${FROM:+--set model.pretrained=$FROM/transformer_$v} "$@" \
      >"$W/train_$v.log" 2>&1 &
  done
  wait
  for v in "${VARIANTS[@]}"; do
    cp "runs/ms_$v/metrics.csv" "$W/metrics_$v.csv"
    echo "$v: $(tail -n 1 "runs/ms_$v/metrics.csv")"
  done
}

evaluate() {  # evaluate ARGS...: every variant's EMA weights as a pipeline, held-out prompts, side by side
  for v in "${VARIANTS[@]}"; do
    # shellcheck disable=SC2086
    python3 scripts/assemble_pipeline.py --transformer "runs/ms_$v/final/transformer_ema" --vae $VAE \
      --guidance ${GUIDANCE:-3 2} -o "runs/pipe_$v" >/dev/null
    OMP_NUM_THREADS=2 timeout "${EVAL_TIMEOUT:-3000}" $M4V eval shapes --model "runs/pipe_$v" --device "$DEVICE" \
      --no-progress --in-memory --batch-size "${EVAL_BATCH:-45}" \
      --out "$W/eval_$v.json" "$@" >"$W/eval_$v.log" 2>&1 &
  done
  wait
  for v in "${VARIANTS[@]}"; do echo "$v: $(tail -n 4 "$W/eval_$v.log" | tr '\n' ' ')"; done
}

case $PHASE in
  vae)
    # shellcheck disable=SC2086
    $M4V train-vae --config configs/vae_moving_shapes.yaml --time-limit "${2:?minutes}" \
      ${VAE_FROM:+--set vae.pretrained=$VAE_FROM} ${DECODER_ONLY:+--set vae.freeze_encoder=true} >"$W/vae.log" 2>&1
    tail -n 3 "$W/vae.log"
    python3 scripts/check_vae.py $VAE --num "${CHECK_CLIPS:-48}" --device "$DEVICE" --out "$W/vae_check.json" | tail -n 22
    python3 scripts/assemble_pipeline.py --halve-only $VAE
    cp -r $VAE "$W/vae"
    cp runs/vae_moving_shapes/vae_metrics.csv "$W/vae_metrics.csv"
    ;;
  probe)
    $M4V prepare --data moving_shapes --out data/ms_probe --config $CFG --vae $VAE \
      --set data.moving_shapes.num_samples="${PROBE_SAMPLES:-2048}" --batch-size 64 --num-workers 8 | tail -n 2
    side_by_side data/ms_probe --time-limit 0.75
    SECONDS=0
    evaluate --limit 1
    echo "eval of 2 videos per variant, side by side: $SECONDS s"
    ;;
  train)
    SECONDS=0
    if [ -z "${LATENTS:-}" ]; then
      LATENTS=data/ms_latents
      $M4V prepare --data moving_shapes --out $LATENTS --config $CFG --vae $VAE \
        --set data.moving_shapes.num_samples="${SAMPLES:-30000}" --batch-size 64 --num-workers 14 | tail -n 2
    fi
    echo "prepare: $SECONDS s"
    SECONDS=0
    side_by_side "$LATENTS" --stop-at "${2:?steps}" --time-limit "${3:?minutes}"
    echo "train: $SECONDS s"
    for v in ${KEEP:-full_temp full_attn}; do  # EMA transformers (float16, ~14 MB each) to bring back
      [ -d "runs/ms_$v/final/transformer_ema" ] || continue
      cp -r "runs/ms_$v/final/transformer_ema" "$W/transformer_$v"
      python3 scripts/assemble_pipeline.py --halve-only "$W/transformer_$v"
    done
    pack  # the trained weights are in $OUT before the evaluation starts (a lost machine keeps them)
    SECONDS=0
    # shellcheck disable=SC2086
    evaluate ${EVAL_ARGS:-}
    echo "eval: $SECONDS s"
    ;;
  ablate)
    python3 scripts/make_ablation_seeds.py --transformer "${SOURCE:-m4v/assets/default/transformer}" \
      -o runs/ablation_seeds
    trap - EXIT
    rmdir "$W" 2>/dev/null || true
    FROM=runs/ablation_seeds VARIANTS="full_temp no_recomposition no_registers no_temporal" \
      KEEP="${KEEP:-full_temp no_recomposition no_registers no_temporal}" exec bash "$0" train "${2:?steps}" "${3:?minutes}"
    ;;
  *) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
