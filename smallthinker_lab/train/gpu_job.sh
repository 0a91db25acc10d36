#!/usr/bin/env bash
# The GPU training run of the shipped model (smallthinker-tiny-wide, DP-group balance loss over the whole batch of
# 64 sequences) on one GPU, for the device tool:
#
#   run(command="bash smallthinker_lab/train/gpu_job.sh", carry=["data/corpus/tokens"], timeout_s=600)
#
# 1. a 40-step probe measures the throughput (tokens/s over steps 21-40, past start-up); with COMPILE=auto (the
#    default) a second probe measures it under torch.compile, and the faster of the two trains;
# 2. steps = min(MAX_PASSES x the training tokens, BUDGET_S x measured tokens/s) / (BATCH x SEQ);
# 3. the run trains (steps planned from BUDGET_S of steady steps; MAX_TIME_S is only a guard, which start-up,
#    compiling and the validations every ~10% (EVAL_WINDOWS windows per domain) must fit under), exports bf16;
# 4. logs, plan and model (no checkpoint) are packed into $OUT/pack.tgz.part-NN (under the 16 MiB/file limit) with
#    its sha256; unpack with:  cat pack.tgz.part-* > pack.tgz && sha256sum -c pack.sha256 && tar xzf pack.tgz
# Environment overrides: CONFIG BATCH SEQ LR GROUP COEF SEED MAX_PASSES BUDGET_S MAX_TIME_S COMPILE (auto, 1, 0)
# EVAL_WINDOWS PEAK_TFLOPS; for a dry run on a CPU: DEVICE=cpu PY=.venv/bin/python MIN_STEPS=5 BATCH=4 SEQ=64 GROUP=4.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_job_out}
mkdir -p "$OUT"
CONFIG=${CONFIG:-smallthinker-tiny-wide} BATCH=${BATCH:-64} SEQ=${SEQ:-512} LR=${LR:-1e-3} SEED=${SEED:-0}
COEF=${COEF:-0.01} GROUP=${GROUP:-$BATCH} MAX_PASSES=${MAX_PASSES:-4}
BUDGET_S=${BUDGET_S:-270} MAX_TIME_S=${MAX_TIME_S:-420} COMPILE=${COMPILE:-auto} EVAL_WINDOWS=${EVAL_WINDOWS:-256}
PEAK_TFLOPS=${PEAK_TFLOPS:-}
DEVICE=${DEVICE:-cuda} PY=${PY:-python3} MIN_STEPS=${MIN_STEPS:-50}
DATA=${DATA:-data/corpus/tokens} TOKENIZER=data/models/smallthinker-tiny WORK=${WORK:-/tmp/gpu_job}
rm -rf "$WORK" && mkdir -p "$WORK"
T0=$(date +%s)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
  | tee "$WORK/nvidia_smi.txt"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available()
          else 'no CUDA')" | tee -a "$WORK/nvidia_smi.txt"

EXTRA=()
[ -n "$PEAK_TFLOPS" ] && EXTRA+=(--peak-tflops "$PEAK_TFLOPS")
COMMON=(--config "$CONFIG" --data "$DATA" --batch-size "$BATCH" --seq-len "$SEQ" --device "$DEVICE" --seed "$SEED"
        --lr "$LR" --balance-coef "$COEF" --balance-group "$GROUP" "${EXTRA[@]}")
train() { "$PY" -m smallthinker_lab.train.cli train "${COMMON[@]}" "$@"; }
probe() {  # probe NAME [train flags]: 40 steps; tokens/s of steps 21-40 in $WORK/NAME/train_log.jsonl
  local name=$1; shift
  train --out "$WORK/$name" --steps 40 --warmup 1000 --log-every 20 --eval-windows 1 --no-export --no-progress \
        --no-resume "$@" > "$WORK/$name.log" 2>&1 \
    || { echo "probe $name failed"; tail -n 30 "$WORK/$name.log"; exit 1; }
}

# 1. probe(s)
case "$COMPILE" in
  1) probe probe --compile ;;
  auto) probe probe_eager; probe probe_compiled --compile ;;
  *) probe probe ;;
esac
PLAN=$("$PY" - "$WORK" "$BATCH" "$SEQ" "$MAX_PASSES" "$BUDGET_S" "$DATA" "$SEED" <<'EOF'
import json, os, sys
from smallthinker_lab.train import WindowSampler, read_log
work, B, T, passes, budget, data, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), \
    float(sys.argv[5]), sys.argv[6], int(sys.argv[7])
probes = {n: read_log(f"{work}/{n}/train_log.jsonl")[-1]["tokens_per_s"]  # steps 21-40
          for n in ("probe", "probe_eager", "probe_compiled") if os.path.exists(f"{work}/{n}/train_log.jsonl")}
compiled = {n: json.load(open(f"{work}/{n}/summary.json"))["compiled"] for n in probes}
best = max(probes, key=probes.get)
tps = probes[best]
unique = sum(len(a) for a in WindowSampler(data, T, B, seed).arrays)
steps = int(min(passes * unique, budget * tps) // (B * T))
plan = {"probe_tokens_per_s": tps, "probes_tokens_per_s": probes, "probes_compiled": compiled,
        "compile": compiled[best], "unique_train_tokens": unique, "max_passes": passes, "budget_s": budget,
        "steps": steps, "tokens": steps * B * T, "passes": steps * B * T / unique}
json.dump(plan, open(f"{work}/plan.json", "w"), indent=2)
print(f"probes {probes} tokens/s (compiled: {compiled}); {unique:,} unique training tokens; {steps} steps = "
      f"{plan['passes']:.2f} passes", file=sys.stderr)
print(steps, int(compiled[best]))
EOF
)
read -r STEPS USE_COMPILE <<< "$PLAN"
[ -n "$STEPS" ] && [ "$STEPS" -ge "$MIN_STEPS" ] || { echo "planning failed (plan '$PLAN')"; exit 1; }
[ "$USE_COMPILE" = 1 ] && COMMON+=(--compile)
WARMUP=$(( STEPS / 15 < 200 ? STEPS / 15 : 200 ))
EVAL_EVERY=$(( STEPS / 10 ))
echo "plan: steps $STEPS warmup $WARMUP eval every $EVAL_EVERY, batch $BATCH x $SEQ, lr $LR, compile $USE_COMPILE" \
     "(t=$(( $(date +%s) - T0 ))s)"

# 2. the run
train --out "$WORK/run" --steps "$STEPS" --warmup "$WARMUP" --eval-every "$EVAL_EVERY" --eval-windows "$EVAL_WINDOWS" \
      --log-every 25 --max-time "$MAX_TIME_S" --tokenizer "$TOKENIZER" --no-resume > "$WORK/run.log" 2>&1
echo "run exit $? (t=$(( $(date +%s) - T0 ))s)"; tail -n 5 "$WORK/run.log"

# 3. pack what comes back (no checkpoint)
PACK=$WORK/pack
mkdir -p "$PACK/training" "$PACK/model"
cp "$WORK/run"/{eval_log.jsonl,summary.json,args.json} "$WORK/plan.json" "$WORK/nvidia_smi.txt" "$PACK/training/"
gzip -c "$WORK/run/train_log.jsonl" > "$PACK/training/train_log.jsonl.gz"
cp "$WORK/run.log" "$WORK"/probe*.log "$PACK/training/"
for p in "$WORK"/probe*/; do n=$(basename "$p"); cp "$p/train_log.jsonl" "$PACK/training/${n}_train_log.jsonl"; done
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
