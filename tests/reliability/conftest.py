"""Reliability suites: long variants (``slow``) and GPU contract tests (``gpu``) are opt-in.

By default a ``slow`` test here is skipped unless the ``-m`` expression names ``slow`` (e.g.
``pytest -m slow tests/reliability``) or ``GPUSPOOL_SLOW=1`` is set; a ``gpu`` test is skipped
unless NVML initialises. So a plain ``pytest`` (CI) runs only the short versions.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import STUB_WORKER, gpu_entry
from tests.integration.conftest import TEST_USER, LiveDaemon
from tests.reliability.submitters import (
    SECOND_USER,
    SYSTEM_PYTHON,
    Submitter,
    _ensure_user,
    _lay_out,
)

HERE = Path(__file__).resolve().parent


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    try:
        return bool(pynvml.nvmlDeviceGetCount())
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [i for i in items if HERE in Path(str(i.fspath)).resolve().parents]
    markexpr = config.getoption("markexpr", "") or ""
    want_slow = "slow" in markexpr and "not slow" not in markexpr
    if not (want_slow or os.environ.get("GPUSPOOL_SLOW") == "1"):
        skip = pytest.mark.skip(reason="long variant: run with -m slow (or GPUSPOOL_SLOW=1)")
        for item in mine:
            if "slow" in item.keywords:
                item.add_marker(skip)
    gpu_items = [i for i in mine if "gpu" in i.keywords]
    if gpu_items and not _nvml_works():
        skip = pytest.mark.skip(reason="needs a GPU and NVML")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def audio_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short synthetic dataset (24 clips, 1–5 s)."""
    from gpuspool.extract.synth import synth_dataset

    return synth_dataset(tmp_path_factory.mktemp("data"), 24, min_s=1.0, max_s=5.0, seed=21)


@pytest.fixture(scope="session")
def reference_output(
    tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, audio_input: Path
) -> bytes:
    """The real worker's output for one uninterrupted run, with the daemon's arguments."""
    from tests.reliability.crashkill import reference_run

    return reference_run(audio_input, tokenizer_dir, tmp_path_factory.mktemp("ref") / "ref.jsonl")


@pytest.fixture
def ram_dir(tmp_path: Path) -> Iterator[Path]:
    """A scratch folder in RAM where there is one (suites that fsync thousands of small files)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="gpuspool-test-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A scratch folder every user may enter (pytest's own tmp folders are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="gpuspool-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- real submitters (the attack tests) ----------------------------------------------------------


@pytest.fixture
def world() -> Iterator[Path]:
    """A folder every user can enter (pytest's own tmp is private to root)."""
    top = Path(tempfile.mkdtemp(prefix="gpuspool-ops-", dir="/tmp"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def live(world: Path) -> Iterator[LiveDaemon]:
    """The real daemon on the documented folder modes; jobs run a stand-in worker (system
    Python) as their submitters."""
    stub = world / "stub_worker.py"
    shutil.copy(STUB_WORKER, stub)
    stub.chmod(0o755)
    d = LiveDaemon(world, worker_command=[SYSTEM_PYTHON, str(stub)], worker_extra_args=[])
    _lay_out(d)
    d.set_gpus(gpu_entry(0, 50))
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


@pytest.fixture(scope="module")
def users() -> tuple[pwd.struct_passwd, pwd.struct_passwd]:
    return _ensure_user(TEST_USER), _ensure_user(SECOND_USER)


@pytest.fixture
def alice(users: tuple[pwd.struct_passwd, pwd.struct_passwd], world: Path) -> Submitter:
    s = Submitter(users[0], world)
    probe = s.run(Path("/"), "import gpuspool.cli", cli=False)
    if probe.returncode != 0:  # pragma: no cover - depends on where the venv lives
        pytest.skip(f"the system Python cannot import gpuspool as {s.name}: {probe.stderr}")
    return s


@pytest.fixture
def bob(users: tuple[pwd.struct_passwd, pwd.struct_passwd], world: Path) -> Submitter:
    return Submitter(users[1], world)
