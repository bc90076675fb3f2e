"""The extraction pipeline: read, plan, load (CPU threads), encode (device), write in order.

A producer thread reads the input from the checkpoint on, reads audio headers, sorts each window
of lines by length, cuts it into padded-seconds batches and hands each clip to a loader thread
pool; a bounded queue of batches keeps at most ``prefetch`` batches decoded ahead of the encoder.
The main thread encodes batch after batch and passes finished lines to the ordered writer, which
checkpoints after every batch. Signals only set a flag: the batch in flight finishes, the
checkpoint is written, and the worker exits with INTERRUPTED.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from gpuspool.estimate import TF32_ACT_FACTOR, need_gib
from gpuspool.exitcodes import ExitCode
from gpuspool.extract.audio import Wave, load_padded
from gpuspool.extract.events import Events
from gpuspool.extract.headers import (
    FRAME_SAMPLES,
    MODEL_SAMPLE_RATE,
    BadAudio,
    BadLine,
    Clip,
    InputScan,
    inspect_line,
    iter_lines,
    scan_input,
)
from gpuspool.extract.owner import Attempt, Fenced, LockTimeout, OwnerFile
from gpuspool.extract.plan import bucket_samples, budget_samples, cut
from gpuspool.extract.startup import prefetch_tokenizer, process_age_s
from gpuspool.extract.writer import Entry, Guard, OrderedWriter, ResumeMismatch, finish_completed


@dataclass
class Options:
    """Parsed command-line options of ``gpuspool extract``."""

    input: Path
    output: Path
    tokenizer: str
    device: str = "auto"
    batch_seconds: float = 320.0
    #: Batch lengths rounded up to whole buckets of this many seconds (0: none); see ``plan``.
    shape_bucket_s: float = 1.0
    on_bad_line: Literal["fail", "skip"] = "fail"
    dtype: Literal["fp32", "bf16"] = "fp32"
    overwrite: bool = False
    skip_report: Path | None = None
    loader_workers: int = 4
    progress_interval_s: float = 5.0
    sort_window: int = 2048
    prefetch_batches: int = 4
    resume: bool = True
    tf32: bool = False
    loader_mode: Literal["process", "thread"] = "process"
    cpu_threads: int | None = None
    #: Shared ledger: the longest wait for the owner file's lock (see ``extract/owner.py``).
    fence_lock_wait_s: float = 60.0

    @property
    def report_path(self) -> Path:
        """Where the skip report goes."""
        return self.skip_report or Path(str(self.output) + ".skipped.jsonl")


class WorkerExit(Exception):
    """Stop with an exit code, a reason and, when one applies, a line number."""

    def __init__(self, code: ExitCode, reason: str, line: int | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.line = line


_END = ("end",)


@dataclass
class Collated:
    """A batch ready for the encoder: padded waveforms stacked, and the clips that failed."""

    good: list[tuple[Clip, int]]
    bad: list[tuple[Clip, str]]
    array: npt.NDArray[np.float32] | None
    #: What holds ``array``'s memory, for the encoder (:meth:`CodeEncoder.host_batch`).
    held: Any = None


#: Makes a (rows, length) batch array, not yet written, and what holds its memory.
Alloc = Callable[[int, int], tuple[npt.NDArray[np.float32], Any]]


def _empty(rows: int, length: int) -> tuple[npt.NDArray[np.float32], Any]:
    return np.empty((rows, length), dtype=np.float32), None


def collate(
    clips: list[Clip],
    futs: list[Future[tuple[Wave, int]]],
    planned: int = 0,
    alloc: Alloc = _empty,
) -> Collated:
    """Wait for a batch's clips and stack them, zero-padded to ``planned`` samples (the length
    the batch was cut for, :func:`~gpuspool.extract.plan.batch_length`) or to the longest
    decoded clip where that is longer (a header that undercounts: not rounded up further), in
    an array from ``alloc``."""
    good: list[tuple[Clip, int]] = []
    bad: list[tuple[Clip, str]] = []
    waves: list[Wave] = []
    for c, f in zip(clips, futs, strict=True):
        try:
            wav, n = f.result()
        except BadAudio as exc:
            bad.append((c, str(exc)))
            continue
        good.append((c, n))
        waves.append(wav)
    if not waves:
        return Collated(good, bad, None)
    arr, held = alloc(len(waves), max(planned, max(int(w.shape[0]) for w in waves)))
    for i, w in enumerate(waves):
        arr[i, : w.shape[0]] = w
        arr[i, w.shape[0] :] = 0.0
    return Collated(good, bad, arr, held)


def _fingerprint(opts: Options) -> dict[str, Any]:
    st = opts.input.stat()
    return {
        "input": str(opts.input.resolve()),
        "input_size": st.st_size,
        "input_mtime_ns": st.st_mtime_ns,
        "tokenizer": opts.tokenizer,
        "dtype": opts.dtype,
        "on_bad_line": opts.on_bad_line,
        "tf32": opts.tf32,
    }


def _loader_init(parent: int) -> None:
    """Set up a loader process.

    SIGINT/SIGTERM are left to the parent, which stops the loaders in order. If the parent dies
    without that (kill -9), the loader exits by itself: it would otherwise wait forever on a
    task queue that its siblings keep open.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _skip_text(bad: BadLine) -> str:
    return json.dumps(bad.to_json(), ensure_ascii=False)


