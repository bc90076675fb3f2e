"""Start-up of the extraction worker: from exec to its first batch on the device, cold and warm.

Each run is a fresh ``python -m gpuspool.extract`` on a small synthetic set; its ``summary`` event
reports ``startup_s`` (from the process's exec, as the kernel recorded it, to the first batch
sent to the device), ``import_s`` and ``model_load_s``. A cold run follows an eviction of the
page cache (``/proc/sys/vm/drop_caches`` where this process may write it, else
``POSIX_FADV_DONTNEED`` on every file the imports read, torch's and CUDA's libraries, the
packages the old import set or the model load reads, the tokenizer and the data); a warm run
follows another run. The same is measured for the imports alone: the old
import set (``import torch, qwen_tts``: the whole TTS model stack) and the worker's own. With
``--readahead``, one more cold run of the worker with a read-ahead of torch's and CUDA's shared
libraries started first (an experiment); with ``--importtime``, the worker's slowest imports.

With ``--config-dir`` the full-size random-weight tokenizer is built from the released config
(about 682 MB, as ``bench/extract_bench.py`` does); without it, the tiny one. Everything goes to
``--work`` and is reused by a later run with the same folder.

    PYTHONPATH=SITE:src python3 bench/worker_startup.py --config-dir CONFIG --device cuda:0
    PYTHONPATH=src python3 bench/worker_startup.py --device cpu        # the tiny tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
IMPORTS = {
    "torch + qwen_tts (old)": "import torch, qwen_tts",
    "worker's imports (new)": (
        "import torch; from gpuspool.extract.model import import_tokenizer_stack as f; f()"
    ),
}
#: The old worker's import set in front of today's worker: `import qwen_tts` ran in the worker.
OLD_WORKER = (
    "import sys, qwen_tts; from gpuspool.extract.cli import main; sys.exit(main(sys.argv[1:]))"
)
#: An experiment for cold starts: the worker with a read-ahead of torch's and CUDA's shared
#: libraries (``readahead_libraries``) started before its first import.
READAHEAD_WORKER = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import worker_startup as w; "
    "w.readahead_libraries(); from gpuspool.extract.cli import main; sys.exit(main(sys.argv[1:]))"
)
#: Lists the imported modules whose bytecode is missing or stale (a job would compile them),
#: and the files the imports read: sources, bytecode, mapped shared libraries, and the CUDA
#: libraries that torch loads later (what a cold run must find out of the page cache).
PYC_CHECK = r"""
import glob, importlib.util, json, os, sys
exec(sys.argv[1])
bad = []
files = set()
with open("/proc/self/maps") as maps:
    files.update(line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6)
for top, pattern in (("torch", "lib/*.so*"), ("nvidia", "*/lib/*.so*")):
    spec = importlib.util.find_spec(top)
    for root in (spec.submodule_search_locations or []) if spec else []:
        files.update(glob.glob(os.path.join(root, pattern)))
for name, mod in list(sys.modules.items()):
    spec = getattr(mod, "__spec__", None)
    src = getattr(spec, "origin", None) or ""
    files.update(f for f in (src, getattr(spec, "cached", None)) if f and os.path.isfile(f))
    if not src.endswith(".py") or not getattr(spec, "cached", None):
        continue
    try:
        with open(spec.cached, "rb") as f:
            head = f.read(16)
        st = os.stat(src)
        flags = int.from_bytes(head[4:8], "little")
        ok = head[:4] == importlib.util.MAGIC_NUMBER and (flags != 0 or (
            int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF))
    except OSError:
        ok = False
    if not ok:
        bad.append(name)
