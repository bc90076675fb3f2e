#!/usr/bin/env bash
# On a GPU host: import cost of the extraction stack (first import compiles bytecode, later
# ones reuse it), the encoder's per-call costs (bench/encoder_profile.py) and one worker run on
# the 3-hour synthetic set with its start-up breakdown.
# Needs the extraction environment on PYTHONPATH and the released config in CONFIG_DIR.
# Usage: CONFIG_DIR=path/to/qwen3-tts-tokenizer-12hz WORK=/scratch bash bench/gpu_encoder_profile.sh
set -euo pipefail
WORK=${WORK:-$(mktemp -d)}
CONFIG_DIR=${CONFIG_DIR:-.bench-config}
BUDGETS=${BUDGETS:-320 640 1280}
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
for i in 1 2; do
    /usr/bin/time -f "import torch + qwen_tts, run $i: %e s" \
        python3 -c "from qwen_tts import Qwen3TTSTokenizer" 2>&1 | grep "^import"
done
/usr/bin/time -f "import torch alone: %e s" python3 -c "import torch" 2>&1 | grep "^import"
python3 -m gpuspool.extract.tiny "$WORK/tok" --full "$CONFIG_DIR" >/dev/null 2>&1
echo "\$ python3 bench/encoder_profile.py --tokenizer TOK --budgets $BUDGETS"
python3 bench/encoder_profile.py --tokenizer "$WORK/tok" --budgets $BUDGETS 2>/dev/null | head -n -1
python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); \
from extract_bench import _dataset; print(_dataset(Path('$WORK'), 3.0, 16)[1])" 2>/dev/null
for b in ${WORKER_BUDGETS:-320 640}; do
    echo "\$ python3 -m gpuspool.extract --input DATA --output OUT_$b --tokenizer TOK --device cuda:0 --batch-seconds $b"
    /usr/bin/time -f "wall %e s" python3 -m gpuspool.extract --input "$WORK/data/input.jsonl" \
        --output "$WORK/o_$b.jsonl" --tokenizer "$WORK/tok" --device cuda:0 --batch-seconds "$b" \
        2>"$WORK/err_$b.txt" | tail -1
    tail -1 "$WORK/err_$b.txt"
done
cmp "$WORK/o_320.jsonl" "$WORK/o_640.jsonl" && echo "outputs at 320 and 640 byte-identical"
