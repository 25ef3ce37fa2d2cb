#!/usr/bin/env bash
# The GPU checks that fit a short lease, for a card whose Fashion-MNIST table is already committed:
#   1. the CPU/GPU agreement and GPU checkpoint tests (verification/test_cuda.py);
#   2. run_fashion.py --decide on the committed runs of this card (benchmarks/results/fashion_<card>_runs.jsonl.gz):
#      the longer Adam/SGD runs that settle the verdicts the protocol left undetermined, 2 at a time, each
#      ending once it has reached both targets. Finished runs are appended to OUT/decide_runs.jsonl (merge them
#      into the committed log); unfinished ones leave their checkpoint in OUT/ckpt.
# Usage: benchmarks/gpu_decide.sh OUT [SECONDS] [CARD]   (SECONDS: the whole budget, default 540; CARD: h100)
# The Fashion-MNIST IDX files must be where snopt.data looks (e.g. SNOPT_DATA_DIR=DIR with DIR/FashionMNIST/raw).
set -u
out=${1:?usage: benchmarks/gpu_decide.sh OUT [SECONDS] [CARD]}
budget=${2:-540}
card=${3:-h100}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" SNOPT_HYPOTHESIS_PROFILE=fast
command -v nvidia-smi >/dev/null && nvidia-smi -L
$py -c "import torch, torchdiffeq; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
$py -m pytest -q -p no:cacheprovider -rs verification/test_cuda.py 2>&1 | tee "$out/cuda_tests.log"
left=$((budget - SECONDS - 15))
echo "== --decide on ${card}: ${left} s left"
timeout -k 10 "$left" $py benchmarks/run_fashion.py --from-log "benchmarks/results/fashion_${card}_runs.jsonl.gz" \
  --device cuda --decide --jobs 2 --log "$out/decide_runs.jsonl" --checkpoint-dir "$out/ckpt" --out "${TMPDIR:-/tmp}" \
  > "$out/decide.log" 2>&1
echo "run_fashion exit $? after ${SECONDS} s"
grep -E "^  |--decide" "$out/decide.log" | head -20
