"""NVML faults through the real ``NvmlProbe`` (driven by ``fake_pynvml``) into the daemon's tick:
the daemon stays up, never places on a GPU whose state is unknown, says why, and recovers."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pynvml
import pytest
from structlog.testing import capture_logs

from gpuspool.gpus import NvmlProbe
from gpuspool.runner import Exit, Launch, Started
from tests.conftest import Harness
from tests.reliability.fake_pynvml import FakeGpu, FakeNvml

GIB = 1024.0


class RandomRunner:
    """Job processes that exist only on paper: each ends (exit 0, output written) at random;
    a prestarted one (``prestart``) only once its go line came."""

    def __init__(self, rng: random.Random, finish_p: float = 0.2) -> None:
        self.rng = rng
        self.finish_p = finish_p
        self.live: dict[int, Path] = {}
        self.gated: set[int] = set()
        self.starts: list[tuple[int, Any]] = []
        self._next = 10_000

    def start(self, launch: Launch) -> Started:
        self._next += 1
        argv = list(launch.argv)
        self.live[self._next] = Path(argv[argv.index("--output") + 1])
        if launch.gated:
            self.gated.add(self._next)
        return Started(self._next, 1.0)

    def open_gate(self, pid: int, message: bytes) -> bool:
        if pid not in self.gated:
            return False
        self.gated.discard(pid)
        return True

    def close_gate(self, pid: int) -> None:
        self.gated.discard(pid)

    def poll(self, pid: int, pid_start: float | None) -> Exit | None:
        if pid in self.gated:
            return None
        if pid in self.live and self.rng.random() < self.finish_p:
            self.live.pop(pid).write_text("{}\n")
            return Exit(0)
        return None if pid in self.live else Exit(None)

    def terminate(self, pid: int, pid_start: float | None) -> bool:
        return self.kill(pid, pid_start)

    def kill(self, pid: int, pid_start: float | None) -> bool:
        self.gated.discard(pid)
        return self.live.pop(pid, None) is not None

    def is_alive(self, pid: int | None, pid_start: float | None) -> bool:
        return pid in self.live

    def find_job_processes(self, uids: Mapping[str, int]) -> dict[str, tuple[int, float]]:
        return {}

    def kill_leftovers(self, uids: Mapping[str, int]) -> dict[str, list[int]]:
        return {}

    def remove_scratch(self, path: Path) -> None:
        pass


def _events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "Driver Not Loaded"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "RM has detected an NVML/RM version mismatch."),
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML Shared Library Not Found"),
        (pynvml.NVML_ERROR_UNKNOWN, "Unknown Error"),
    ],
)
def test_init_failure_at_start_waits_says_why_and_recovers(
    harness: Harness, code: int, text: str
) -> None:
    """nvmlInit fails from the start: ticks go on, the job waits with NVML's reason, logged once;
    when init succeeds the job starts after stable_polls good polls."""
    harness.env["STUB_MODE"] = "sleep"
    fake = FakeNvml([FakeGpu("GPU-a", free_mib=70 * GIB)])
    fake.fail_init = code
    harness.daemon.probe = NvmlProbe(nvml=fake)
    job = harness.submit("a")
    with capture_logs() as logs:
        for _ in range(6):
            report = harness.tick()
            assert report.probe_error is not None and text in report.probe_error
        assert harness.state(job) == "queued"
        assert harness.job(job).reason.startswith(f"no GPU readings: NVML init failed: {text}")
        assert len(_events(logs, "gpu_probe_error")) == 1
        fake.fail_init = None
        harness.tick()
        harness.tick()
        assert harness.state(job) == "queued"
        harness.tick()
        assert harness.state(job) == "running"
        assert len(_events(logs, "gpu_probe_recovered")) == 1
    assert fake.calls["nvmlInit"] == 8  # at construction, then once per tick until it works
    harness.daemon.stop_all(harness.now)
    harness.settle(job)


def test_gpu_lost_mid_job_is_never_placed_on_and_recovers(harness: Harness) -> None:
    """GPU 0 is lost while a job runs on it: the job is left to its worker, the GPU is unknown,
    nothing else starts there (the waiting job says why), and it is used again once it is back."""
    harness.env["STUB_MODE"] = "sleep"
    fake = FakeNvml([FakeGpu("GPU-a", free_mib=75 * GIB), FakeGpu("GPU-b", free_mib=5 * GIB)])
    harness.daemon.probe = NvmlProbe(nvml=fake)
    first = harness.submit("first")
    for _ in range(3):
        harness.tick()
    assert harness.state(first) == "running" and harness.job(first).gpu_uuid == "GPU-a"
    fake.gpus[0].fault = pynvml.NVML_ERROR_GPU_IS_LOST
    second = harness.submit("second", gpus=[0])
    with capture_logs() as logs:
        for _ in range(8):
            report = harness.tick()
            assert report.started == []
        assert harness.state(first) == "running"  # not killed by the daemon
        reason = harness.job(second).reason
        assert reason == "GPU 0 (GPU-a): state unknown (GPU is lost)", reason
        lost = _events(logs, "gpu_error")
        assert len(lost) == 1 and lost[0]["error"] == "GPU is lost"
        fake.gpus[0].fault = None
        fake.gpus[0].free_mib = 50 * GIB
        harness.tick()
        harness.tick()
        assert harness.state(second) == "queued"
        harness.tick()
        assert harness.state(second) == "running" and harness.job(second).gpu_uuid == "GPU-a"
        assert _events(logs, "gpu_recovered")
    harness.daemon.stop_all(harness.now)
    harness.settle(first)
    harness.settle(second)


def test_gpu_allow_listed_by_uuid_that_is_lost_is_unknown_not_missing(harness: Harness) -> None:
    """A job allowed only on GPU-a, while GPU-a's handle cannot be had (lost): it waits because
    the state of GPU-a is unknown, not because GPU-a "does not exist on this host"."""
    fake = FakeNvml([FakeGpu("GPU-a", free_mib=75 * GIB)])
    harness.daemon.probe = NvmlProbe(nvml=fake)
    harness.tick()
    fake.gpus[0].fault = pynvml.NVML_ERROR_GPU_IS_LOST
    job = harness.submit("a", gpus=["GPU-a"])
    for _ in range(4):
        assert harness.tick().started == []
    reason = harness.job(job).reason
    assert "GPU is lost" in reason and "exist" not in reason, reason


@pytest.mark.parametrize("where", ["memory", "count"])
def test_unknown_errors_flapping_never_place(harness: Harness, where: str) -> None:
    """UNKNOWN on every other poll (one GPU's memory query, or the device count): a job that
    needs 3 stable polls never starts while it flaps, and the reason names the error."""
    fake = FakeNvml([FakeGpu("GPU-a", free_mib=75 * GIB)])
    harness.daemon.probe = NvmlProbe(nvml=fake)
    job = harness.submit("a")
    reasons = set()
    for i in range(20):
        bad = pynvml.NVML_ERROR_UNKNOWN if i % 2 else None
        if where == "memory":
            fake.gpus[0].memory_fault = bad
        else:
            fake.fail_count = bad
        assert harness.tick().started == []
        reasons.add(harness.job(job).reason)
    expected = (
        "GPU 0 (GPU-a): state unknown (Unknown Error)"
        if where == "memory"
        else "no GPU readings: nvmlDeviceGetCount failed: Unknown Error"
    )
    assert expected in reasons, reasons
    assert harness.state(job) == "queued"


def test_fault_storm_never_places_on_unknown_or_short_gpus(harness: Harness) -> None:
    """Seeded: 1,500 polls of 4 GPUs with random count/per-GPU faults (GPU_IS_LOST, UNKNOWN,
    LIB_RM_VERSION_MISMATCH) and free memory swinging around the 20 GiB threshold, 150 jobs.
    The tick never raises; every start was on a GPU healthy and above the threshold at each of
    the last stable_polls polls; after the storm every job finishes."""
    rng = random.Random(7)
    runner = RandomRunner(rng)
    harness.daemon.runner = runner  # type: ignore[assignment]
    gpus = [FakeGpu(f"GPU-{i}", free_mib=30 * GIB) for i in range(4)]
    fake = FakeNvml(gpus)
    harness.daemon.probe = NvmlProbe(nvml=fake)
    codes = [pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_UNKNOWN,
             pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH]  # fmt: skip
    jobs = [harness.submit(f"j{i}") for i in range(150)]
    stable = harness.settings.stable_polls
    history: list[dict[str, bool]] = []  # per poll: GPU uuid → healthy and >= threshold
    faults = 0
    for _ in range(1500):
        fake.fail_count = pynvml.NVML_ERROR_UNKNOWN if rng.random() < 0.03 else None
        for g in gpus:
            g.fault = rng.choice(codes) if rng.random() < 0.08 else None
            g.memory_fault = pynvml.NVML_ERROR_UNKNOWN if rng.random() < 0.05 else None
            g.free_mib = rng.choice([19.5, 20.5, 25.0, 60.0]) * GIB
        faults += fake.fail_count is not None
        faults += sum((g.fault is not None) + (g.memory_fault is not None) for g in gpus)
        probe_ok = fake.fail_count is None
        history.append(
            {
                g.uuid: probe_ok
                and g.fault is None
                and g.memory_fault is None
                and g.free_mib >= 20 * GIB
                for g in gpus
            }
        )
        report = harness.tick()
        for _, uuid in report.started:
            recent = history[-stable:]
            assert len(recent) == stable and all(h.get(uuid) for h in recent), (uuid, recent)
    for g in gpus:
        g.fault = g.memory_fault = None
        g.free_mib = 80 * GIB
    fake.fail_count = None
    for _ in range(2000):
        harness.tick()
        if all(harness.state(j) == "done" for j in jobs):
            break
    assert all(harness.state(j) == "done" for j in jobs)
    print(f"NVML fault storm: {faults} faults injected over 1,500 polls, {fake.errors_raised}"
          f" NVML errors raised, {len(jobs)} jobs done, 0 placements on unknown GPUs")  # fmt: skip
    assert faults > 500


def test_probe_initialises_again_after_nvml_forgets_it() -> None:
    """If NVML answers UNINITIALIZED mid-run (a driver reload), the probe calls nvmlInit again."""
    fake = FakeNvml([FakeGpu("GPU-a", free_mib=70 * GIB)])
    probe = NvmlProbe(nvml=fake)
    assert probe.poll().gpus[0].uuid == "GPU-a"
    fake.reset()
    lost = probe.poll()
    assert lost.gpus == () and lost.error and "nvmlDeviceGetCount failed" in lost.error
    inits = fake.calls["nvmlInit"]
    back = probe.poll()
    assert fake.calls["nvmlInit"] == inits + 1
    assert back.error is None and back.gpus[0].uuid == "GPU-a"
