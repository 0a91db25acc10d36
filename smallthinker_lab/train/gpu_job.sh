#!/usr/bin/env bash
# The GPU training run of the shipped model (smallthinker-tiny-wide, DP-group balance loss over the whole batch of
# 64 sequences) on one GPU, for the device tool:
#
#   run(command="bash smallthinker_lab/train/gpu_job.sh", carry=["data/corpus/tokens"], timeout_s=600)
#
# 1. a 40-step probe measures the throughput (tokens/s over steps 21-40, past start-up);
# 2. steps = min(MAX_PASSES x the training tokens, BUDGET_S x measured tokens/s) / (BATCH x SEQ);
# 3. the run trains (max-time guard MAX_TIME_S), validates every ~10%, exports the bf16 model;
# 4. logs, plan and model (no checkpoint) are packed into $OUT/pack.tgz.part-NN (under the 16 MiB/file limit) with
#    its sha256; unpack with:  cat pack.tgz.part-* > pack.tgz && sha256sum -c pack.sha256 && tar xzf pack.tgz
# Environment overrides: CONFIG BATCH SEQ LR GROUP COEF SEED MAX_PASSES BUDGET_S MAX_TIME_S COMPILE (1: --compile)
# PEAK_TFLOPS; for a dry run on a CPU: DEVICE=cpu PY=.venv/bin/python MIN_STEPS=5 BATCH=4 SEQ=64 GROUP=4.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_job_out}
mkdir -p "$OUT"
CONFIG=${CONFIG:-smallthinker-tiny-wide} BATCH=${BATCH:-64} SEQ=${SEQ:-512} LR=${LR:-1e-3} SEED=${SEED:-0}
COEF=${COEF:-0.01} GROUP=${GROUP:-$BATCH} MAX_PASSES=${MAX_PASSES:-4}
BUDGET_S=${BUDGET_S:-300} MAX_TIME_S=${MAX_TIME_S:-340} COMPILE=${COMPILE:-0} PEAK_TFLOPS=${PEAK_TFLOPS:-}
DEVICE=${DEVICE:-cuda} PY=${PY:-python3} MIN_STEPS=${MIN_STEPS:-50}
DATA=${DATA:-data/corpus/tokens} TOKENIZER=data/models/smallthinker-tiny WORK=${WORK:-/tmp/gpu_job}
rm -rf "$WORK" && mkdir -p "$WORK"
T0=$(date +%s)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
  | tee "$WORK/nvidia_smi.txt"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available()
          else 'no CUDA')" | tee -a "$WORK/nvidia_smi.txt"

EXTRA=()
[ "$COMPILE" = 1 ] && EXTRA+=(--compile)
[ -n "$PEAK_TFLOPS" ] && EXTRA+=(--peak-tflops "$PEAK_TFLOPS")
COMMON=(--config "$CONFIG" --data "$DATA" --batch-size "$BATCH" --seq-len "$SEQ" --device "$DEVICE" --seed "$SEED"
        --lr "$LR" --balance-coef "$COEF" --balance-group "$GROUP" "${EXTRA[@]}")
train() { "$PY" -m smallthinker_lab.train.cli train "${COMMON[@]}" "$@"; }

# 1. probe
train --out "$WORK/probe" --steps 40 --warmup 1000 --log-every 20 --eval-windows 1 --no-export --no-progress \
      --no-resume > "$WORK/probe.log" 2>&1 || { echo "probe failed"; tail -n 30 "$WORK/probe.log"; exit 1; }
STEPS=$("$PY" - "$WORK" "$BATCH" "$SEQ" "$MAX_PASSES" "$BUDGET_S" "$DATA" "$SEED" <<'EOF'
import json, sys
from smallthinker_lab.train import WindowSampler, read_log
work, B, T, passes, budget, data, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), \
    float(sys.argv[5]), sys.argv[6], int(sys.argv[7])
tps = read_log(f"{work}/probe/train_log.jsonl")[-1]["tokens_per_s"]  # steps 21-40
unique = sum(len(a) for a in WindowSampler(data, T, B, seed).arrays)
steps = int(min(passes * unique, budget * tps) // (B * T))
plan = {"probe_tokens_per_s": tps, "unique_train_tokens": unique, "max_passes": passes, "budget_s": budget,
        "steps": steps, "tokens": steps * B * T, "passes": steps * B * T / unique}
json.dump(plan, open(f"{work}/plan.json", "w"), indent=2)
print(f"probe {tps:,.0f} tokens/s; {unique:,} unique training tokens; {steps} steps = {plan['passes']:.2f} passes",
      file=sys.stderr)
print(steps)
EOF
)
[ -n "$STEPS" ] && [ "$STEPS" -ge "$MIN_STEPS" ] || { echo "planning failed (STEPS='$STEPS')"; exit 1; }
WARMUP=$(( STEPS / 15 < 200 ? STEPS / 15 : 200 ))
EVAL_EVERY=$(( STEPS / 10 ))
echo "plan: steps $STEPS warmup $WARMUP eval every $EVAL_EVERY, batch $BATCH x $SEQ, lr $LR (t=$(( $(date +%s) - T0 ))s)"

# 2. the run
train --out "$WORK/run" --steps "$STEPS" --warmup "$WARMUP" --eval-every "$EVAL_EVERY" --eval-windows 100000 \
      --log-every 25 --max-time "$MAX_TIME_S" --tokenizer "$TOKENIZER" --no-resume > "$WORK/run.log" 2>&1
echo "run exit $? (t=$(( $(date +%s) - T0 ))s)"; tail -n 5 "$WORK/run.log"

# 3. pack what comes back (no checkpoint)
PACK=$WORK/pack
mkdir -p "$PACK/training" "$PACK/model"
cp "$WORK/run"/{eval_log.jsonl,summary.json,args.json} "$WORK/plan.json" "$WORK/nvidia_smi.txt" "$PACK/training/"
gzip -c "$WORK/run/train_log.jsonl" > "$PACK/training/train_log.jsonl.gz"
cp "$WORK/run.log" "$WORK/probe.log" "$PACK/training/"
cp "$WORK/probe/train_log.jsonl" "$PACK/training/probe_train_log.jsonl"
cp "$WORK/run"/model/{config.json,model.safetensors} "$PACK/model/" 2>/dev/null
tar czf "$WORK/pack.tgz" -C "$WORK" pack
(cd "$WORK" && sha256sum pack.tgz > "$OUT/pack.sha256")
split -b 15m -d "$WORK/pack.tgz" "$OUT/pack.tgz.part-"
ls -la "$OUT"
"$PY" - "$WORK/run/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
lt = s["last_train"] or {}
mfu = s["mfu_this_run"]
print(f"steps {s['steps_done']}/{s['steps_planned']} tokens {s['tokens_seen']:,} wall {s['wall_s_this_run']}s "
      f"tok/s {s['tokens_per_s_this_run']} MFU {mfu if mfu is None else f'{mfu:.2%}'} (peak {s['peak_tflops']} "
      f"TFLOP/s, {s['peak_source']}) compiled {s['compiled']} ce {lt.get('ce', float('nan')):.3f} "
      f"val {json.dumps({k: round(v, 3) for k, v in (s['val_ce'] or {}).items()})} time_stop {s['stopped_by_time']}")
EOF
echo "total $(( $(date +%s) - T0 ))s"
