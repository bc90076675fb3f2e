"""SIGHUP on the real daemon: what a changed setting needs is rebuilt (the GPU probe, the metrics
server), and a setting that cannot change while running is named in the log."""

from __future__ import annotations

import signal
import sys
import urllib.request
from pathlib import Path

from gpuspool.gpus import write_gpu_file
from tests.conftest import STUB_WORKER, gpu_entry, wait_until
from tests.integration.conftest import LiveDaemon, wait_state


def test_sighup_rebuilds_probe_and_metrics_and_names_restart_settings(tmp_path: Path) -> None:
    live = LiveDaemon(tmp_path, worker_command=[sys.executable, STUB_WORKER], worker_extra_args=[])
    try:
        live.start()  # its GPU file shows 10 GiB free: the job waits (needs 20)
        data = tmp_path / "in.jsonl"
        data.write_text('{"audio": "a.wav"}\n')
        job = live.submit(data, tmp_path, name="waits")
        wait_until(lambda: live.state(job) == "queued", 20)
        other = tmp_path / "other-gpus.json"
        write_gpu_file(other, [gpu_entry(0, 60)])
        text = live.config.read_text()
        text = text.replace(f'"file:{live.gpu_file}"', f'"file:{other}"')
        text = text.replace(f'state_dir = "{tmp_path / "state"}"', 'state_dir = "/elsewhere"')
        live.config.write_text(text + 'metrics_address = "127.0.0.1:0"\n')
        assert live.proc is not None
        live.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: any(e["event"] == "config_reloaded" for e in live.events()), 20)

        # The new GPU source is polled: the job starts and ends on it.
        assert wait_state(live, job, {"done", "failed"}, timeout=60) == "done"
        # The metrics server now serves.
        (served,) = [e for e in live.events() if e["event"] == "metrics_serving"]
        with urllib.request.urlopen(served["url"], timeout=10) as reply:
            assert b"gpuspool_" in reply.read()
        # state_dir needs a restart: named, and the daemon stays on its ledger.
        (restart,) = [e for e in live.events() if e["event"] == "config_needs_restart"]
        assert restart["setting"] == "state_dir" and restart["configured"] == "/elsewhere"
        assert live.stop() == 0
    finally:
        if live.proc is not None and live.proc.poll() is None:
            live.proc.kill()
            live.proc.wait()
