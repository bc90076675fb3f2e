"""The extraction worker end to end on CPU with the tiny random-weight tokenizer."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from tests.conftest import json_lines as _records
from tests.extract.conftest import run_extract

from gpuspool.exitcodes import ExitCode
from gpuspool.extract.audio import load_resampled
from gpuspool.extract.headers import FRAME_SAMPLES

pytest.importorskip("torch")
pytest.importorskip("qwen_tts")


def _by_audio(path: Path) -> dict[str, Any]:
    return {r["audio"]: r["audio_codes"] for r in _records(path)}


@pytest.fixture(scope="module")
def reference(
    tiny_tokenizer: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One uninterrupted run at the default settings (the output other tests compare to)."""
    out = tmp_path_factory.mktemp("ref") / "out.jsonl"
    assert run_extract("--input", dataset, "--output", out, "--tokenizer", tiny_tokenizer).code == 0
    return out


def test_loader_is_bit_identical_to_official(dataset: Path, official_tokenizer: Any) -> None:
    """Decoding and resampling equal Qwen3TTSTokenizer.load_audio bit for bit on every format."""
    base = dataset.parent
    for rec in _records(dataset):
        p = base / rec["audio"]
        ref = official_tokenizer.load_audio(str(p), target_sr=24000)
        got = load_resampled(p)
        assert got.dtype == np.float32 and got.shape == ref.shape, p.name
        assert np.array_equal(got, ref), p.name


def test_codes_match_official_except_last_frame(
    reference: Path, dataset: Path, official_tokenizer: Any
) -> None:
    """Every frame but each clip's last equals Qwen3TTSTokenizer.encode on that clip alone."""
    base = dataset.parent
    inputs = _records(dataset)
    outputs = _records(reference)
    assert [r["audio"] for r in outputs] == [r["audio"] for r in inputs]
    distinct: set[int] = set()
    for inp, out in zip(inputs, outputs, strict=True):
        assert {k: v for k, v in out.items() if k != "audio_codes"} == inp
        got = np.asarray(out["audio_codes"])
        ref = official_tokenizer.encode([str(base / inp["audio"])]).audio_codes[0].numpy()
        n = load_resampled(base / inp["audio"]).shape[0]
        assert got.shape == ref.shape == (-(-n // FRAME_SAMPLES), 16)
        assert np.array_equal(got[:-1], ref[:-1]), inp["audio"]
        distinct.update(got.ravel().tolist())
    assert len(distinct) > 20  # the comparison is not vacuous


def test_codes_identical_across_budgets_and_line_orders(
    extract: Any, reference: Path, dataset: Path, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    """Codes do not depend on --batch-seconds, --shape-bucket, --sort-window or the order of
    lines."""
    expected = _by_audio(reference)
    lines = dataset.read_text().splitlines()
    random.Random(7).shuffle(lines)
    shuffled = dataset.parent / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines) + "\n")
    for inp, extra in (
        (dataset, ["--batch-seconds", "3", "--sort-window", "5"]),
        (shuffled, ["--batch-seconds", "40", "--loader-mode", "thread"]),
        (dataset, ["--batch-seconds", "1000"]),
        (dataset, ["--shape-bucket", "0"]),  # the default rounds to 1 s buckets
        (shuffled, ["--batch-seconds", "20", "--shape-bucket", "3"]),
    ):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}.jsonl"
        r = extract("--input", inp, "--output", out, "--tokenizer", tiny_tokenizer, *extra)
        assert r.code == 0
        got = _records(out)
        assert [g["audio"] for g in got] == [
            json.loads(x)["audio"] for x in inp.read_text().splitlines()
        ]
        assert {g["audio"]: g["audio_codes"] for g in got} == expected


