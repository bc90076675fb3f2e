#!/usr/bin/env bash
# On a GPU host: bench/official_side_by_side.py with the pinned packages installed from wheels.
# WHEELS: folder of the pinned wheels (qwen-tts 0.1.1, transformers 4.57.3, ...), installed
# offline into $WORK/site, byte-compiled and put first on PYTHONPATH (torch comes from the host);
# OFFICIAL: finetuning/prepare_data.py of QwenLM/Qwen3-TTS, as published; CONFIG_DIR: the
# released tokenizer config. Extra arguments go to the Python script.
# Usage: WHEELS=w OFFICIAL=prepare_data.py CONFIG_DIR=c WORK=/scratch bash bench/gpu_side_by_side.sh \
#            --hours 8 2 --json OUT.json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=${WORK:-/tmp/side-by-side}
mkdir -p "$WORK"
source bench/wheels.sh
use_wheels "$WORK/site"
exec python3 bench/official_side_by_side.py --official-script "$OFFICIAL" \
    --config-dir "${CONFIG_DIR:-.bench-config}" --work "$WORK" "$@"
