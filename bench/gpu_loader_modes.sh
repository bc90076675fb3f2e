#!/usr/bin/env bash
# Compare the worker's two loader modes (decode in processes vs threads) on a GPU host, same
# 3-hour synthetic set, same budget; the outputs must be byte-identical.
# Usage: CONFIG_DIR=path/to/qwen3-tts-tokenizer-12hz WORK=/scratch bash bench/gpu_loader_modes.sh
set -euo pipefail
WORK=${WORK:-$(mktemp -d)}
CONFIG_DIR=${CONFIG_DIR:-.bench-config}
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
python3 -m gpuspool.extract.tiny "$WORK/tok" --full "$CONFIG_DIR" > /dev/null 2>&1
python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); \
from extract_bench import _dataset; print(_dataset(Path('$WORK'), 3.0, 16)[1])"
for mode in process thread process thread; do
    echo "\$ python3 -m gpuspool.extract --input DATA --output OUT_$mode --tokenizer TOK --device cuda:0 --batch-seconds 320 --loader-mode $mode --overwrite --no-resume"
    python3 -m gpuspool.extract --input "$WORK/data/input.jsonl" --output "$WORK/o_$mode.jsonl" \
        --tokenizer "$WORK/tok" --device cuda:0 --batch-seconds 320 --loader-mode "$mode" \
        --overwrite --no-resume 2>/dev/null | tail -1
done
cmp "$WORK/o_process.jsonl" "$WORK/o_thread.jsonl" && echo "outputs of both modes byte-identical"
