"""The fake ``pynvml`` against real NVML: the same assertions on both (the real one needs a GPU).

What the fault suites rely on: the calls ``NvmlProbe`` makes exist with these signatures and
return these shapes; a bad device index raises ``NVMLError`` with NVML_ERROR_INVALID_ARGUMENT;
calls after ``nvmlShutdown`` raise UNINITIALIZED; error codes render as NVML's own strings; and
the real ``NvmlProbe`` reads a healthy snapshot through either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pynvml
import pytest

from gpuspool.gpus import NvmlProbe
from tests.reliability.fake_pynvml import FakeGpu, FakeNvml

CODES = [
    pynvml.NVML_ERROR_UNINITIALIZED,
    pynvml.NVML_ERROR_INVALID_ARGUMENT,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
    pynvml.NVML_ERROR_GPU_IS_LOST,
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    pynvml.NVML_ERROR_UNKNOWN,
]


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.gpu)])
def nv(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An initialised NVML: the fake (one H100-like GPU) or the real library."""
    mod: Any = FakeNvml([FakeGpu("GPU-00000000-1111-2222-3333-444444444444")])
    if request.param == "real":
        mod = pynvml
    mod.nvmlInit()
    yield mod
    with contextlib.suppress(pynvml.NVMLError):
        mod.nvmlShutdown()


def test_device_queries_have_the_shapes_the_probe_reads(nv: Any) -> None:
    """Count, handle, UUID, name, memory (v1 and v2) and processes, as NvmlProbe uses them."""
    count = nv.nvmlDeviceGetCount()
    assert isinstance(count, int) and count >= 1
    handle = nv.nvmlDeviceGetHandleByIndex(0)
    uuid = nv.nvmlDeviceGetUUID(handle)
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    assert uuid.startswith("GPU-") or uuid.startswith("MIG-")
    name = nv.nvmlDeviceGetName(handle)
    assert isinstance(name, (str, bytes)) and name
    v1 = nv.nvmlDeviceGetMemoryInfo(handle)
    assert isinstance(v1.total, int) and isinstance(v1.free, int)
    assert 0 <= v1.free <= v1.total and v1.used == v1.total - v1.free
    v2 = nv.nvmlDeviceGetMemoryInfo(handle, nv.nvmlMemory_v2)
    assert v2.total == v1.total and 0 <= v2.free <= v2.total
    assert v2.used + v2.reserved + v2.free == v2.total
    for p in nv.nvmlDeviceGetComputeRunningProcesses(handle):
        assert isinstance(p.pid, int)
        assert p.usedGpuMemory is None or isinstance(p.usedGpuMemory, int)


def test_bad_index_raises_invalid_argument(nv: Any) -> None:
    """A device index past the count raises NVMLError_InvalidArgument (code 2)."""
    with pytest.raises(pynvml.NVMLError) as info:
        nv.nvmlDeviceGetHandleByIndex(nv.nvmlDeviceGetCount() + 7)
    assert info.value.value == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert isinstance(info.value, pynvml.NVMLError_InvalidArgument)
    assert str(info.value) == "Invalid Argument"


def test_calls_after_shutdown_raise_uninitialized(nv: Any) -> None:
    """After the last nvmlShutdown, device calls raise UNINITIALIZED; nvmlInit brings them back.

    Init is reference-counted (in NVML and in the fake), and other code in this process may
    hold a reference, so shut down until NVML itself says it is no longer initialised.
    """
    for _ in range(32):
        try:
            nv.nvmlShutdown()
        except pynvml.NVMLError as exc:
            assert exc.value == pynvml.NVML_ERROR_UNINITIALIZED
            break
    with pytest.raises(pynvml.NVMLError) as info:
        nv.nvmlDeviceGetCount()
    assert info.value.value == pynvml.NVML_ERROR_UNINITIALIZED
    nv.nvmlInit()
    assert nv.nvmlDeviceGetCount() >= 1


@pytest.mark.parametrize("code", CODES)
def test_error_strings_are_nvmls(nv: Any, code: int) -> None:
    """Each error code the fault suites inject has a text, as the daemon will log it.

    The daemon logs ``str(NVMLError)``; for some codes the binding's own text differs from the
    library's ``nvmlErrorString`` (code 18 reads "RM has detected an NVML/RM version mismatch."
    in one and "Driver/library version mismatch" in the other on driver 580), so both are only
    required to be non-empty and to name the same code.
    """
    library = nv.nvmlErrorString(code)
    library = library.decode() if isinstance(library, bytes) else library
    logged = str(pynvml.NVMLError(code))
    assert library and logged
    assert pynvml.NVMLError(code).value == code


def test_nvml_probe_reads_a_healthy_snapshot(nv: Any) -> None:
    """The real NvmlProbe over this NVML: every GPU healthy, known UUID, sane memory."""
    probe = NvmlProbe(nvml=nv)
    try:
        result = probe.poll()
    finally:
        probe.close()
    assert result.error is None and result.gpus
    for gpu in result.gpus:
        assert gpu.healthy and gpu.error is None
        assert gpu.uuid.startswith(("GPU-", "MIG-"))
        assert 0 < gpu.free_mib <= gpu.total_mib
