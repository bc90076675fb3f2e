#!/usr/bin/env bash
# Run the worker in several set-ups on a GPU host, same synthetic set (HOURS, default 6), same
# budget (BUDGET, default 320): the default; thread loaders; a 0.5 ms GIL switch interval;
# torch's allocator without expandable segments. Prints each run's summary event; all outputs
# must be byte-identical.
# Usage: CONFIG_DIR=path/to/qwen3-tts-tokenizer-12hz WORK=/scratch bash bench/gpu_worker_variants.sh
set -euo pipefail
WORK=${WORK:-$(mktemp -d)}
CONFIG_DIR=${CONFIG_DIR:-.bench-config}
HOURS=${HOURS:-6}
BUDGET=${BUDGET:-320}
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
python3 -m gpuspool.extract.tiny "$WORK/tok" --full "$CONFIG_DIR" > /dev/null 2>&1
python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'bench'); \
from extract_bench import _dataset; print(_dataset(Path('$WORK'), $HOURS, 16)[1])" 2>/dev/null
ARGS=(--input "$WORK/data/input.jsonl" --tokenizer "$WORK/tok" --device cuda:0
      --batch-seconds "$BUDGET" --overwrite --no-resume)
SWITCH='import sys; sys.setswitchinterval(0.0005); from gpuspool.extract.cli import main; sys.exit(main())'
run() {  # name, then the command (its output file is added)
    local name=$1; shift
    echo "\$ [$name] $* --output OUT_$name"
    "$@" --output "$WORK/o_$name.jsonl" 2>/dev/null | tail -1
}
run default python3 -m gpuspool.extract "${ARGS[@]}"
run thread python3 -m gpuspool.extract "${ARGS[@]}" --loader-mode thread
run switch python3 -c "$SWITCH" "${ARGS[@]}"
PYTORCH_ALLOC_CONF=expandable_segments:False run noexpand python3 -m gpuspool.extract "${ARGS[@]}"
for v in thread switch noexpand; do
    cmp "$WORK/o_default.jsonl" "$WORK/o_$v.jsonl" && echo "default and $v outputs byte-identical"
done
