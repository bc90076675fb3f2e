"""Issue rows 9, 13, 15 (the ledger) and 16 against the real daemon, with real users.

- 9: ``gpuspool submit`` as an ordinary member of ``gpuspool-submit`` (the folder modes of
  deploy/gpuspool.tmpfiles.conf) publishes the job and leaves nothing in ``tmp/``, also when it
  fails;
- 13: two submitters: each sees the other's jobs only anonymised, reads their own jobs, logs and
  rejection reasons, and nothing of the other's;
- 15: a corrupt ledger stops the daemon at start-up (exit 2, one line naming the file) without
  rejecting anything; a deleted one is created anew;
- 16: a second daemon on the same ``state_dir`` exits 2 naming the first one's pid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.integration.conftest import LiveDaemon, wait_state
from tests.reliability.submitters import SYSTEM_PYTHON, Submitter

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and runs as them"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason=f"no {SYSTEM_PYTHON}"),
]


# -- row 9 ----------------------------------------------------------------------------------


def test_row9_submit_as_an_ordinary_user(live: LiveDaemon, alice: Submitter) -> None:
    """``gpuspool submit`` as a member of gpuspool-submit publishes the job (which then runs as
    them) and leaves nothing in tmp/; a failed publication removes its file from tmp/."""
    live.start()
    job = alice.submit(live.config, "mine")
    assert wait_state(live, job, {"done", "failed"}, timeout=60) == "done"
    rec = live.job(job)
    assert rec.submitter_uid == alice.uid
    assert (alice.data / "mine.jsonl").stat().st_uid == alice.uid
    assert os.listdir(live.tmp / "spool" / "tmp") == []

    incoming = live.tmp / "spool" / "incoming"
    incoming.chmod(0o1710)  # the rename into incoming/ now fails
    done = alice.run(live.config, "submit", "--input", str(alice.data / "in.jsonl"), "--output",
                     str(alice.data / "two.jsonl"), "--tokenizer", "Qwen/tiny")  # fmt: skip
    incoming.chmod(0o1730)
    assert done.returncode == 1 and "cannot write into the spool" in done.stderr
    assert "Traceback" not in done.stderr
    assert os.listdir(live.tmp / "spool" / "tmp") == []
    assert live.stop() == 0


# -- row 13 ---------------------------------------------------------------------------------


def _status(who: Submitter, cfg: Path) -> dict[str, Any]:
    done = who.run(cfg, "status", "--json")
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_row13_submitters_see_each_other_only_anonymised(
    live: LiveDaemon, alice: Submitter, bob: Submitter
) -> None:
    live.start()
    a_job = alice.submit(live.config, "alices-secret-name")
    b_job = bob.submit(live.config, "bobs-secret-name")
    for job in (a_job, b_job):
        assert wait_state(live, job, {"done", "failed"}, timeout=60) == "done"
    snapshot = live.tmp / "spool" / "status" / "status.json"

    def published() -> bool:
        mine = _status(alice, live.config)
        return any(j["id"] == b_job and j["state"] == "done" for j in mine["jobs"])

    wait_until(published, timeout=20, step=0.3)

    # The public snapshot: every job, nobody's name, paths or uid.
    text = snapshot.read_text()
    assert a_job in text and b_job in text
    for secret in ("alices-secret-name", "bobs-secret-name", str(alice.data), str(bob.data)):
        assert secret not in text
    assert alice.can_read(snapshot) and bob.can_read(snapshot)
    public = {j["id"]: j for j in json.loads(text)["status"]["jobs"]}
    assert public[b_job]["submitter_uid"] is None and public[b_job]["output"] is None
    assert public[b_job]["progress"]["lines_done"] == 4 and public[b_job]["gpu_uuid"]

    # What alice sees: her job in full, bob's anonymised.
    seen = {j["id"]: j for j in _status(alice, live.config)["jobs"]}
    assert seen[a_job]["name"] == "alices-secret-name"
    assert seen[a_job]["output"] == str(alice.data / "alices-secret-name.jsonl")
    assert seen[b_job]["name"] is None and seen[b_job]["output"] is None
    shown = alice.run(live.config, "show", a_job[:8])
    assert shown.returncode == 0 and json.loads(shown.stdout)["name"] == "alices-secret-name"
    other = alice.run(live.config, "show", b_job)
    assert other.returncode == 1 and "bobs-secret-name" not in other.stdout + other.stderr

    # Logs: her own, not his (not even by path).
    logs = alice.run(live.config, "logs", a_job, "--json")
    assert logs.returncode == 0, logs.stderr
    assert any(json.loads(line).get("event") == "summary" for line in logs.stdout.splitlines())
    assert alice.run(live.config, "logs", b_job).returncode == 1
    assert not alice.can_read(Path(live.job(b_job).log_path))
    assert not alice.can_read(live.tmp / "spool" / "status" / "users" / f"{bob.uid}.json")
    assert not alice.can_read(live.ledger_path)
    assert bob.can_read(Path(live.job(b_job).log_path))

    # Rejection reasons: each reads their own, by the name their status gives.
    bad = alice.data / "bad.json"
    bad.write_text("{not json")
    os.chown(bad, alice.uid, alice.user.pw_gid)
    moved = alice.run(
        live.config,
        f"import os; os.rename({str(bad)!r}, {str(live.tmp / 'spool/incoming/bad.json')!r})",
        cli=False,
    )
    assert moved.returncode == 0, moved.stderr

    def rejections() -> list[dict[str, Any]]:
        return list(_status(alice, live.config).get("rejections") or [])

    found = wait_until(rejections, timeout=20, step=0.3)
    assert "not valid JSON" in found[0]["text"]
    reason = Path(found[0]["reason_file"])
    assert alice.can_read(reason) and not bob.can_read(reason)
    assert _status(bob, live.config).get("rejections") == []
    assert live.stop() == 0


# -- row 15 (the ledger) -------------------------------------------------------------------


def test_row15_corrupt_ledger_stops_the_daemon_deleted_one_is_created_anew(
    live: LiveDaemon, alice: Submitter
) -> None:
    live.start()
    first = alice.submit(live.config, "before")
    assert wait_state(live, first, {"done", "failed"}, timeout=60) == "done"
    assert live.stop() == 0

    # Corrupt: refuses to start, says why in one line, rejects nothing.
    with open(live.ledger_path, "r+b") as f:
        f.write(b"this is not an SQLite database" * 4)
    waiting = alice.submit(live.config, "waiting")
    live.start(wait=False)
    assert live.proc is not None
    assert live.proc.wait(timeout=60) == 2
    (line,) = [e for e in live.events() if e["event"] == "daemon_cannot_start"]
    assert str(live.ledger_path) in line["error"] and "\n" not in line["error"]
    assert os.listdir(live.tmp / "spool" / "rejected") == []
    assert len(os.listdir(live.tmp / "spool" / "incoming")) == 1

    # Deleted: a new ledger, and the waiting job is taken in and runs.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{live.ledger_path}{suffix}").unlink(missing_ok=True)
    _restart(live)
    assert wait_state(live, waiting, {"done", "failed"}, timeout=60) == "done"
    assert live.ledger_path.stat().st_mode & 0o777 == 0o600
    assert live.stop() == 0


# -- row 16 ---------------------------------------------------------------------------------


def test_row16_second_daemon_on_one_state_dir_exits_2_naming_the_first(
    live: LiveDaemon, alice: Submitter
) -> None:
    live.start()
    assert live.proc is not None
    second = subprocess.run(
        [sys.executable, "-m", "gpuspool.cli", "--config", str(live.config), "daemon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert f"another gpuspool daemon (pid {live.proc.pid})" in second.stdout + second.stderr
    # The first one is unharmed and runs a job exactly once.
    assert live.proc.poll() is None
    job = alice.submit(live.config, "once")
    assert wait_state(live, job, {"done", "failed"}, timeout=60) == "done"
    starts = [e for e in live.events() if e["event"] == "job_started" and e["job_id"] == job]
    assert len(starts) == 1
    assert live.stop() == 0
    # Released at exit: the next daemon starts.
    _restart(live)
    assert live.stop() == 0


def _restart(live: LiveDaemon) -> None:
    """Start the daemon again and wait for *its* start (the log holds the earlier ones')."""
    before = sum(e["event"] == "daemon_started" for e in live.events())
    live.start(wait=False)
    wait_until(
        lambda: sum(e["event"] == "daemon_started" for e in live.events()) > before, timeout=30
    )
