"""One output per unfinished job (``ledger.add`` raising ``OutputClaimed``), tried by a submitter.

The check that another unfinished job writes the same output answers from the root daemon's
ledger. Asked before the job's files are checked as its submitter, it was an oracle: any
submitter could learn whether a path in another user's private folder is the output of one of
their jobs, and that job's id (whose progress the anonymised status then shows). Real users,
the documented spool modes, the real daemon and the stand-in worker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import gpu_entry, wait_until
from tests.integration.conftest import wait_state
from tests.reliability import test_attacks_review as review
from tests.reliability.submitters import SYSTEM_PYTHON, Submitter
from tests.reliability.test_attacks_review import accepted_id, drop

#: The review's fixtures: a world folder every user can reach, two submitters, live daemons.
world, pair, make_daemon = review.world, review.pair, review.make_daemon

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and runs as them"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason=f"no {SYSTEM_PYTHON}"),
]


def _reason(d: Any, stem: str, timeout: float = 60) -> str:
    def find() -> str | None:
        for path in d.spool.reason_files():
            text = path.read_text()
            if text.startswith(f"file: {stem}.json\n"):
                return text
        return None

    return str(wait_until(find, timeout))


def test_a_submitter_learns_nothing_of_another_users_output_in_a_private_folder(
    make_daemon: Any, pair: tuple[Submitter, Submitter]
) -> None:
    attacker, victim = pair
    d = make_daemon()
    d.set_gpus(gpu_entry(0, 5))  # too little free: the victim's job waits, unfinished
    d.start()
    private = victim.data / "private"
    private.mkdir(mode=0o700)
    os.chown(private, victim.uid, victim.user.pw_gid)
    drop(d, victim, "secret", output=str(private / "secret.jsonl"))
    job = wait_until(lambda: accepted_id(d, "secret"), 60)
    assert wait_state(d, job, {"queued"}, timeout=30) == "queued"
    # The attacker guesses the path; it is not theirs to write, so the answer must be the same
    # as for any path they cannot reach.
    drop(d, attacker, "probe", output=str(private / "secret.jsonl"))
    drop(d, attacker, "control", output=str(private / "nothing.jsonl"))
    probe, control = _reason(d, "probe"), _reason(d, "control")
    assert job not in probe, probe
    assert "already the output" not in probe, probe
    assert probe.splitlines()[1] == control.splitlines()[1].replace("nothing", "secret")


@pytest.mark.parametrize("spelling", ["same", "leading //"])
def test_a_submitter_still_hears_of_their_own_job_on_the_same_output(
    make_daemon: Any, pair: tuple[Submitter, Submitter], spelling: str
) -> None:
    """Their own job is named. POSIX keeps a leading ``//`` (and so does ``pathlib``):
    ``//data/out.jsonl`` is the file ``/data/out.jsonl``, and must not let two unfinished jobs
    write it."""
    who = pair[0]
    d = make_daemon()
    d.set_gpus(gpu_entry(0, 5))
    d.start()
    drop(d, who, "first", output=str(who.data / "same.jsonl"))
    job = wait_until(lambda: accepted_id(d, "first"), 60)
    second = str(who.data / "same.jsonl")
    drop(d, who, "second", output=second if spelling == "same" else "/" + second)
    assert f"already the output of job {job}" in _reason(d, "second")


def test_another_users_job_on_a_shared_output_is_not_named(
    make_daemon: Any, pair: tuple[Submitter, Submitter], world: Path
) -> None:
    """In a folder both may write, the second job is still refused, without the other's id."""
    attacker, victim = pair
    shared = world / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)
    d = make_daemon()
    d.set_gpus(gpu_entry(0, 5))
    d.start()
    drop(d, victim, "theirs", output=str(shared / "out.jsonl"))
    job = wait_until(lambda: accepted_id(d, "theirs"), 60)
    drop(d, attacker, "mine", output=str(shared / "out.jsonl"))
    reason = _reason(d, "mine")
    assert "already the output of another user's unfinished job" in reason, reason
    assert job not in reason, reason


@pytest.mark.xfail(
    strict=True,
    reason="outputs are compared as written: the folder's real path is known only to the scanner,"
    " which runs as the submitter; recording it would change the scan's answer and the ledger",
)
def test_an_output_reached_through_a_linked_folder_is_the_same_output(
    make_daemon: Any, pair: tuple[Submitter, Submitter]
) -> None:
    """``DATA/link/out.jsonl``, where ``link`` points at ``DATA``, is the file ``DATA/out.jsonl``:
    two unfinished jobs would write it at once (on one host, with no owner file, both append)."""
    who = pair[0]
    link = who.data / "link"
    link.symlink_to(who.data)
    os.chown(link, who.uid, who.user.pw_gid, follow_symlinks=False)
    d = make_daemon()
    d.set_gpus(gpu_entry(0, 5))
    d.start()
    drop(d, who, "first", output=str(who.data / "same.jsonl"))
    job = wait_until(lambda: accepted_id(d, "first"), 60)
    drop(d, who, "second", output=str(link / "same.jsonl"))
    assert f"already the output of job {job}" in _reason(d, "second", timeout=15)