files = sorted(f for f in files if f.startswith("/") and os.path.isfile(f))
print(json.dumps({"modules": len(sys.modules), "without_bytecode": sorted(bad), "files": files}))
"""


#: Packages evicted whole for a cold run: those the old import set reads and the worker's
#: imports do not, and those whose modules the model load imports later.
EVICT_PACKAGES = (
    "qwen_tts", "sklearn", "scipy", "numba", "llvmlite", "librosa", "pandas", "onnxruntime",
    "einops", "sox", "torchaudio", "audioread", "pooch", "transformers", "accelerate",
    "safetensors", "huggingface_hub", "tokenizers",
)  # fmt: skip
#: The device's name, as the worker's start event gives it.
DEVICE_NAME = [""]
#: The source tree the measured worker runs from (``--src``: another checkout, for a before).
WORKER_SRC = [SRC]


def readahead_libraries() -> None:
    """Ask the kernel, from a thread, to read torch's and the CUDA wheels' shared libraries
    into the page cache (``POSIX_FADV_WILLNEED``), torch's own first: sequential read-ahead
    beside the imports instead of page faults during them. Finds them without importing."""
    import importlib.util
    import threading

    def paths() -> list[Path]:
        out: list[Path] = []
        for name, pattern in (("torch", "lib/*.so*"), ("nvidia", "*/lib/*.so*")):
            spec = importlib.util.find_spec(name)
            for root in (spec.submodule_search_locations or []) if spec else []:
                out += sorted(Path(root).glob(pattern), key=lambda q: -q.stat().st_size)
        return out

    from gpuspool.extract.startup import will_need

    def run() -> None:
        for path in paths():
            will_need(path)

    threading.Thread(target=run, name="readahead", daemon=True).start()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    parts = (str(WORKER_SRC[0]), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
    return env


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def import_roots() -> list[Path]:
    """The folders the worker imports from (its interpreter's ``sys.path``)."""
    out = subprocess.run(
        [sys.executable, "-c", "import json, sys; print(json.dumps(sys.path))"],
        capture_output=True, text=True, env=_env(), check=True, cwd="/",
    )  # fmt: skip
    return [Path(p) for p in json.loads(out.stdout) if p and Path(p).is_dir()]


def package_dirs(names: tuple[str, ...]) -> list[Path]:
    """The folders of these installed packages (found without importing them)."""
    import importlib.util

    out: list[Path] = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None:
            out += [Path(p) for p in spec.submodule_search_locations or []]
    return out


def evict(paths: list[Path]) -> str:
    """Empty the page cache of what a run reads (``paths``: files, and folders taken whole);
    return how."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    n = 0
    for path in paths:
        walked = os.walk(path) if path.is_dir() else [(str(path.parent), [], [path.name])]
        for folder, _, files in walked:
            for name in files:
                try:
                    fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    n += 1
                except OSError:
                    pass
                finally:
                    os.close(fd)
    return f"fadvise DONTNEED on {n} files"


def prepare(work: Path, config_dir: str | None, clips: int) -> tuple[Path, Path]:
    """The tokenizer (full-size from the released config, or tiny) and a small data set."""
    from gpuspool.extract.synth import synth_dataset

    tok = work / ("tok_full" if config_dir else "tok_tiny")
    if not (tok / "model.safetensors").exists():
        cmd = [sys.executable, "-m", "gpuspool.extract.tiny", str(tok)]
        cmd += ["--full", config_dir] if config_dir else []
        t = time.monotonic()
        subprocess.run(cmd, check=True, capture_output=True, env=_env())
        print(f"# built {tok.name} in {time.monotonic() - t:.1f} s", flush=True)
    data = work / "data" / "input.jsonl"
    if not data.exists():
        synth_dataset(work / "data", clips, 2.0, 20.0, seed=7)
    return tok, data


def pyc_report(code: str) -> dict[str, Any]:
    """How many of the modules ``code`` imports have no valid bytecode (read-only check)."""
    out = subprocess.run(
        [sys.executable, "-B", "-c", PYC_CHECK, code],
        capture_output=True, text=True, env=_env(), cwd="/",
    )  # fmt: skip
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    line = out.stdout.strip().splitlines()[-1]
    return dict(json.loads(line))


def time_import(code: str) -> dict[str, Any]:
    """Wall and CPU seconds of a fresh interpreter running ``code`` (or why it failed: the old
    import set needs packages, such as onnxruntime, that the worker does not)."""
    cpu = _children_cpu()
    t = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), cwd="/")  # fmt: skip
    row: dict[str, Any] = {"wall_s": time.monotonic() - t, "cpu_s": _children_cpu() - cpu}
    if done.returncode != 0:
        row = {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return row


def run_worker(argv: list[str], out: Path) -> dict[str, Any]:
    """One worker run; its summary's start-up fields and the outside view of them."""
    cmd = [sys.executable, *argv, "--output", str(out), "--overwrite", "--no-resume"]
    cpu = _children_cpu()
    t0 = time.monotonic()
    start_seen = None
    events: list[dict[str, Any]] = []
    # stderr to a file, not a pipe: a full pipe would stall the worker.
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True,
                                env=_env(), cwd="/")  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("{"):
                continue  # the old import set prints banners on stdout
            ev = json.loads(line)
            events.append(ev)
            if ev["event"] == "start" and start_seen is None:
                start_seen = time.monotonic() - t0
                DEVICE_NAME[0] = str(ev.get("device_name"))
        code = proc.wait()
        wall = time.monotonic() - t0
        errors.seek(0)
        err = errors.read()
    summary = next((e for e in events if e["event"] == "summary"), None)
    if code != 0 or summary is None:
        raise SystemExit(f"worker failed ({code}): {err[-2000:]}")
    return {
        "startup_s": summary.get("startup_s"),
        "import_s": summary["import_s"],
        "model_load_s": summary["model_load_s"],
        "start_event_s": start_seen,
        "process_s": wall,
        "cpu_s": _children_cpu() - cpu,
    }


