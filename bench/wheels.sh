# Sourced by the GPU benches: with WHEELS set (a folder of the pinned extraction wheels), install
# them offline into $1 (once), byte-compile them with every core (pip compiles one file at a
# time) and put $1 first on PYTHONPATH; torch comes from the host. Our own sources get bytecode
# too, as an installed wheel has. PY names the interpreter (default python3).
use_wheels() {
    local site=$1 py=${PY:-python3}
    if [[ -n ${WHEELS:-} ]]; then
        if [[ ! -d $site/qwen_tts ]]; then
            "$py" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
                --no-compile --target "$site" "$WHEELS"/*.whl
            "$py" -m compileall -qq -j 0 "$site" || true
        fi
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$py" -m compileall -qq -j 0 src || true
}
