#!/usr/bin/env bash
# The short check to run where a CUDA GPU is at hand: the GPU's name for the record, then the
# tests marked `cuda` (they compare CUDA results with CPU ones and check that maps, scores
# and metrics stay on the device). Run from a checkout whose environment has torch with CUDA:
#   bash tools/device_check.sh            # uses .venv/bin/python, else python3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
"$PY" -m pytest -q -p no:cacheprovider -m cuda tests
