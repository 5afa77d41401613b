#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU and no network, run Bulwark's GPU tests, then print
# the GPU figures (bench/gpu_figures.py). Under 8 minutes on one H200 by construction: the tests get at
# most TESTS_TIMEOUT_S (230; they took ~4 min there), the figures FIGURES_BUDGET_S (190; ~25 s a case,
# cases in order of importance, those not started in time are listed as skipped). All 13 figure cases
# need ~6 min: FIGURES_BUDGET_S=360 GPU_TESTS=tests/test_gpu.py when the figures are what is wanted.
#
#   bash scripts/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# Needs torch (CUDA), transformers, peft, accelerate, typer, rich, pyyaml and pytest on the machine.
# What is missing of DeepSpeed and its needs is installed from the wheels in WHEEL_DIR (default .whl/)
# into a scratch folder put first on PYTHONPATH; nothing is fetched. Make the wheels on a machine with
# network and the same Python minor version as the GPU machine (3.12 here), from the repository root:
#   pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl      # pure Python (py3-none-any)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl pydantic==2.13.4 pydantic-core==2.46.4 \
#       annotated-types==0.7.0 typing-inspection==0.4.2 hjson==3.1.0
# The data folder comes from BULWARK_DATA_DIR (default ../shared/data, then .gpudata/).
# Writes OUT_DIR/gpu_check.log (everything), OUT_DIR/pytest_gpu.log, OUT_DIR/figures.json and
# OUT_DIR/profiles.txt. Exit code: 0 when the tests passed and every figure case ran.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [WHEEL_DIR]}
WHEEL_DIR=${2:-.whl}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
T0=$SECONDS
stamp() { echo "== [$((SECONDS - T0)) s] $*"; }

stamp "machine"
command -v nvidia-smi >/dev/null || { echo "error: no NVIDIA GPU here (nvidia-smi not found): run $0 on the GPU machine"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || exit 2
python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

stamp "install what is missing"
if ! python3 -c "import deepspeed" 2>/dev/null; then
  ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1 || { echo "error: DeepSpeed is not installed and $WHEEL_DIR holds no wheels (see the header of $0)"; exit 2; }
  SITE=$(mktemp -d /tmp/bulwark-site.XXXX)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEEL_DIR"/*.whl || exit 2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bulwark and its CLI from this checkout, no install
if [ -z "${BULWARK_DATA_DIR:-}" ]; then
  for d in ../shared/data .gpudata; do [ -f "$d/sst2_train.jsonl" ] && export BULWARK_DATA_DIR=$(cd "$d" && pwd) && break; done
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset DS_ACCELERATOR
python3 -c "import deepspeed, transformers, peft; print('deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" || exit 2

stamp "pytest -m gpu"
# GPU_TESTS: the test files to run (all GPU test files by default); TESTS_TIMEOUT_S bounds them
timeout "${TESTS_TIMEOUT_S:-230}" python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --durations=0 \
  ${GPU_TESTS:-tests/test_gpu.py tests/test_gpu_recover.py tests/test_gpu_eval.py tests/test_multinode.py} 2>&1 | tee "$OUT_DIR/pytest_gpu.log"
TESTS=${PIPESTATUS[0]}

stamp "figures"
timeout $(( ${FIGURES_BUDGET_S:-190} + 30 )) python3 bench/gpu_figures.py --out "$OUT_DIR/figures" --budget-s "${FIGURES_BUDGET_S:-190}"
FIGURES=$?
cp "$OUT_DIR/figures/figures.json" "$OUT_DIR/figures/profiles.txt" "$OUT_DIR/" 2>/dev/null
rm -rf "$OUT_DIR/figures"
python3 - "$OUT_DIR/figures.json" <<'EOF'
import json, sys
cases = json.load(open(sys.argv[1]))["cases"]
failed = [c for c, row in cases.items() if "step_s" not in row]
print("figure cases failed:", ", ".join(failed) if failed else "none")
sys.exit(1 if failed else 0)
EOF
FIGURES_OK=$?
stamp "done: tests exit $TESTS, figures exit $FIGURES, all cases ok: $([ $FIGURES_OK = 0 ] && echo yes || echo no)"
[ "$TESTS" = 0 ] && [ "$FIGURES" = 0 ] && [ "$FIGURES_OK" = 0 ]
