#!/usr/bin/env bash
# The GPU check in one call (benchmarks/GPU.md): run from the repository root on a GPU machine.
#
#   OUT=/path/to/out bash benchmarks/gpu_run.sh        # reports land in $OUT (default ./gpu-out)
#
# 1. torch: the machine's own when it sees a CUDA device; otherwise the project's pins
#    (torch==2.14.1 torchvision==0.29.1) from the package index, where one is reachable.
# 2. sparsefw's pure-Python dependencies the machine lacks: from wheels in .whl/ when that folder
#    exists (a machine without an index), else from the index.
# 3. sparsefw itself, editable, offline (no build isolation, no index); if the machine's
#    setuptools cannot do an editable install, a copy into /tmp/sparsefw-site.
# 4. benchmarks/gpu_suite.py --out "$OUT" --budget-s "${BUDGET_S:-420}" $GPU_SUITE_ARGS; its exit
#    status is ours.
# Checking this script on a CPU: PYTHON=.venv/bin/python REQUIRE_CUDA=0 \
#    GPU_SUITE_ARGS="--device cpu --tiny" OUT=/tmp/gpu-out bash benchmarks/gpu_run.sh
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-run.log") 2>&1
tee_pid=$!
export PYTHONUNBUFFERED=1 SETUPTOOLS_USE_DISTUTILS=stdlib
echo "== $(date -u +%FT%TZ) $(uname -m) $("$PY" --version 2>&1) at $(command -v "$PY")"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"

if [ "${REQUIRE_CUDA:-1}" = 1 ] \
    && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
    echo "== torch with CUDA not found: installing the project's pins from the index"
    "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" \
        || { echo "gpu_run: no CUDA-enabled torch and none installable here"; exit 2; }
fi
"$PY" -c "import torch, torchvision; print('== torch', torch.__version__, 'CUDA', torch.version.cuda,
      '| torchvision', torchvision.__version__, '|',
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"

if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing carried wheels: $(ls .whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/sparsefw-site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/sparsefw-site${PYTHONPATH:+:$PYTHONPATH}"
fi
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"pluggy": "pluggy", "attrs": "attrs", "cattrs": "cattrs", "tensorboard": "tensorboard",
        "tqdm": "tqdm", "matplotlib": "matplotlib", "pytest": "pytest",
        "hypothesis": "hypothesis", "PIL": "pillow", "numpy": "numpy"}
print(" ".join(dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
    echo "== missing: $missing; installing from the index"
    "$PY" -m pip install -q $missing || { echo "gpu_run: cannot install $missing"; exit 2; }
fi
if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
    echo "== editable install failed; installing a copy into /tmp/sparsefw-site instead"
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --upgrade \
        --target /tmp/sparsefw-site . \
        || { echo "gpu_run: installing sparsefw (offline) failed"; exit 2; }
    export PYTHONPATH="/tmp/sparsefw-site${PYTHONPATH:+:$PYTHONPATH}"
fi

# shellcheck disable=SC2086  # GPU_SUITE_ARGS is a list of words
"$PY" benchmarks/gpu_suite.py --out "$OUT" --budget-s "${BUDGET_S:-420}" ${GPU_SUITE_ARGS:-}
status=$?
echo "== gpu_suite exit status $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exec >&- 2>&-  # let tee write the end of the log before we return
wait "$tee_pid" 2>/dev/null
exit $status
