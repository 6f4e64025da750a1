"""The memory monitor samples, raises alarms, and never outlives its context."""

from __future__ import annotations

import logging
import math
import threading
import time

import pytest
import torch
from torch.profiler import record_function

from kvlab.memory.monitor import Alarm, MemoryMonitor
from kvlab.memory.trace import MemoryTracer
from kvlab.memory.units import MiB as MIB


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kvlab-memory-monitor"]


def test_samples_arrive() -> None:
    with MemoryMonitor(interval=0.005) as monitor:
        assert wait_for(lambda: len(monitor.samples) >= 5)
    frame = monitor.samples
    assert list(frame.columns) == ["t", "rss_bytes", "cuda_allocated_bytes", "cuda_reserved_bytes", "label"]
    assert frame["t"].is_monotonic_increasing and (frame["rss_bytes"] > 0).all()
    assert frame["cuda_allocated_bytes"].isna().all()  # no CUDA device was asked for
    assert not monitor.running and monitor_threads() == []


def test_threshold_and_rate_alarms_fire(caplog: pytest.LogCaptureFixture) -> None:
    fired: list[Alarm] = []
    caplog.set_level(logging.WARNING, logger="kvlab.memory.monitor")
    with MemoryMonitor(interval=0.005, threshold_bytes=64 * MIB, rate_bytes_per_s=64 * MIB, rate_window_s=0.2,
                       callback=fired.append) as monitor:
        time.sleep(0.15)  # a quiet start: at least half a rate window of samples before the allocation
        block = torch.ones(256 * MIB // 4)  # written, so its pages are resident
        assert wait_for(lambda: {a.kind for a in fired} == {"threshold", "rate"})
        del block
    assert [a.kind for a in monitor.alarms].count("threshold") == 1  # fires once per crossing
    threshold = next(a for a in fired if a.kind == "threshold")
    assert threshold.value > 64 * MIB and threshold.metric == "rss_bytes"
    assert any("memory alarm" in r.getMessage() for r in caplog.records)


def test_alarm_names_top_sites_when_an_exact_tracer_is_active() -> None:
    fired: list[Alarm] = []
    with MemoryMonitor(interval=0.005, threshold_bytes=32 * MIB, callback=fired.append), MemoryTracer(frames=False):
        with record_function("big_buffer"):
            block = torch.empty(128 * MIB // 4)  # registered by the tracer now, resident only once written
        block.fill_(1.0)
        assert wait_for(lambda: bool(fired))
        del block
    assert fired[0].top_sites[0][0] == "big_buffer" and fired[0].top_sites[0][1] >= 128 * MIB
    assert "big_buffer" in fired[0].message


def test_thread_stops_when_the_body_raises() -> None:
    with pytest.raises(ValueError, match="boom"):
        with MemoryMonitor(interval=0.005) as monitor:
            assert monitor.running
            raise ValueError("boom")
    assert not monitor.running and monitor_threads() == []
    assert len(monitor.samples) >= 2  # the baseline and the sample taken at stop


def test_a_failing_callback_does_not_stop_sampling(caplog: pytest.LogCaptureFixture) -> None:
    def broken(alarm: Alarm) -> None:
        raise RuntimeError("observer bug")

    with MemoryMonitor(interval=0.005, threshold_bytes=0, callback=broken) as monitor:
        block = torch.ones(16 * MIB // 4)
        assert wait_for(lambda: bool(monitor.alarms))
        count = len(monitor.samples)
        assert wait_for(lambda: len(monitor.samples) > count + 3)
        del block
    assert any("callback failed" in r.getMessage() for r in caplog.records)


def test_misuse_is_rejected() -> None:
    with pytest.raises(ValueError):
        MemoryMonitor(interval=0)
    with pytest.raises(ValueError):
        MemoryMonitor(metric="cuda_allocated_bytes", device="cpu")
    monitor = MemoryMonitor(interval=0.01).start()
    try:
        with pytest.raises(RuntimeError):
            monitor.start()
    finally:
        monitor.stop()
    monitor.stop()  # idempotent


def test_labels_and_summary() -> None:
    with MemoryMonitor(interval=0.005) as monitor:
        monitor.mark("decode")
        assert wait_for(lambda: (monitor.samples["label"] == "decode").any())
    assert monitor.peak() >= monitor.samples["rss_bytes"].iloc[0]
    assert math.isfinite(monitor.growth())


def test_plugin_fixture_runs_during_the_test(memory_monitor: MemoryMonitor) -> None:
    assert memory_monitor.running
    assert wait_for(lambda: len(memory_monitor.samples) >= 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_counters() -> None:
    with MemoryMonitor(interval=0.005, device="cuda", threshold_bytes=64 * MIB) as monitor:
        block = torch.ones(128 * MIB // 4, device="cuda")
        assert wait_for(lambda: bool(monitor.alarms))
        del block
    assert monitor.metric == "cuda_allocated_bytes"
    assert monitor.samples["cuda_allocated_bytes"].max() >= 128 * MIB
