"""Torch-free parts of the extraction worker: headers, input scan, batching plan, synth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from gpuspool.extract.headers import (
    FRAME_SAMPLES,
    MODEL_SAMPLE_RATE,
    BadAudio,
    Clip,
    clip_seconds,
    padded_samples,
    resampled_length,
    scan_input,
)
from gpuspool.extract.plan import (
    batch_cost,
    batch_length,
    bucket_samples,
    budget_samples,
    cut,
    pack,
)
from gpuspool.extract.synth import SAMPLE_RATES, synth_dataset

SRC = Path(__file__).resolve().parents[2] / "src"


def _clip(line: int, seconds: float) -> Clip:
    return Clip(line, {"audio": f"{line}.wav"}, Path(f"{line}.wav"), int(seconds * 24000))


def test_light_modules_do_not_import_torch() -> None:
    """The package and the modules the daemon uses import neither torch nor qwen_tts."""
    code = (
        "import sys; import gpuspool.extract, gpuspool.extract.headers, gpuspool.extract.plan, "
        "gpuspool.extract.synth, gpuspool.extract.cli, gpuspool.extract.writer, "
        "gpuspool.extract.events; bad = [m for m in ('torch', 'qwen_tts', 'transformers') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC)},
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_clip_seconds_reads_headers(tmp_path: Path) -> None:
    """clip_seconds gives frames / rate from the header for WAV and FLAC."""
    for ext, sr, n in (("wav", 22050, 33075), ("flac", 48000, 24000)):
        p = tmp_path / f"a.{ext}"
        sf.write(p, np.zeros(n, dtype=np.float32), sr)
        assert clip_seconds(p) == pytest.approx(n / sr)


def test_clip_seconds_bad_files(tmp_path: Path) -> None:
    """Missing, garbage and empty files raise BadAudio with a reason."""
    with pytest.raises(BadAudio, match="not found"):
        clip_seconds(tmp_path / "nope.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(BadAudio, match="unreadable"):
        clip_seconds(junk)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(BadAudio, match="empty"):
        clip_seconds(empty)


def test_resampled_length_matches_librosa_arithmetic() -> None:
    """Lengths at 24 kHz use librosa's float ceil, including its rounding edge cases."""
    assert resampled_length(24000, 24000) == 24000
    assert resampled_length(16000, 16000) == 24000
    # 44100 * (24000 / 44100) is 24000.000000000004 in floating point: librosa keeps 24001.
    assert resampled_length(44100, 44100) == 24001
    for n in (1, 441, 44100, 123457):
        for sr in SAMPLE_RATES:
            assert resampled_length(n, sr) == int(np.ceil(n * (24000.0 / sr)))
    assert padded_samples(1) == FRAME_SAMPLES
    assert padded_samples(FRAME_SAMPLES) == FRAME_SAMPLES
    assert padded_samples(FRAME_SAMPLES + 1) == 2 * FRAME_SAMPLES