class _Signals:
    """SIGTERM/SIGINT set a flag; a second signal exits at once."""

    def __init__(self) -> None:
        self.flag = threading.Event()
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.flag.is_set():
            os._exit(int(ExitCode.INTERRUPTED))
        self.signum = signum
        self.flag.set()

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


class _Producer(threading.Thread):
    """Reads lines from the checkpoint on and queues immediates and batches of load futures."""

    def __init__(
        self,
        opts: Options,
        writer: OrderedWriter,
        pool: Executor,
        collate_pool: ThreadPoolExecutor,
        out_q: queue.Queue[tuple[Any, ...]],
        stop: threading.Event,
        loader: Callable[[Path], tuple[Wave, int]],
        alloc: Alloc = _empty,
    ):
        super().__init__(name="extract-producer", daemon=True)
        self.alloc = alloc
        self.opts = opts
        self.start_offset = writer.input_offset
        self.start_line = writer.next_line
        self.done = writer.done_lines()
        self.pool = pool
        self.collate_pool = collate_pool
        self.q = out_q
        self.stop = stop
        self.loader = loader
        self.base = opts.input.resolve().parent

    def _put(self, item: tuple[Any, ...]) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _flush(self, window: list[Clip], imm: list[tuple[Any, ...]]) -> bool:
        if imm and not self._put(("imm", list(imm))):
            return False
        imm.clear()
        o = self.opts
        for batch, planned in cut(window, o.batch_seconds, o.shape_bucket_s):
            futs = [self.pool.submit(self.loader, c.path) for c in batch]
            ready = self.collate_pool.submit(collate, batch, futs, planned, self.alloc)
            if not self._put(("batch", batch, ready)):
                return False
        window.clear()
        return True

    def run(self) -> None:
        try:
            window: list[Clip] = []
            imm: list[tuple[Any, ...]] = []
            for lineno, raw, end in iter_lines(self.opts.input, self.start_offset, self.start_line):
                if self.stop.is_set():
                    return
                if lineno in self.done:
                    continue
                got = inspect_line(raw, lineno, self.base, end)
                if got is None:
                    imm.append(("blank", lineno, end))
                elif isinstance(got, BadLine):
                    imm.append(("bad", got, end))
                else:
                    window.append(got)
                full = len(window) >= self.opts.sort_window or len(imm) >= 1024
                if full and not self._flush(window, imm):
                    return
            if self._flush(window, imm):
                self._put(_END)
        except BaseException as exc:  # surfaced by the main thread
            self._put(("crash", exc))


