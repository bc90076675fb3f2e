"""A fault-injecting stand-in for the ``pynvml`` module, to drive the real ``NvmlProbe``.

It has the functions ``NvmlProbe`` calls, with real signatures, and raises the real
``pynvml.NVMLError`` (so ``NVMLError(15)`` is a ``NVMLError_GPUIsLost`` whose text is NVML's
"GPU is lost") with NVML's own error codes. Faults are scripted per call:

    nv = FakeNvml([FakeGpu("GPU-a", total_mib=81920, free_mib=40000)])
    nv.fail_init = nv.NVML_ERROR_LIB_RM_VERSION_MISMATCH   # every nvmlInit fails so
    nv.gpus[0].fault = nv.NVML_ERROR_GPU_IS_LOST           # every call on that GPU fails so
    nv.fail_count = nv.NVML_ERROR_UNKNOWN                  # nvmlDeviceGetCount fails

``tests/reliability/test_nvml_contract.py`` checks these behaviours against the real library on a
GPU machine. Like real NVML, init is reference-counted, and calls other than ``nvmlInit`` fail
with UNINITIALIZED before a successful init or after the last ``nvmlShutdown``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

MIB = 1024 * 1024


@dataclass
class FakeGpu:
    uuid: str
    total_mib: float = 81559.0
    free_mib: float = 81079.0
    name: str = "NVIDIA H100 80GB HBM3"
    #: An NVML error code every call on this GPU fails with (None: healthy).
    fault: int | None = None
    #: Fault only for the memory query (the handle, UUID and name still work).
    memory_fault: int | None = None
    processes: list[tuple[int, float | None]] = field(default_factory=list)


@dataclass(frozen=True)
class _Handle:
    index: int


class FakeNvml:
    """The ``pynvml`` surface ``NvmlProbe`` uses; hand it in as ``NvmlProbe(nvml=fake)``."""

    NVMLError = pynvml.NVMLError
    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus
        self.fail_init: int | None = None
        self.fail_count: int | None = None
        self.refs = 0
        self.calls: dict[str, int] = {}
        self.errors_raised = 0

    def __getattr__(self, name: str) -> Any:
        if name.startswith("NVML_"):  # the constants: the real module's values
            return getattr(pynvml, name)
        raise AttributeError(name)

    def _raise(self, code: int) -> None:
        self.errors_raised += 1
        raise pynvml.NVMLError(code)

    def _enter(self, fn: str) -> None:
        self.calls[fn] = self.calls.get(fn, 0) + 1
        if self.refs <= 0:
            self._raise(pynvml.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: Any) -> FakeGpu:
        if not isinstance(handle, _Handle) or not 0 <= handle.index < len(self.gpus):
            self._raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[handle.index]
        if gpu.fault is not None:
            self._raise(gpu.fault)
        return gpu

    # -- the API -------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] = self.calls.get("nvmlInit", 0) + 1
        if self.fail_init is not None:
            self._raise(self.fail_init)
        self.refs += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.refs -= 1

    def reset(self) -> None:
        """As after a driver reload: every earlier init is void."""
        self.refs = 0

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        if self.fail_count is not None:
            self._raise(self.fail_count)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            self._raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        handle = _Handle(index)
        self._gpu(handle)
        return handle

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        self._enter("nvmlDeviceGetUUID")
        return self._gpu(handle).uuid

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        self._enter("nvmlDeviceGetName")
        return self._gpu(handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: int | None = None) -> Any:
        self._enter("nvmlDeviceGetMemoryInfo")
        gpu = self._gpu(handle)
        if gpu.memory_fault is not None:
            self._raise(gpu.memory_fault)
        total = int(gpu.total_mib * MIB)
        free = int(gpu.free_mib * MIB)
        if version is None:
            return SimpleNamespace(total=total, free=free, used=total - free)
        reserved = 480 * MIB
        return SimpleNamespace(
            version=version, total=total, free=free, used=total - free - reserved,
            reserved=reserved,
        )  # fmt: skip

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[Any]:
        self._enter("nvmlDeviceGetComputeRunningProcesses")
        gpu = self._gpu(handle)
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=None if used is None else int(used * MIB))
            for pid, used in gpu.processes
        ]

    def nvmlErrorString(self, code: int) -> str:
        return str(pynvml.NVMLError(code))
