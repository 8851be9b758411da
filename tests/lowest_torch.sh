#!/usr/bin/env bash
# The trainer, checkpoint and model tests a second time, on the lowest torch the package supports (the GPU
# machines' torch 2.11). CI runs it after the main suite (the README's test command), so an API that one of the two
# versions lacks fails CI the day it is used. The environment is a venv layered on the main one
# (--system-site-packages: every other dependency and the editable stagerun come from there) holding only the older
# torch and the packages pinned to it; the first run downloads it (~2 GB, about a minute), later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_FLOOR=2.11.0  # tests/test_code_quality.py checks it is the floor of the torch range in pyproject.toml
VENV=${STAGERUN_TORCH_FLOOR_VENV:-.venv-torch-floor}
if [ ! -x "$VENV/bin/python" ]; then
  python -m venv --system-site-packages "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_FLOOR')" 2>/dev/null; then
  "$VENV/bin/pip" install -q "torch==$TORCH_FLOOR"
fi
# The tests that exercise torch itself: model, losses, step, parallelism, checkpoints, the trainer end to end.
FILES=(
  tests/test_model.py
  tests/test_losses.py
  tests/test_step.py
  tests/test_layout.py
  tests/test_checkpoint.py
  tests/test_async_checkpoint.py
  tests/test_checkpoint_integrity.py
  tests/test_prefetch.py
  tests/test_tensor_parallel.py
  tests/test_gpu_paths.py
  tests/test_training.py
  tests/test_trainer_extensions.py
  tests/test_hf.py
  tests/test_context_parallel.py
  tests/test_optimizer.py
  tests/test_dpo.py
)
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "${FILES[@]}" "$@"
