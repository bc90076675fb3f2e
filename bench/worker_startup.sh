#!/usr/bin/env bash
# On a GPU host: the extraction worker's start-up, from exec to its first batch on the GPU, cold
# (page cache emptied) and warm, with the full-size random-weight tokenizer built from the
# released config; and the imports alone: the old import set (torch + qwen_tts, the whole TTS
# model stack) and the worker's. Prints a table; all numbers go to $WORK/worker_startup.json
# (or to the file of a --json argument).
#
# Needs python3 with torch (CUDA). The pinned extraction packages (qwen-tts 0.1.1, transformers
# 4.57.3, accelerate, librosa, soundfile, soxr, ...) come either from WHEELS, a folder of .whl
# files installed offline into $WORK/site, byte-compiled and put first on PYTHONPATH; or from the
# environment as it is. About 100 s: installing the wheels and building the tokenizer (both
# reused when WORK is), 2 cold and 2 warm worker runs, 1 cold run of the worker with a
# read-ahead of torch's and CUDA's libraries (an experiment), 4 import runs (about 35 s; leave
# them out with --no-imports). Extra arguments go to bench/worker_startup.py (--help).
#
# Usage: WHEELS=/path/to/wheels CONFIG_DIR=/path/to/qwen3-tts-tokenizer-12hz \
#            bash bench/worker_startup.sh [--json FILE]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=${WORK:-/tmp/worker-startup}
DEVICE=${DEVICE:-cuda:0}
PY=${PYTHON:-python3}
if [[ -z ${CONFIG_DIR:-} ]]; then
    for d in shared/qwen3-tts-tokenizer-12hz ../shared/qwen3-tts-tokenizer-12hz; do
        [[ -f $d/config.json ]] && CONFIG_DIR=$d && break
    done
fi
[[ -f ${CONFIG_DIR:-}/config.json ]] ||
    { echo "worker_startup.sh: set CONFIG_DIR to the released config's folder" >&2; exit 64; }
mkdir -p "$WORK"
source bench/wheels.sh
use_wheels "$WORK/site"
exec "$PY" bench/worker_startup.py --work "$WORK" --config-dir "$CONFIG_DIR" --device "$DEVICE" \
    --importtime --readahead --json "$WORK/worker_startup.json" "$@"
