"""What `status`, `gpus`, `show` and `logs` print: through a pipe, on a narrow terminal, and
with hostile job names (issue 11; issue 10 row 12); what `submit` checks before it publishes.

The CLI runs as a real process (stdout a pipe, COLUMNS unset) against a real ledger and spool;
the daemon's tick runs in-process on fake time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from gpuspool.cli import main
from gpuspool.models import JobSpec, JobState
from gpuspool.spool import Spool
from gpuspool.views import (
    gpus_data,
    gpus_snapshot,
    gpus_view,
    log_json,
    log_line,
    status_data,
    status_view,
)
from tests.conftest import Harness, gpu_entry

#: A name that would clear the screen, move the cursor, recolour, and inject rich markup.
HOSTILE = "\x1b[2J\x1b[H\x1b[31mevil\x9b31m\u202eman[red]x[/red][bold]b"


@pytest.fixture
def cfg(harness: Harness) -> Path:
    path = harness.tmp / "gpuspool.toml"
    path.write_text(
        f'spool_dir = "{harness.settings.spool_dir}"\n'
        f'state_dir = "{harness.settings.state_dir}"\n'
        f'gpu_source = "file:{harness.gpu_file}"\n'
        "min_free_gib = 20.0\n"
    )
    return path


def cli(cfg: Path, *args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    """``gpuspool --config cfg ARGS`` as a process whose stdout is a pipe."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TERM")}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "gpuspool.cli", "--config", str(cfg), *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def in_process(cfg: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--config", str(cfg), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _queue(h: Harness) -> dict[str, str]:
    """Two queued jobs with long names, one held, one done: id -> state."""
    long_name = "a-rather-long-job-name-that-would-never-fit-in-an-eighty-column-terminal"
    h.set_gpus([gpu_entry(0, 50)])
    done = h.submit("first")
    for _ in range(3):
        h.tick()
    assert h.settle(done) == "done"
    h.set_gpus([gpu_entry(0, 5)])
    jobs = {done: "done"}
    for i in range(2):
        jobs[h.submit(f"{long_name}-{i}")] = "queued"
    held = h.submit("held-one")
    h.tick()
    h.daemon.ledger.transition(held, JobState.HELD, now=h.now, detail="held", reason="held")
    jobs[held] = "held"
    h.tick()
    return jobs


def test_piped_status_is_one_complete_line_per_job(harness: Harness, cfg: Path) -> None:
    """Through a pipe (COLUMNS unset) every job's full id and state are on its own line; grep
    counts the queued jobs and awk's $1/$2 are the id and the state."""
    jobs = _queue(harness)
    done = cli(cfg, "status")
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines() if not line.startswith("#")]
    assert {r[0]: r[1] for r in rows} == jobs
    assert all(len(r) == 9 for r in rows)
    queued_lines = [line for line in done.stdout.splitlines() if "queued" in line]
    assert len(queued_lines) == list(jobs.values()).count("queued") == 2  # grep -c queued
    awk = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines()
           if not line.startswith("#")}  # fmt: skip
    assert awk == jobs
    long_waiting = [r for r in rows if r[1] == "queued"]
    assert all("need 20.0" in r[8] and r[7].endswith(("-0", "-1")) for r in long_waiting)


def test_piped_gpus_is_one_complete_line_per_gpu(harness: Harness, cfg: Path) -> None:
    harness.set_gpus([gpu_entry(0, 50, 141.0), gpu_entry(1, 5, 141.0)])
    harness.tick()
    done = cli(cfg, "gpus")
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines() if not line.startswith("#")]
    assert [(r[0], r[1], r[2], r[5]) for r in rows] == [
        ("0", "GPU-sim-0", "50.0", "yes"),
        ("1", "GPU-sim-1", "5.0", "no"),
    ]


@pytest.mark.parametrize("width", [80, 60, 40])
def test_narrow_terminal_drops_columns_never_ids_or_states(harness: Harness, width: int) -> None:
    """At 80 columns and less, each job's id and state are whole on its line."""
    jobs = _queue(harness)
    data = status_data(harness.daemon.ledger, harness.now)
    console = Console(width=width, record=True, force_terminal=True, color_system=None)
    console.print(status_view(data, width=width))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width
    for job_id, state in jobs.items():
        line = next(line for line in text.splitlines() if job_id in line)
        assert state in line.split()
    if width == 80:
        assert "why waiting" in text  # the reason is kept while it fits
    snap = gpus_snapshot(harness.daemon.ledger)
    gdata = gpus_data(snap, [], 20.0, 3)
    console = Console(width=width, record=True, force_terminal=True, color_system=None)
    console.print(gpus_view(gdata, harness.now, width=width))
    assert "GPU-sim-0" in console.export_text()


def _ansi_free(text: str) -> None:
    """No escape sequence but the colours rich itself emits (SGR ``ESC[...m``)."""
    import re

    leftover = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert "\x1b" not in leftover and "\x9b" not in leftover and "\u202e" not in leftover


