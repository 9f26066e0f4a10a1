#!/usr/bin/env bash
# GPU check, one prepared script for a CUDA machine with PyTorch but no network (e.g. the lent H100).
# Here, first: `make gpu-wheels gpu-stage` (the wheels the GPU image lacks, and the working tree under
# the 64 MiB transfer limit); run this with carry [".whl"]; afterwards `make gpu-unstage`.
#   1. install the project's other wheels carried in .whl/
#   2. the conformance suite for the GPU backends (torch on cuda:0 in fp16; others skip with reasons)
#   3. the pipeline throughput benchmark (bench/gpu_pipeline.py), results in $OUT (or ./gpu-out)
# Target (issue 8): >= 12,000 img/s for EfficientNet-Lite0 through the pipeline on an H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -rs tests/test_backends.py 2>&1 | tee "$OUT/conformance.txt" || true
PYTHONUNBUFFERED=1 timeout 150 python3 bench/gpu_pipeline.py --out "$OUT/gpu-results.json" 2>&1 | tee "$OUT/bench.txt"
