"""Fuzzed job files through the real intake (``Spool.read`` + ``Daemon.intake``).

``job_cases()`` is a hypothesis strategy of job files: valid ones (JSON or TOML, every optional
field), valid ones with mutations (missing or unknown keys, type-confused values, relative or
``..`` or NUL paths), deeply nested documents, wrong encodings (UTF-16/32, Latin-1, a BOM),
oversized files, random bytes and random JSON values. ``IntakeFuzzer.feed`` drops each one into
``incoming/`` and runs the daemon's intake, then checks that the file was decided exactly once:
accepted (in the ledger and ``accepted/``) or rejected with a reason, never "internal error";
valid files must be accepted, files that are certainly invalid must be rejected.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hseed
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gpuspool.config import Settings
from gpuspool.daemon import Daemon, TickReport
from gpuspool.gpus import FileProbe, write_gpu_file
from gpuspool.ledger import Ledger
from gpuspool.models import JobSpec
from gpuspool.runner import ProcessRunner
from gpuspool.spool import Spool

OUT = "\x00OUT\x00"  # placeholder: replaced by a fresh output path when the file is fed
VALID, INVALID, EITHER = "valid", "invalid", "either"

# -- a small TOML writer (flat tables of the types a job file has) -------------------------------


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v: Any) -> str:
    if v is None:
        return '"null"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else "inf")
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_str(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(data: dict[str, Any]) -> str:
    return "".join(f"{_toml_str(k)} = {_toml_value(v)}\n" for k, v in data.items())


# -- strategies ----------------------------------------------------------------------------------

_finite = st.floats(allow_nan=False, allow_infinity=False)
_json_scalar = st.none() | st.booleans() | st.integers() | _finite | st.text(max_size=40)
_json_value = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip
#: Characters a job's strings may hold: no control character (C0, DEL, C1: the schema refuses).
_printable_char = st.characters(
    blacklist_categories=("Cs",),
    blacklist_characters=[chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]],
)
_printable = st.text(_printable_char, min_size=1, max_size=200)
_gpu_ref = st.text(_printable_char, min_size=1, max_size=20) | st.integers(0, 16)


@st.composite
def valid_spec(draw: st.DrawFn, inputs: tuple[str, ...]) -> dict[str, Any]:
    """A job file that must be accepted (the output placeholder is filled in when fed)."""
    spec: dict[str, Any] = {
        "input": draw(st.sampled_from(inputs)),
        "output": OUT,
        "tokenizer": draw(st.sampled_from(["Qwen/Qwen3-TTS-Tokenizer-12Hz", "tiny", "x" * 4096])),
    }
    optional: dict[str, Any] = {
        "name": _printable,
        "priority": st.integers(-1000, 1000),
        "min_free_gib": st.floats(0, 1e6) | st.integers(0, 10**6) | st.just("auto"),
        "gpus": st.lists(_gpu_ref, max_size=8),
        "batch_seconds": st.floats(1e-3, 86400) | st.integers(1, 86400),
        "on_bad_line": st.sampled_from(["fail", "skip"]),
        "dtype": st.sampled_from(["fp32", "bf16"]),
        "timeout_s": st.floats(1e-3, 1e9) | st.integers(1, 10**9),
        "max_attempts": st.integers(1, 100),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        spec[key] = draw(optional[key])
    return spec


_bad_paths = st.sampled_from(
    ["", "relative/out.jsonl", "/a/../etc/passwd", "/tmp/x\x00y", "..", "~/x.jsonl", "/"]
)


@st.composite
def mutated_spec(draw: st.DrawFn, inputs: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """A valid spec with 1–3 mutations, and whether it is then certainly invalid."""
    spec = dict(draw(valid_spec(inputs)))
    expect = EITHER
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["drop", "unknown", "confuse", "path", "range"]))
        if how == "drop":
            spec.pop(draw(st.sampled_from(["input", "output", "tokenizer"])), None)
            expect = INVALID
        elif how == "unknown":
            unknown = st.text(min_size=1, max_size=12).filter(
                lambda k: k not in spec and k not in JobSpec.model_fields  # a real key is known
            )
            spec[draw(unknown)] = draw(_json_value)
            expect = INVALID
        elif how == "confuse":
            key = draw(st.sampled_from(sorted(spec)))
            spec[key] = draw(_json_value)
        elif how == "path":
            spec[draw(st.sampled_from(["input", "output"]))] = draw(_bad_paths)
            expect = INVALID
        else:
            key, value = draw(
                st.sampled_from(
                    [("priority", 1001), ("priority", -1001), ("max_attempts", 0),
                     ("batch_seconds", 0), ("batch_seconds", 86401), ("timeout_s", -1),
                     ("min_free_gib", -1.0), ("name", ""), ("name", "n" * 201),
                     ("gpus", list(range(65))), ("dtype", "fp16"), ("priority", True),
                     ("tokenizer", "tiny\x00"), ("tokenizer", "a\nb"), ("name", "\x1b[2J"),
                     ("gpus", ["GPU-0\r"])]
                )
            )  # fmt: skip
            spec[key] = value
            expect = INVALID
    return spec, expect


def _nested(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a": ' * depth + "1" + "}" * depth


@dataclass(frozen=True)
class Case:
    """One job file to feed: its suffix, a dict (encoded when fed) or raw bytes, the verdict."""

    label: str
    suffix: str
    expect: str
    data: dict[str, Any] | None = None
    raw: bytes | None = None
    encoding: str = "utf-8"
    pad: int = 0


def job_cases(inputs: tuple[str, ...], max_bytes: int) -> st.SearchStrategy[Case]:
    """Every kind of job file, valid and not."""
    suffix = st.sampled_from([".json", ".toml", ".JSON"])
    valid = st.builds(lambda d, s: Case("valid", s, VALID, data=d), valid_spec(inputs), suffix)
    mutated = st.builds(
        lambda de, s: Case("mutated", s, de[1], data=de[0]), mutated_spec(inputs), suffix
    )
    nested = st.builds(
        lambda depth, kind, s: Case("nested", s, INVALID, raw=_nested(depth, kind).encode()),
        st.integers(1, max_bytes // 2).map(lambda n: min(n, max_bytes // 8)) | st.integers(1, 200),
        st.sampled_from(["list", "dict"]),
        st.just(".json"),
    )
    nested_toml = st.builds(
        lambda depth: Case("nested", ".toml", INVALID,
                           raw=("a = " + "[" * depth + "]" * depth + "\n").encode()),
        st.integers(1, max_bytes // 4),
    )  # fmt: skip
    encoded = st.builds(
        lambda d, enc, s: Case("encoding", s, INVALID, data={**d, "name": "café"}, encoding=enc),
        valid_spec(inputs),
        st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "utf-8-sig", "cp1252"]),
        suffix,
    )
    oversized = st.builds(
        lambda d, extra, s: Case("oversized", s, INVALID, data=d, pad=max_bytes + extra),
        valid_spec(inputs),
        st.integers(1, 3 * max_bytes),
        suffix,
    )
    random_bytes = st.builds(
        lambda b, s: Case("bytes", s, EITHER, raw=b), st.binary(max_size=4096), suffix
    )
    random_json = st.builds(
        lambda v: Case("json-value", ".json", INVALID if not isinstance(v, dict) else EITHER,
                       raw=json.dumps(v).encode()),
        _json_value,
    )  # fmt: skip
    wrong_suffix = st.builds(
        lambda d, s: Case("suffix", s, INVALID, data=d),
        valid_spec(inputs),
        st.sampled_from([".yaml", ".txt", "", ".json~", ".tom"]),
    )
    return st.one_of(
        valid, mutated, mutated, nested, nested_toml, encoded, oversized, random_bytes,
        random_json, wrong_suffix,
    )  # fmt: skip


# -- the fuzzer ----------------------------------------------------------------------------------


@dataclass
class FuzzReport:
    files: int = 0
    accepted: int = 0
    rejected: int = 0
    valid_fed: int = 0
    by_label: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.by_label.items()))
        return (
            f"files fuzzed: {self.files} ({kinds}); accepted {self.accepted}"
            f" (valid among them: {self.valid_fed}), rejected with a reason {self.rejected};"
            f" failures: {len(self.failures)}"
        )


class IntakeFuzzer:
    """A daemon (fake time, no GPUs to start anything on) whose intake is fed one file at a time."""

    def __init__(self, root: Path, max_bytes: int = 65536) -> None:
        self.root = root
        self.max_bytes = max_bytes
        data = root / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.out_dir = root / "out"
        self.out_dir.mkdir(exist_ok=True)
        self.inputs = tuple(str(data / f"in{i}.jsonl") for i in range(3))
        for p in self.inputs:
            Path(p).write_text('{"audio": "missing.wav"}\n')
        gpu_file = root / "gpus.json"
        write_gpu_file(gpu_file, [])
        self.settings = Settings(
            spool_dir=root / "spool",
            state_dir=root / "state",
            scratch_dir=root / "scratch",
            gpu_source=f"file:{gpu_file}",
            max_job_file_bytes=max_bytes,
            worker_command=[sys.executable, "-c", "raise SystemExit(1)"],
        )
        self.spool = Spool(self.settings.spool_dir, max_bytes=max_bytes)
        self.daemon = Daemon(
            self.settings,
            ledger=Ledger(self.settings.ledger_path),
            spool=self.spool,
            probe=FileProbe(gpu_file),
            runner=ProcessRunner(),
            environ={},
            daemon_euid=os.geteuid(),
        )
        self.daemon.startup(0.0)
        self.report = FuzzReport()
        self.now = 1.0

    def encode(self, case: Case) -> bytes:
        if case.raw is not None:
            return case.raw
        assert case.data is not None
        data = dict(case.data)
        for key in ("input", "output"):
            if data.get(key) == OUT:
                data[key] = str(self.out_dir / f"o{self.report.files}.jsonl")
        text = (
            to_toml(data)
            if case.suffix.lower() == ".toml"
            else json.dumps(data, ensure_ascii=False)
        )
        if case.pad:
            text += " " * case.pad if case.suffix.lower() == ".json" else "#" + "x" * case.pad
        return text.encode(case.encoding, errors="replace")

    def feed(self, case: Case) -> None:
        r = self.report
        r.files += 1
        r.by_label[case.label] = r.by_label.get(case.label, 0) + 1
        name = f"f{r.files}{case.suffix}"
        content = self.encode(case)
        tmp = self.spool.staging / name
        tmp.write_bytes(content)
        os.rename(tmp, self.spool.incoming / name)
        tick = TickReport()
        self.now += 1.0
        deadline = time.monotonic() + 60.0
        while True:  # intake never waits on a scan: run it until this file is decided
            self.daemon.intake(self.now, tick)
            if self.daemon.intake_stage.idle(self.now) or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        problem = None
        if self.spool.pending():
            problem = "left in incoming/"
        elif len(tick.accepted) + len(tick.rejected) != 1:
            problem = f"decided {len(tick.accepted)} + {len(tick.rejected)} times"
        elif tick.accepted:
            r.accepted += 1
            job_id = tick.accepted[0]
            if case.expect == VALID:
                r.valid_fed += 1
            if case.expect == INVALID:
                problem = "certainly invalid, but accepted"
            elif self.daemon.ledger.get(job_id) is None or not any(
                self.spool.accepted.glob(f"{job_id}.*")
            ):
                problem = "accepted but not in the ledger and accepted/"
        else:
            r.rejected += 1
            reason = self._last_reason()
            if case.expect == VALID:
                problem = f"valid, but rejected: {reason}"
            elif not reason or "internal error" in reason:
                problem = f"rejected without a proper reason: {reason!r}"
        if problem is not None:
            r.failures.append(f"{name} ({case.label}): {problem}; content {content[:200]!r}")

    def _last_reason(self) -> str:
        newest = max(self.spool.rejected.glob("*.reason"), key=lambda p: p.stat().st_mtime_ns)
        text = newest.read_text()
        reason = text.split("\nreason: ", 1)[-1]
        newest.rename(newest.with_suffix(".seen"))  # so the next lookup finds the next one
        return reason.strip()


def run_fuzz(root: Path, examples: int, seed: int) -> FuzzReport:
    """Feed ``examples`` generated job files through one daemon's intake."""
    fuzzer = IntakeFuzzer(root)

    @hseed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(job_cases(fuzzer.inputs, fuzzer.max_bytes))
    def check(case: Case) -> None:
        fuzzer.feed(case)

    with capture_logs() as logs:
        check()
    crashed = [e for e in logs if e.get("event") in ("tick_failed",) or e.get("exc_info")]
    fuzzer.report.failures += [f"daemon error: {e}" for e in crashed]
    return fuzzer.report