class Run:
    """One invocation of the worker."""

    def __init__(self, opts: Options, events: Events):
        self.opts = opts
        self.events = events
        self.t0 = time.monotonic()
        self.t_proc: float | None = None
        self.session_audio_s = 0.0
        self.session_lines = 0
        self.session_skipped = 0
        self.prior_lines = 0
        self.prior_skipped = 0
        self.prior_audio_s = 0.0
        self.scan_s = 0.0
        self.import_s = 0.0
        self.model_load_s = 0.0
        self.startup_s: float | None = None  # from exec to the first batch sent to the device
        #: Started before its GPU was free: seconds from its exec to its go line (the part of
        #: ``startup_s`` before its GPU was given); None for a worker started with its GPU.
        self.gate_wait_s: float | None = None
        self._writes: list[Future[None]] = []
        self._write_pool: ThreadPoolExecutor | None = None
        self.batches = 0
        self.max_batch_padded_s = 0.0
        self.scan: InputScan | None = None
        self.writer: OrderedWriter | None = None
        self.encoder: Any = None
        self._pending: tuple[Any, Collated, list[Entry]] | None = None
        self._started = False
        # Where the encoding thread's time goes (seconds): waiting for decoded audio, queueing
        # work on the device, waiting for the device to finish a batch.
        self.t_audio_wait = 0.0
        self.t_launch = 0.0
        self.t_device_wait = 0.0
        self.signals = _Signals()
        self._last_progress = 0.0
        #: On a shared ledger, the owner file this attempt checks before every write.
        self.owner: OwnerFile | None = None

    # -- entry ---------------------------------------------------------------------------------
    def execute(self) -> int:
        """Run and return the exit code; an ``error`` event precedes any non-zero code."""
        self.signals.install()
        try:
            return self._execute()
        except WorkerExit as exc:
            self._error(exc.code, exc.reason, exc.line)
            return int(exc.code)
        except Fenced as exc:  # another attempt owns the output: nothing more was written
            self._error(ExitCode.FENCED_OUT, str(exc))
            return int(ExitCode.FENCED_OUT)
        except LockTimeout as exc:
            self._error(ExitCode.OUTPUT_LOCKED, str(exc))
            return int(ExitCode.OUTPUT_LOCKED)
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":
                self._error(ExitCode.OOM, f"CUDA out of memory: {_first_line(exc)}")
                return int(ExitCode.OOM)
            import traceback

            traceback.print_exc()
            self._error(ExitCode.CRASH, f"{type(exc).__name__}: {_first_line(exc)}")
            return int(ExitCode.CRASH)
        finally:
            if self.writer is not None:
                self.writer.close()
            if self.owner is not None:
                self.owner.close()
            self.signals.restore()

    def _error(self, code: ExitCode, reason: str, line: int | None = None) -> None:
        fields: dict[str, Any] = {"exit_code": int(code), "reason": reason}
        if line is not None:
            fields["line"] = line
        if self.writer is not None:
            fields["lines_done"] = self.writer.ck.lines_done
            fields["lines_skipped"] = self.writer.ck.lines_skipped
            fields["resume_line"] = self.writer.next_line
        self.events.emit("error", **fields)

    # -- the run -------------------------------------------------------------------------------
    def _execute(self) -> int:
        o = self.opts
        for flag, check, value in (
            ("--batch-seconds", budget_samples, o.batch_seconds),
            ("--shape-bucket", bucket_samples, o.shape_bucket_s),
        ):  # the cut's own checks, here before anything starts
            try:
                check(value)
            except ValueError as exc:
                raise WorkerExit(ExitCode.USAGE, f"{flag}: {exc}") from exc
        guard = self._take_output()
        with guard():
            done = None if o.overwrite else finish_completed(o.output, o.report_path)
        if done is not None:
            # A finished run died before the end of its clean-up; that is now done.
            self.events.emit(
                "summary",
                lines_done=done.lines_done,
                lines_skipped=done.lines_skipped,
                audio_s_done=done.audio_s_done,
                audio_s_per_s=None,
                wall_s=time.monotonic() - self.t0,
                peak_gpu_gib=None,
                output=str(o.output),
                already_complete=True,
            )
            return int(ExitCode.OK)
        if o.output.exists() and not o.overwrite:
            raise WorkerExit(
                ExitCode.OUTPUT_EXISTS, f"output exists: {o.output} (pass --overwrite)"
            )
        if not o.input.is_file():
            raise WorkerExit(ExitCode.DATA_ERROR, f"input not found: {o.input}")
        t_scan = time.monotonic()
        try:
            self.scan = scan = scan_input(o.input)
        except OSError as exc:
            raise WorkerExit(ExitCode.DATA_ERROR, f"cannot read input: {exc}") from exc
        self.scan_s = time.monotonic() - t_scan
        if o.on_bad_line == "fail" and scan.bad:
            b = scan.bad[0]
            raise WorkerExit(ExitCode.DATA_ERROR, f"line {b.line}: {b.reason}", b.line)
        try:
            self.writer = OrderedWriter(
                o.output, o.report_path, _fingerprint(o), o.resume, guard=guard
            )
        except ResumeMismatch as exc:
            raise WorkerExit(ExitCode.USAGE, str(exc)) from exc
        w = self.writer
        self.prior_lines = w.ck.lines_done + sum(1 for e in w.ready.values() if e.kind == "out")
        self.prior_skipped = w.ck.lines_skipped + sum(
            1 for e in w.ready.values() if e.kind == "skip"
        )
        self.prior_audio_s = w.ck.audio_s_done + sum(e.audio_s for e in w.ready.values())

        try:
            self._load_and_consume(scan)
        finally:
            self._stop_pipeline()
        self._check_writes(final=True)
        self.writer.finish(after=self.owner.remove if self.owner is not None else None)
        self._summary()
        return int(ExitCode.OK)

    def _take_output(self) -> Guard:
        """On a shared ledger (the daemon announced this attempt), check that the job's paths
        are there on this host, then make this attempt the output's owner; the guard every
        write of the output goes through. Elsewhere, a guard that does nothing."""
        try:
            attempt = Attempt.from_env(os.environ)
        except ValueError as exc:
            raise WorkerExit(ExitCode.USAGE, str(exc)) from exc
        if attempt is None:
            return contextlib.nullcontext
        self._check_visible(attempt.host)
        self.owner = OwnerFile(self.opts.output, attempt, self.opts.fence_lock_wait_s)
        try:
            self.owner.take()
        except OSError as exc:
            raise WorkerExit(
                ExitCode.CRASH, f"cannot open the owner file {self.owner.path}: {exc.strerror}"
            ) from exc
        return self.owner.guard

    def _check_visible(self, host: str) -> None:
        """The intake scanner saw the input and the output's folder on the host that took the
        job in; a host that does not see them lacks the shared filesystem (docs/cluster.md)."""
        o = self.opts
        for what, path, ok in (
            ("input", o.input, o.input.is_file()),
            ("output folder", o.output.parent, o.output.parent.is_dir()),
        ):
            if not ok:
                raise WorkerExit(
                    ExitCode.NO_INPUT,
                    f"{what} {path} not found on host {host} (or not readable there): every "
                    "host must mount the shared filesystem at the same paths (docs/cluster.md)",
                )

    def _load_and_consume(self, scan: InputScan) -> None:
        o = self.opts
        assert self.writer is not None
        if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
            os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
        t = time.monotonic()
        # The kernel reads the weights while Python imports (a prestarted worker asked before
        # its gate); the device starts (CUDA context, cuDNN, cuBLAS) in a thread while the
        # tokenizer's modules import and the model loads.
        if self.gate_wait_s is None:
            prefetch_tokenizer(o.tokenizer)
        try:
            import torch

            from gpuspool.extract.model import (
                CodeEncoder,
                DeviceStart,
                import_tokenizer_stack,
                resolve_device,
            )
        except ImportError as exc:  # a rerun would fail the same way: fix the install
            raise _missing_stack(exc) from exc
        try:
            device = resolve_device(o.device)
        except (ValueError, RuntimeError) as exc:
            raise WorkerExit(ExitCode.USAGE, str(exc)) from exc
        started = DeviceStart(device)
        try:
            import_tokenizer_stack()
        except ImportError as exc:
            raise _missing_stack(exc) from exc
        self.import_s = time.monotonic() - t

        # The loaders start now, not before the imports: decoding outpaces the encoder anyway,
        # and a dozen processes starting up beside the imports slowed them down. They get the
        # first batches ready while the model loads.
        self._start_pipeline()
        if o.cpu_threads:
            torch.set_num_threads(o.cpu_threads)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            # TF32 convolutions make codes depend on the algorithm cuDNN picks for each batch
            # shape; full fp32 with deterministic algorithms keeps them batch-independent.
            torch.backends.cudnn.allow_tf32 = o.tf32
            torch.backends.cuda.matmul.allow_tf32 = o.tf32
            torch.backends.cudnn.deterministic = not o.tf32
        t = time.monotonic()
        try:
            self.encoder = CodeEncoder(o.tokenizer, device, o.dtype, started)
        except Exception as exc:
            if _transient(exc):
                raise
            raise WorkerExit(
                ExitCode.CONFIG,
                f"tokenizer {o.tokenizer!r} cannot be loaded: {type(exc).__name__}: "
                f"{_first_line(exc)}",
            ) from exc
        self.encoder.warm_up()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.model_load_s = time.monotonic() - t
        self.events.emit(
            "start",
            lines_total=scan.lines,
            lines_bad=len(scan.bad),
            audio_s_total=scan.total_s,
            longest_s=scan.longest_s,
            device=str(device),
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            device_uuid=_device_uuid(device),
            batch_seconds=o.batch_seconds,
            dtype=o.dtype,
            tf32=o.tf32,
            need_gib=self._need(),
            resumed=self.writer.resumed,
            resume_line=self.writer.next_line,
            lines_already_done=self.writer.ck.lines_done,
            output=str(o.output),
        )
        self._consume()

    def _start_pipeline(self) -> None:
        o = self.opts
        writer = self.writer
        assert writer is not None
        self._started = True
        self._stop = threading.Event()
        self._q: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=max(1, o.prefetch_batches))
        workers = max(1, o.loader_workers)
        self._pool: Executor
        if o.loader_mode == "process":
            # Processes, not threads: decoding holds the GIL often enough to starve the thread
            # that feeds the GPU. "spawn": the parent will hold a CUDA context.
            self._pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_loader_init,
                initargs=(os.getpid(),),
            )
        else:
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load")
        self._collate_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collate")
        # Serialising codes to JSON and the fsync'd writes run beside the encoder.
        self._write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write")
        producer = _Producer(
            o, writer, self._pool, self._collate_pool, self._q, self._stop, load_padded, self._alloc
        )
        producer.start()

    def _alloc(self, rows: int, length: int) -> tuple[npt.NDArray[np.float32], Any]:
        """A batch array from the encoder once it is loaded (pinned on a GPU, filled by the
        collating thread); before that, a plain one, which the launch copies."""
        encoder = self.encoder
        return encoder.host_batch(rows, length) if encoder is not None else _empty(rows, length)

    def _stop_pipeline(self) -> None:
        if not self._started:
            return
        self._stop.set()
        self._collate_pool.shutdown(wait=False, cancel_futures=True)
        while True:  # unblock the producer
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._write_pool is not None:
            self._write_pool.shutdown(wait=True)

    def _consume(self) -> None:
        self.t_proc = time.monotonic()
        self._last_progress = self.t_proc
        while True:
            if self.signals.flag.is_set():
                self._interrupted()
            self._check_writes()
            t_wait = time.monotonic()
            try:
                item = self._q.get(timeout=0.25)
            except queue.Empty:
                self.t_audio_wait += time.monotonic() - t_wait
                self._collect_pending()  # the loaders are behind: finish what the device has
                self._maybe_progress()
                continue
            self.t_audio_wait += time.monotonic() - t_wait
            kind = item[0]
            if kind == "end":
                self._collect_pending()
                break
            try:
                if kind == "crash":
                    raise item[1]
                if kind == "imm":
                    self._immediates(item[1])
                elif kind == "batch":
                    self._batch(item[2])
            except (WorkerExit, KeyboardInterrupt):
                self._salvage_pending()
                raise
            except Exception:
                self._salvage_pending()
                if self.signals.flag.is_set():  # e.g. loader processes hit by the signal
                    self._interrupted()
                raise
            self._maybe_progress()

    def _submit_write(self, entries: list[Entry]) -> None:
        assert self.writer is not None
        assert self._write_pool is not None
        self._writes.append(self._write_pool.submit(self.writer.add, entries))

    def _submit_codes(
        self, good: list[tuple[Clip, int]], codes: list[Any], skipped: list[Entry]
    ) -> None:
        def job() -> None:
            entries = list(skipped)
            for (c, n), code in zip(good, codes, strict=True):
                rec = dict(c.record)
                rec["audio_codes"] = code.tolist()
                text = json.dumps(rec, ensure_ascii=False)
                entries.append(Entry(c.line, c.end_offset, "out", text, n / MODEL_SAMPLE_RATE))
            assert self.writer is not None
            self.writer.add(entries)

        assert self._write_pool is not None
        self._writes.append(self._write_pool.submit(job))

    def _check_writes(self, final: bool = False) -> None:
        """Raise the first error of a finished write; drop finished ones."""
        keep: list[Future[None]] = []
        for f in self._writes:
            if f.done() or final:
                f.result()
            else:
                keep.append(f)
        self._writes = keep

    def _interrupted(self) -> None:
        sig = self.signals.signum
        name = signal.Signals(sig).name if sig is not None else "signal"
        raise WorkerExit(ExitCode.INTERRUPTED, f"interrupted by {name}; checkpointed, resumable")

    def _bad(self, bad: BadLine, end: int) -> Entry:
        if self.opts.on_bad_line == "fail":
            raise WorkerExit(ExitCode.DATA_ERROR, f"line {bad.line}: {bad.reason}", bad.line)
        self.session_skipped += 1
        return Entry(bad.line, end, "skip", _skip_text(bad))

    def _immediates(self, items: list[tuple[Any, ...]]) -> None:
        entries: list[Entry] = []
        try:
            for it in items:
                if it[0] == "blank":
                    entries.append(Entry(it[1], it[2], "blank"))
                else:
                    entries.append(self._bad(it[1], it[2]))
        finally:
            if entries:
                self._submit_write(entries)

    def _batch(self, ready: Future[Collated]) -> None:
        t = time.monotonic()
        try:
            col = ready.result()  # still being decoded or collated: waiting for audio too
        finally:
            self.t_audio_wait += time.monotonic() - t
        skipped: list[Entry] = []
        try:
            for c, reason in col.bad:
                skipped.append(self._bad(BadLine(c.line, reason, c.record["audio"]), c.end_offset))
        finally:
            if skipped and col.array is None:
                self._submit_write(skipped)
        if col.array is None:
            return
        frames = [-(-n // FRAME_SAMPLES) for _, n in col.good]
        # Launch this batch before collecting the previous one, so the device never waits for
        # the host between batches.
        if self.startup_s is None:  # before the launch, which on a CPU encodes the batch
            self.startup_s = process_age_s()
        t = time.monotonic()
        pending = self.encoder.launch(col.array, frames, col.held)
        self.t_launch += time.monotonic() - t
        self.max_batch_padded_s = max(
            self.max_batch_padded_s, col.array.shape[0] * col.array.shape[1] / MODEL_SAMPLE_RATE
        )
        self._collect_pending()
        self._pending = (pending, col, skipped)

    def _salvage_pending(self) -> None:
        """On the way out, keep the batch already on the device if it finished cleanly."""
        with contextlib.suppress(Exception):
            self._collect_pending()

    def _collect_pending(self) -> None:
        """Finish the batch launched last: count it and hand its codes to the writer."""
        if self._pending is None:
            return
        pending, col, skipped = self._pending
        self._pending = None
        t = time.monotonic()
        codes = self.encoder.collect(pending)
        self.t_device_wait += time.monotonic() - t
        self.batches += 1
        if self.batches == 1:
            self.encoder.remeasure_context()
        for _, n in col.good:
            self.session_audio_s += n / MODEL_SAMPLE_RATE
        self.session_lines += len(col.good)
        self._submit_codes(col.good, codes, skipped)

    # -- reporting -----------------------------------------------------------------------------
    def _gpu(self) -> tuple[float | None, float | None]:
        mem = self.encoder.memory() if self.encoder is not None else None
        if mem is None:
            return None, None
        return mem.peak, mem.peak_reserved

    def _done_counts(self) -> tuple[int, int, float]:
        """Lines encoded (written or about to be), lines skipped, audio seconds encoded."""
        return (
            self.prior_lines + self.session_lines,
            self.prior_skipped + self.session_skipped,
            self.prior_audio_s + self.session_audio_s,
        )

    def _need(self) -> float:
        """The memory estimate for this run (``--tf32`` takes more activation memory)."""
        assert self.scan is not None
        f = TF32_ACT_FACTOR if self.opts.tf32 else 1.0
        return need_gib(self.scan.longest_s * f, self.opts.batch_seconds * f, self.opts.dtype)

    def _rate(self) -> float:
        el = time.monotonic() - (self.t_proc or self.t0)
        return self.session_audio_s / el if el > 0 else 0.0

    def _maybe_progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress < self.opts.progress_interval_s:
            return
        self._last_progress = now
        assert self.scan is not None
        lines, skipped, audio = self._done_counts()
        rate = self._rate()
        remaining = max(0.0, self.scan.total_s - audio)
        peak, _ = self._gpu()
        self.events.emit(
            "progress",
            lines_done=lines,
            lines_skipped=skipped,
            lines_total=self.scan.lines,
            audio_s_done=audio,
            audio_s_total=self.scan.total_s,
            audio_s_per_s=rate,
            eta_s=remaining / rate if rate > 0 else None,
            gpu_peak_gib=peak,
            batches=self.batches,
        )

    def _summary(self) -> None:
        w = self.writer
        assert w is not None and self.scan is not None
        mem = self.encoder.memory() if self.encoder is not None else None
        self.events.emit(
            "summary",
            lines_done=w.ck.lines_done,
            lines_skipped=w.ck.lines_skipped,
            lines_total=self.scan.lines,
            audio_s_done=w.ck.audio_s_done,
            audio_s_session=self.session_audio_s,
            audio_s_per_s=self._rate(),
            wall_s=time.monotonic() - self.t0,
            processing_s=time.monotonic() - (self.t_proc or self.t0),
            scan_s=self.scan_s,
            import_s=round(self.import_s, 3),
            model_load_s=round(self.model_load_s, 3),
            startup_s=None if self.startup_s is None else round(self.startup_s, 3),
            gate_wait_s=None if self.gate_wait_s is None else round(self.gate_wait_s, 3),
            peak_gpu_gib=mem.peak if mem else None,
            peak_gpu_reserved_gib=mem.peak_reserved if mem else None,
            gpu_context_gib=mem.context if mem else None,
            gpu_context_source=mem.context_source if mem else None,
            batches=self.batches,
            waiting_for_audio_s=round(self.t_audio_wait, 3),
            launching_s=round(self.t_launch, 3),
            waiting_for_device_s=round(self.t_device_wait, 3),
            max_batch_padded_s=self.max_batch_padded_s,
            need_gib=self._need(),
            output=str(self.opts.output),
            skip_report=str(self.opts.report_path) if w.ck.lines_skipped else None,
        )


#: Errors loading the tokenizer that another attempt may not meet (memory, the network).
_TRANSIENT = {"OutOfMemoryError", "ConnectionError", "TimeoutError", "Timeout", "ReadTimeout",
              "ConnectTimeout", "LocalEntryNotFoundError"}  # fmt: skip
#: Hub answers that are final whatever the network does (a misspelt id, say).
_PERMANENT = {"RepositoryNotFoundError", "GatedRepoError", "EntryNotFoundError",
              "RevisionNotFoundError", "HFValidationError"}  # fmt: skip


def _transient(exc: BaseException) -> bool:
    """Whether a failure to load the tokenizer is worth a retry (else it is a config error)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _PERMANENT:
        return False
    return bool(names & _TRANSIENT) or "CUDA" in str(exc)


def _missing_stack(exc: ImportError) -> WorkerExit:
    """A module of the extraction stack is missing: a rerun would fail the same way."""
    return WorkerExit(
        ExitCode.CONFIG, f"cannot import the extraction stack ({exc}); install gpuspool[extract]"
    )


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip().splitlines()
    return s[0] if s else type(exc).__name__


def _device_uuid(device: Any) -> str | None:
    """The GPU this process runs on, as NVML names it (``GPU-<uuid>``), seen from inside the
    process: what the daemon chose through ``CUDA_VISIBLE_DEVICES``, checked end to end."""
    import torch

    if device.type != "cuda":
        return None
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"
