"""README "Using it", walked as a user does against the live daemon: submit, status, logs,
cancel, retry, and a job the daemon refuses found by the id `submit` printed.

Every step is the `gpuspool` command line as a separate process (stdout a pipe, as in a script);
the daemon is the real one with the real worker on CPU and a simulated GPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import gpu_entry, wait_until
from tests.integration.conftest import LiveDaemon, wait_state


def gpuspool(live: LiveDaemon, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    done = subprocess.run(
        [sys.executable, "-m", "gpuspool.cli", "--config", str(live.config), *args],
        capture_output=True, text=True, timeout=180, env=env, cwd=live.tmp, check=False,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


def status_rows(live: LiveDaemon) -> dict[str, list[str]]:
    """`gpuspool status` through a pipe: job id -> its tab-separated fields."""
    out = gpuspool(live, "status").stdout
    return {f[0]: f for f in (line.split("\t") for line in out.splitlines()) if f[0][:1] != "#"}


def test_using_it_as_the_readme_says(
    live: LiveDaemon, tokenizer_dir: Path, audio_input: Path
) -> None:
    live.start()  # GPU 0 has 10 GiB free; the threshold is 20 GiB: jobs wait
    output = live.tmp / "train_codes.jsonl"

    # gpuspool submit -i data/train.jsonl -o data/train_codes.jsonl --tokenizer ... --name train
    done = gpuspool(live, "submit", "-i", str(audio_input), "-o", str(output),
                    "--tokenizer", str(tokenizer_dir), "--name", "train")  # fmt: skip
    match = re.match(r"submitted ([0-9a-f]{12}): needs ≈([\d.]+) GiB", done.stdout)
    assert match, done.stdout
    job = match[1]

    # gpuspool status: the job, its state, and why it waits
    wait_until(lambda: "need 20.0" in ((live.job(job) and live.job(job).reason) or ""), 30)
    row = status_rows(live)[job]
    assert row[1] == "queued" and row[7] == "train" and "need 20.0" in row[8]

    # A second job onto the same output: submit cannot know (the file does not exist yet), the
    # daemon refuses it; `show ID` finds it by the id submit printed, with the reason.
    done = gpuspool(live, "submit", "-i", str(audio_input), "-o", str(output),
                    "--tokenizer", str(tokenizer_dir), "--name", "dup", "--json")  # fmt: skip
    dup = json.loads(done.stdout)["job_id"]
    wait_until(lambda: list(live.spool.rejected.glob(f"*-{dup}-*.reason")), 30)
    shown = json.loads(gpuspool(live, "show", dup).stdout)
    assert shown["id"] == dup and shown["state"] == "rejected"
    assert f"already the output of job {job}" in shown["reason"]
    assert dup not in status_rows(live)  # never queued: it shows only by its id

    # gpuspool cancel / retry: the daemon's own reason comes back after the retry
    assert gpuspool(live, "cancel", job).stdout.strip() == f"{job}: cancelled"
    assert status_rows(live)[job][1] == "cancelled"
    assert gpuspool(live, "retry", job).stdout.strip() == f"{job}: queued"
    wait_until(lambda: "need 20.0" in (live.job(job).reason or ""), 30)
    assert status_rows(live)[job][1] == "queued"

    # The other tenant leaves; gpuspool logs ID -f follows the job to its end.
    live.set_gpus(gpu_entry(0, 50))
    wait_state(live, job, {"running", "done"}, timeout=30)
    started = time.monotonic()
    logs = gpuspool(live, "logs", job, "-f")
    events = [json.loads(line) for line in logs.stdout.splitlines()]
    names = [e.get("event") for e in events]
    assert "summary" in names and "job_finished" in names, names
    assert time.monotonic() - started < 170
    assert live.state(job) == "done"
    assert status_rows(live)[job][1] == "done"
    assert len(output.read_text().splitlines()) == 40
    shown = json.loads(gpuspool(live, "show", job).stdout)
    assert [t["to_state"] for t in shown["transitions"]][-2:] == ["running", "done"]
    assert live.stop() == 0
