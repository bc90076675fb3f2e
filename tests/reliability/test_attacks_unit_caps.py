"""The daemon finds a job's processes with only the root powers the shipped unit leaves it.

A process is a job's if it carries the job's id in its environment and runs as the job's user
(``runner._job_processes``): that is how a worker started just before a crash is adopted, how a
host that comes back kills the workers of jobs another host took over (``job_fenced_out``), and
how a finished job's stray children are killed. Another user's ``/proc/PID/environ`` is readable
only with ``CAP_SYS_PTRACE``; run with the unit's ``CapabilityBoundingSet=`` (and nothing more,
as systemd runs it) the daemon must still see them. The tests themselves run as full root, so
nothing else would notice. Real users, real processes, the real bounding set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpuspool.runner import JOB_ID_ENV
from tests.integration.conftest import ensure_test_user
from tests.integration.test_systemd_unit import UNIT, _settings

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs as another user"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv"),
]

#: Run as root within the unit's bounding set: what the daemon finds of job ``argv[1]``.
_FIND = """
import json, sys
from gpuspool.runner import find_job_processes
print(json.dumps(find_job_processes({sys.argv[1]: int(sys.argv[2])})))
"""


def _bounding_set() -> str:
    """The unit's ``CapabilityBoundingSet=`` as ``setpriv --bounding-set`` takes it."""
    caps = _settings(UNIT.read_text())["CapabilityBoundingSet"][0].split()
    return ",".join(["-all", *(f"+{c.lower().removeprefix('cap_')}" for c in caps)])


def test_the_units_capabilities_let_the_daemon_find_a_jobs_processes() -> None:
    user = ensure_test_user()
    job = "unitcaps0001"
    worker = subprocess.Popen(
        ["sleep", "60"],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin", JOB_ID_ENV: job},
        cwd="/",
    )
    try:
        src = str(Path(__file__).resolve().parents[2] / "src")
        found = subprocess.run(
            ["setpriv", "--bounding-set", _bounding_set(), sys.executable, "-c", _FIND, job,
             str(user.pw_uid)],
            capture_output=True, text=True, timeout=60, check=True,
            env={**os.environ, "PYTHONPATH": src},
        )  # fmt: skip
    finally:
        worker.kill()
        worker.wait()
    got = json.loads(found.stdout)
    assert job in got and got[job][0] == worker.pid, (
        f"with the unit's capabilities the daemon does not see job {job}'s process: {got}"
    )
