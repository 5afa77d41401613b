# Sourced by scripts/quickstart.sh and .ci/run: create ./.venv once (never the system Python), activate it,
# install torch from the CPU wheel first (a looser spec pulls a multi-GB CUDA build), then Bulwark.
# Usage: source scripts/venv.sh [EXTRAS]   e.g. `source scripts/venv.sh test`
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".${1:+[$1]}"
