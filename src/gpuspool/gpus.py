"""GPU probes: what each GPU shows at one poll. The only module that imports pynvml.

``NvmlProbe`` reads NVML (package ``nvidia-ml-py``), initialised once; every NVML call goes
through ``_call`` so a per-GPU error makes that GPU "unknown" (never "0 used"). ``FileProbe``
reads a JSON list of GPUs at every poll, so tests and the demo can change what the GPUs show by
rewriting the file. Both return a ``ProbeResult``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from gpuspool.models import GpuProcess, GpuSnapshot

T = TypeVar("T")
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One poll: the GPUs seen, and an error that hid all of them (e.g. NVML init failed)."""

    gpus: tuple[GpuSnapshot, ...]
    error: str | None = None


class GpuProbe(Protocol):
    """What the daemon needs of a GPU source."""

    def poll(self) -> ProbeResult: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class NvmlDiagnostics:
    """What ``gpuspool doctor`` reports about NVML and the driver."""

    ok: bool
    driver_version: str | None = None
    nvml_version: str | None = None
    device_count: int = 0
    error: str | None = None
    version_mismatch: bool = False
    devices: list[str] = field(default_factory=list)


def _nvml_error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class NvmlProbe:
    """The real GPUs, through NVML. ``nvmlInit`` runs once; a failure is retried at each poll.

    ``nvml`` is the module to call (default: ``pynvml``); tests hand in a fault-injecting stand-in
    with the same surface instead of patching ``sys.modules``.
    """

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self._nvml: Any = nvml
        self._initialised = False
        self._init_error: str | None = None
        #: (uuid, name) of each index at its last good poll: a GPU that fails later is still
        #: named by its UUID (unknown, never placed on) rather than appearing as a new GPU.
        self._seen: dict[int, tuple[str, str]] = {}
        self._try_init()

    def _try_init(self) -> None:
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            self._init_error = f"NVML init failed: {_nvml_error_text(exc)}"
            self._initialised = False
        else:
            self._init_error = None
            self._initialised = True

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """The one choke point for NVML calls (errors surface as ``NVMLError``)."""
        return fn(*args)

    def _memory(self, handle: Any) -> tuple[float, float]:
        nv = self._nvml
        try:
            info = self._call(nv.nvmlDeviceGetMemoryInfo, handle, nv.nvmlMemory_v2)
        except (nv.NVMLError, TypeError, AttributeError):
            info = self._call(nv.nvmlDeviceGetMemoryInfo, handle)
        return info.total / MIB, info.free / MIB

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        nv = self._nvml
        try:
            procs = self._call(nv.nvmlDeviceGetComputeRunningProcesses, handle)
        except nv.NVMLError:
            return ()
        out = []
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            out.append(GpuProcess(pid=int(p.pid), used_mib=None if used is None else used / MIB))
        return tuple(out)

    def poll(self) -> ProbeResult:
        nv = self._nvml
        if not self._initialised:
            self._try_init()
            if not self._initialised:
                return ProbeResult((), self._init_error)
        try:
            count = self._call(nv.nvmlDeviceGetCount)
        except nv.NVMLError as exc:
            if getattr(exc, "value", None) == nv.NVML_ERROR_UNINITIALIZED:
                self._initialised = False  # e.g. the driver was reloaded: init again next poll
            return ProbeResult((), f"nvmlDeviceGetCount failed: {_nvml_error_text(exc)}")
        gpus: list[GpuSnapshot] = []
        for index in range(count):
            uuid, name = self._seen.get(index, (f"index-{index}", "?"))
            try:
                handle = self._call(nv.nvmlDeviceGetHandleByIndex, index)
                uuid = _str(self._call(nv.nvmlDeviceGetUUID, handle))
                name = _str(self._call(nv.nvmlDeviceGetName, handle))
                total, free = self._memory(handle)
            except nv.NVMLError as exc:
                gpus.append(
                    GpuSnapshot(
                        index=index,
                        uuid=uuid,
                        name=name,
                        total_mib=0.0,
                        free_mib=0.0,
                        healthy=False,
                        error=_nvml_error_text(exc),
                    )
                )
                continue
            self._seen[index] = (uuid, name)
            gpus.append(
                GpuSnapshot(
                    index=index,
                    uuid=uuid,
                    name=name,
                    total_mib=total,
                    free_mib=free,
                    processes=self._processes(handle),
                )
            )
        return ProbeResult(tuple(gpus))

    def close(self) -> None:
        if self._initialised:
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
            self._initialised = False


