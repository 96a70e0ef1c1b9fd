#!/usr/bin/env bash
# The GPU check of swudi_jax, one prepared run of at most 6 minutes (see benchmarks/README.md).
#
#   bash benchmarks/gpu_check.sh                 # on a machine whose python3 has jax[cuda], flax,
#                                                # optax, orbax-checkpoint, safetensors and torch
#   bash benchmarks/gpu_check.sh --quick --cpu   # the CPU fallback, seconds (the smoke test)
#
# Installs nothing. Runs from the repository root with PYTHONPATH=. ; writes gpu_check.json,
# gpu_check.md (the table) and gpu_check.log into $OUT when set, else benchmarks/results/.
# Extra arguments go to `python3 -m benchmarks.gpu_check` (e.g. --sections vit,llm --budget 200).
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
{
  echo "gpu_check: $(date -u +%FT%TZ) on $(hostname)"
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # 345 s for the Python driver (its own budget is 330 s), inside the 6-minute limit
  timeout -k 10 345 "$PY" -m benchmarks.gpu_check --out-dir "$DEST" "$@"
  echo "gpu_check: exit status $?"
} 2>&1 | tee "$DEST/gpu_check.log"
