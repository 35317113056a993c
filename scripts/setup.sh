#!/usr/bin/env bash
# Create .venv with a pinned torch: the CPU wheel on this kind of machine (found through
# PIP_FIND_LINKS), the normal CUDA build when `nvidia-smi -L` lists a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q uv >/dev/null 2>&1 || true
links=()
[ -n "${PIP_FIND_LINKS:-}" ] && links=(--find-links "$PIP_FIND_LINKS")
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_spec="torch==${TORCH_VERSION}"          # CUDA build from the index
else
  torch_spec="torch==${TORCH_VERSION}"
  # Prefer the CPU wheel on disk; otherwise the CPU index avoids a 6 GB CUDA download.
  if [ -z "${PIP_FIND_LINKS:-}" ]; then links+=(--extra-index-url https://download.pytorch.org/whl/cpu); fi
fi
if .venv/bin/python -m uv --version >/dev/null 2>&1; then
  .venv/bin/python -m uv pip install -q --python .venv/bin/python "${links[@]}" "$torch_spec" -e ".[test]" "webdataset==1.0.2"
else
  .venv/bin/python -m pip install -q "${links[@]}" "$torch_spec" -e ".[test]" "webdataset==1.0.2"
fi
.venv/bin/python -c "import torch, wsra_dist; print('torch', torch.__version__, '| wsra_dist ready')"
