#!/usr/bin/env bash
# Profile the extraction worker on a GPU host: the encoder alone on pre-loaded tensors (the
# GPU-only limit) and two `gpuspool extract` runs on the same 3-hour synthetic set, each with
# its summary event (which says where the encoding thread's time went).
# Needs the extraction environment on PYTHONPATH and the released config in CONFIG_DIR.
# Usage: CONFIG_DIR=path/to/qwen3-tts-tokenizer-12hz WORK=/scratch bash bench/gpu_worker_profile.sh
set -euo pipefail
WORK=${WORK:-$(mktemp -d)}
CONFIG_DIR=${CONFIG_DIR:-.bench-config}
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
python3 -m gpuspool.extract.tiny "$WORK/tok" --full "$CONFIG_DIR"
python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); \
from extract_bench import _dataset; print(_dataset(Path('$WORK'), 3.0, 16)[1])"
echo '$ python3 bench/extract_bench.py gpuonly --input DATA --tokenizer TOK --budgets 320 640 --mem-budgets 320'
python3 bench/extract_bench.py gpuonly --input "$WORK/data/input.jsonl" --tokenizer "$WORK/tok" \
    --budgets 320 640 --mem-budgets 320 2>&1 | tail -3
for b in 320 640; do
    echo "\$ python3 -m gpuspool.extract --input DATA --output OUT_$b --tokenizer TOK --device cuda:0 --batch-seconds $b"
    /usr/bin/time -f "wall %e s" python3 -m gpuspool.extract --input "$WORK/data/input.jsonl" \
        --output "$WORK/o_$b.jsonl" --tokenizer "$WORK/tok" --device cuda:0 --batch-seconds "$b" \
        2>"$WORK/err_$b.txt" | tail -1
    tail -1 "$WORK/err_$b.txt"
done
cmp "$WORK/o_320.jsonl" "$WORK/o_640.jsonl" && echo "outputs at 320 and 640 byte-identical"
