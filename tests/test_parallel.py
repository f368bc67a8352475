"""Stages on separate (fake CPU) devices: thread machinery, placements, MPMD pipeline, SPMD pipeline."""

import functools
import threading
import time

import chex
import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from dgl_jax import dgl_step, get_model, init_stage_states, make_optimizer, with_optimizer
from dgl_jax.parallel import PipelinedDGL, SpmdPipeline, Workers, make_placement, message_shapes, run_chain

T = 3  # batches per run
X = jax.random.normal(jax.random.key(1), (T, 16, 8, 8, 1))
Y = jax.random.randint(jax.random.key(2), (T, 16), 0, 10)
# Float reassociation tolerance: the same program on one device is bit-identical; a data-parallel stage sums
# its gradient in a different order, which after T SGD-momentum steps moves params by ~1e-6 relative.
RTOL, ATOL = 1e-4, 1e-5


# ---------------------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------------------
def test_run_chain_keeps_order_and_overlaps():
    # Overlap is shown by the order of events, never by wall time: some stage starts an item while another
    # stage is still inside its own (sequential execution would make every interval disjoint).
    events, lock = [], threading.Lock()

    def slow(tag):
        def f(x):
            with lock:
                events.append(("start", tag))
            time.sleep(0.05)
            with lock:
                events.append(("end", tag))
            return x + [tag]

        return f

    out = run_chain([slow(0), slow(1), slow(2), slow(3)], ([i] for i in range(8)), timeout_s=30)
    assert out == [[i, 0, 1, 2, 3] for i in range(8)]
    busy, most = set(), 0
    for kind, tag in events:
        busy = busy | {tag} if kind == "start" else busy - {tag}
        most = max(most, len(busy))
    assert most >= 2, events


def test_worker_exception_propagates_and_stops_everyone():
    seen = []

    def boom(x):
        if x == 3:
            raise RuntimeError("stage failed on item 3")
        seen.append(x)
        return x

    with pytest.raises(RuntimeError, match="item 3"):
        run_chain([lambda x: x, boom, lambda x: x], iter(range(10**9)), timeout_s=30)
    assert seen == [0, 1, 2]
    assert not [t for t in threading.enumerate() if t.name.startswith("stage")]


def test_timeout_and_stop_do_not_hang():
    with pytest.raises(TimeoutError):
        with Workers() as w:
            ch = w.channel(1)
            w.spawn(ch.get, name="waiter")  # waits forever unless stopped
            w.join(timeout=0.3)
    assert w.stop.is_set()
    assert not any(t.is_alive() for t in w._threads)


