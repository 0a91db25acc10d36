#!/usr/bin/env bash
# The lent GPU machine's job for llama.cpp's CUDA rows beside the engine (issue 19 item 4), one `run` call:
#   bash benchmarks/gpu_peer_job.sh        (carry .peer/llama.cpp-0.3.36-cuda-src.tar.xz)
# The GPU suite with --peer llama.cpp: the CUDA build (benchmarks/llamacpp_cuda.py; cached in .peer/ by the source's
# sha256, so a second call on a warm machine skips it) compiles in the background while the suite writes its
# checkpoint, bundle and GGUF; then the ceilings and the rows, llama.cpp's interleaved with the engine's.
# Results in $OUT: bench_gpu.json / .md, the build log. Settings (environment):
#   ONLY    the engine rows (benchmarks.run --only; default: the Triton-kernel rows in memory and at 60%, bf16 and Q4_0)
#   BUDGET  seconds for the suite (default 570; the build is stopped when less than 150 s of it are left)
#   EXTRA   more benchmarks.run arguments
set -u
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the lent machines' rule
T0=$(date +%s)
OUT=${OUT:-/tmp/peer_out}
mkdir -p "$OUT"
ARCHIVE=.peer/llama.cpp-0.3.36-cuda-src.tar.xz
ls -l "$ARCHIVE" || echo "no $ARCHIVE: the llama.cpp rows will record why"
python3 - <<'PY'
import importlib.util as u
need = ("torch", "numpy", "safetensors", "transformers", "tokenizers", "yaml", "gguf")
print("modules:", ", ".join(f"{m} {'ok' if u.find_spec(m) else 'MISSING'}" for m in need),
      "(gguf MISSING is fine: the archive's gguf-py is used)")
PY
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
ONLY=${ONLY:-"=4b-synthetic in_memory kernels=True,=4b-synthetic engine cuda_graph=kernels,=4b-synthetic engine 60% lru prefetch cuda_graph=kernels,=4b-synthetic in_memory q4_0 kernels=True,=4b-synthetic engine q4_0 cuda_graph=kernels,=4b-synthetic engine q4_0 60% lru prefetch cuda_graph=kernels"}
export TQDM_DISABLE=1
# shellcheck disable=SC2086
python3 -m benchmarks.run --suite gpu --peer llama.cpp --no-trained --routing '' --no-readme --keep --reuse \
    --scratch /tmp/st_peer --out "$OUT" --budget-s "${BUDGET:-570}" --only "$ONLY" ${EXTRA:-} > "$OUT/suite.log" 2>&1
rc=$?
grep -v "^|" "$OUT/suite.log" | tail -40
cp .peer/build-cuda-*.log "$OUT/" 2>/dev/null
[ -f "$OUT/bench_gpu.md" ] && sed -n '/# llama.cpp (CUDA)/,/^### Decode/p' "$OUT/bench_gpu.md"
echo "suite exit $rc, job wall $(( $(date +%s) - T0 )) s"
exit $rc
