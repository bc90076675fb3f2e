#!/usr/bin/env bash
# On a GPU host: where the extraction worker's threads spend their time, sampled with py-spy
# (raw collapsed stacks, one file per budget), on a synthetic set of HOURS hours and the
# full-size random-weight tokenizer. Needs py-spy, the pinned extraction packages on PYTHONPATH
# and the released config in CONFIG_DIR.
# Usage: CONFIG_DIR=path/to/config WORK=/scratch OUTDIR=results bash bench/gpu_worker_profile.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=${WORK:-/tmp/worker-profile}
OUTDIR=${OUTDIR:-$WORK}
HOURS=${HOURS:-2}
mkdir -p "$WORK" "$OUTDIR"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
[[ -f $WORK/tok/config.json ]] ||
    python3 -m gpuspool.extract.tiny "$WORK/tok" --full "${CONFIG_DIR:-.bench-config}" >/dev/null 2>&1
python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); \
from extract_bench import _dataset; print(_dataset(Path('$WORK'), $HOURS, 16)[1])" 2>/dev/null
for b in ${BUDGETS:-320 640}; do
    echo "\$ py-spy record --format raw --threads --idle --rate 250 -- python3 -m gpuspool.extract ... --batch-seconds $b"
    py-spy record --format raw --threads --idle --rate 250 -o "$OUTDIR/pyspy_$b.txt" -- \
        python3 -m gpuspool.extract --input "$WORK/data/input.jsonl" --output "$WORK/o_$b.jsonl" \
        --tokenizer "$WORK/tok" --device cuda:0 --batch-seconds "$b" --overwrite --no-resume \
        2>"$WORK/err_$b.txt" | tail -1
done
