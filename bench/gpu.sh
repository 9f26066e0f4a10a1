#!/usr/bin/env bash
# GPU check, one prepared script for a CUDA machine with PyTorch but no network (e.g. the lent H100).
# Here, first: `make gpu-wheels gpu-broker gpu-stage` (the wheels the GPU image lacks, Mosquitto with
# its libraries, and the working tree under the 64 MiB transfer limit); run this with carry
# [".whl", ".gpu-broker"] and timeout_s 540; afterwards `make gpu-unstage`.
#   1. install the project's other wheels carried in .whl/
#   2. the conformance suite for the GPU backends (torch on cuda:0 in fp16; others skip with reasons)
#   3. the pipeline throughput benchmark (bench/gpu_pipeline.py), results in $OUT (or ./gpu-out)
#   4. with the carried Mosquitto: `edge-agent bench` for torch on the GPU in fp16 (raw, pipeline,
#      end to end over MQTT, naive): what one agent process serves over MQTT, beside the raw limit
# Target (issue 8): >= 12,000 img/s for EfficientNet-Lite0 through the pipeline on an H100/H200.
# Rehearsal on a CPU machine: GPU_DEVICE=cpu GPU_QUICK=1 with a stub nvidia-smi on PATH.
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
PYTHONUNBUFFERED=1 timeout 150 python3 bench/gpu_pipeline.py --device "${GPU_DEVICE:-cuda:0}" \
  ${GPU_QUICK:+--quick --seconds 0.5} --out "$OUT/gpu-results.json" 2>&1 \
  | tee "$OUT/bench.txt" || true
if [ -x .gpu-broker/mosquitto ]; then
  PATH="$PWD/.gpu-broker:$PATH" PYTHONUNBUFFERED=1 timeout 200 python3 -m agent bench --backends torch \
    --device "${GPU_DEVICE:-cuda:0}" --precision fp16 --instances 1,4 --batch 1,32 --seconds 2 --no-plot \
    --out "$OUT" 2>&1 | tee "$OUT/e2e.txt" || true
fi