#: The worker's imports without its silencing of file descriptor 2, where importtime writes.
IMPORTTIME_CODE = "import torch; from gpuspool.extract.model import _tokenizer_modules as f; f()"


def importtime_top(n: int = 16) -> list[str]:
    """``-X importtime`` of the worker's imports (warm): the slowest imports at most two levels
    below the top, by cumulative time, and the self time of each top-level package."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", IMPORTTIME_CODE],
                         capture_output=True, text=True, env=_env(), cwd="/")  # fmt: skip
    rows: list[tuple[int, str]] = []
    packages: dict[str, int] = {}
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            own, cumulative, name = line.split(":", 1)[1].split("|")
            top = name.strip().split(".")[0]
            packages[top] = packages.get(top, 0) + int(own)
            if len(name) - len(name.lstrip()) <= 5:  # one space, then two a level
                rows.append((int(cumulative), name.rstrip()))
    rows.sort(reverse=True)
    lines = [f"{c / 1e6:7.2f} s {name}" for c, name in rows[:n]]
    own_total = sorted(packages.items(), key=lambda kv: -kv[1])[:8]
    lines.append("self time by package: " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in own_total))
    return lines


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp)")
    ap.add_argument("--config-dir", default=None, help="released config: full-size tokenizer")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--cold", type=int, default=2, help="cold runs of each kind")
    ap.add_argument("--warm", type=int, default=2, help="warm runs of each kind")
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--no-imports", action="store_true", help="skip the imports-only rows")
    ap.add_argument(
        "--old-worker",
        action="store_true",
        help="also run the worker behind `import qwen_tts` (the old import set)",
    )
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here")
    ap.add_argument(
        "--readahead",
        action="store_true",
        help="also run the worker with a read-ahead of torch's and CUDA's libraries",
    )
    ap.add_argument(
        "--importtime", action="store_true", help="print the worker's slowest imports (warm)"
    )
    ap.add_argument("--src", type=Path, default=SRC, help="the worker's source tree (default ours)")
    a = ap.parse_args(argv)
    WORKER_SRC[0] = a.src.resolve()
    work = a.work or Path(tempfile.mkdtemp(prefix="worker-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    tok, data = prepare(work, a.config_dir, a.clips)
    new_code = IMPORTS["worker's imports (new)"]
    report = pyc_report(new_code)
    read = [Path(f) for f in report.pop("files", [])]
    # What a cold run must read: the files the imports read (else the whole import path), the
    # packages of EVICT_PACKAGES, the tokenizer and the data.
    roots = [*(read or import_roots()), *package_dirs(EVICT_PACKAGES), tok, data.parent]
    missing = report.get("without_bytecode", [])
    print(f"# {report.get('modules')} modules imported, {len(missing)} without current "
          f"bytecode {missing[:5]}, {len(read)} files read {report.get('error', '')}",
          flush=True)  # fmt: skip
    results: dict[str, Any] = {"device": a.device, "tokenizer": str(tok), "runs": []}
    results["bytecode"] = {"modules": report.get("modules"), "without_bytecode": missing}

    base = ["--input", str(data), "--tokenizer", str(tok), "--device", a.device]
    # (name, argv, cold runs, warm runs): the variants only where they differ.
    kinds = [("worker", ["-m", "gpuspool.extract", *base], a.cold, a.warm)]
    if a.old_worker:
        kinds.append(("worker behind `import qwen_tts`", ["-c", OLD_WORKER, *base], 1, 1))
    if a.readahead:
        bench_dir = str(Path(__file__).resolve().parent)
        kinds.append(("worker + library read-ahead", ["-c", READAHEAD_WORKER, bench_dir, *base],
                      min(a.cold, 1), 0))  # fmt: skip
    how = ""
    for name, args, cold, warm in kinds:
        for mode, n in (("cold", cold), ("warm", warm)):
            for _ in range(n):
                if mode == "cold":
                    how = evict(roots)
                row = {"kind": name, "mode": mode, **run_worker(args, work / "out.jsonl")}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    if not a.no_imports:
        for name, code in IMPORTS.items():
            for mode in ("cold", "warm"):
                if mode == "cold":
                    how = evict(roots)
                row = {"kind": f"import: {name}", "mode": mode, **time_import(code)}
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    results["eviction"] = how
    results["device_name"] = DEVICE_NAME[0]
    if a.importtime:
        results["importtime"] = importtime_top()
    _table(results)
    for line in results.get("importtime", []):
        print(line)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _table(results: dict[str, Any]) -> None:
    """Medians per kind and mode."""
    print(f"\ndevice {results['device']} ({results['device_name']}), "
          f"python {sys.version.split()[0]}; cold = {results['eviction']}")  # fmt: skip
    print(f"{'run':40s} {'mode':5s} {'n':>2s} {'exec→1st batch':>14s} {'import':>7s} "
          f"{'load':>6s} {'process':>8s} {'cpu':>6s}")  # fmt: skip
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results["runs"]:
        groups.setdefault((r["kind"], r["mode"]), []).append(r)

    def col(rows: list[dict[str, Any]], key: str, width: int) -> str:
        xs = [r[key] for r in rows if r.get(key) is not None]
        return f"{_median(xs):{width}.2f}" if xs else " " * (width - 1) + "–"

    for (kind, mode), rows in groups.items():
        wall = "wall_s" if kind.startswith("import") else "process_s"
        print(f"{kind:40s} {mode:5s} {len(rows):2d} {col(rows, 'startup_s', 14)} "
              f"{col(rows, 'import_s', 7)} {col(rows, 'model_load_s', 6)} "
              f"{col(rows, wall, 8)} {col(rows, 'cpu_s', 6)}")  # fmt: skip
    print("(seconds, medians; exec→1st batch: the worker's startup_s; process: exec to exit)")
    for r in results["runs"]:
        if "error" in r:
            print(f"{r['kind']} ({r['mode']}) failed: {r['error']}")


if __name__ == "__main__":
    raise SystemExit(main())
