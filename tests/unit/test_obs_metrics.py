"""Metrics: loopback-only binding, gauges from a tick, counters from the ledger's transitions."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuspool.metrics import DaemonMetrics, MetricsAddressError, MetricsServer, parse_loopback
from tests.conftest import Harness, gpu_entry


def sample(m: DaemonMetrics, name: str, **labels: str) -> float | None:
    value = m.registry.get_sample_value(name, labels)
    return value


@pytest.mark.parametrize("address", ["0.0.0.0:9404", "10.1.2.3:9404", "example.org:80",
                                     "[::]:9404", "9404", "127.0.0.1:notaport"])  # fmt: skip
def test_non_loopback_or_malformed_address_is_refused(address: str) -> None:
    """Anything but a loopback HOST:PORT raises with a message naming the rule."""
    with pytest.raises(MetricsAddressError, match="metrics_address"):
        parse_loopback(address)


def test_loopback_addresses_are_accepted() -> None:
    """IPv4, IPv6 and localhost loopback parse to a host and port."""
    assert parse_loopback("127.0.0.1:9404") == ("127.0.0.1", 9404)
    assert parse_loopback("[::1]:9") == ("::1", 9)
    assert parse_loopback("localhost:0") == ("127.0.0.1", 0)


def test_gauges_and_counters_follow_a_job_through_ticks(harness: Harness) -> None:
    """GPU memory matches the GPU file; start, finish, wait and duration are each counted once."""
    m = DaemonMetrics()
    harness.set_gpus([gpu_entry(0, 10, processes=[{"pid": 1, "used_mib": 512}])])
    job = harness.submit("a")
    harness.tick()
    m.observe(harness.daemon)
    assert sample(m, "gpuspool_gpu_free_mib", gpu="0", UUID="GPU-sim-0",
                  model_name="Simulated 80GB") == 10 * 1024  # fmt: skip
    assert sample(m, "gpuspool_gpu_used_mib", gpu="0", UUID="GPU-sim-0",
                  model_name="Simulated 80GB") == 70 * 1024  # fmt: skip
    assert sample(m, "gpuspool_jobs", state="queued") == 1
    assert sample(m, "gpuspool_jobs_started_total") == 0
    harness.set_gpus([gpu_entry(0, 50)])
    for _ in range(3):
        harness.tick(5.0)
    m.observe(harness.daemon)
    assert harness.state(job) in {"running", "done"}
    assert sample(m, "gpuspool_jobs_started_total") == 1
    # Waited from intake (t=1001) to the start three 5-s ticks later (t=1016).
    assert sample(m, "gpuspool_job_wait_seconds_count") == 1
    assert sample(m, "gpuspool_job_wait_seconds_sum") == pytest.approx(15.0)
    assert harness.settle(job) == "done"
    m.observe(harness.daemon)
    m.observe(harness.daemon)  # a second look counts nothing twice
    assert sample(m, "gpuspool_jobs_finished_total", outcome="done") == 1
    assert sample(m, "gpuspool_job_duration_seconds_count", outcome="done") == 1
    assert sample(m, "gpuspool_jobs_started_total") == 1
    assert sample(m, "gpuspool_jobs", state="done") == 1
    assert sample(m, "gpuspool_last_tick_timestamp_seconds") == harness.now


def test_retry_then_failure_are_counted(harness: Harness) -> None:
    """An OOM is a retry; the last attempt's OOM is a failure."""
    harness.env["STUB_MODE"] = "oom"
    m = DaemonMetrics()
    harness.set_gpus([gpu_entry(0, 50)])
    job = harness.submit("oom", max_attempts=2)
    for _ in range(3):
        harness.tick()
    assert harness.settle(job) == "deferred"
    m.observe(harness.daemon)
    assert sample(m, "gpuspool_jobs_retried_total") == 1
    assert sample(m, "gpuspool_job_duration_seconds_count", outcome="retry") == 1
    harness.tick(30.0)
    for _ in range(3):
        harness.tick()
    assert harness.settle(job) == "failed"
    m.observe(harness.daemon)
    assert sample(m, "gpuspool_jobs_finished_total", outcome="failed") == 1
    assert sample(m, "gpuspool_jobs_started_total") == 2


