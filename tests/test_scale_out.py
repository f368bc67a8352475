"""experiments/scale_out.py: the model's formulas on hand-checkable inputs, and the tiny run's JSON."""

import importlib.util
import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1]
_flags = os.environ.get("XLA_FLAGS")
spec = importlib.util.spec_from_file_location("scale_out", ROOT / "experiments" / "scale_out.py")
so = importlib.util.module_from_spec(spec)
spec.loader.exec_module(so)
if _flags is None:  # the script sets the fake device count for its own process: keep the tests' environment
    os.environ.pop("XLA_FLAGS", None)
else:
    os.environ["XLA_FLAGS"] = _flags


@pytest.mark.parametrize("k", [2, 4, 8])
def test_equal_stages_zero_latency_give_speedup_k(k):
    t = [0.1] * k
    step = so.dgl_sync_step(t, [1e6] * (k - 1), bandwidth_bps=float("inf"))
    assert step == pytest.approx(0.1)
    assert sum(t) / step == pytest.approx(k)
    # n batches: fill of K stages then n-1 periods
    assert so.pipeline_makespan(t, [0.0] * (k - 1), [0.0] * (k - 1), 10) == pytest.approx(0.1 * (k + 9))


def test_link_bound_pipeline_and_latency_in_fill_only():
    # 1 Gbit/s, 25 MB wire: 0.2 s on the link, slower than the 0.1 s stages
    assert so.dgl_sync_step([0.1, 0.1], [25e6], 1e9) == pytest.approx(0.2)
    assert so.link_time(25e6, 1e9, 0.005) == pytest.approx(0.205)
    assert so.pipeline_makespan([0.1, 0.1], [0.205], [0.2], 5) == pytest.approx(0.2 + 0.205 + 4 * 0.2)
    assert so.async_reuse([0.1, 0.1], [25e6], 1e9) == pytest.approx([1.0, 2.0])
    assert so.dgl_async_step([0.1, 0.3, 0.2]) == 0.3


def test_validation_hops_latency_only_and_with_bandwidth():
    # latency only: stage 0's hop overlaps its own compute, links never busy
    hops, busy = so.validation_hops([0.1, 0.2, 0.3], [1e3, 1e3], None, 0.15)
    assert hops == pytest.approx([0.05, 0.15]) and busy == [0.0, 0.0]
    assert so.validation_hops([0.1, 0.2], [1e3], None, 0.05) == ([0.0], [0.0])
    # 1000 bytes at 40 kbit/s: 0.2 s busy per item, hop 0.2 s + latency
    hops, busy = so.validation_hops([0.1, 0.1], [1000.0], 40e3, 0.02)
    assert hops == pytest.approx([0.22]) and busy == pytest.approx([0.2])
    assert so.pipeline_makespan([0.1, 0.1], hops, busy, 5) == pytest.approx(0.2 + 0.22 + 4 * 0.2)


def test_ring_allreduce_and_data_parallel():
    assert so.ring_allreduce_bytes(100.0, 4) == pytest.approx(150.0)  # 2 (K-1)/K G
    assert so.ring_allreduce_bytes(100.0, 2) == pytest.approx(100.0)
    # 4 devices, 1 s backprop, 1 GB gradients on 8 Gbit/s (1 GB/s), 1 ms latency: 0.25 + 6 ms + 1.5 s
    assert so.data_parallel_step(1.0, 1e9, 4, 8e9, 1e-3) == pytest.approx(0.25 + 0.006 + 1.5)
    assert so.data_parallel_step(1.0, 1e9, 1, 8e9, 1e-3) == 1.0


def test_gpipe_bubble():
    # K equal stages, free links: (M + K - 1) / M of one stage's time; speed-up K M / (M + K - 1)
    k, m, t = 4, 8, 0.2
    step = so.gpipe_step([t] * k, [0.0] * (k - 1), m, float("inf"), 0.0)
    assert step == pytest.approx((m + k - 1) * t / m)
    assert k * t / step == pytest.approx(k * m / (m + k - 1))


def test_best_split_and_steps_to_accuracy():
    sizes, costs = so.best_split([1.0, 1.0, 4.0, 1.0], [0.0, 0.0, 0.0, 0.5], 2)
    assert sizes == [2, 2] and costs == pytest.approx([2.0, 5.5])  # [3, 1] costs 6, [1, 3] 6.5
    sizes, costs = so.best_split([1.0] * 4, [0.0] * 4, 4)
    assert sizes == [1, 1, 1, 1]
    steps = so.steps_to_accuracy({1: [0.5, 0.9], 2: [0.7, 0.8]}, 10, 0.85)
    assert steps == {1: 20, 2: None}


def test_tiny_run_writes_json(tmp_path):
    out = tmp_path / "scale_out_tiny"
    so.main(["--tiny", "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    for key in ("git_sha", "machine", "versions", "seeds", "cells", "predictions", "steps_to_accuracy"):
        assert key in saved, key
    prof = saved["cells"]["profile/tiny"]
    sp = prof["splits"]["2"]
    assert len(sp["stage_s"]) == 2 and len(sp["float32_bytes"]) == 1 and sp["vq_bytes"][0] < sp["float32_bytes"][0]
    vals = [c for cid, c in saved["cells"].items() if cid.startswith("validate/")]
    assert len(vals) == 2 and all(c["measured_s"] > 0 and c["predicted_s"] > 0 for c in vals)
    bw = [c for c in vals if "link_s" in c]  # one bandwidth-bound cell: 8 b / bw = 2x the slowest wait
    assert len(bw) == 1 and bw[0]["link_bound"] and bw[0]["link_s"][0] == pytest.approx(2 * max(bw[0]["waits_s"]))
    assert next(iter(saved["predictions"].values()))["dgl_sync"]["step_s"] > 0
    assert "| K |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
