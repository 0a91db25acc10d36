#!/usr/bin/env bash
# One device call of GPU checks and benchmark rows, results packed for the device tool's 8-file limit:
#
#   run(command="STEPS=tests,routing,quant bash benchmarks/gpu_job.sh", timeout_s=600)
#
# STEPS (comma-separated, in this order):
#   tests    the kernel tests compiled on CUDA (tests/test_kernels.py, test_replay.py run on the GPU when one is
#            there) and every test marked gpu (notebooks and GGUF need packages the GPU image lacks: skipped);
#   routing  the 4B shape on the trained model's routing (gsm8k, zh-news) replayed: eager and Triton-kernel rows,
#            with the uniform-routing rows of the same run (benchmarks/results/bench_gpu_routing.*);
#   quant    bench_quant_kernels.py --tune: bf16 / int8 / Q4_0 expert products, tiles swept first;
#   peer     llama.cpp's CUDA build beside the engine (benchmarks/gpu_peer_job.sh; carry its source archive,
#            .peer/llama.cpp-0.3.36-cuda-src.tar.xz; about 8 minutes: give it a call of its own).
# Everything lands in $OUT/results.tgz (+ its sha256); unpack with tar xzf.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/gpu_job_out} STEPS=${STEPS:-tests,routing,quant} PY=${PY:-python3}
RES=/tmp/gpu_job_results
rm -rf "$RES" && mkdir -p "$RES" "$OUT"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$RES/job_log.txt"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2;
  df -h /tmp | tail -1; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$RES/machine.txt" 2>&1
has() { [[ ",$STEPS," == *",$1,"* ]]; }

if has tests; then
  stamp "tests"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_replay.py > "$RES/pytest_kernels.txt" 2>&1
  stamp "kernel tests rc=$?: $(tail -1 "$RES/pytest_kernels.txt")"
  "$PY" -m pytest -q -p no:cacheprovider -m gpu --ignore tests/test_notebooks.py --ignore tests/test_gguf.py \
    > "$RES/pytest_gpu.txt" 2>&1
  stamp "gpu tests rc=$?: $(tail -1 "$RES/pytest_gpu.txt")"
fi
if has routing; then
  stamp "routing rows"
  "$PY" -m benchmarks.run --suite gpu --out "$RES/routing" --routing gsm8k,zh-news --no-q4 --no-readme \
    --budget-s "${ROUTING_BUDGET_S:-240}" --scratch /tmp/st_routing --keep --only "${ROUTING_ONLY:-routing=,in memory}" \
    > "$RES/routing_log.txt" 2>&1
  stamp "routing rc=$?"
fi
if has quant; then
  stamp "quant kernels --tune"
  "$PY" benchmarks/bench_quant_kernels.py --out "$RES/quant" --tune --steps 30 --repeats 5 > "$RES/quant_log.txt" 2>&1
  stamp "quant rc=$?"
fi
if has peer; then
  stamp "llama.cpp peer"
  OUT="$RES/peer" bash benchmarks/gpu_peer_job.sh > "$RES/peer_log.txt" 2>&1
  stamp "peer rc=$?"
fi
stamp "done"
tar czf "$OUT/results.tgz" -C "$RES" . && (cd "$OUT" && sha256sum results.tgz > results.sha256)
