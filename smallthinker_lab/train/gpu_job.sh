#!/usr/bin/env bash
# The GPU training run of the shipped model (DP-group global balance loss) and of its comparison model
# (conventional micro-batch balance loss), side by side on one GPU, for the device tool:
#
#   run(command="bash smallthinker_lab/train/gpu_job.sh", carry=["data/corpus/tokens"], timeout_s=600)
#
# 1. a 30-step probe of both runs side by side measures their throughput under the same sharing;
# 2. steps = min(TARGET_TOKENS, BUDGET_S * measured tokens/s) / (BATCH * SEQ), the same for both runs;
# 3. both runs train side by side (max-time guard MAX_TIME_S each), validate every ~10%, export bf16 models;
# 4. everything but the checkpoints is packed into $OUT/pack.tgz.part-NN (under the 16 MiB/file limit) with its
#    sha256; unpack with:  cat pack.tgz.part-* > pack.tgz && sha256sum -c pack.sha256 && tar xzf pack.tgz
# Environment overrides: BATCH SEQ LR TARGET_TOKENS BUDGET_S MAX_TIME_S GROUP MICRO COEF SEED, and for a dry run
# on a CPU: DEVICE=cpu PY=.venv/bin/python MIN_STEPS=5.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_job_out}
mkdir -p "$OUT"
BATCH=${BATCH:-64} SEQ=${SEQ:-512} LR=${LR:-1e-3} SEED=${SEED:-0} COEF=${COEF:-0.01}
GROUP=${GROUP:-$BATCH} MICRO=${MICRO:-1}
TARGET_TOKENS=${TARGET_TOKENS:-120000000} BUDGET_S=${BUDGET_S:-400} MAX_TIME_S=${MAX_TIME_S:-440}
DEVICE=${DEVICE:-cuda} PY=${PY:-python3} MIN_STEPS=${MIN_STEPS:-50}
DATA=${DATA:-data/corpus/tokens} TOKENIZER=data/models/smallthinker-tiny WORK=/tmp/gpu_job
rm -rf "$WORK" && mkdir -p "$WORK"
T0=$(date +%s)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
  | tee "$WORK/nvidia_smi.txt"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available()
          else 'no CUDA')" | tee -a "$WORK/nvidia_smi.txt"
ls -la "$DATA"

COMMON=(--config smallthinker-tiny --data "$DATA" --batch-size "$BATCH" --seq-len "$SEQ" --device "$DEVICE"
        --seed "$SEED" --lr "$LR" --balance-coef "$COEF" --group-size "$GROUP" --microbatch-size "$MICRO")
train() { "$PY" -m smallthinker_lab.train.cli train "${COMMON[@]}" "$@"; }

# 1. probe
for b in global microbatch; do
  train --balance "$b" --out "$WORK/probe_$b" --steps 30 --warmup 1000 --log-every 10 --eval-windows 1 \
        --no-export --no-progress --no-resume > "$WORK/probe_$b.log" 2>&1 &
done
wait
tail -n 3 "$WORK"/probe_*.log
STEPS=$("$PY" - "$WORK" "$BATCH" "$SEQ" "$TARGET_TOKENS" "$BUDGET_S" <<'EOF'
import csv, sys
work, B, T, target, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
tps = []
for b in ("global", "microbatch"):
    rows = list(csv.DictReader(open(f"{work}/probe_{b}/train_log.csv")))
    tps.append(float(rows[-1]["tokens_per_s"]))  # steps 20-29: past start-up
steps = int(min(target, budget * min(tps)) // (B * T))
print(f"probe tokens/s side by side: {tps}; planned steps {steps}", file=sys.stderr)
print(steps)
EOF
)
[ -n "$STEPS" ] && [ "$STEPS" -ge "$MIN_STEPS" ] || { echo "probe failed (STEPS='$STEPS')"; cat "$WORK"/probe_*.log; exit 1; }
WARMUP=$(( STEPS / 15 < 200 ? STEPS / 15 : 200 ))
EVAL_EVERY=$(( STEPS / 10 ))
echo "plan: steps $STEPS warmup $WARMUP eval every $EVAL_EVERY, batch $BATCH x $SEQ, lr $LR (t=$(( $(date +%s) - T0 ))s)"

# 2. the two runs side by side
for b in global microbatch; do
  train --balance "$b" --out "$WORK/run_$b" --steps "$STEPS" --warmup "$WARMUP" --eval-every "$EVAL_EVERY" \
        --eval-windows 100000 --log-every 25 --max-time "$MAX_TIME_S" --tokenizer "$TOKENIZER" --no-resume \
        > "$WORK/run_$b.log" 2>&1 &
done
wait
tail -n 4 "$WORK"/run_*.log
echo "runs done (t=$(( $(date +%s) - T0 ))s)"

# 3. pack what comes back (no checkpoints, no tokenizer copies)
PACK=$WORK/pack
for b in global microbatch; do
  mkdir -p "$PACK/$b/model"
  cp "$WORK/run_$b"/{train_log.csv,eval_log.csv,summary.json,args.json} "$PACK/$b/" 2>/dev/null
  cp "$WORK/run_$b"/model/{config.json,model.safetensors} "$PACK/$b/model/" 2>/dev/null
  cp "$WORK/run_$b.log" "$WORK/probe_$b.log" "$PACK/$b/"
  cp "$WORK/probe_$b/train_log.csv" "$PACK/$b/probe_train_log.csv"
done
cp "$WORK/nvidia_smi.txt" "$PACK/"
echo "steps=$STEPS warmup=$WARMUP eval_every=$EVAL_EVERY batch=$BATCH seq=$SEQ lr=$LR group=$GROUP micro=$MICRO" \
  > "$PACK/plan.txt"
tar czf "$WORK/pack.tgz" -C "$WORK" pack
(cd "$WORK" && sha256sum pack.tgz > "$OUT/pack.sha256")
split -b 15m -d "$WORK/pack.tgz" "$OUT/pack.tgz.part-"
ls -la "$OUT"

# 4. summary
"$PY" - "$WORK" <<'EOF'
import json, sys
for b in ("global", "microbatch"):
    s = json.load(open(f"{sys.argv[1]}/run_{b}/summary.json"))
    lt = s["last_train"] or {}
    print(f"{b:10s} steps {s['steps_done']}/{s['steps_planned']} tokens {s['tokens_seen']:,} wall {s['wall_s_this_run']}s "
          f"tok/s {s['tokens_per_s_this_run']} ce {lt.get('ce', float('nan')):.3f} "
          f"load_entropy {lt.get('load_entropy', float('nan')):.3f} bal_mb {lt.get('bal_microbatch', float('nan')):.3f} "
          f"bal_g {lt.get('bal_global', float('nan')):.3f} val {json.dumps({k: round(v, 3) for k, v in (s['val_ce'] or {}).items()})} "
          f"time_stop {s['stopped_by_time']}")
EOF
echo "total $(( $(date +%s) - T0 ))s"