# ---------------------------------------------------------------------------------------------------------
# Placements
# ---------------------------------------------------------------------------------------------------------
def test_default_placements():
    devs = jax.devices()
    assert make_placement(4).stage_devices == tuple((d,) for d in devs)
    assert make_placement(2).stage_devices == ((devs[0], devs[1]), (devs[2], devs[3]))
    assert make_placement(3, num_devices=2).stage_devices == ((devs[0],), (devs[0],), (devs[1],))
    assert make_placement(5).stage_devices[4] == (devs[3],)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_stages": 2, "num_devices": 9}, "9 devices requested but only 4"),
        ({"num_stages": 2, "devices": []}, "empty device list"),
        ({"num_stages": 3, "assignment": [0, 1]}, "every stage needs a device"),
        ({"num_stages": 2, "assignment": [0, []]}, "stage 1 is left without a device"),
        ({"num_stages": 2, "assignment": [0, 7]}, "out of range"),
        ({"num_stages": 2, "assignment": [[0, 1], [1, 2]]}, "overlap"),
        ({"num_stages": 0}, "num_stages"),
    ],
)
def test_bad_placements_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_placement(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# MPMD pipeline
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    stages = with_optimizer(get_model("small_cnn"), lambda j: make_optimizer("sgd", 0.05))
    states = init_stage_states(stages, jax.random.key(0), X[0])
    return stages, states


@pytest.fixture(scope="module")
def reference(model):
    """T sequential dgl_step calls on one device: final states and [T, K] metrics."""
    stages, states = model
    step = jax.jit(functools.partial(dgl_step, stages))
    losses = []
    for t in range(T):
        states, m = step(states, X[t], Y[t])
        losses.append(np.asarray(m["loss"]))
    return states, np.stack(losses)


def _param_devices(states):
    return [{d for leaf in jax.tree.leaves(s) for d in leaf.devices()} for s in states]


@pytest.mark.parametrize(
    "placement_kwargs",
    [
        {},  # 3 stages on 4 devices: one device each, the 4th unused
        {"num_devices": 2},  # 3 stages on 2 devices: [0, 0, 1]
        {"assignment": [[0, 1], [2, 3], [2, 3]]},  # a data-parallel pair per stage
    ],
    ids=["one-per-device", "3-on-2", "data-parallel"],
)
def test_pipelined_matches_dgl_step(model, reference, placement_kwargs):
    stages, states = model
    placement = make_placement(len(stages), **placement_kwargs)
    pipe = PipelinedDGL(stages, placement)
    placed = pipe.place(states)
    pipe.compile(placed, X[0], Y[0])
    final, metrics = pipe.run(placed, [(X[t], Y[t]) for t in range(T)], timeout_s=120)
    assert _param_devices(final) == [set(d) for d in placement.stage_devices]
    ref_states, ref_loss = reference
    chex.assert_trees_all_close(jax.device_get(final), jax.device_get(ref_states), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=RTOL, atol=ATOL)
    assert metrics["loss"].shape == (T, len(stages))


def test_pipeline_rejects_mismatches_before_compiling(model):
    stages, states = model
    with pytest.raises(ValueError, match="every stage needs a device"):
        PipelinedDGL(stages, make_placement(2))
    pipe = PipelinedDGL(stages, make_placement(3, assignment=[[0, 1], [2, 3], [2, 3]]))
    with pytest.raises(ValueError, match="compile"):
        pipe.run(states, [(X[0], Y[0])])
    with pytest.raises(ValueError, match="not divisible"):
        pipe.compile(pipe.place(states), X[0, :15], Y[0, :15])


def test_message_shapes(model):
    stages, states = model
    assert message_shapes(stages, states, X[0]) == [(16, 8, 8, 32), (16, 4, 4, 64)]


# ---------------------------------------------------------------------------------------------------------
# SPMD pipeline
# ---------------------------------------------------------------------------------------------------------
def _mesh(shape, names):
    n = int(np.prod(shape))
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=jax.devices()[:n])


def test_spmd_heterogeneous_stages_match_dgl_step(model, reference):
    """3 stages of different shapes (8x8x32, 4x4x64, 2x2x128 outputs) on a ('stage',) mesh of 3 devices."""
    stages, states = model
    pipe = SpmdPipeline(stages, _mesh((3,), ("stage",)), states, X[0])
    state = pipe.init(states)
    # Row j of the stacked state lives on the j-th device of the stage axis.
    for shard in state.floats.addressable_shards:
        assert shard.device == pipe.mesh.devices[shard.index[0].start]
    # Tick 0 (pipeline fill): only stage 0 has a real batch; the others keep their state.
    state, m = pipe.tick(state, X[0], Y[0])
    loss = np.asarray(m["loss"])
    assert np.isfinite(loss[0]) and np.isnan(loss[1:]).all()
    unchanged = pipe.unpack(state)
    chex.assert_trees_all_equal(unchanged[1:], jax.device_get(states[1:]))
    # The full run: T batches + K-1 drain ticks == T dgl_step calls.
    state, metrics = pipe.run(pipe.init(states), [(X[t], Y[t]) for t in range(T)])
    ref_states, ref_loss = reference
    chex.assert_trees_all_close(pipe.unpack(state), jax.device_get(ref_states), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=RTOL, atol=ATOL)


