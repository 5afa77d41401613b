#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: install into ./.venv, then align
# SmolLM2-135M-Instruct on refusals and fine-tune it on an SST-2 upload with 10% harmful rows, under SFT
# (the attack) and Lisa.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1
export BULWARK_DATA_DIR="${BULWARK_DATA_DIR:-$(cd .. && pwd)/shared/data}"
source scripts/venv.sh
bulwark demo "$@"
