"""Intake: job files from the spool into the ledger; bounded, fair, and never waiting.

Each tick, :meth:`Intake.run`:

1. **collects** the scanners that have finished (a non-blocking poll; one past its wall-clock
   limit is killed) and decides their jobs: accepted into the ledger and moved to
   ``accepted/``, or rejected with the scanner's reason;
2. every ``requeue_check_s`` (and at start-up) **finds lost jobs**: files in ``accepted/``
   without a ledger row (the spool is the source of truth, as in a mail queue); they are taken
   in again under their job id;
3. **takes new files**, at most ``intake_max_files`` and ``intake_max_ms`` per tick, in turn
   from each owner (round-robin by the file's uid): read safely (``spool.py``: the only thing a
   submitter controls that root reads), validated, then handed to a scanner that runs as the
   job's user (``scan.py``). At most ``scan_concurrency`` scanners run, each for up to
   ``scan_batch`` jobs of one user, and at most one per user at a time (a scanner runs as its
   submitter, who can stop it: it must not hold others' slots). A file stays in ``incoming/``
   while its scan runs; after a restart it is simply scanned again.

A job is rejected only for what is wrong with the job. A daemon-side error (the ledger locked or
full, the spool read-only, no process could be started) leaves the file where it is; it is tried
again after ``intake_retry_s``, with one log line per new error, not one per tick. A scanner
batch that fails is split, so a job is rejected for a scan failure only when scanned alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from gpuspool import privileges
from gpuspool.config import Settings
from gpuspool.estimate import job_threshold_gib, need_gib
from gpuspool.ledger_api import LedgerBackend, OutputClaimed
from gpuspool.models import JobSpec
from gpuspool.scan import ScanJob, ScanLimits, ScanProcess, ScanResult
from gpuspool.spool import Folder, RawJob, Refusal, Spool, display_name, validate_spec

#: An entry of the spool: (folder, name).
Key = tuple[Folder, bytes]


class Host(Protocol):
    """What intake uses of the daemon (read on every tick, so a reload is seen)."""

    settings: Settings
    ledger: LedgerBackend
    spool: Spool
    identity_for: Callable[[int], Any] | None
    log: Any


class Report(Protocol):
    """Where a tick records what intake decided."""

    accepted: list[str]
    rejected: list[str]


@dataclass
class _Item:
    """A job file read and validated, waiting for (or in) its scan."""

    key: Key
    raw: RawJob
    spec: JobSpec
    runs_as: Any | None
    judge_for: dict[str, Any] | None = None

    @property
    def name(self) -> bytes:
        return self.key[1]


@dataclass
class _Batch:
    """A running scanner and the jobs it scans."""

    proc: ScanProcess
    items: list[_Item]
    who: str
    #: The uid owning the batch's files (one owner per batch, one batch per owner at a time).
    owner: int


class Intake:
    """The intake stage of the tick; owns the scanners it started."""

    def __init__(
        self,
        host: Host,
        *,
        clock: Callable[[], float] = time.monotonic,
        scan_argv: list[str] | None = None,
    ) -> None:
        self.host = host
        self.clock = clock
        self.scan_argv = scan_argv
        #: Largest GPU (total GiB) seen; a need is never more (set by the daemon after a poll).
        self.largest_gpu_gib: float | None = None
        self._batches: list[_Batch] = []
        self._busy: set[Key] = set()
        self._solo: set[Key] = set()
        self._later: dict[Key, tuple[str, float]] = {}
        self._owners: dict[bytes, int] = {}
        self._lost: set[bytes] = set()
        self._lost_todo: list[bytes] = []
        self._next_prune = float("-inf")
        self._lost_found = 0
        self._next_lost_check = float("-inf")
        self._last_owner = -1

    # -- the stage --------------------------------------------------------------------------------

    def run(self, now: float, report: Report) -> None:
        """One tick's intake: collect finished scans, find lost jobs, take new files."""
        self.collect(now, report)
        self.take(now, report)

    def collect(self, now: float, report: Report) -> None:
        """The cheap half, before placement: finished scans become queued jobs."""
        self._collect(now, report)

    def take(self, now: float, report: Report) -> None:
        """The half a flood of files can make long (up to ``intake_max_ms``), after placement:
        find lost jobs, read and hand new files to scanners, prune ``rejected/``."""
        if now >= self._next_lost_check or self._lost_todo:
            self._find_lost(now)
        self._take(now, report)
        if now >= self._next_prune:
            self._prune(now)

    def requeue_lost_now(self) -> None:
        """Look for accepted files without a ledger row at the next run (start-up)."""
        self._next_lost_check = float("-inf")

    @property
    def scanning(self) -> int:
        """Jobs whose scan is running."""
        return len(self._busy)

    def idle(self, now: float) -> bool:
        """Nothing to do before ``now``: no scan running, nothing due in the spool."""
        return not self._batches and not self._lost_todo and not self._due(now)

    def close(self) -> None:
        """Kill the scanners still running (their files stay in the spool)."""
        for batch in self._batches:
            batch.proc.kill()
        self._batches.clear()
        self._busy.clear()

    # -- collecting scans -------------------------------------------------------------------------

    def _collect(self, now: float, report: Report) -> None:
        for batch in list(self._batches):
            got = batch.proc.poll(self.clock())
            if got is None:
                continue
            self._batches.remove(batch)
            self._busy.difference_update(item.key for item in batch.items)
            if isinstance(got, str):
                self._scan_failed(batch, got, now, report)
                continue
            answers = got
            for i, item in enumerate(batch.items):
                result = answers[str(i)]
                self._guard(item.key, now, partial(self._decide, item, result, now, report))

    def _scan_failed(self, batch: _Batch, failure: str, now: float, report: Report) -> None:
        if len(batch.items) > 1:  # one bad job must not sink the others: scan each alone
            self.host.log.warning(
                "scan_batch_failed", jobs=len(batch.items), runs_as=batch.who, error=failure
            )
            self._solo.update(item.key for item in batch.items)
            return
        item = batch.items[0]
        self._solo.discard(item.key)
        reason = f"could not check the job's files as {batch.who}: the scanner failed: {failure}"
        self._reject(item.key, reason, now, report)

    def _decide(self, item: _Item, result: ScanResult, now: float, report: Report) -> None:
        """Accept or reject a scanned job (if its file is still the one that was scanned)."""
        again = self.host.spool.read(item.name, item.key[0])
        if not isinstance(again, RawJob) or again.job_id != item.raw.job_id:
            return  # replaced or gone meanwhile: the next tick reads it afresh
        if result.problem is not None:
            self._reject(item.key, result.problem, now, report)
            return
        self._accept(item, result, now, report)

    def _accept(self, item: _Item, result: ScanResult, now: float, report: Report) -> None:
        host, spec, raw = self.host, item.spec, item.raw
        budget = spec.batch_seconds or host.settings.default_batch_seconds
        estimated = need_gib(result.longest_s, budget, spec.dtype)
        need = estimated
        if self.largest_gpu_gib is not None and need > self.largest_gpu_gib:
            need = round(self.largest_gpu_gib, 2)  # never reserve more than a whole GPU
        threshold = job_threshold_gib(spec, host.settings.min_free_gib, need)
        spec, priority_note = privileges.job_priority(spec, raw.submitter_uid, host.settings)
        try:
            added = host.ledger.add(
                job_id=raw.job_id,
                spec=spec,
                submitter_uid=raw.submitter_uid,
                need_gib=need,
                threshold_gib=threshold,
                spool_file=None,
                now=now,
                note=priority_note,
            )
        except OutputClaimed as exc:
            # Checked where the job is recorded, atomically: another job with this output may
            # have been scanned at the same time (one batch, two owners', or another host's).
            own = self._own_job(exc.other, raw.submitter_uid)
            self._reject(item.key, _claimed(spec.output, exc.other, own=own), now, report)
            return
        dest = host.spool.accept(raw) if item.key[0] == "incoming" else None
        self._lost.discard(item.name)
        self._settled(item.key)
        if not added:
            return
        host.ledger.update(raw.job_id, now=now, reason="queued")
        report.accepted.append(raw.job_id)
        host.log.info(
            "job_accepted",
            job_id=raw.job_id,
            name=spec.name,
            file=display_name(raw.name),
            submitter_uid=raw.submitter_uid,
            need_gib=need,
            estimated_gib=estimated if estimated != need else None,
            threshold_gib=threshold,
            lines=result.lines,
            bad_lines=result.bad,
            longest_s=round(result.longest_s, 3),
            scan_note=result.note,
            accepted_as=str(dest) if dest is not None else None,
            requeued=item.key[0] == "accepted" or None,
        )

    # -- lost jobs --------------------------------------------------------------------------------

    def _find_lost(self, now: float) -> None:
        """Accepted files whose job the ledger does not know are taken in again. The ledger is
        asked about a bounded number of names per tick, so a large ``accepted/`` costs no long
        tick; the names found are logged once per pass."""
        host = self.host
        if now >= self._next_lost_check and not self._lost_todo:
            self._next_lost_check = now + host.settings.requeue_check_s
            self._lost_todo = host.spool.accepted_names()
            self._lost &= set(self._lost_todo)  # forget files removed meanwhile
            self._lost_found = 0
        until = self.clock() + host.settings.intake_max_ms / 4000.0
        checked = 0
        while self._lost_todo and (checked < 256 or self.clock() < until):
            name = self._lost_todo[-1]
            stem = name.rsplit(b".", 1)[0].decode("ascii", "replace")
            try:
                known = host.ledger.get(stem) is not None
            except Exception as exc:  # the ledger's problem: try again next pass
                self._later_log(("accepted", b""), f"ledger: {type(exc).__name__}: {exc}", now)
                self._lost_todo = []
                return
            self._lost_todo.pop()
            checked += 1
            if not known and name not in self._lost:
                self._lost.add(name)
                self._lost_found += 1
        if not self._lost_todo and self._lost_found:
            host.log.warning("jobs_requeued_from_spool", count=self._lost_found, folder="accepted")
            self._lost_found = 0

    def _prune(self, now: float) -> None:
        """Delete ``rejected/`` entries older than ``rejected_keep_days``: a thousand per tick,
        once an hour (sooner while more are left)."""
        keep_s = self.host.settings.rejected_keep_days * 86400.0
        try:
            removed = self.host.spool.prune_rejected(now - keep_s, limit=1000)
        except OSError as exc:
            self._later_log(("incoming", b""), f"pruning rejected/: {exc}", now)
            removed = 0
        self._next_prune = now + (1.0 if removed >= 1000 else 3600.0)
        if removed:
            self.host.log.info("rejected_pruned", count=removed, older_than_days=keep_s / 86400)

    # -- taking new files -------------------------------------------------------------------------

    def _due(self, now: float) -> list[Key]:
        """Entries waiting for intake at ``now`` (not in a scan, not backing off)."""
        held = {k for k, (_, at) in self._later.items() if at > now} | self._busy
        due: list[Key] = [("accepted", n) for n in sorted(self._lost)]
        due += [("incoming", n) for n in self.host.spool.pending()]
        return [k for k in due if k not in held] if held else due

    def _by_owner(self, keys: list[Key], until: float) -> dict[int, list[Key]]:
        """Entries grouped by owner uid (cached per name); new names are looked up until
        ``until``, the rest on a later tick, so a flood of names costs a bounded time."""
        cache = self._owners
        if len(cache) > 2 * len(keys) + 1024:  # forget names long gone, now and then
            current = {k[1] for k in keys}
            self._owners = cache = {n: u for n, u in cache.items() if n in current}
        groups: dict[int, list[Key]] = {}
        late = False
        looked = 0
        for key in keys:
            folder, name = key
            uid = cache.get(name) if folder == "incoming" else None
            if uid is None:
                # At least some progress each tick, however slow the machine.
                late = late or (looked >= 512 and looked % 64 == 0 and self.clock() >= until)
                if late:
                    continue
                looked += 1
                uid = self.host.spool.owner(name, folder)
                if uid is None:
                    continue
                if folder == "incoming":
                    cache[name] = uid
            group = groups.get(uid)
            if group is None:
                groups[uid] = [key]
            else:
                group.append(key)
        return groups

    def _fair(self, by_owner: dict[int, list[Key]]) -> Iterator[Key]:
        """Round-robin by owner uid, starting after the owner served first last time."""
        order = sorted(by_owner)
        first = next((i for i, uid in enumerate(order) if uid > self._last_owner), 0)
        order = order[first:] + order[:first]
        if order:
            self._last_owner = order[0]
        queues = [iter(by_owner[uid]) for uid in order]
        while queues:
            alive = []
            for queue in queues:
                key = next(queue, None)
                if key is not None:
                    alive.append(queue)
                    yield key
            queues = alive

    def _take(self, now: float, report: Report) -> None:
        """Read, check and hand to scanners the next files, fairly, within the tick's budget:
        looking up new names' owners may take half of ``intake_max_ms``, deciding files the
        whole of it (each phase always makes some progress, however slow the machine).

        An owner has at most one scanner at a time (a batch of up to ``scan_batch`` of their
        files): a scanner runs as its submitter, who may stop it or make it slow, so one
        submitter's scans must never hold every slot while another's files wait."""
        settings = self.host.settings
        budget = settings.intake_max_ms / 1000.0
        by_owner = self._by_owner(self._due(now), self.clock() + budget / 2)
        until = self.clock() + budget
        owner_of = {key: uid for uid, keys in by_owner.items() for key in keys}
        busy = {batch.owner for batch in self._batches}
        closed = set(busy)  # owners who get no more files this tick
        new: dict[int, list[_Item]] = {}
        taken = 0
        for key in self._fair({u: k for u, k in by_owner.items() if u not in busy}):
            if taken >= settings.intake_max_files or (taken >= 16 and self.clock() >= until):
                break
            owner = owner_of[key]
            if owner in closed:
                continue
            if owner not in new and len(self._batches) + len(new) >= settings.scan_concurrency:
                if all(o in closed for o in new):
                    break  # no scanner free: the rest wait for the next tick
                continue
            taken += 1
            item = self._guard(key, now, partial(self._prepare, key, now, report))
            if item is None:
                continue
            batch = new.setdefault(owner, [])
            if key in self._solo and batch:
                continue  # scanned alone, on a later tick
            batch.append(item)
            if key in self._solo or len(batch) >= settings.scan_batch:
                closed.add(owner)
        for owner, items in new.items():
            if items:
                self._start(items, now, owner)

    def _prepare(self, key: Key, now: float, report: Report) -> _Item | None:
        """Read and validate one file; the item to scan, or None when already decided."""
        host = self.host
        folder, name = key
        raw = host.spool.read(name, folder)
        if isinstance(raw, Refusal):
            self._reject(key, raw.reason, now, report)
            return None
        if host.ledger.get(raw.job_id) is not None:
            # In the ledger already (a crash between the insert and the move): finish the move.
            if folder == "incoming":
                host.spool.accept(raw)
            self._lost.discard(name)
            self._settled(key)
            return None
        try:
            spec = validate_spec(raw.data)
        except ValueError as exc:
            self._reject(key, str(exc), now, report)
            return None
        runs_as, judge_for = None, None
        if host.identity_for is not None:
            try:
                runs_as = host.identity_for(raw.submitter_uid)
                judge_for = _judge_for(raw.submitter_uid, runs_as)
            except Exception as exc:  # no account, root-owned without fallback_user, ...
                self._reject(key, str(exc), now, report)
                return None
        other = host.ledger.output_claimed(str(spec.output))
        if other is not None and self._own_job(other, raw.submitter_uid):
            # Another user's job is left to ``ledger.add``, after the scan: answered here, before
            # the files are checked as the submitter, it would tell anyone which paths in
            # others' private folders are outputs of their jobs.
            self._reject(key, _claimed(spec.output, other, own=True), now, report)
            return None
        return _Item(key, raw, spec, runs_as, judge_for)

    def _own_job(self, job_id: str, submitter_uid: int) -> bool:
        """Whether ``job_id`` was submitted by ``submitter_uid`` (others' jobs are not named)."""
        other = self.host.ledger.get(job_id)
        return other is not None and other.submitter_uid == submitter_uid

    def _start(self, items: list[_Item], now: float, owner: int) -> None:
        settings = self.host.settings
        limits = ScanLimits(
            timeout_s=settings.scan_timeout_s,
            max_lines=settings.scan_max_lines,
            max_bytes=settings.scan_max_bytes,
            max_line_bytes=settings.scan_max_line_bytes,
            memory_mib=settings.scan_memory_mib,
        )
        jobs = [
            ScanJob(
                str(i), str(it.spec.input), str(it.spec.output), it.spec.tokenizer, it.judge_for
            )
            for i, it in enumerate(items)
        ]
        runs_as = items[0].runs_as
        who = str(runs_as) if runs_as is not None else "the daemon's user"
        try:
            proc = ScanProcess(
                jobs, limits, identity=runs_as, started=self.clock(), argv=self.scan_argv
            )
        except Exception as exc:  # fork/exec failed, no memory, too many files: ours
            for item in items:
                self._later_log(item.key, f"could not start the scanner: {exc}", now)
            return
        self._batches.append(_Batch(proc, items, who, owner))
        self._busy.update(item.key for item in items)

    # -- outcomes ---------------------------------------------------------------------------------

    def _guard(self, key: Key, now: float, step: Callable[[], Any]) -> Any:
        """Run one step for one file; a daemon-side exception defers the file, never rejects."""
        try:
            result = step()
        except Exception as exc:  # ledger locked or full, spool read-only, ...: not the job's
            self._later_log(key, f"{type(exc).__name__}: {exc}", now)
            return None
        return result

    def _settled(self, key: Key) -> None:
        """A file was decided: forget its retries (saying so if it had been held back)."""
        self._solo.discard(key)
        held = self._later.pop(key, None)
        if held is not None:
            self.host.log.info("intake_recovered", file=display_name(key[1]), after=held[0])

    def _later_log(self, key: Key, error: str, now: float) -> None:
        """Leave a file where it is and try again later; log only a new error for it."""
        retry_s = self.host.settings.intake_retry_s
        previous = self._later.get(key)
        if previous is None or previous[0] != error:
            self.host.log.warning(
                "intake_retry_later",
                file=display_name(key[1]),
                folder=key[0],
                error=error,
                retry_in_s=retry_s,
            )
        self._later[key] = (error, now + retry_s)

    def _reject(self, key: Key, reason: str, now: float, report: Report) -> None:
        folder, name = key
        try:
            where = self.host.spool.reject(name, reason, now=now, folder=folder)
        except OSError as exc:
            self._later_log(key, f"could not move it to rejected/ ({reason}): {exc}", now)
            return
        self._settled(key)
        if folder == "accepted":
            self._lost.discard(name)
        report.rejected.append(display_name(name))
        self.host.log.warning(
            "job_rejected",
            file=display_name(name),
            folder=folder,
            reason=reason,
            reason_file=str(where),
        )


def _claimed(output: Path, other: str, *, own: bool) -> str:
    """The reason a job whose output an unfinished job writes already is refused: the other
    job's id only when it is the submitter's own (ids link to progress in the public status)."""
    whose = f"job {other}" if own else "another user's unfinished job"
    return f"output: {output} is already the output of {whose}"


def _judge_for(submitter_uid: int, runs_as: Any) -> dict[str, Any] | None:
    """The submitter, when the daemon (not root) runs their job as itself: the scanner then also
    judges the submitter's rights from mode bits, so no one borrows the daemon's."""
    if os.geteuid() == 0 or submitter_uid == runs_as.uid:
        return None
    submitter = privileges.identity_for_uid(submitter_uid)
    return {
        "uid": submitter.uid,
        "gid": submitter.gid,
        "groups": list(submitter.groups),
        "name": submitter.name,
    }
