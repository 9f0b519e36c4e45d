#!/usr/bin/env bash
# The GPU figures in one run, for a machine with a GPU (see benchmarks/gpu_check.py):
# student training speed fp32 / bf16 / bf16 + compile (images/s, MFU, peak memory), the replay
# cache's ViT-B/16 teacher pass (views/s), and 4 small trials packed on one GPU against 1.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --steps 2 --batch 4 --image-size 32 --no-compile   # a CPU smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
"$python" -c "import torch; print('GPUs:', torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
exec "$python" benchmarks/gpu_check.py "$@"
