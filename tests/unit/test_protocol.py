"""The worker → daemon events protocol: what is accepted, and that nothing else is."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuspool.models import JobSpec
from gpuspool.protocol import (
    MAX_EVENT_BYTES,
    MAX_GO_BYTES,
    ErrorEvent,
    ProgressEvent,
    SummaryEvent,
    encode_event,
    encode_go,
    parse_event,
    parse_events,
    parse_go,
)


def test_worker_events_round_trip() -> None:
    line = encode_event("progress", {"lines_done": 3, "lines_total": 9, "eta_s": float("inf")})
    event = parse_event(line)
    assert isinstance(event, ProgressEvent)
    assert event.fields() == {"lines_done": 3, "lines_total": 9}
    assert json.loads(line)["timestamp"].endswith("Z")  # ISO 8601 UTC, like the journal


@pytest.mark.parametrize(
    "line",
    [
        b'{"event":"progress","lines_done":"a"}',  # a string where a count belongs
        b'{"event":"progress","lines_done":1.5}',
        b'{"event":"progress","lines_done":true}',
        b'{"event":"progress","lines_done":-1}',
        b'{"event":"progress","audio_s_done":1e400}',
        b'{"event":"progress","audio_s_done":NaN}',
        b'{"event":"progress","lines_done":' + b"9" * 400 + b"}",
        b'{"event":"error","exit_code":1,"reason":"' + b"x" * 5000 + b'"}',
        b'{"event":"error","exit_code":999}',
        b'{"event":"error"}',
        b'{"event":"job_finished","source":"daemon"}',  # a forged daemon line
        b'{"event":"summary","lines_done":[1]}',
        b"{" + b"[" * 2000,
        b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}",
        b"[" * 2000,
        b"not json",
        b"\xff\xfe{",
        b"",
        b'{"event":"progress"}' + b" " * MAX_EVENT_BYTES,
    ],
)
def test_invalid_lines_are_ignored(line: bytes) -> None:
    assert parse_event(line) is None


def test_unknown_fields_are_dropped_and_reason_is_cleaned() -> None:
    event = parse_event(b'{"event":"error","exit_code":65,"reason":"a\\u001b[2Jb","x":[[[]]]}')
    assert isinstance(event, ErrorEvent)
    assert event.reason == "a?[2Jb" and "x" not in event.fields()


def test_an_oversized_error_keeps_its_code_and_reason() -> None:
    line = encode_event("error", {"exit_code": 65, "reason": "ü" * 5000, "output": "é" * 9000})
    event = parse_event(line)
    assert isinstance(event, ErrorEvent) and event.exit_code == 65 and event.reason.startswith("ü")


def test_an_oversized_event_still_parses_with_its_numbers() -> None:
    line = encode_event("summary", {"lines_done": 4, "peak_gpu_gib": 1.5, "output": "é" * 9000})
    assert len(line) <= MAX_EVENT_BYTES
    event = parse_event(line)
    assert isinstance(event, SummaryEvent) and event.peak_gpu_gib == 1.5


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_never_raise(data: bytes) -> None:
    for event in parse_events(data):
        json.dumps(event.fields())


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["start", "progress", "summary", "error", "x"]),
       st.dictionaries(st.sampled_from(["lines_done", "lines_total", "exit_code", "reason",
                                        "peak_gpu_gib", "eta_s", "resumed"]), _json))  # fmt: skip
def test_wrong_types_are_refused_or_bounded(kind: str, fields: dict[str, object]) -> None:
    line = json.dumps({"event": kind, **fields}, allow_nan=True).encode()
    event = parse_event(line)
    if event is not None:
        for value in event.fields().values():
            assert value is None or isinstance(value, (bool, int, float, str))
            assert not isinstance(value, float) or abs(value) <= 1e15


@pytest.mark.parametrize(
    ("field", "value"),
    [("tokenizer", "tok\x00x"), ("tokenizer", "tok\nx"), ("input", "/data/a\rb.jsonl"),
     ("output", "/data/\x1b[31mout.jsonl"), ("name", "job\x07"), ("gpus", ["GPU-\x00"])],
)  # fmt: skip
def test_job_strings_with_control_characters_are_refused(field: str, value: object) -> None:
    data = {"input": "/data/in.jsonl", "output": "/data/out.jsonl", "tokenizer": "t", field: value}
    with pytest.raises(ValueError, match=f"{field}[\\s\\S]*control characters"):
        JobSpec.model_validate(data)


def test_status_shows_only_numbers_of_a_legacy_ledger_row() -> None:
    """Progress stored by an older version (which copied whatever the worker printed) shows
    as numbers or nothing, so ``status`` renders."""
    from gpuspool.views import progress_view

    got = progress_view('{"lines_done": "a", "lines_total": 3, "eta_s": 1e400, "x": [[]]}')
    assert got["lines_done"] is None and got["lines_total"] == 3 and got["eta_s"] is None
    assert set(progress_view("[" * 5000).values()) == {None}


def test_the_summary_keeps_the_workers_start_up_times() -> None:
    """The worker's exec-to-first-batch time and its parts reach the daemon's job_finished."""
    line = encode_event("summary", {"lines_done": 4, "startup_s": 4.2, "import_s": 3.1,
                                    "model_load_s": 0.6, "launching_s": 1.0})  # fmt: skip
    event = parse_event(line)
    assert isinstance(event, SummaryEvent)
    fields = event.fields()
    assert (fields["startup_s"], fields["import_s"], fields["model_load_s"]) == (4.2, 3.1, 0.6)
    assert "launching_s" not in fields  # not a field of the protocol: dropped


def test_a_go_line_sets_only_the_gpu_and_the_attempt() -> None:
    go = {"CUDA_VISIBLE_DEVICES": "GPU-1", "GPUSPOOL_FENCE": "7", "GPUSPOOL_HOST": "h1"}
    line = encode_go(go)
    assert line.endswith(b"\n") and parse_go(line.rstrip(b"\n")) == go
    with pytest.raises(ValueError, match="LD_PRELOAD"):
        encode_go({"LD_PRELOAD": "/tmp/x.so"})
    with pytest.raises(ValueError, match="bytes"):
        encode_go({"GPUSPOOL_HOST": "h" * MAX_GO_BYTES})
    for bad in (b"[]", b"{", b'{"PATH": "/tmp"}', b'{"GPUSPOOL_FENCE": 7}',
                b'{"GPUSPOOL_HOST": "a\\u001bb"}'):  # fmt: skip
        assert parse_go(bad) is None, bad


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan", "inf", "-inf", 86401, 0])
def test_a_job_batch_budget_the_worker_cannot_use_is_refused(value: object) -> None:
    """``batch_seconds`` reaches the worker's command line: only a finite number in (0, 86400]."""
    data = {"input": "/data/in.jsonl", "output": "/data/out.jsonl", "tokenizer": "t"}
    with pytest.raises(ValueError, match="batch_seconds"):
        JobSpec.model_validate({**data, "batch_seconds": value})
    assert JobSpec.model_validate({**data, "batch_seconds": 86400}).batch_seconds == 86400
