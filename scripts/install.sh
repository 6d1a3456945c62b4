#!/usr/bin/env bash
# Set up .venv with hfserve and the PyTorch build that fits this machine.
#
#   scripts/install.sh            the server
#   scripts/install.sh test       and the test tools (extras, comma-separated: test,lint,bench)
#
# PyTorch: a machine with an NVIDIA driver (nvidia-smi works) gets the default build from PyPI, with
# CUDA; any other machine gets the CPU-only build from PyTorch's own index (about 200 MB instead of
# several GB of CUDA libraries). HFSERVE_TORCH=cpu or HFSERVE_TORCH=cuda overrides the choice.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: hfserve needs Python 3.11 or newer ($python is $("$python" -V 2>&1))" >&2
  exit 1
fi

torch_build="${HFSERVE_TORCH:-auto}"
if [ "$torch_build" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    torch_build=cuda
  else
    torch_build=cpu
  fi
fi

"$python" -m venv .venv
pip=(.venv/bin/python -m pip)
"${pip[@]}" install --quiet --upgrade pip

# constraints.txt pins the tested torch version; the index decides which build of it is installed.
args=(-c constraints.txt)
cpu_index="https://download.pytorch.org/whl/cpu"
if [ "$torch_build" = cpu ]; then
  # A short probe first: behind a proxy or mirror that cannot reach it, pip would spend minutes in
  # retries. Without it, torch comes from the configured index (a mirror may well carry the CPU build).
  if .venv/bin/python -c "import urllib.request as u; u.urlopen('$cpu_index/torch/', timeout=5)" 2>/dev/null
  then
    args+=(--extra-index-url "$cpu_index")
  else
    echo "note: $cpu_index is unreachable; torch comes from the configured package index" >&2
  fi
fi

spec="."
if [ -n "${1:-}" ]; then
  spec=".[$1]"
fi
"${pip[@]}" install --quiet "${args[@]}" -e "$spec"
.venv/bin/python -c "import torch; print('hfserve installed in .venv with torch', torch.__version__,
      '(CUDA build)' if torch.version.cuda else '(CPU build)')"
