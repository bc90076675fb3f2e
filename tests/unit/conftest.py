"""Unit-test fixtures: the tick starts no process (the daemon gets the scripted FakeRunner), and
the PostgreSQL test server for the tests that run on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Harness, fake_runner
from tests.pgserver import pg_server, pg_url  # noqa: F401


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path, make_runner=fake_runner)


@pytest.fixture
def plain(tmp_path: Path) -> Harness:
    """A harness whose daemon starts each worker with its GPU (``prestart`` off)."""
    return Harness(tmp_path, make_runner=fake_runner, prestart=False)
