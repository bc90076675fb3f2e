"""Command line of the extraction worker (``gpuspool extract`` / ``python -m gpuspool.extract``).

Importing this module does not import torch; the worker imports it when it starts encoding.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

from gpuspool.exitcodes import ExitCode
from gpuspool.extract.events import Events
from gpuspool.protocol import GATE_FD_ENV, inherited_fd

DESCRIPTION = """\
Extract Qwen3-TTS 12 Hz audio codes for every line of a JSONL file, as the official
finetuning/prepare_data.py does (each input line plus "audio_codes"), in batches cut at a
padded-seconds budget, with CPU decoding overlapped with encoding, resumable output and JSON
progress events on stdout. See docs/extract.md.
"""

EPILOG = """\
exit codes: 0 done; 1 crash; 64 usage; 65 bad data (a bad line under --on-bad-line fail);
66 input not found on this host (shared ledger); 73 output exists; 74 output locked by a
stale worker (shared ledger, retryable); 75 CUDA out of memory (checkpointed, retryable);
77 fenced out: a newer attempt owns the output (shared ledger); 78 config (the tokenizer
cannot be loaded, a module is missing); 143 interrupted by SIGTERM/SIGINT (checkpointed,
resumable), or its gate closed before its GPU was given (daemon prestart; nothing done).
"""


#: Printed (to the job log) when a prestarted worker must exec itself again for CUDA to see its GPU.
RESTART_NOTE = "gpuspool extract: CUDA started during the imports; starting again for its GPU"


def _positive_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError("must be a number > 0")
    return v


def _non_negative_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError("must be a number ≥ 0")
    return v


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for ``--help`` in the docs)."""
    ap = argparse.ArgumentParser(
        prog="gpuspool extract",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--input", "-i", required=True, type=Path, help="input JSONL")
    ap.add_argument("--output", "-o", required=True, type=Path, help="output JSONL")
    ap.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer folder or hub id (e.g. Qwen/Qwen3-TTS-Tokenizer-12Hz)",
    )
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    ap.add_argument(
        "--batch-seconds",
        type=_positive_float,
        default=320.0,
        help="padded seconds a batch may hold: batch size × longest clip (default 320)",
    )
    ap.add_argument(
        "--shape-bucket",
        type=_non_negative_float,
        default=1.0,
        dest="shape_bucket_s",
        metavar="SECONDS",
        help="round each batch's length up to whole buckets of this many seconds (whole "
        "frames; at most an eighth of the length), so that batch shapes repeat; 0: none "
        "(default 1)",
    )
    ap.add_argument("--on-bad-line", choices=("fail", "skip"), default="fail")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ap.add_argument(
        "--skip-report", type=Path, default=None, help="skipped lines (default OUT.skipped.jsonl)"
    )
    ap.add_argument(
        "--loader-workers",
        type=_positive_int,
        default=max(1, min(16, (os.cpu_count() or 2) - 1)),
        help="CPU threads decoding and resampling audio (default min(16, cores - 1))",
    )
    ap.add_argument("--progress-interval-s", type=_positive_float, default=5.0)
    ap.add_argument(
        "--sort-window",
        type=_positive_int,
        default=2048,
        help="lines sorted by length together before batching (default 2048)",
    )
    ap.add_argument(
        "--prefetch-batches",
        type=_positive_int,
        default=4,
        help="batches decoded ahead of the encoder (default 4)",
    )
    ap.add_argument(
        "--no-resume", action="store_true", help="discard a partial output and start over"
    )
    ap.add_argument(
        "--tf32",
        action="store_true",
        help="allow TF32 convolutions on the GPU: faster, but codes then depend slightly on "
        "batch shapes (off by default: full fp32, deterministic cuDNN algorithms)",
    )
    ap.add_argument(
        "--loader-mode",
        choices=("process", "thread"),
        default="process",
        help="decode audio in worker processes (default) or threads",
    )
    ap.add_argument("--cpu-threads", type=_positive_int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--fence-lock-wait-s",
        type=_positive_float,
        default=60.0,
        help="shared ledger: longest wait for the output's owner-file lock (default 60)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the worker; return its exit code (see :class:`ExitCode`)."""
    from gpuspool.extract.worker import Options, Run

    events = Events.from_env(sys.stdout)
    parser = build_parser()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            a = parser.parse_args(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if code == 0:  # --help
            return 0
        events.emit("error", exit_code=int(ExitCode.USAGE), reason="bad command line")
        return int(ExitCode.USAGE)
    kw = vars(a)
    kw["resume"] = not kw.pop("no_resume")
    opts = Options(**kw)
    gate = inherited_fd(os.environ, GATE_FD_ENV)
    waited = None
    if gate is not None:
        del os.environ[GATE_FD_ENV]
        waited = _wait_for_gpu(gate, opts.tokenizer, opts.dtype)
        if waited is None:
            # Nothing done, nothing lost: as a run interrupted before its first batch.
            return int(ExitCode.INTERRUPTED)
    with contextlib.redirect_stdout(sys.stderr):
        run = Run(opts, events)
        run.gate_wait_s = waited
        return run.execute()


def _wait_for_gpu(gate: int, tokenizer: str, dtype: str) -> float | None:
    """Started before its GPU was free: import torch and the tokenizer's modules and load the
    tokenizer on the CPU now, then wait for the daemon's go line and set what it names in the
    environment. Returns the seconds from the exec to the go line; None when the gate closed or
    its line was not a go line (nothing was done). Should the CUDA driver have started
    meanwhile (it then sees no GPU), the worker runs itself again from the exec, so CUDA reads
    its GPU."""
    from gpuspool.extract import startup

    startup.prefetch_tokenizer(tokenizer)
    with contextlib.redirect_stdout(sys.stderr), contextlib.suppress(Exception):
        # A broken install is reported by the run itself, which imports and loads again.
        from gpuspool.extract.model import import_tokenizer_stack, preload_tokenizer

        import_tokenizer_stack()
        preload_tokenizer(tokenizer, dtype)
    go = startup.read_go(gate)
    waited = startup.process_age_s() or 0.0
    if go is None:
        print("gpuspool extract: not started: the gate closed or sent no go line", file=sys.stderr)
        return None
    os.environ.update(go)
    if go.get("CUDA_VISIBLE_DEVICES") and startup.cuda_sees_no_gpu():
        print(RESTART_NOTE, file=sys.stderr, flush=True)
        os.execv(sys.executable, sys.orig_argv)
    return waited


if __name__ == "__main__":
    raise SystemExit(main())
