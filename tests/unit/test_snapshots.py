"""The published snapshots: everyone's jobs anonymised, each user's own in full, only to them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpuspool.views import PRIVATE_JOB_KEYS, SnapshotPublisher, read_snapshot
from tests.conftest import Harness

ALICE, BOB = 4242, 4343


def _submit_as(h: Harness, uid: int, name: str) -> str:
    job = h.submit(name)
    for entry in h.settings.incoming_dir.iterdir():
        if entry.stat().st_uid == os.geteuid():
            os.chown(entry, uid, uid)
    return job


@pytest.fixture
def published(harness: Harness) -> tuple[Harness, Path, dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: job files owned by other users")
    jobs = {"alice": _submit_as(harness, ALICE, "alice-secret")}
    harness.tick()
    jobs["bob"] = _submit_as(harness, BOB, "bob-secret")
    harness.tick()
    path = harness.tmp / "spool" / "status" / "status.json"
    pub = SnapshotPublisher(path)
    pub.publish(harness.daemon.ledger, harness.now, threshold_gib=20.0, stable_polls=3)
    return harness, path, jobs


def test_public_snapshot_names_no_one(published: tuple[Harness, Path, dict[str, str]]) -> None:
    _, path, jobs = published
    text = path.read_text()
    assert jobs["alice"] in text and jobs["bob"] in text
    assert "secret" not in text and str(ALICE) not in text and "in.jsonl" not in text
    for job in json.loads(text)["status"]["jobs"]:
        assert all(job[k] is None for k in PRIVATE_JOB_KEYS)
        assert job["state"] == "queued" and job["threshold_gib"] == 20.0
    assert path.stat().st_mode & 0o777 == 0o640


def test_each_user_file_is_theirs_alone(published: tuple[Harness, Path, dict[str, str]]) -> None:
    _, path, jobs = published
    users = path.parent / "users"
    assert users.stat().st_mode & 0o777 == 0o711
    for uid, who in ((ALICE, "alice"), (BOB, "bob")):
        own = users / f"{uid}.json"
        st = own.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (uid, 0o400)
        data = json.loads(own.read_text())
        assert [j["id"] for j in data["jobs"]] == [jobs[who]]
        assert data["jobs"][0]["name"] == f"{who}-secret"


def test_read_snapshot_merges_the_callers_own_jobs(
    published: tuple[Harness, Path, dict[str, str]],
) -> None:
    _, path, jobs = published
    merged = read_snapshot(path, uid=ALICE)
    assert merged is not None
    by_id = {j["id"]: j for j in merged["status"]["jobs"]}
    assert by_id[jobs["alice"]]["name"] == "alice-secret"
    assert by_id[jobs["alice"]]["waiting_for"]
    assert by_id[jobs["bob"]]["name"] is None and by_id[jobs["bob"]]["input"] is None
    assert merged["status"]["rejections"] == []
    anonymous = read_snapshot(path, uid=99999)  # no file of theirs: everything anonymised
    assert anonymous is not None
    assert all(j["name"] is None for j in anonymous["status"]["jobs"])


def test_user_file_is_rewritten_only_when_their_jobs_change(
    published: tuple[Harness, Path, dict[str, str]],
) -> None:
    h, path, jobs = published
    pub = SnapshotPublisher(path)
    pub.publish(h.daemon.ledger, h.now, threshold_gib=20.0, stable_polls=3)
    alice = path.parent / "users" / f"{ALICE}.json"
    bob = path.parent / "users" / f"{BOB}.json"
    before = (alice.stat().st_ino, bob.stat().st_ino)
    h.daemon.ledger.request_cancel(jobs["bob"], now=h.now + 1)
    pub.publish(h.daemon.ledger, h.now + 2, threshold_gib=20.0, stable_polls=3)
    assert alice.stat().st_ino == before[0]
    assert bob.stat().st_ino != before[1]
    assert json.loads(bob.read_text())["jobs"][0]["state"] == "cancelled"


def test_a_link_planted_at_a_snapshot_name_is_replaced_not_followed(
    published: tuple[Harness, Path, dict[str, str]],
) -> None:
    h, path, _ = published
    target = h.tmp / "target"
    target.write_text("mine")
    own = path.parent / "users" / f"{ALICE}.json"
    own.unlink()
    own.symlink_to(target)
    # A new publisher (a restarted daemon) writes every user's file.
    SnapshotPublisher(path).publish(h.daemon.ledger, h.now + 5, threshold_gib=20.0, stable_polls=3)
    assert target.read_text() == "mine"
    assert not own.is_symlink() and own.stat().st_uid == ALICE