def test_spmd_stage_groups_of_several_stages_match_dgl_step(model, reference):
    """Stages 0 and 1 in group 0 (one device), stage 2 in group 1: one wire crosses, S-1 = 1 drain tick."""
    stages, states = model
    pipe = SpmdPipeline(stages, _mesh((2,), ("stage",)), states, X[0], groups=[0, 0, 1])
    state, m = pipe.tick(pipe.init(states), X[0], Y[0])
    assert np.isfinite(np.asarray(m["loss"])[:2]).all() and np.isnan(np.asarray(m["loss"])[2:]).all()
    state, metrics = pipe.run(pipe.init(states), [(X[t], Y[t]) for t in range(T)])
    ref_states, ref_loss = reference
    chex.assert_trees_all_close(pipe.unpack(state), jax.device_get(ref_states), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=RTOL, atol=ATOL)
    assert pipe.wire_bytes() == [16 * 4 * 4 * 64 * 4 + 16 * 4 + 8 + 1]  # stage 1's features, labels, key, valid
    with pytest.raises(ValueError, match="contiguous from 0"):
        SpmdPipeline(stages, _mesh((2,), ("stage",)), states, X[0], groups=[0, 1, 0])


def test_spmd_stage_and_data_axes_match_dgl_step():
    stages = with_optimizer(get_model("small_cnn", split=2), lambda j: make_optimizer("sgd", 0.05))
    states = init_stage_states(stages, jax.random.key(0), X[0])
    step = jax.jit(functools.partial(dgl_step, stages))
    ref, losses = states, []
    for t in range(T):
        ref, m = step(ref, X[t], Y[t])
        losses.append(np.asarray(m["loss"]))
    pipe = SpmdPipeline(stages, _mesh((2, 2), ("stage", "data")), states, X[0], data_axis="data")
    state, metrics = pipe.run(pipe.init(states), [(X[t], Y[t]) for t in range(T)])
    assert tuple(state.inbox[0][0].sharding.spec) == ("stage", "data")  # the wire stays split over data
    chex.assert_trees_all_close(pipe.unpack(state), jax.device_get(ref), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["loss"], np.stack(losses), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "shape, names, kwargs, match",
    [
        ((2,), ("stage",), {}, "has 2 devices but there are 3 stages"),
        ((3,), ("pipe",), {}, "no stage axis 'stage'"),
        ((3, 1), ("stage", "data"), {}, "neither the stage axis"),
        ((3, 1), ("stage", "data"), {"data_axis": "batch"}, "neither the stage axis"),
    ],
)
def test_spmd_bad_meshes_raise(model, shape, names, kwargs, match):
    stages, states = model
    with pytest.raises(ValueError, match=match):
        SpmdPipeline(stages, _mesh(shape, names), states, X[0], **kwargs)


# ---------------------------------------------------------------------------------------------------------
# The benchmark script runs end to end (tiny; its timings are not checked here)
# ---------------------------------------------------------------------------------------------------------
def test_pipeline_benchmark_tiny(tmp_path):
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "pipeline.py"
    spec = importlib.util.spec_from_file_location("pipeline_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "pipeline.json"
    mod.main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    o = saved["overlap"]["round0"]["K=2"]
    assert o["k_devices"]["efficiency"] > 0 and o["sequential_one_device"]["repeats"] == 2
    best = saved["balance"]["best_split_per_k"]["2"]
    assert best["predicted_speedup"] == pytest.approx(sum(best["stage_ms"]) / max(best["stage_ms"]))
    assert set(saved["balance"]["splits"]) == {"[1, 2]", "[2, 1]"}
    b0 = saved["traffic"]["boundaries"][0]
    assert b0["float32_bytes"] == 8 * 8 * 8 * 32 * 4 + 8 * 4  # features [8, 8, 8, 32] + int32 labels
    # vq-packed:16:16: 2 groups of 16 channels, 4-bit codes (64 pixels x 2 codes = 64 bytes per example) + codebook
    assert b0["vq_packed_bytes"] == 8 * 64 + 2 * 16 * 16 * 4 + 8 * 4


def test_spmd_empty_mesh_axis_raises(model):
    from jax.sharding import Mesh

    stages, states = model
    with pytest.raises(ValueError, match="mesh axis 'data' is empty"):
        SpmdPipeline(stages, Mesh(np.empty((3, 0), object), ("stage", "data")), states, X[0], data_axis="data")
