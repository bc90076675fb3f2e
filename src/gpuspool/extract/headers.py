"""Input lines and audio headers, without torch.

The worker and the CLI use :func:`scan_input` to size a job; the daemon's intake scanner
(``gpuspool.scan``, running as the submitter) reads the same headers with its own bounds.
Durations come from audio headers only (no decoding), so a scan of thousands of files takes
well under a second per thousand on a local disk.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf

#: Sample rate the tokenizer encodes at.
MODEL_SAMPLE_RATE = 24000
#: Input samples per code frame (12.5 frames per second at 24 kHz).
FRAME_SAMPLES = 1920


class BadAudio(Exception):
    """An audio file that cannot be used: missing, unreadable, empty or not finite."""


@dataclass(frozen=True)
class BadLine:
    """A line that cannot be encoded, with its 1-based line number and the reason."""

    line: int
    reason: str
    audio: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The skip-report record for this line."""
        out: dict[str, Any] = {"line": self.line, "reason": self.reason}
        if self.audio is not None:
            out["audio"] = self.audio
        return out


@dataclass(frozen=True)
class Clip:
    """A good line: its record, the resolved audio path and its length at 24 kHz (from headers)."""

    line: int
    record: dict[str, Any]
    path: Path
    samples: int
    end_offset: int = 0

    @property
    def padded(self) -> int:
        """Samples after right-padding to a whole number of frames."""
        return padded_samples(self.samples)

    @property
    def seconds(self) -> float:
        """Duration in seconds (unpadded)."""
        return self.samples / MODEL_SAMPLE_RATE


@dataclass
class InputScan:
    """What a pass over the input's lines and audio headers found."""

    #: Non-blank lines (good and bad).
    lines: int = 0
    #: Longest good clip in seconds.
    longest_s: float = 0.0
    #: Total seconds of the good clips.
    total_s: float = 0.0
    #: Bad lines, in line order.
    bad: list[BadLine] = field(default_factory=list)

    @property
    def good(self) -> int:
        """Lines that can be encoded."""
        return self.lines - len(self.bad)


def resampled_length(frames: int, samplerate: int) -> int:
    """Samples at 24 kHz after resampling ``frames`` samples at ``samplerate``.

    Same arithmetic as ``librosa.resample`` (which the official loader calls): the output is
    fixed to ``ceil(frames * (target / source))`` computed in floating point.
    """
    if samplerate == MODEL_SAMPLE_RATE:
        return frames
    return math.ceil(frames * (float(MODEL_SAMPLE_RATE) / samplerate))


def padded_samples(samples: int) -> int:
    """``samples`` rounded up to a whole number of frames (at least one frame)."""
    return max(1, -(-samples // FRAME_SAMPLES)) * FRAME_SAMPLES


def probe(path: Path) -> tuple[int, int]:
    """(frames, sample rate) of an audio file from its header; raises :class:`BadAudio`."""
    try:
        info = sf.info(str(path))
    except FileNotFoundError as exc:
        raise BadAudio(f"audio file not found: {path}") from exc
    except Exception as exc:
        if not path.exists():
            raise BadAudio(f"audio file not found: {path}") from exc
        raise BadAudio(f"unreadable audio: {_one_line(exc)}") from exc
    frames, sr = int(info.frames), int(info.samplerate)
    if sr <= 0:
        raise BadAudio(f"unreadable audio: sample rate {sr}")
    if frames <= 0:
        raise BadAudio("empty audio (0 samples)")
    return frames, sr


def clip_seconds(path: str | os.PathLike[str]) -> float:
    """Duration of an audio file in seconds, from its header (raises :class:`BadAudio`)."""
    frames, sr = probe(Path(path))
    return frames / sr


def iter_lines(
    path: Path, offset: int = 0, first_line: int = 1
) -> Iterator[tuple[int, bytes, int]]:
    """Yield (line number, raw line, byte offset just after the line) from ``offset`` on."""
    with open(path, "rb") as f:
        f.seek(offset)
        pos = offset
        lineno = first_line
        for raw in f:
            pos += len(raw)
            yield lineno, raw, pos
            lineno += 1


def parse_line(
    raw: bytes, lineno: int, base_dir: Path
) -> tuple[dict[str, Any], Path] | BadLine | None:
    """Parse one input line: (record, audio path), a :class:`BadLine`, or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return BadLine(lineno, "line is not valid UTF-8")
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return BadLine(lineno, f"invalid JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(record, dict):
        return BadLine(lineno, "line is not a JSON object")
    if "audio" not in record:
        return BadLine(lineno, "missing 'audio' field")
    audio = record["audio"]
    if not isinstance(audio, str) or not audio:
        return BadLine(lineno, "'audio' is not a non-empty string")
    p = Path(audio).expanduser()
    if not p.is_absolute():
        p = base_dir / p
    return record, p


def inspect_line(
    raw: bytes, lineno: int, base_dir: Path, end_offset: int = 0
) -> Clip | BadLine | None:
    """Parse a line and read its audio header: a :class:`Clip`, a :class:`BadLine`, or None."""
    parsed = parse_line(raw, lineno, base_dir)
    if parsed is None or isinstance(parsed, BadLine):
        return parsed
    record, path = parsed
    try:
        frames, sr = probe(path)
    except BadAudio as exc:
        return BadLine(lineno, str(exc), record["audio"])
    return Clip(lineno, record, path, resampled_length(frames, sr), end_offset)


def scan_input(jsonl_path: str | os.PathLike[str]) -> InputScan:
    """Count lines, total and longest audio, and list bad lines, from headers only.

    Relative audio paths resolve against the input file's folder. Blank lines are ignored.
    Raises OSError if the input itself cannot be read.
    """
    path = Path(jsonl_path)
    base = path.resolve().parent
    scan = InputScan()
    for lineno, raw, end in iter_lines(path):
        got = inspect_line(raw, lineno, base, end)
        if got is None:
            continue
        scan.lines += 1
        if isinstance(got, BadLine):
            scan.bad.append(got)
            continue
        scan.total_s += got.seconds
        scan.longest_s = max(scan.longest_s, got.seconds)
    return scan


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return msg[-1] if msg else type(exc).__name__
