"""Unit tests of the tick start no process: the daemon gets the scripted FakeRunner."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Harness, fake_runner


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path, make_runner=fake_runner)
