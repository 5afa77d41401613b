#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: install, then align SmolLM2-135M-Instruct
# on refusals and fine-tune it on an SST-2 upload with 10% harmful rows, under SFT (the attack) and Lisa.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export BULWARK_DATA_DIR="${BULWARK_DATA_DIR:-$(cd .. && pwd)/shared/data}"
python3 -m pip install -q torch==2.13.0          # the CPU wheel; a looser spec pulls CUDA
python3 -m pip install -q -e .
bulwark demo "$@"
