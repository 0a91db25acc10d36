#!/usr/bin/env bash
# The balance-group sweep (smallthinker_lab/train/sweep.py) on one GPU, for the device tool:
#
#   run(command="bash smallthinker_lab/train/gpu_sweep.sh", carry=["data/corpus/tokens"], timeout_s=600)
#
# sweep.py all: a probe of PARALLEL concurrent runs plans the steps so that all runs (ARMS x SEEDS, PARALLEL at a
# time) train in TRAIN_S seconds; each run is measured on the CPU as soon as it finishes; then the per-arm table.
# The sweep is stopped at SWEEP_S seconds whatever it has done, so that packing always happens; rerunning the
# command on the same (still warm) machine with STEPS=<the planned steps> resumes it.
# Packed into $OUT/pack.tgz.part-NN (15 MiB parts) + pack.sha256: sweep.json, the tables, per run its logs,
# summary, args, measure.json and config (no checkpoints, no weights), plus the weights of run COMPARE (one
# comparison model; COMPARE= to leave it out). Unpack: cat pack.tgz.part-* > pack.tgz && sha256sum -c pack.sha256
# && tar xzf pack.tgz.
# Environment overrides: ARMS SEEDS PARALLEL TRAIN_S SWEEP_S STEPS COMPILE (1) CONFIG BATCH SEQ LR DEVICE PY DATA.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_sweep_out}
mkdir -p "$OUT"
ARMS=${ARMS:-1,4,16,64,micro-batch} SEEDS=${SEEDS:-0,1,2} PARALLEL=${PARALLEL:-8} TRAIN_S=${TRAIN_S:-360}
SWEEP_S=${SWEEP_S:-550} STEPS=${STEPS:-} COMPILE=${COMPILE:-0} CONFIG=${CONFIG:-smallthinker-tiny-wide}
BATCH=${BATCH:-64} SEQ=${SEQ:-512} LR=${LR:-1e-3} DEVICE=${DEVICE:-cuda} PY=${PY:-python3}
DATA=${DATA:-data/corpus/tokens} WORK=${WORK:-/tmp/sweep} COMPARE=${COMPARE-microbatch-s0}
mkdir -p "$WORK"
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
  > "$WORK/nvidia_smi.txt"
nproc >> "$WORK/nvidia_smi.txt"
cat "$WORK/nvidia_smi.txt"

ARGS=(all --out "$WORK" --data "$DATA" --config "$CONFIG" --arms "$ARMS" --seeds "$SEEDS" --parallel "$PARALLEL"
      --train-s "$TRAIN_S" --batch-size "$BATCH" --seq-len "$SEQ" --lr "$LR" --device "$DEVICE")
[ -n "$STEPS" ] && ARGS+=(--steps "$STEPS")
[ "$COMPILE" = 1 ] && ARGS+=(--compile)
timeout -k 5 "$SWEEP_S" "$PY" -m smallthinker_lab.train.sweep "${ARGS[@]}" 2>&1 | tee "$WORK/sweep.out"
echo "sweep exit ${PIPESTATUS[0]} (t=$(( $(date +%s) - T0 ))s)"
[ -f "$WORK/sweep_table.md" ] || "$PY" -m smallthinker_lab.train.sweep table --out "$WORK" --arms "$ARMS" \
  --seeds "$SEEDS" 2>&1 | tail -n 3  # stopped early: the table of what was measured

# pack: everything small, no checkpoints or weights except the comparison model's
cd "$WORK" || exit 1
LIST=$(ls sweep.json sweep_runs.csv sweep_table.csv sweep_table.md sweep.out nvidia_smi.txt probe/*.out 2>/dev/null)
for d in runs/*/; do
  for f in train_log.jsonl eval_log.jsonl summary.json args.json measure.json train.out measure.out model/config.json; do
    [ -f "$d$f" ] && LIST="$LIST $d$f"
  done
done
[ -n "$COMPARE" ] && [ -f "runs/$COMPARE/model/model.safetensors" ] && LIST="$LIST runs/$COMPARE/model/model.safetensors"
# shellcheck disable=SC2086
tar czf "$WORK/pack.tgz" $LIST
sha256sum pack.tgz > "$OUT/pack.sha256"
split -b 15m -d pack.tgz "$OUT/pack.tgz.part-"
ls -la "$OUT"
[ -f sweep_table.md ] && cat sweep_table.md
echo "total $(( $(date +%s) - T0 ))s"