def test_events_and_summary(
    extract: Any, dataset: Path, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    """stdout carries only start/progress/summary JSON events with the documented fields."""
    out = tmp_path / "out.jsonl"
    r = extract(
        "--input",
        dataset,
        "--output",
        out,
        "--tokenizer",
        tiny_tokenizer,
        "--batch-seconds",
        "2",
        "--progress-interval-s",
        "0.01",
        "--device",
        "cpu",
    )
    assert r.code == 0
    assert r.events[0]["event"] == "start" and r.events[-1]["event"] == "summary"
    assert {e["event"] for e in r.events} == {"start", "progress", "summary"}
    start = r.one("start")
    for k in ("lines_total", "audio_s_total", "device", "batch_seconds", "need_gib"):
        assert k in start
    assert start["lines_total"] == 16 and start["device"] == "cpu"
    prog = r.of("progress")
    assert prog
    for p in prog:
        for k in (
            "lines_done",
            "lines_total",
            "audio_s_done",
            "audio_s_per_s",
            "eta_s",
            "gpu_peak_gib",
        ):
            assert k in p
        assert p["gpu_peak_gib"] is None
    done = [p["lines_done"] for p in prog]
    assert done == sorted(done)
    s = r.one("summary")
    assert s["lines_done"] == 16 and s["lines_skipped"] == 0
    assert s["audio_s_done"] == pytest.approx(start["audio_s_total"], rel=1e-3)
    assert s["audio_s_per_s"] > 0 and s["wall_s"] > 0 and s["peak_gpu_gib"] is None
    assert s["max_batch_padded_s"] <= 2.0 + 7.2  # one clip over budget may run alone
    # start-up is timed apart from the work: imports, then model load and warm-up
    assert s["import_s"] >= 0 and s["model_load_s"] > 0
    assert s["import_s"] + s["model_load_s"] + s["processing_s"] <= s["wall_s"]
    assert not Path(str(out) + ".partial").exists()
    assert not Path(str(out) + ".partial.ckpt").exists()


def test_output_exists_and_overwrite(
    extract: Any, dataset: Path, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    """An existing output is kept with exit 73 unless --overwrite replaces it."""
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    r = extract("--input", dataset, "--output", out, "--tokenizer", tiny_tokenizer)
    assert r.code == ExitCode.OUTPUT_EXISTS
    assert r.one("error")["exit_code"] == 73
    assert out.read_text() == "keep me\n"
    r = extract("--input", dataset, "--output", out, "--tokenizer", tiny_tokenizer, "--overwrite")
    assert r.code == 0 and len(_records(out)) == 16


def test_usage_errors(extract: Any, dataset: Path, tiny_tokenizer: Path, tmp_path: Path) -> None:
    """Bad flags and an unusable device exit 64 with an error event."""
    r = extract(
        "--input",
        dataset,
        "--output",
        tmp_path / "o.jsonl",
        "--tokenizer",
        tiny_tokenizer,
        "--on-bad-line",
        "maybe",
    )
    assert r.code == ExitCode.USAGE and r.one("error")["exit_code"] == 64
    for flag, value in (
        ("--shape-bucket", "-1"), ("--shape-bucket", "nan"), ("--shape-bucket", "inf"),
        ("--batch-seconds", "nan"), ("--batch-seconds", "inf"), ("--batch-seconds", "0"),
    ):  # fmt: skip
        r = extract(
            "--input", dataset, "--output", tmp_path / "o.jsonl", "--tokenizer", tiny_tokenizer,
            flag, value,
        )  # fmt: skip
        assert r.code == ExitCode.USAGE, (flag, value)
    r = extract(
        "--input",
        dataset,
        "--output",
        tmp_path / "o.jsonl",
        "--tokenizer",
        tiny_tokenizer,
        "--device",
        "tpu",
    )
    assert r.code == ExitCode.USAGE and "device" in r.one("error")["reason"]
    r = extract(
        "--input",
        tmp_path / "none.jsonl",
        "--output",
        tmp_path / "o.jsonl",
        "--tokenizer",
        tiny_tokenizer,
    )
    assert r.code == ExitCode.DATA_ERROR and "input not found" in r.one("error")["reason"]


def _bad_input(tmp: Path, dataset: Path) -> tuple[Path, dict[int, str]]:
    """Copy of the dataset with one bad line of every kind; returns it and {line: reason part}."""
    d = tmp / "bad"
    shutil.copytree(dataset.parent, d)
    good = _records(d / dataset.name)[:6]
    sf.write(d / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    (d / "junk.wav").write_bytes(b"RIFF....WAVEfmt garbage" * 20)
    nan = np.full(8000, np.nan, dtype=np.float32)
    sf.write(d / "nan.wav", nan, 16000, subtype="FLOAT")
    lines = [
        json.dumps(good[0]),
        "{broken json",
        json.dumps(good[1]),
        json.dumps({"text": "no audio field"}),
        "",
        json.dumps({"audio": "missing.wav", "text": "x"}),
        json.dumps(good[2]),
        json.dumps({"audio": "empty.wav"}),
        json.dumps({"audio": "junk.wav"}),
        json.dumps({"audio": "nan.wav", "text": "not finite"}),
        json.dumps(good[3]),
        "[1, 2]",
        json.dumps(good[4]),
    ]
    inp = d / "bad.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    expect = {
        2: "invalid JSON",
        4: "missing 'audio'",
        6: "not found",
        8: "empty",
        9: "unreadable",
        10: "NaN",
        12: "not a JSON object",
    }
    return inp, expect


def test_bad_lines_skip_writes_report(
    extract: Any, dataset: Path, tiny_tokenizer: Path, tmp_path: Path, reference: Path
) -> None:
    """With skip, good lines come out in order and the report names each bad line and reason."""
    inp, expect = _bad_input(tmp_path, dataset)
    out = tmp_path / "out.jsonl"
    r = extract(
        "--input",
        inp,
        "--output",
        out,
        "--tokenizer",
        tiny_tokenizer,
        "--on-bad-line",
        "skip",
        "--batch-seconds",
        "4",
    )
    assert r.code == 0
    good = [
        json.loads(x)
        for i, x in enumerate(inp.read_text().splitlines(), 1)
        if x.strip() and i not in expect
    ]
    got = _records(out)
    assert [g["audio"] for g in got] == [g["audio"] for g in good]
    ref = _by_audio(reference)
    assert all(g["audio_codes"] == ref[g["audio"]] for g in got)
    report = _records(Path(str(out) + ".skipped.jsonl"))
    assert [x["line"] for x in report] == sorted(expect)
    for x in report:
        assert expect[x["line"]] in x["reason"]
    s = r.one("summary")
    assert s["lines_done"] == 5 and s["lines_skipped"] == 7
    assert r.one("start")["lines_total"] == 12


def test_bad_line_fail_names_the_line(
    extract: Any, dataset: Path, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    """With fail (the default), the first bad line stops the run with exit 65 and its number."""
    inp, _ = _bad_input(tmp_path, dataset)
    out = tmp_path / "out.jsonl"
    r = extract("--input", inp, "--output", out, "--tokenizer", tiny_tokenizer)
    assert r.code == ExitCode.DATA_ERROR
    err = r.one("error")
    assert err["exit_code"] == 65 and err["line"] == 2 and "invalid JSON" in err["reason"]
    assert not out.exists()


def test_load_time_failure_keeps_done_prefix(
    extract: Any, dataset: Path, tiny_tokenizer: Path, tmp_path: Path, reference: Path
) -> None:
    """A clip that fails only when decoded stops a fail run at its line, keeping earlier lines."""
    d = tmp_path / "d"
    shutil.copytree(dataset.parent, d)
    sf.write(d / "nan.wav", np.full(4000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    recs = _records(d / dataset.name)
    lines = [json.dumps(x) for x in recs[:8]] + [json.dumps({"audio": "nan.wav"})]
    lines += [json.dumps(x) for x in recs[8:]]
    inp = d / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    r = extract(
        "--input",
        inp,
        "--output",
        out,
        "--tokenizer",
        tiny_tokenizer,
        "--batch-seconds",
        "1",
        "--sort-window",
        "4",
    )
    assert r.code == ExitCode.DATA_ERROR
    err = r.one("error")
    assert err["line"] == 9 and "NaN" in err["reason"]
    partial = _records(Path(str(out) + ".partial"))
    assert [p["audio"] for p in partial] == [x["audio"] for x in recs[:8]]
    ref = _by_audio(reference)
    assert all(p["audio_codes"] == ref[p["audio"]] for p in partial)
    assert not out.exists()


def test_resume_with_other_arguments_is_refused(
    extract: Any, dataset: Path, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    """A partial output from a run with another dtype is not mixed in: exit 64, or --no-resume."""
    out = tmp_path / "out.jsonl"
    Path(str(out) + ".partial.ckpt").write_text(
        json.dumps({"version": 1, "fingerprint": {"other": True}, "next_line": 3})
    )
    r = extract("--input", dataset, "--output", out, "--tokenizer", tiny_tokenizer)
    assert r.code == ExitCode.USAGE and "--no-resume" in r.one("error")["reason"]
    r = extract("--input", dataset, "--output", out, "--tokenizer", tiny_tokenizer, "--no-resume")
    assert r.code == 0 and len(_records(out)) == 16


def test_tokenizer_that_cannot_load_is_a_config_error(
    extract: Any, dataset: Path, tmp_path: Path
) -> None:
    """A tokenizer folder that is not one: exit 78 (config), final for the daemon, no retry."""
    empty = tmp_path / "not-a-tokenizer"
    empty.mkdir()
    r = extract("--input", dataset, "--output", tmp_path / "o.jsonl", "--tokenizer", empty,
                "--device", "cpu")  # fmt: skip
    assert r.code == ExitCode.CONFIG
    reason = r.one("error")["reason"]
    assert "cannot be loaded" in reason and str(empty) in reason


def test_events_go_to_the_daemon_channel_too(
    extract: Any, dataset: Path, tiny_tokenizer: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """With GPUSPOOL_EVENTS_FD set, each event is also written there, in the protocol's format."""
    from gpuspool.protocol import ProgressEvent, SummaryEvent, parse_events

    channel = tmp_path / "events"
    fd = os.open(channel, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    monkeypatch.setenv("GPUSPOOL_EVENTS_FD", str(fd))
    try:
        r = extract("--input", dataset, "--output", tmp_path / "o.jsonl", "--tokenizer",
                    tiny_tokenizer, "--device", "cpu", "--progress-interval-s", "0.01")  # fmt: skip
    finally:
        os.close(fd)
    assert r.code == 0
    got = parse_events(channel.read_bytes())
    assert [e.event for e in got] == [e["event"] for e in r.events]
    assert isinstance(got[-1], SummaryEvent) and got[-1].lines_done == 16
    assert any(isinstance(e, ProgressEvent) for e in got)


def test_job_logs_do_not_start_with_import_noise() -> None:
    """Importing qwen-tts prints banners (flash-attn, sox) that never reach a job's log."""
    import subprocess
    import sys

    code = "from gpuspool.extract.model import import_tokenizer_stack as f; f(); print('ok')"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout == "ok\n" and got.stderr == ""


def test_time_waiting_for_slow_loaders_counts_as_waiting_for_audio(
    extract: Any, dataset: Path, tiny_tokenizer: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """A batch still being decoded when the encoder wants it is time spent waiting for audio,
    however far it got through the queue: with one loader taking 0.15 s a clip, most of the
    encoding thread's time shows as ``waiting_for_audio_s``."""
    import time

    from gpuspool.extract import worker

    real = worker.load_padded

    def slow(path: Path) -> Any:
        time.sleep(0.15)
        return real(path)

    monkeypatch.setattr(worker, "load_padded", slow)
    r = extract(
        "--input",
        dataset,
        "--output",
        tmp_path / "out.jsonl",
        "--tokenizer",
        tiny_tokenizer,
        "--device",
        "cpu",
        "--loader-mode",
        "thread",
        "--loader-workers",
        "1",
    )
    assert r.code == 0
    s = r.one("summary")
    decoding = 16 * 0.15  # 16 clips, one after the other
    assert s["waiting_for_audio_s"] >= 0.5 * decoding
    assert s["waiting_for_audio_s"] <= s["processing_s"]