def test_unreadable_gpu_has_no_memory_value_and_counts_an_error(harness: Harness) -> None:
    """A GPU in error is exported as unhealthy with an error count, never as 0 MiB free."""
    m = DaemonMetrics(dcgm_names=True, hostname="node1")
    harness.set_gpus([gpu_entry(0, 50, error="GPU is lost")])
    harness.tick()
    m.observe(harness.daemon)
    labels = {"gpu": "0", "UUID": "GPU-sim-0", "model_name": "Simulated 80GB"}
    dcgm = {"gpu": "0", "UUID": "GPU-sim-0", "device": "nvidia0", "modelName": "Simulated 80GB",
            "Hostname": "node1"}  # fmt: skip
    assert sample(m, "DCGM_FI_DEV_FB_FREE", **dcgm) is None
    assert sample(m, "gpuspool_gpu_free_mib", **labels) is None
    assert sample(m, "gpuspool_gpu_healthy", **labels) == 0
    assert sample(m, "gpuspool_gpu_probe_errors_total", UUID="GPU-sim-0") == 1


def test_server_serves_the_registry_on_loopback(harness: Harness) -> None:
    """The HTTP endpoint on an ephemeral loopback port returns the exposition text."""
    m = DaemonMetrics()
    harness.tick()
    m.observe(harness.daemon)
    server = MetricsServer(m, "127.0.0.1:0")
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        text = urllib.request.urlopen(server.url, timeout=5).read().decode()
    finally:
        server.close()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"gpuspool_gpu_free_mib", "gpuspool_jobs", "gpuspool_job_wait_seconds"} <= names
    assert not any(name.startswith("DCGM_") for name in names)  # off by default


def test_dcgm_named_series_carry_dcgm_exporters_labels(harness: Harness) -> None:
    """With the DCGM names on: the same MiB values, labelled as dcgm-exporter labels them."""
    m = DaemonMetrics(dcgm_names=True, hostname="node1")
    harness.set_gpus([gpu_entry(0, 10), gpu_entry(1, 30)])
    harness.tick()
    m.observe(harness.daemon)
    for index, free in ((0, 10), (1, 30)):
        dcgm = {"gpu": str(index), "UUID": f"GPU-sim-{index}", "device": f"nvidia{index}",
                "modelName": "Simulated 80GB", "Hostname": "node1"}  # fmt: skip
        assert sample(m, "DCGM_FI_DEV_FB_FREE", **dcgm) == free * 1024
        assert sample(m, "DCGM_FI_DEV_FB_USED", **dcgm) == (80 - free) * 1024
        assert sample(m, "DCGM_FI_DEV_FB_TOTAL", **dcgm) == 80 * 1024


def test_counters_start_at_zero_and_build_info_is_there() -> None:
    """Before any event: every outcome and the whole-probe error series read 0; no *_created
    series; the version and the process collector are exported."""
    from gpuspool import __version__

    m = DaemonMetrics()
    for outcome in ("done", "failed", "cancelled"):
        assert sample(m, "gpuspool_jobs_finished_total", outcome=outcome) == 0
    for outcome in ("done", "failed", "cancelled", "retry", "interrupted"):
        assert sample(m, "gpuspool_job_duration_seconds_count", outcome=outcome) == 0
    assert sample(m, "gpuspool_gpu_probe_errors_total", UUID="") == 0
    assert sample(m, "gpuspool_build_info", version=__version__) == 1
    assert (sample(m, "process_resident_memory_bytes") or 0) > 0
    names = {s.name for f in m.registry.collect() for s in f.samples}
    assert not [n for n in names if n.endswith("_created")]
