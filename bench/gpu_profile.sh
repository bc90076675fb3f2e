#!/usr/bin/env bash
# On a GPU host: the worker's start-up phases (bench/startup_phases.py) and the encoder's
# variants and profile (bench/encoder_variants.py), with the full-size random-weight tokenizer.
# Needs python3 with torch (CUDA) and the pinned extraction packages, either installed or as
# wheels in WHEELS; CONFIG_DIR is the released config's folder.
# Usage: WHEELS=path/to/wheels CONFIG_DIR=path/to/config WORK=/scratch bash bench/gpu_profile.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=${WORK:-/tmp/gpu-profile}
CONFIG_DIR=${CONFIG_DIR:-.bench-config}
mkdir -p "$WORK"
source bench/wheels.sh
use_wheels "$WORK/site"
[[ -f $WORK/tok/config.json ]] ||
    PYTHONPATH=$PYTHONPATH:src python3 -m gpuspool.extract.tiny "$WORK/tok" --full "$CONFIG_DIR" >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
echo "\$ python3 bench/startup_phases.py --tokenizer TOK --runs ${RUNS:-2} --importtime"
python3 bench/startup_phases.py --tokenizer "$WORK/tok" --runs "${RUNS:-2}" --importtime
for b in ${BUDGETS:-320}; do
    echo "\$ python3 bench/encoder_variants.py --tokenizer TOK --budget $b --clips ${CLIPS:-600}"
    python3 bench/encoder_variants.py --tokenizer "$WORK/tok" --budget "$b" --clips "${CLIPS:-600}" 2>&1 |
        grep -v -e flash-attn -e '^\*' -e '^ *$'
done