def test_hostile_job_name_is_escaped_everywhere(
    harness: Harness, cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job name with ANSI escapes, C1 codes, a bidi override and rich markup reaches no
    terminal raw: status (table and pipe), gpus, logs, and show print it escaped."""
    harness.set_gpus([gpu_entry(0, 50)])
    data = {"input": str(harness.data / "in.jsonl"), "output": str(harness.data / "hostile.out"),
            "tokenizer": "Qwen/tiny"}  # fmt: skip
    _, refused = Spool(harness.settings.spool_dir).submit({**data, "name": HOSTILE}, stem="x")
    harness.tick()
    assert harness.job(refused) is None  # intake refuses control characters in a name ...
    reasons = "".join(p.read_text() for p in harness.settings.rejected_dir.glob("*.reason"))
    assert "name" in reasons and "control character" in reasons
    # ... and the renderers escape whatever a ledger holds (one written before that check).
    job = "0123456789ab"
    spec = JobSpec.model_validate(data).model_copy(update={"name": HOSTILE})
    harness.daemon.ledger.add(job_id=job, spec=spec, submitter_uid=os.getuid(), need_gib=1.0,
                              threshold_gib=20.0, spool_file=None, now=harness.now)  # fmt: skip
    # The table, as a colour terminal would get it.
    status = status_data(harness.daemon.ledger, harness.now)
    assert any(j["name"] == HOSTILE for j in status["jobs"])
    console = Console(width=200, record=True, force_terminal=True, color_system="standard")
    console.print(status_view(status, width=200))
    styled = console.export_text(styles=True, clear=False)
    _ansi_free(styled)
    shown = console.export_text()
    assert "[red]x[/red][bold]b" in shown  # markup shown, not applied
    assert "\\x1b[2J" in shown
    # Through a pipe.
    piped = cli(cfg, "status").stdout
    _ansi_free(piped)
    assert "\\x1b[2J\\x1b[H\\x1b[31mevil\\x9b31m\\u202eman[red]x[/red][bold]b" in piped
    # gpus marks our process with the job's name.
    snap = gpus_snapshot(harness.daemon.ledger)
    record = dataclasses.replace(harness.job(job), pid=os.getpid())  # as if it ran here
    snap["gpus"][0]["processes"] = [{"pid": os.getpid(), "used_mib": 1024}]
    console = Console(width=200, record=True, force_terminal=True, color_system="standard")
    console.print(gpus_view(gpus_data(snap, [record], 20.0, 3), harness.now))
    assert "job \\x1b[2J" in console.export_text(clear=False)
    _ansi_free(console.export_text(styles=True))
    # A worker log line carrying the same bytes (the worker's output is the user's).
    line = json.dumps({"event": "progress", "note": HOSTILE, "ts": 1.0})
    console = Console(width=300, record=True, force_terminal=True, color_system="standard")
    console.print(log_line(line))
    console.print(log_line("raw text " + HOSTILE))
    _ansi_free(console.export_text(styles=True))
    # logs through a pipe (JSON lines): a worker's raw C1 code or bidi override is re-escaped.
    raw = json.dumps({"event": "progress", "note": HOSTILE}, ensure_ascii=False)
    assert log_json(raw).isascii() and json.loads(log_json(raw))["note"] == HOSTILE
    # show is JSON: escapes by construction.
    code, out, _ = in_process(cfg, capsys, "show", job)
    assert code == 0 and json.loads(out)["name"] == HOSTILE
    _ansi_free(out)


def test_show_prints_local_iso_times(
    harness: Harness, cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """show prints times as local ISO 8601 (--epoch keeps the stored seconds)."""
    from datetime import datetime

    job = harness.submit("a")
    harness.tick()
    code, out, _ = in_process(cfg, capsys, "show", job)
    shown = json.loads(out)
    assert code == 0 and isinstance(shown["submitted_at"], str)
    assert datetime.fromisoformat(shown["submitted_at"]).timestamp() == pytest.approx(
        harness.now, abs=1.0
    )
    assert all(isinstance(t["at"], str) for t in shown["transitions"])
    code, out, _ = in_process(cfg, capsys, "show", "--epoch", job)
    assert isinstance(json.loads(out)["submitted_at"], float)


def test_status_watch_through_a_pipe_prints_a_block_each_interval(
    harness: Harness, cfg: Path
) -> None:
    job = harness.submit("a")
    harness.tick()
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuspool.cli", "--config", str(cfg), "status", "--watch", "-n",
         "0.2"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:
        if line.startswith(job):
            seen += 1
            if seen == 3:
                break
    proc.kill()
    proc.wait()
    assert seen == 3


def test_retry_after_cancel_shows_the_daemons_reason_again(
    harness: Harness, cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After cancel then retry, the next tick's reason replaces "retry requested"."""
    job = harness.submit("a")
    harness.tick()
    before = harness.job(job).reason
    assert "need 20.0" in before
    for args in (("cancel", job), ("retry", job)):
        code, out, _ = in_process(cfg, capsys, *args, "--json")
        assert code == 0 and json.loads(out)["job_id"] == job
    assert harness.job(job).reason == "retry requested"
    harness.tick()
    assert harness.job(job).reason == before


def test_change_commands_answer_in_json(
    harness: Harness, cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = harness.submit("a")
    harness.tick()
    answers: dict[str, Any] = {}
    for args in (("hold", job), ("release", job), ("cancel", job), ("retry", job), ("drain",),
                 ("resume",)):  # fmt: skip
        code, out, _ = in_process(cfg, capsys, *args, "--json")
        assert code == 0
        answers[args[0]] = json.loads(out)
    assert answers["hold"] == {"job_id": job, "state": "held"}
    assert answers["release"] == {"job_id": job, "state": "queued"}
    assert answers["cancel"] == {"job_id": job, "state": "cancelled", "stopping": False}
    assert answers["retry"] == {"job_id": job, "state": "queued"}
    assert answers["drain"] == {"draining": True, "running": 0}
    assert answers["resume"] == {"draining": False, "was_draining": True, "waiting": 1}


# -- submit ---------------------------------------------------------------------------------------


def _submit(
    cfg: Path, capsys: pytest.CaptureFixture[str], h: Harness, *extra: str, out: str = "o.jsonl"
) -> tuple[int, str, str]:
    return in_process(
        cfg, capsys, "submit", "-i", str(h.data / "in.jsonl"), "-o", str(h.data / out), *extra
    )


def test_submit_checks_paths_and_tokenizer_before_publishing(
    harness: Harness, cfg: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Output taken, a missing input, a mistyped relative tokenizer: refused before anything
    reaches the spool; an existing relative tokenizer folder is made absolute."""
    h = harness
    (h.data / "taken.jsonl").write_text("")
    code, _, err = _submit(cfg, capsys, h, "--tokenizer", "Qwen/x", out="taken.jsonl")
    assert code == 1 and "already exists" in err
    code, _, err = in_process(cfg, capsys, "submit", "-i", str(h.data / "nope.jsonl"), "-o",
                              str(h.data / "o.jsonl"), "--tokenizer", "Qwen/x")  # fmt: skip
    assert code == 1 and "does not exist" in err
    monkeypatch.chdir(tmp_path)
    code, _, err = _submit(cfg, capsys, h, "--tokenizer", "toq")
    assert code == 1 and "'toq' is neither an existing folder nor a hub id" in err
    code, _, err = _submit(cfg, capsys, h, "--tokenizer", "/no/such/tokenizer")
    assert code == 1 and "does not exist" in err
    assert not h.settings.incoming_dir.exists() or list(h.settings.incoming_dir.iterdir()) == []
    (tmp_path / "toq").mkdir()
    code, out, _ = _submit(cfg, capsys, h, "--tokenizer", "toq", "--json")
    assert code == 0
    published = json.loads(Path(json.loads(out)["file"]).read_text())
    assert published["tokenizer"] == str(tmp_path / "toq")
    job_file = h.data / "job.txt"
    job_file.write_text("input = 1\n")
    code, _, err = in_process(cfg, capsys, "submit", str(job_file))
    assert code == 1 and "job files must end in .toml or .json" in err


def test_submit_warns_of_a_threshold_below_the_need_and_a_need_no_gpu_has(
    harness: Harness, cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h = harness
    h.set_gpus([gpu_entry(0, 5, total_gib=16.0)])
    h.tick()
    code, out, err = _submit(cfg, capsys, h, "--tokenizer", "Qwen/x", "--min-free-gib", "0.5",
                             "--json")  # fmt: skip
    result = json.loads(out)
    assert code == 0 and "below the computed need" in err
    code, out, err = _submit(cfg, capsys, h, "--tokenizer", "Qwen/x", "--min-free-gib", "64",
                             "--json", out="o2.jsonl")  # fmt: skip
    assert code == 0 and "more than the largest GPU here has (16.0 GiB)" in err
    assert len(result["warnings"]) == 1
    (h.data / "o3.jsonl.partial").write_text("")
    code, _, err = _submit(cfg, capsys, h, "--tokenizer", "Qwen/x", "--min-free-gib", "auto",
                           out="o3.jsonl")  # fmt: skip
    assert code == 0 and "o3.jsonl.partial is left from an earlier run" in err


def test_a_rejected_job_is_found_by_the_id_submit_printed(
    harness: Harness, cfg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon refuses a job submit published (its output was claimed meanwhile); show ID
    finds it, with the reason."""
    h = harness
    first = h.submit("first", output=str(h.data / "o.jsonl"))
    code, out, _ = _submit(cfg, capsys, h, "--tokenizer", "Qwen/x", "--json")
    assert code == 0
    second = json.loads(out)["job_id"]
    h.tick()
    assert h.job(first) is not None and h.job(second) is None
    code, out, err = in_process(cfg, capsys, "show", second)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["id"] == second and shown["state"] == "rejected"
    assert "o.jsonl" in shown["reason"] and isinstance(shown["rejected_at"], str)
    code, out, _ = in_process(cfg, capsys, "show", second[:6])
    assert code == 0 and json.loads(out)["id"] == second
    for command in ("logs", "cancel"):
        code, _, err = in_process(cfg, capsys, command, second)
        assert code == 1 and f"the daemon refused job {second}: output: " in err
