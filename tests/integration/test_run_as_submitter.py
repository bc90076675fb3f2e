"""A root daemon runs each job as the owner of its job file, never as root (real users)."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuspool import privileges
from tests.conftest import STUB_WORKER, Harness, json_lines
from tests.integration.conftest import TEST_USER, ensure_test_user

SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason=f"no {SYSTEM_PYTHON}"),
]


@pytest.fixture(scope="module")
def user() -> pwd.struct_passwd:
    return ensure_test_user()


@pytest.fixture
def world(user: pwd.struct_passwd) -> Iterator[Harness]:
    """A daemon whose jobs switch users; its files live where any user can reach them (the
    worker is a stand-in run by the system Python, since this venv may sit in /root)."""
    top = Path(tempfile.mkdtemp(prefix="gpuspool-runas-"))
    top.chmod(0o755)
    stub = top / "stub_worker.py"
    shutil.copy(STUB_WORKER, stub)
    stub.chmod(0o755)

    def identity_for(uid: int) -> privileges.Identity:
        return privileges.job_identity(uid, daemon_euid=0, fallback_user=None)

    h = Harness(top, identity_for=identity_for, worker_command=[SYSTEM_PYTHON, str(stub)])
    h.data.chmod(0o755)
    (h.data / "in.jsonl").chmod(0o644)
    out = h.data / "out"
    out.mkdir()
    os.chown(out, user.pw_uid, user.pw_gid)
    h.env["STUB_MODE"] = "ok"
    h.set_gpus([{"uuid": "GPU-sim-0", "name": "sim", "total_mib": 81920.0, "free_mib": 51200.0}])
    yield h
    shutil.rmtree(top, ignore_errors=True)


def _drop(h: Harness, name: str, output: Path, owner: int) -> Path:
    import json

    body = {"input": str(h.data / "in.jsonl"), "output": str(output), "tokenizer": "tiny"}
    path = h.drop_raw(name, json.dumps(body).encode())
    os.chown(path, owner, owner if owner == 0 else pwd.getpwuid(owner).pw_gid)
    return path


def test_job_runs_as_file_owner_and_output_is_theirs(
    world: Harness, user: pwd.struct_passwd
) -> None:
    """The worker's uid is the job file's owner's, and so is the output's owner."""
    output = world.data / "out" / "codes.jsonl"
    _drop(world, "job.json", output, user.pw_uid)
    report = world.tick()
    assert len(report.accepted) == 1, report.rejected
    job = report.accepted[0]
    assert world.job(job).submitter_uid == user.pw_uid
    world.tick()
    world.tick()
    assert world.settle(job) == "done"
    start = next(e for e in json_lines(Path(world.job(job).log_path)) if e["event"] == "start")
    assert start["uid"] == user.pw_uid and start["gid"] == user.pw_gid
    assert output.stat().st_uid == user.pw_uid


def test_root_owned_job_file_is_rejected(world: Harness) -> None:
    """Without a fallback user, a root-owned job file never runs (as root or anyone)."""
    _drop(world, "root.json", world.data / "out" / "r.jsonl", 0)
    report = world.tick()
    assert report.accepted == [] and report.rejected == ["root.json"]
    reason = world.daemon.spool.reason_files()[0].read_text()
    assert "owned by root" in reason and "never run as root" in reason


def test_output_folder_submitter_cannot_write_is_rejected(
    world: Harness, user: pwd.struct_passwd
) -> None:
    """An output folder the submitter may not write is refused with that reason at intake."""
    closed = world.data / "closed"
    closed.mkdir(mode=0o755)  # root's, not the user's
    _drop(world, "nope.json", closed / "codes.jsonl", user.pw_uid)
    report = world.tick()
    assert report.accepted == [] and report.rejected == ["nope.json"]
    reason = world.daemon.spool.reason_files()[0].read_text()
    assert TEST_USER in reason and "write" in reason
