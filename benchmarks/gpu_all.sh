#!/usr/bin/env bash
# Every GPU check and benchmark in one go, for a lent GPU machine with a time limit:
#   1. the CPU/GPU agreement tests (verification/test_cuda.py) and the data loaders' tests;
#   2. benchmarks/gpu_bench.py (adjoint speed, hvp cost, flat CUDA memory, per-iteration cost);
#   3. the full Fashion-MNIST benchmark on the card (run_fashion.py --device cuda), each finished
#      run appended to OUT/fashion_runs.jsonl, so a benchmark cut short by the time limit keeps its
#      finished runs and `run_fashion.py --from-log` writes the table from them. Unfinished runs
#      checkpoint to OUT/checkpoints at every evaluation.
# Usage: benchmarks/gpu_all.sh OUT [SECONDS]   (SECONDS: the whole budget, default 3600)
# To go on in a later lease, pass the earlier OUT (or a copy of its fashion_runs.jsonl and checkpoints/)
# as RESUME=DIR: the logged runs are read back and the interrupted ones continue from their checkpoints.
# Dry run on a CPU: DEVICE=cpu SNOPT_BENCH_DEVICE=cpu SNOPT_BENCH_SMALL=1 FASHION_ARGS="--iterations 3 --seeds 0"
set -u
out=${1:?usage: benchmarks/gpu_all.sh OUT [SECONDS]}
budget=${2:-3600}
py=${PYTHON:-python3}
mkdir -p "$out"
if [ -n "${RESUME:-}" ]; then
  cp "$RESUME/fashion_runs.jsonl" "$out/" 2>/dev/null
  [ -d "$RESUME/checkpoints" ] && cp -r "$RESUME/checkpoints" "$out/"
  echo "resuming from $RESUME: $(wc -l < "$out/fashion_runs.jsonl" 2>/dev/null || echo 0) logged runs," \
    "$(ls "$out/checkpoints" 2>/dev/null | wc -l) checkpoints"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" SNOPT_HYPOTHESIS_PROFILE=fast
command -v nvidia-smi >/dev/null && nvidia-smi -L
$py -c "import torch, torchdiffeq; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
$py -m pytest -q -p no:cacheprovider -rs verification/test_cuda.py tests/test_data.py 2>&1 | tee "$out/cuda_tests.log"
timeout 150 $py benchmarks/gpu_bench.py "$out/gpu_bench.md" >/dev/null 2>"$out/gpu_bench.err" \
  && cat "$out/gpu_bench.md" && rm -f "$out/gpu_bench.err"
left=$((budget - SECONDS - 15))
echo "== Fashion-MNIST on ${DEVICE:-cuda}: ${left} s left"
# shellcheck disable=SC2086
timeout -k 10 "$left" $py benchmarks/run_fashion.py --device "${DEVICE:-cuda}" --jobs 4 --extra adam=0.003 \
  --log "$out/fashion_runs.jsonl" --checkpoint-dir "$out/checkpoints" --out "$out" ${FASHION_ARGS:-} \
  > "$out/fashion.log" 2>&1
echo "run_fashion exit $? after ${SECONDS} s"
tail -n 40 "$out/fashion.log"
