# Sourced by demo.sh and test.sh after venv.sh: install PyTorch when the environment has none.
# PyPI's Linux x86_64 wheel of torch is a CUDA build (about 5 GB with its NVIDIA libraries); on a machine
# without an NVIDIA GPU, PyTorch's own CPU build does the same work from a tenth of that. So with no torch
# yet, no `nvidia-smi`, and download.pytorch.org answering within 5 seconds, the CPU build comes from there;
# otherwise pip's own sources decide (a GPU machine, a mirror, or a local wheel of the CPU build).
if ! python3 -c "import torch" 2>/dev/null; then
  if ! command -v nvidia-smi >/dev/null 2>&1 &&
    python3 -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=5)" \
      >/dev/null 2>&1; then
    echo "gradproj: no NVIDIA GPU here: installing PyTorch's CPU build from download.pytorch.org/whl/cpu" >&2
    python3 -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  else
    python3 -m pip install -q torch==2.13.0
  fi
fi