def test_scan_input_counts_and_bad_lines(tmp_path: Path) -> None:
    """scan_input totals good clips and names each bad line with its 1-based number."""
    (tmp_path / "a").mkdir()
    sf.write(tmp_path / "a" / "one.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(tmp_path / "two.flac", np.zeros(3 * 48000, dtype=np.float32), 48000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    lines = [
        json.dumps({"audio": "a/one.wav", "text": "x"}),
        "",
        "{not json",
        json.dumps({"text": "no audio"}),
        json.dumps(["a", "list"]),
        json.dumps({"audio": "missing.wav"}),
        json.dumps({"audio": str(tmp_path / "two.flac")}),
        json.dumps({"audio": "empty.wav"}),
        json.dumps({"audio": 3}),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    scan = scan_input(inp)
    assert scan.lines == 8
    assert scan.good == 2
    assert scan.total_s == pytest.approx(4.0)
    assert scan.longest_s == pytest.approx(3.0)
    by_line = {b.line: b.reason for b in scan.bad}
    assert sorted(by_line) == [3, 4, 5, 6, 8, 9]
    assert "invalid JSON" in by_line[3]
    assert "missing 'audio'" in by_line[4]
    assert "not a JSON object" in by_line[5]
    assert "not found" in by_line[6]
    assert "empty" in by_line[8]
    assert "not a non-empty string" in by_line[9]


def test_pack_respects_budget_and_covers_every_clip() -> None:
    """Every clip lands in exactly one batch, each batch costs ≤ budget unless a clip is alone."""
    rng = np.random.default_rng(0)
    clips = [_clip(i + 1, float(s)) for i, s in enumerate(rng.uniform(0.5, 30, 300))]
    clips.append(_clip(301, 100.0))
    for budget in (20.0, 60.0, 320.0):
        batches = pack(clips, budget)
        lines = sorted(c.line for b in batches for c in b)
        assert lines == list(range(1, 302))
        for b in batches:
            assert batch_cost(b) <= budget_samples(budget) or len(b) == 1
            assert [c.line for c in b] == sorted(c.line for c in b)
        firsts = [b[0].line for b in batches]
        assert firsts == sorted(firsts)
        (alone,) = [b for b in batches if any(c.line == 301 for c in b)]
        if budget < 100:
            assert len(alone) == 1


def test_pack_wastes_little_padding() -> None:
    """Sorting by length keeps padding under 10 % on 1–30 s clips at a 320 s budget."""
    rng = np.random.default_rng(1)
    clips = [_clip(i + 1, float(s)) for i, s in enumerate(rng.uniform(1, 30, 1000))]
    batches = pack(clips, 320.0)
    real = sum(c.padded for c in clips)
    padded = sum(batch_cost(b) for b in batches)
    assert padded / real < 1.10


def test_shape_buckets_make_batch_shapes_repeat_within_the_budget() -> None:
    """Lengths rounded up to whole buckets (an eighth of the length where that is less): fewer
    distinct shapes, each batch still within the budget at its rounded length, a clip longer
    than the budget alone at its own length."""
    rng = np.random.default_rng(2)
    clips = [_clip(i + 1, float(s)) for i, s in enumerate(rng.uniform(1, 30, 1000))]
    clips.append(_clip(1001, 400.0))
    budget = budget_samples(320.0)
    bucket = bucket_samples(1.0)
    assert bucket == 12 * FRAME_SAMPLES  # whole frames: 12.5 rounds to 12
    plain = {(len(b), max(c.padded for c in b)) for b in pack(clips, 320.0)}
    batches = pack(clips, 320.0, 1.0)
    assert sorted(c.line for b in batches for c in b) == list(range(1, 1002))
    shapes = set()
    for b in batches:
        longest = max(c.padded for c in b)
        length = batch_length(longest, bucket, budget)
        shapes.add((len(b), length))
        if longest > budget:
            assert len(b) == 1 and length == longest
            continue
        assert length % FRAME_SAMPLES == 0
        assert longest <= length <= longest + min(bucket, longest // 8)
        assert batch_cost(b, bucket, budget) == len(b) * length <= budget
    assert len(shapes) <= 0.6 * len(plain)  # 30 against 53 on this set
    # cut() gives each batch with the length it was cut for.
    assert cut(clips, 320.0, 1.0) == [
        (b, batch_length(max(c.padded for c in b), bucket, budget)) for b in batches
    ]
    # No bucket: as before.
    assert pack(clips, 320.0, 0.0) == pack(clips, 320.0)
    assert batch_length(5 * FRAME_SAMPLES, 0, budget) == 5 * FRAME_SAMPLES
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            bucket_samples(bad)


@pytest.mark.parametrize("bucket_s", [1.0, 200.0])
def test_short_clips_are_not_padded_to_a_whole_bucket(bucket_s: float) -> None:
    """A 1.04 s clip (13 frames) is not padded to 24 frames by a 0.96 s bucket, and a bucket as
    large as the budget pads no batch by more than an eighth."""
    budget = budget_samples(320.0)
    bucket = bucket_samples(bucket_s)
    for frames in (1, 8, 13, 16, 40, 95, 96, 97, 250, 3999):
        length = batch_length(frames * FRAME_SAMPLES, bucket, budget)
        assert frames * FRAME_SAMPLES <= length <= frames * FRAME_SAMPLES * 9 // 8
        assert length <= budget
    assert batch_length(13 * FRAME_SAMPLES, bucket_samples(1.0), budget) == 13 * FRAME_SAMPLES
    assert bucket_samples(0.03) == 0  # under half a frame: none


def test_collate_pads_every_row_with_zeros_whatever_memory_it_is_given() -> None:
    """The batch array may come unwritten (pinned memory is not cleared): the tails are zeroed.
    It is as long as planned, or as the longest clip where a header undercounted (not rounded
    up further)."""
    from concurrent.futures import Future

    from gpuspool.extract.worker import collate

    def ready(*lengths: int) -> list[Future[Any]]:
        futs: list[Future[Any]] = []
        for i, n in enumerate(lengths):
            f: Future[Any] = Future()
            f.set_result((np.full(n, float(i + 1), np.float32), n))
            futs.append(f)
        return futs

    held = object()

    def nan_alloc(rows: int, n: int) -> tuple[Any, Any]:
        return np.full((rows, n), np.nan, np.float32), held

    clips = [_clip(1, 0.2), _clip(2, 0.1)]
    col = collate(clips, ready(3 * FRAME_SAMPLES, FRAME_SAMPLES), 4 * FRAME_SAMPLES, nan_alloc)
    assert col.held is held and col.array is not None
    assert col.array.shape == (2, 4 * FRAME_SAMPLES)
    a = col.array
    assert (a[0, : 3 * FRAME_SAMPLES] == 1).all() and (a[0, 3 * FRAME_SAMPLES :] == 0).all()
    assert (a[1, :FRAME_SAMPLES] == 2).all() and (a[1, FRAME_SAMPLES:] == 0).all()
    longer = collate(clips, ready(6 * FRAME_SAMPLES, 7), 4 * FRAME_SAMPLES, nan_alloc)
    assert longer.array is not None and longer.array.shape == (2, 6 * FRAME_SAMPLES)
    assert not np.isnan(longer.array).any()


def test_synth_dataset_mixes_rates_channels_formats(tmp_path: Path) -> None:
    """synth_dataset writes relative paths, text, and mixed rates, channels and formats."""
    jl = synth_dataset(tmp_path, 20, 0.3, 1.0, seed=5, stereo_fraction=0.5)
    recs = [json.loads(x) for x in jl.read_text().splitlines()]
    assert len(recs) == 20
    rates, chans, exts = set(), set(), set()
    for r in recs:
        assert not Path(r["audio"]).is_absolute() and r["text"]
        info = sf.info(str(tmp_path / r["audio"]))
        rates.add(info.samplerate)
        chans.add(info.channels)
        exts.add(Path(r["audio"]).suffix)
        assert 0.25 < info.duration < 1.2
    assert len(rates) >= 4 and chans == {1, 2}
    assert {".wav", ".flac"} <= exts
    assert rates <= set(SAMPLE_RATES) and MODEL_SAMPLE_RATE in SAMPLE_RATES


def test_estimate_bounds_measured_h100_peaks() -> None:
    """need_gib is at or above every measured H100 peak of the default mode, by at most 15 %."""
    from gpuspool.estimate import need_gib

    results = Path(__file__).resolve().parents[2] / "bench" / "results" / "extract_h100.json"
    if not results.exists():
        pytest.skip("no benchmark results")
    res = json.loads(results.read_text())
    points = res["gpuonly"]["memory"]
    assert len(points) >= 5
    for p in points:
        measured = p["max_reserved_gib"] + p["context_gib"]
        est = need_gib(p["longest_s"], p["budget_s"], "fp32")
        assert measured <= est <= 1.15 * measured, p["label"]


@pytest.mark.parametrize(
    ("field", "flag", "value"),
    [
        ("batch_seconds", "--batch-seconds", float("nan")),
        ("batch_seconds", "--batch-seconds", 0.0),
        ("shape_bucket_s", "--shape-bucket", float("inf")),
        ("shape_bucket_s", "--shape-bucket", -1.0),
    ],
)
def test_a_worker_set_up_in_code_refuses_what_the_cut_cannot_use(
    tmp_path: Path, field: str, flag: str, value: float
) -> None:
    """Options built in code skip the command line's checks: the run refuses them as usage
    errors naming the flag, before it opens anything (not as a crash of the producer thread)."""
    import io

    from gpuspool.extract.events import Events
    from gpuspool.extract.worker import Options, Run

    buf = io.StringIO()
    opts = Options(
        input=tmp_path / "in.jsonl", output=tmp_path / "out.jsonl", tokenizer="t", **{field: value}
    )
    assert Run(opts, Events(buf)).execute() == 64
    assert json.loads(buf.getvalue().splitlines()[-1])["reason"].startswith(flag + ":")
    assert not (tmp_path / "out.jsonl.partial").exists()
