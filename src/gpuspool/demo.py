"""``gpuspool demo``: the whole system on a machine with no GPU, in about a minute.

It builds a tiny random-weight tokenizer and a small synthetic dataset, writes a config whose GPU
source is a file simulating one shared 141 GiB GPU (another tenant holds most of it at first),
starts the real daemon as a subprocess, submits a job through the spool (it waits for memory,
then runs) and a bad job file (it is rejected), shows status as it goes, frees the GPU, and
checks the output line by line. Everything it makes stays in the work folder it names; a
temporary one (``/tmp/gpuspool-demo-*``, when run as root without ``--workdir``) is removed when
the demo passes.

Its output is plain lines (no wrapping, no cursor movement), the same on a terminal and captured.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from gpuspool.gpus import write_gpu_file
from gpuspool.ledger import Ledger
from gpuspool.models import JobState
from gpuspool.spool import Spool

# soft_wrap: a captured run (80 columns, no TTY) keeps each line whole instead of wrapping it.
console = Console(soft_wrap=True, highlight=False)
GIB_MIB = 1024.0
#: Seconds without news after which the demo says what it is waiting for.
HEARTBEAT_S = 4.0
SIM_UUID = "GPU-5e1f0a3c-0000-4d00-9000-00000000d3m0"
DEMO_TIMEOUT_S = 110.0


def _gpus(free_gib: float, *, tenant_gib: float) -> list[dict[str, Any]]:
    total = 141.0
    return [
        {
            "uuid": SIM_UUID,
            "name": "NVIDIA H200 (simulated)",
            "total_mib": total * GIB_MIB,
            "free_mib": free_gib * GIB_MIB,
            "processes": [{"pid": 1, "used_mib": tenant_gib * GIB_MIB}] if tenant_gib else [],
        }
    ]


def _config(work: Path, gpu_file: Path, fallback_user: str | None) -> Path:
    cfg = work / "gpuspool.toml"
    extra = [f'fallback_user = "{fallback_user}"'] if fallback_user else []
    if fallback_user is None and os.geteuid() == 0:
        extra.append("allow_root_jobs = true")
    cfg.write_text(
        "\n".join(
            [
                *extra,
                f'spool_dir = "{work / "spool"}"',
                f'state_dir = "{work / "state"}"',
                f'gpu_source = "file:{gpu_file}"',
                "poll_interval_s = 1.0",
                "stable_polls = 2",
                "min_free_gib = 100.0",
                'worker_device = "cpu"',
                "progress_log_interval_s = 2.0",
                "default_batch_seconds = 60.0",
                'log_format = "json"',
                'worker_extra_args = ["--progress-interval-s", "1"]',
                "",
            ]
        )
    )
    return cfg


def _status(ledger_path: Path) -> list[Any]:
    if not ledger_path.exists():
        return []
    try:
        ledger = Ledger(ledger_path, readonly=True)
    except Exception:  # the daemon is still creating it
        return []
    try:
        return ledger.jobs()
    except Exception:  # created, its tables not yet: the next look finds them
        return []
    finally:
        ledger.close()


def _print_status(jobs: list[Any], t0: float) -> None:
    for job in jobs:
        p = job.progress
        prog = f" {p.get('lines_done', 0)}/{p.get('lines_total', '?')} lines" if p else ""
        if job.state == JobState.RUNNING and not p:
            prog = " (the worker is loading torch and the model)"
        why = f" — {job.reason}" if job.state != JobState.RUNNING and job.reason else ""
        console.print(
            f"  [dim]{time.monotonic() - t0:5.1f}s[/dim] {job.id} [bold]{job.state.value}[/bold]"
            f"{escape(prog + why)}"
        )


def verify_output(input_jsonl: Path, output_jsonl: Path) -> int:
    """Check every output line: the input fields unchanged plus well-formed audio codes."""
    from gpuspool.extract.headers import probe, resampled_length

    inputs = [json.loads(x) for x in input_jsonl.read_text().splitlines() if x.strip()]
    outputs = [json.loads(x) for x in output_jsonl.read_text().splitlines() if x.strip()]
    if len(inputs) != len(outputs):
        raise AssertionError(f"{len(outputs)} output lines for {len(inputs)} input lines")
    for n, (src, out) in enumerate(zip(inputs, outputs, strict=True), start=1):
        codes = out.pop("audio_codes")
        if out != src:
            raise AssertionError(f"line {n}: fields changed")
        frames, sr = probe(input_jsonl.parent / src["audio"])
        expected = math.ceil(resampled_length(frames, sr) / 1920)
        if len(codes) != expected or any(len(f) != 16 for f in codes):
            raise AssertionError(f"line {n}: {len(codes)} frames, expected {expected} × 16")
        if not all(0 <= c < 2048 for f in codes for c in f):
            raise AssertionError(f"line {n}: code out of range")
    return len(outputs)


def run(workdir: Path | None = None) -> int:
    """Run the demo; 0 when every check passed."""
    t0 = time.monotonic()
    as_root = os.geteuid() == 0
    temporary = workdir is None and as_root
    if temporary:
        # Jobs never run as root: they run as the fallback user, who must reach the files.
        work = Path(tempfile.mkdtemp(prefix="gpuspool-demo-"))
        work.chmod(0o755)
    else:
        work = (workdir or Path.cwd() / "demo-run").absolute()
        if work.exists() and any(work.iterdir()):
            work = work / time.strftime("%Y%m%d-%H%M%S")
        work.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]gpuspool demo")
    console.print(f"work folder: {work}")
    fallback = None
    if as_root:
        from gpuspool import privileges

        nobody = privileges.identity_for_name("nobody")
        if privileges.check_input_readable(nobody, Path(sys.executable).resolve()) is None:
            fallback = "nobody"
            console.print(
                "running as root: jobs never run as root, so root-owned job files run as"
                f" the fallback user [bold]{fallback}[/bold]"
            )
        else:
            console.print(
                "[yellow]running as root, and this Python is not reachable by other users:"
                " the demo sets allow_root_jobs (never do this on a shared server)[/yellow]"
            )

    console.print("1. building a tiny random-weight tokenizer and 12 synthetic clips ...")
    tok = work / "tiny-tokenizer"
    building = subprocess.Popen(
        [sys.executable, "-m", "gpuspool.extract.tiny", str(tok)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    from gpuspool.extract.synth import synth_dataset

    data = synth_dataset(work / "data", 12, min_s=0.5, max_s=6.0, seed=7)
    console.print(f"  [dim]{time.monotonic() - t0:5.1f}s[/dim] 12 clips written to {work / 'data'}")
    while True:
        try:
            _, stderr = building.communicate(timeout=HEARTBEAT_S)
            break
        except subprocess.TimeoutExpired:
            console.print(
                f"  [dim]{time.monotonic() - t0:5.1f}s[/dim] tokenizer: still importing torch"
                " and saving random weights ..."
            )
    if building.returncode != 0:
        console.print(f"[red]building the tokenizer failed:[/red]\n{escape(stderr)}")
        return 1
    console.print(f"  [dim]{time.monotonic() - t0:5.1f}s[/dim] tokenizer saved to {tok}")
    out_dir = work / "out"
    out_dir.mkdir(exist_ok=True)
    if fallback is not None:
        pw = pwd.getpwnam(fallback)
        os.chown(out_dir, pw.pw_uid, pw.pw_gid)

    gpu_file = work / "gpus.json"
    write_gpu_file(gpu_file, _gpus(21.0, tenant_gib=120.0))
    cfg = _config(work, gpu_file, fallback)
    console.print(
        "2. simulated GPU: NVIDIA H200 141 GiB, another tenant holds 120 GiB (21 GiB free);"
        " threshold 100 GiB"
    )
    daemon_log = work / "daemon.log"
    with open(daemon_log, "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "gpuspool.cli", "--config", str(cfg), "daemon"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    console.print(f"3. daemon started (pid {daemon.pid}); its JSON log: {daemon_log}")
    code = 1
    try:
        code = _drive(work, cfg, data, tok, gpu_file, daemon, t0)
        return code
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if temporary and code == 0:
            shutil.rmtree(work, ignore_errors=True)
            console.print(f"removed the temporary work folder {work}")
        elif temporary:
            console.print(f"kept the work folder for a look: {work}")


def _drive(
    work: Path,
    cfg: Path,
    data: Path,
    tok: Path,
    gpu_file: Path,
    daemon: subprocess.Popen[bytes],
    t0: float,
) -> int:
    spool = Spool(work / "spool")
    spool.ensure_dirs()
    output = work / "out" / "codes.jsonl"
    job = {"input": str(data), "output": str(output), "tokenizer": str(tok), "name": "demo"}
    _, job_id = spool.submit(job, stem="demo")
    console.print(
        f"4. submitted job {job_id}: it starts when the GPU has 100 GiB free (the configured"
        " threshold), so it must wait"
    )
    bad = {"input": "relative/path.jsonl", "output": str(work / "out" / "x.jsonl"), "tokenizer": 1}
    _, _ = spool.submit(bad, stem="bad-job")
    console.print("   and a bad job file (relative input, tokenizer not a string)")
    ledger_path = work / "state" / "ledger.sqlite3"
    freed = False
    told_need = False
    last = ""
    last_news = time.monotonic()
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            console.print(f"[red]daemon exited with {daemon.returncode}; see {work}/daemon.log")
            return 1
        jobs = _status(ledger_path)
        if jobs and not told_need:
            told_need = True
            console.print(
                f"   the daemon accepted it: it needs ≈{jobs[0].need_gib:.1f} GiB (computed from"
                f" its longest clip and batch budget); threshold {jobs[0].threshold_gib:g} GiB"
            )
        line = json.dumps([(j.state.value, j.reason, j.progress.get("lines_done")) for j in jobs])
        if line != last or time.monotonic() - last_news >= HEARTBEAT_S:
            _print_status(jobs, t0)
            last = line
            last_news = time.monotonic()
        state = jobs[0].state if jobs else None
        if not freed and state == JobState.QUEUED and time.monotonic() - t0 > 6:
            write_gpu_file(gpu_file, _gpus(139.5, tenant_gib=0.0))
            console.print("5. the other tenant finished: 139.5 GiB free now")
            freed = True
        if state is not None and state.terminal:
            break
        time.sleep(0.3)
    jobs = _status(ledger_path)
    if not jobs or jobs[0].state != JobState.DONE:
        console.print(f"[red]job did not finish: {jobs[0].state if jobs else 'missing'}")
        return 1
    reasons = spool.reason_files()
    if len(reasons) != 1:
        console.print(f"[red]expected 1 rejected file, found {len(reasons)}")
        return 1
    why = next(
        (x for x in reasons[0].read_text().splitlines() if x.startswith("reason: ")), "reason: ?"
    )
    console.print(f"6. rejected as expected ({reasons[0].name}): {escape(why)}")
    lines = verify_output(data, output)
    console.print(f"7. output verified: {lines} lines, each the input line plus 16-codebook codes")
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(timeout=30)
    if code != 0:
        console.print(f"[red]daemon exited with {code} on SIGTERM")
        return 1
    console.print(
        f"8. daemon stopped cleanly on SIGTERM (exit 0). Total {time.monotonic() - t0:.1f} s"
    )
    console.rule("[green]demo passed")
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