def _str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class FileProbe:
    """Simulated GPUs: a JSON list re-read at every poll.

    Each entry: ``uuid``, ``name``, ``total_mib``, ``free_mib``, optional ``healthy`` (default
    true), ``error`` (a string makes the GPU unhealthy) and ``processes``
    (``[{"pid": 123, "used_mib": 500}]``). A missing or malformed file is a probe error.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def poll(self) -> ProbeResult:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return ProbeResult((), f"cannot read GPU file {self.path}: {exc}")
        if not isinstance(raw, list):
            return ProbeResult((), f"{self.path}: expected a JSON list of GPUs")
        gpus = []
        for index, entry in enumerate(raw):
            try:
                gpus.append(_snapshot_from_dict(index, entry))
            except (KeyError, TypeError, ValueError) as exc:
                gpus.append(
                    GpuSnapshot(
                        index=index,
                        uuid=f"index-{index}",
                        name="?",
                        total_mib=0.0,
                        free_mib=0.0,
                        healthy=False,
                        error=f"bad GPU entry {index}: {exc}",
                    )
                )
        return ProbeResult(tuple(gpus))

    def close(self) -> None:
        pass


def _snapshot_from_dict(index: int, entry: Any) -> GpuSnapshot:
    if not isinstance(entry, dict):
        raise TypeError("entry is not an object")
    error = entry.get("error")
    healthy = bool(entry.get("healthy", True)) and error is None
    procs = tuple(
        GpuProcess(
            pid=int(p["pid"]), used_mib=None if p.get("used_mib") is None else float(p["used_mib"])
        )
        for p in entry.get("processes", [])
    )
    return GpuSnapshot(
        index=index,
        uuid=str(entry["uuid"]),
        name=str(entry.get("name", "simulated GPU")),
        total_mib=float(entry["total_mib"]),
        free_mib=float(entry["free_mib"]),
        healthy=healthy,
        error=None if error is None else str(error),
        processes=procs,
    )


def write_gpu_file(path: Path, gpus: list[dict[str, Any]]) -> None:
    """Atomically rewrite a ``file:`` GPU source (tests and the demo drive GPUs with it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(gpus), encoding="utf-8")
    os.replace(tmp, path)


def make_probe(source: str) -> GpuProbe:
    """The probe named by the ``gpu_source`` setting."""
    if source == "nvml":
        return NvmlProbe()
    if source.startswith("file:"):
        return FileProbe(Path(source[len("file:") :]))
    raise ValueError(f'gpu_source must be "nvml" or "file:PATH", got {source!r}')


def nvml_diagnostics() -> NvmlDiagnostics:
    """Initialise NVML once and report driver/library versions and devices, or the error."""
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - a base dependency
        return NvmlDiagnostics(ok=False, error=f"nvidia-ml-py is not installed: {exc}")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        mismatch = getattr(pynvml, "NVML_ERROR_LIB_RM_VERSION_MISMATCH", -1)
        return NvmlDiagnostics(
            ok=False,
            error=_nvml_error_text(exc),
            version_mismatch=getattr(exc, "value", None) == mismatch,
        )
    try:
        driver = _str(pynvml.nvmlSystemGetDriverVersion())
        nvml_version = _str(pynvml.nvmlSystemGetNVMLVersion())
        count = pynvml.nvmlDeviceGetCount()
        names = [
            _str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
            for i in range(count)
        ]
        return NvmlDiagnostics(
            ok=True,
            driver_version=driver,
            nvml_version=nvml_version,
            device_count=count,
            devices=names,
        )
    except pynvml.NVMLError as exc:
        return NvmlDiagnostics(ok=False, error=_nvml_error_text(exc))
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
