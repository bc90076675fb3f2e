"""One set of probe assertions, run against the file probe (everywhere) and real NVML (GPU hosts).

The ``file:`` source stands in for NVML in CI and the demo; this contract keeps the two honest.
On the GPU machine: ``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuspool.gpus import FileProbe, GpuProbe, NvmlProbe, nvml_diagnostics, write_gpu_file


def _nvml_available() -> bool:
    return nvml_diagnostics().ok and nvml_diagnostics().device_count > 0


needs_gpu = pytest.mark.skipif(not _nvml_available(), reason="no NVIDIA GPU/NVML on this host")


@pytest.fixture(params=["file", pytest.param("nvml", marks=[pytest.mark.gpu, needs_gpu])])
def probe(request: pytest.FixtureRequest, tmp_path: Path) -> GpuProbe:
    if request.param == "nvml":
        return NvmlProbe()
    gpu_file = tmp_path / "gpus.json"
    write_gpu_file(
        gpu_file,
        [
            {"uuid": "GPU-11111111-2222-3333-4444-555555555555", "name": "NVIDIA H100 80GB HBM3",
             "total_mib": 81559.0, "free_mib": 80000.0,
             "processes": [{"pid": 4242, "used_mib": 1024.0}]},
        ],
    )  # fmt: skip
    return FileProbe(gpu_file)


def test_probe_snapshot_shape(probe: GpuProbe) -> None:
    """Every GPU has a GPU- UUID, a name, 0 <= free <= total, and well-formed processes."""
    result = probe.poll()
    assert result.error is None
    assert result.gpus
    for index, gpu in enumerate(result.gpus):
        assert gpu.index == index
        assert gpu.uuid.startswith("GPU-") and len(gpu.uuid) > 10
        assert gpu.name
        assert gpu.healthy and gpu.error is None
        assert gpu.total_mib > 1024
        assert 0 <= gpu.free_mib <= gpu.total_mib
        for proc in gpu.processes:
            assert isinstance(proc.pid, int) and proc.pid > 0
            assert proc.used_mib is None or proc.used_mib >= 0
    probe.close()


def test_probe_polls_are_stable_and_cheap(probe: GpuProbe) -> None:
    """Repeated polls see the same GPUs in the same order, each poll well under a millisecond
    per GPU once initialised."""
    first = probe.poll()
    t0 = time.perf_counter()
    n = 50
    for _ in range(n):
        again = probe.poll()
    per_poll_s = (time.perf_counter() - t0) / n
    assert [g.uuid for g in again.gpus] == [g.uuid for g in first.gpus]
    print(f"poll: {per_poll_s * 1e3:.3f} ms for {len(first.gpus)} GPU(s)")
    assert per_poll_s < 0.05
    probe.close()


@pytest.mark.gpu
@needs_gpu
def test_nvml_sees_memory_a_process_takes() -> None:
    """When a CUDA process allocates 2 GiB, NVML free drops by at least that much; whether its
    pid is listed (it is not in some containers) is printed, since reservations rely on it."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    probe = NvmlProbe()
    before = probe.poll().gpus[0]
    code = (
        "import torch, sys, time; x = torch.empty(2 * 1024**3, dtype=torch.uint8, device='cuda');"
        " torch.cuda.synchronize(); print('ready', flush=True); time.sleep(30)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
        env={"CUDA_VISIBLE_DEVICES": before.uuid, **__import__("os").environ},
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        after = probe.poll().gpus[0]
        dropped = before.free_mib - after.free_mib
        pids = {p.pid: p.used_mib for p in after.processes}
        print(f"free dropped {dropped:.0f} MiB; child pid {child.pid} listed: {child.pid in pids}"
              f" ({pids.get(child.pid)} MiB); processes: {pids}")  # fmt: skip
        assert dropped >= 2048
    finally:
        child.kill()
        child.wait()
        probe.close()


@pytest.mark.gpu
@needs_gpu
def test_nvml_free_matches_cuda_free() -> None:
    """NVML's free memory equals what CUDA reports as free (within 1 %)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    torch.cuda.init()
    free_b, total_b = torch.cuda.mem_get_info(0)
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    probe = NvmlProbe()
    gpus = {g.uuid.removeprefix("GPU-"): g for g in probe.poll().gpus}
    probe.close()
    gpu = gpus[uuid]
    print(f"CUDA free {free_b / 2**20:.0f} MiB total {total_b / 2**20:.0f};"
          f" NVML free {gpu.free_mib:.0f} total {gpu.total_mib:.0f}")  # fmt: skip
    assert abs(free_b / 2**20 - gpu.free_mib) <= 0.01 * gpu.total_mib
    assert abs(total_b / 2**20 - gpu.total_mib) <= 0.01 * gpu.total_mib


def test_diagnostics_report_versions_or_error() -> None:
    """nvml_diagnostics gives versions on a GPU host and a readable error elsewhere."""
    diag = nvml_diagnostics()
    if diag.ok:
        assert diag.driver_version and diag.nvml_version and diag.device_count >= 1
    else:
        assert diag.error
