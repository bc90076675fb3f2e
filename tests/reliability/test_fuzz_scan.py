"""Generated inputs and audio headers through the real intake (scanner processes included):
0 daemon crashes, 0 stalled ticks, every job decided, and no need above the largest GPU.

Each example is one job whose input JSONL mixes lines pointing at generated audio files (real
WAV/FLAC/OGG files with bytes of their header overwritten, truncated files, foreign magic
numbers, random bytes) with broken lines (bad UTF-8, bad JSON, deep nesting, non-objects, very
long lines, missing or non-string ``audio``).
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Harness, gpu_entry
from tests.unit.test_intake import Recorder

#: A tick must stay well under a poll interval, whatever the input (2 shared cores).
TICK_LIMIT_S = 2.0
EXAMPLES = int(os.environ.get("GPUSPOOL_SCAN_FUZZ_EXAMPLES", "40"))


def _seed_audio() -> dict[str, bytes]:
    """Small real files of a few formats, to be mutated."""
    import numpy as np
    import soundfile as sf

    out = {}
    tone = (np.sin(np.arange(2400) / 5.0) * 0.3).astype("float32")
    for name, kw in {
        "wav16": {"format": "WAV", "subtype": "PCM_16"},
        "wavf": {"format": "WAV", "subtype": "FLOAT"},
        "flac": {"format": "FLAC", "subtype": "PCM_16"},
        "ogg": {"format": "OGG", "subtype": "VORBIS"},
        "aiff": {"format": "AIFF", "subtype": "PCM_24"},
    }.items():
        buf = io.BytesIO()
        sf.write(buf, tone, 24000, **kw)
        out[name] = buf.getvalue()
    return out


SEEDS = _seed_audio()

mutation = st.tuples(st.integers(0, 200), st.binary(min_size=1, max_size=8))
audio_bytes = st.one_of(
    st.sampled_from(sorted(SEEDS.values())),
    st.builds(
        lambda seed, muts, cut: _mutate(SEEDS[seed], muts, cut),
        st.sampled_from(sorted(SEEDS)),
        st.lists(mutation, max_size=6),
        st.one_of(st.none(), st.integers(0, 4000)),
    ),
    st.builds(
        lambda magic, rest: magic + rest,
        st.sampled_from(
            [
                b"RIFF",
                b"RIFF\xff\xff\xff\xffWAVEfmt ",
                b"fLaC",
                b"OggS",
                b"FORM",
                b"ID3",
                b"\xff\xfb",
                b"caff",
                b"",
            ]
        ),
        st.binary(max_size=300),
    ),
)


def _mutate(data: bytes, muts: list[tuple[int, bytes]], cut: int | None) -> bytes:
    out = bytearray(data)
    for at, patch in muts:
        out[at : at + len(patch)] = patch
    return bytes(out[:cut] if cut is not None else out)


def _line(kind: str, audio: str, extra: Any) -> bytes:
    if kind == "ok":
        return json.dumps({"audio": audio}).encode()
    if kind == "abs":
        return json.dumps({"audio": "/nonexistent/" + audio}).encode()
    if kind == "deep":
        return b"[" * 5000 + b"]" * 5000
    if kind == "nonobj":
        return json.dumps([audio]).encode()
    if kind == "noaudio":
        return json.dumps({"text": audio}).encode()
    if kind == "badtype":
        return json.dumps({"audio": extra}).encode()
    if kind == "long":
        return b'{"audio": "' + b"a" * (2 << 20) + b'"}'
    if kind == "utf8":
        return b'{"audio": "\xff\xfe"}'
    return bytes(str(extra), "utf-8", "replace")


lines = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "ok",
                "ok",
                "ok",
                "abs",
                "deep",
                "nonobj",
                "noaudio",
                "badtype",
                "long",
                "utf8",
                "junk",
            ]
        ),
        st.integers(0, 3),
        st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=20)),
    ),
    max_size=12,
)


def test_fuzzed_inputs_and_audio_headers(tmp_path: Path) -> None:
    """``EXAMPLES`` generated jobs: every one decided, no tick over the limit, no exception."""
    h = Harness(tmp_path, min_free_gib=0.0)
    h.set_gpus([gpu_entry(0, 0, total_gib=80)])
    h.tick()  # the daemon has seen its GPU (largest: 80 GiB)
    h.daemon.log = Recorder()
    stats = {"accepted": 0, "rejected": 0, "scanner_failed": 0, "longest_tick": 0.0}
    counter = iter(range(10**9))

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(audio=st.lists(audio_bytes, min_size=1, max_size=4), lines=lines,
           trailing_newline=st.booleans())  # fmt: skip
    def one_job(
        audio: list[bytes], lines: list[tuple[str, int, Any]], trailing_newline: bool
    ) -> None:
        n = next(counter)
        folder = h.data / f"case{n}"
        folder.mkdir()
        names = []
        for i, data in enumerate(audio):
            name = f"a{i}.{['wav', 'flac', 'ogg', 'aiff'][i % 4]}"
            (folder / name).write_bytes(data)
            names.append(name)
        body = b"\n".join(_line(k, names[i % len(names)], x) for k, i, x in lines)
        (folder / "in.jsonl").write_bytes(body + (b"\n" if trailing_newline else b""))
        job = {"input": str(folder / "in.jsonl"), "output": str(folder / "out.jsonl"),
               "tokenizer": "tiny", "min_free_gib": "auto"}  # fmt: skip
        h.drop_raw(f"case{n}.json", json.dumps(job).encode())
        for _ in range(400):
            t0 = time.monotonic()
            report = h.tick(settle_intake=False)
            took = time.monotonic() - t0
            stats["longest_tick"] = max(stats["longest_tick"], took)
            assert took < TICK_LIMIT_S, f"case {n}: a tick took {took:.1f} s"
            if report.accepted:
                stats["accepted"] += 1
                need = h.job(report.accepted[0]).need_gib
                assert 0 < need <= 80.0
                return
            if report.rejected:
                stats["rejected"] += 1
                reason = h.daemon.spool.reason_files()[-1].read_text()
                stats["scanner_failed"] += "scanner failed" in reason
                return
            time.sleep(0.02)
        pytest.fail(f"case {n} was not decided")

    one_job()
    sized = [e for e in h.daemon.log.events("job_accepted") if e["longest_s"] > 0]
    print(stats, f"{len(sized)} sized from their audio")
    assert stats["accepted"] + stats["rejected"] == EXAMPLES
    assert stats["accepted"] > 0 and sized
