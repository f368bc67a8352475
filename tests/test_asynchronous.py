"""Asynchronous DGL: simulation inside one jitted scan, schedules, bad input, threaded runner on fake devices."""

import functools
import queue

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import asynchronous as A
from dgl_jax import dgl_step, get_model, init_stage_states, make_optimizer, with_optimizer

T = 3  # batches
X = jax.random.normal(jax.random.key(1), (T, 16, 8, 8, 1))
Y = jax.random.randint(jax.random.key(2), (T, 16), 0, 10)
K = 3
# Same math, different XLA fusion (a cond inside a scan vs one fused step): float reassociation only.
RTOL, ATOL = 1e-4, 1e-5


def input_fn(n):
    return X[n % T], Y[n % T]


@pytest.fixture(scope="module")
def model():
    # linear heads: the scan holds every stage's step, and mlp_sr heads would double each compile
    stages = with_optimizer(
        get_model("small_cnn", head="linear"), lambda j: make_optimizer("sgd", 0.05, steps_per_epoch=10)
    )
    states = init_stage_states(stages, jax.random.key(0), X[0])
    return stages, states


def fresh(states):
    return jax.tree.map(jnp.copy, states)


@pytest.fixture(scope="module")
def run_m1(model):
    """One compiled program for M=1 (the schedule is an argument: every schedule object reuses it per type)."""
    stages, _ = model
    return A.make_async_run(stages, A.AsyncConfig(capacity=1), input_fn, T * K)


def test_capacity_one_round_robin_is_synchronous_dgl(model, run_m1):
    stages, states = model
    step = jax.jit(functools.partial(dgl_step, stages))
    ref, losses = fresh(states), []
    for t in range(T):
        ref, m = step(ref, X[t], Y[t])
        losses.append(m["loss"])
    st = A.init_async(stages, fresh(states), X[0], Y[0], A.AsyncConfig(capacity=1), jax.random.key(3))
    st, rec = run_m1(st, A.RoundRobin(K))
    for a, b in zip(ref, st.states):
        chex.assert_trees_all_close(a, b, rtol=RTOL, atol=ATOL)
    # the per-update losses are dgl_step's, stage by stage, in order
    rec_loss = np.asarray(rec.loss)[np.asarray(rec.updated)].reshape(T, K)
    np.testing.assert_allclose(rec_loss, np.stack(losses), rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(rec.updated).sum(0), [T] * K)
    np.testing.assert_array_equal(np.asarray(rec.reuse).max(0), [0] * K)  # every batch used once
    assert int(st.consumed) == T and int(st.tick) == T * K


def test_paper_schedule_slows_a_stage_and_records_staleness_and_reuse(model, run_m1):
    stages, states = model
    st = A.init_async(stages, fresh(states), X[0], Y[0], A.AsyncConfig(capacity=1), jax.random.key(4))
    # traced weights: S=3 on stage 1, and compare with the same compiled program at S=1
    st, rec = run_m1(st, A.paper_schedule(K, slow_stage=1, slowdown=3.0))
    upd = np.asarray(rec.updated)
    assert upd.sum() == T * K and (upd.sum(1) == 1).all()  # one stage per tick
    assert np.asarray(rec.updated)[:K].tolist() == np.eye(K, dtype=bool).tolist()  # ordered warm-up
    stale, reuse = np.asarray(rec.staleness), np.asarray(rec.reuse)
    assert (stale[~upd] == -1).all() and (stale[upd] >= 0).all()
    assert (stale[:, 0][upd[:, 0]] == 0).all()
    assert (reuse[~upd] == -1).all() and (reuse[upd] >= 0).all()
    assert reuse[:, 2][upd[:, 2]].max() >= 1  # stage 2 reads faster than the slowed stage 1 writes: it re-reads
    assert np.isnan(np.asarray(rec.loss)[~upd]).all() and np.isfinite(np.asarray(rec.loss)[upd]).all()
    s = A.summarize(rec)
    assert s["updates"].tolist() == upd.sum(0).tolist()
    assert s["max_reuse"].tolist() == [reuse[:, j].max() for j in range(K)]


def test_schedules_frequencies():
    key = jax.random.key(0)
    ticks = jnp.arange(3000)
    keys = jax.random.split(key, 3000)
    act = jax.vmap(A.paper_schedule(3, 1, 2.0))(keys, ticks)
    freq = np.asarray(act).mean(0)
    np.testing.assert_allclose(freq, np.array([1, 0.5, 1]) / 2.5, atol=0.03)
    fixed = np.asarray(jax.vmap(A.fixed_speed_schedule([1.0, 2.0, 1.25]))(keys[:20], ticks[:20]))
    assert fixed[:, 0].all() and fixed[:, 1].sum() == 10 and fixed[:, 2].sum() == 16
    rr = np.asarray(jax.vmap(A.RoundRobin(3))(keys[:6], ticks[:6]))
    assert rr.argmax(1).tolist() == [0, 1, 2, 0, 1, 2]


def test_empty_buffer_makes_the_consumer_skip_and_delay_postpones(model):
    stages, states = model
    cfg = A.AsyncConfig(capacity=2, delay=2, warmup_rounds=0)
    run = A.make_async_run(stages, cfg, input_fn, 4)
    st = A.init_async(stages, fresh(states), X[0], Y[0], cfg, jax.random.key(5))
    # every stage wants to run every tick: stage 1 and 2 must skip until a batch has arrived (delay 2)
    st, rec = run(st, A.fixed_speed_schedule([1.0, 1.0, 1.0]))
    upd = np.asarray(rec.updated)
    assert upd[:, 0].all()
    # stage 0 pushes at tick 0; readable from tick 0 + 1 + delay = 3
    assert upd[:, 1].tolist() == [False, False, False, True]
    assert not upd[:, 2].any()
    assert np.asarray(rec.staleness)[3, 1] == 3
    for leaf in jax.tree.leaves(st.states):
        assert np.isfinite(np.asarray(leaf, np.float64)).all()


def test_bad_input_names_the_value(model):
    stages, states = model
    with pytest.raises(ValueError, match="capacity.*0"):
        A.AsyncConfig(capacity=0)
    with pytest.raises(ValueError, match="'random'"):
        A.AsyncConfig(policy="random")
    with pytest.raises(ValueError, match="0.5"):
        A.paper_schedule(3, 1, 0.5)
    with pytest.raises(ValueError, match="stage index 3"):
        A.paper_schedule(3, 3, 2.0)
    with pytest.raises(ValueError, match="0.9"):
        A.fixed_speed_schedule([1.0, 0.9])
    with pytest.raises(ValueError, match="'warp'"):
        A.make_schedule("warp", 3)
    with pytest.raises(ValueError, match="stage index -1"):
        A.run_threaded(
            stages, states, [(X[0], Y[0])], A.AsyncConfig(), num_updates=1, injected=A.Injected(slow_stage=-1)
        )


def test_threaded_runner_on_two_fake_devices(model):
    stages, states = model
    devs = jax.devices()[:2]
    assert len(devs) == 2, "conftest provides fake CPU devices"
    res = A.run_threaded(
        stages,
        states,
        [(np.asarray(X[t]), np.asarray(Y[t])) for t in range(T)],
        A.AsyncConfig(capacity=2),
        num_updates=[4, 3, 5],
        devices=devs,
        # the emulated-bandwidth path, at a rate that costs nothing
        injected=A.Injected(slow_stage=1, slow_extra_s=0.02, link_bandwidth_bps=1e12),
        timeout_s=120,
    )
    assert res.updates.tolist() == [4, 3, 5]
    for j, st in enumerate(res.states):
        for leaf in jax.tree.leaves(st):
            assert leaf.devices() == {devs[j % 2]}, (j, leaf.devices())
    assert [len(x) for x in res.loss] == [4, 3, 5]
    assert all(np.isfinite(x).all() for x in res.loss)
    assert (res.reuse[2] >= 0).all() and res.age[0].tolist() == [0] * 4
    # the params moved: every stage trained
    for a, b in zip(states, res.states):
        assert not np.allclose(np.asarray(jax.tree.leaves(a.params)[0]), np.asarray(jax.tree.leaves(b.params)[0]))


def test_link_schedule_sends_one_item_at_a_time_then_adds_latency():
    # 1000 bytes at 8000 bit/s: 1 s on the link, then 0.25 s of latency
    assert A.link_schedule(10.0, 0.0, 1000, 8000.0, 0.25) == (11.25, 11.0)
    # put while the link is busy until 11: it waits for the link
    assert A.link_schedule(10.5, 11.0, 1000, 8000.0, 0.25) == (12.25, 12.0)
    # an idle link starts at the put
    assert A.link_schedule(20.0, 12.0, 500, 8000.0, 0.0) == (20.5, 20.5)
    # infinite bandwidth: latency only, the link is free at the put
    assert A.link_schedule(3.0, 2.0, 10**9, None, 0.5) == (3.5, 3.0)


def test_inbox_bandwidth_counts_the_items_array_bytes():
    inbox = A.Inbox(bandwidth_bps=8.0)  # one byte per second
    item = (np.zeros(250, np.float32), jnp.zeros(10, jnp.int32))  # 1000 + 40 bytes
    inbox.put(item)
    first = inbox.link_free
    inbox.put(item)  # queued behind the first: the link is free 1040 s later
    assert inbox.link_free - first == pytest.approx(1040.0)
    inbox.put(A.END)  # no bytes: behind the items, no link time
    assert inbox.link_free - first == pytest.approx(1040.0)
    with pytest.raises(queue.Empty):
        inbox.get_nowait()


def test_bad_link_bandwidth_is_one_line(model):
    stages, states = model
    for bad in (0.0, -1e9, float("nan")):
        with pytest.raises(ValueError, match="bandwidth must be > 0") as e:
            A.run_threaded(
                stages,
                states,
                [(X[0], Y[0])],
                A.AsyncConfig(),
                num_updates=1,
                injected=A.Injected(link_bandwidth_bps=bad),
            )
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        A.Inbox(bandwidth_bps=0)


def test_threaded_runner_propagates_worker_errors(model):
    stages, states = model
    bad = [(np.asarray(X[0]), np.asarray(Y[0])), (np.zeros((16, 8, 8, 1), np.float32), None)]
    with pytest.raises(Exception):  # noqa: B017 - whatever stage 0 raises on a None label must reach us
        A.run_threaded(  # two stages: fewer programs to compile before the failure
            stages[:2], states[:2], bad, A.AsyncConfig(), num_updates=3, devices=jax.devices()[:2], timeout_s=60
        )
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("async-stage") and t.is_alive()]


# ----------------------------------------------------------------------------------------------------------
# --method async through the trainer and the command line
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_digits(digits):
    from dgl_jax.data import Dataset

    # 2 steps of 32. Measured: on 8x8 digits, float32 noise between two programs that do the same math grows
    # from ~2e-7 after 2 steps to ~1e-3 after 4 (also between --loop scan and --loop dispatch of plain DGL).
    return Dataset("digits", digits.train_images[:64], digits.train_labels[:64], digits.test_images[:100],
                   digits.test_labels[:100], 10)  # fmt: skip


def test_trainer_async_round_robin_capacity_one_equals_dgl(small_digits):
    """The trainer's ``async`` method (M=1, round-robin) replays as plain ``dgl_step`` on the trainer's batches:
    the tick counter, buffers and warm-up carried in ``extra`` across steps are wired right."""
    from dgl_jax.input_pipeline import epoch_order
    from dgl_jax.trainer import TrainConfig, Trainer

    cfg = TrainConfig(epochs=1, batch_size=32, augment=False, chunk_steps=1, head="linear", method="async",
                      method_options={"capacity": 1, "schedule": "round_robin"})  # fmt: skip
    trainer = Trainer(cfg, dataset=small_digits, log=lambda s: None)
    init = trainer.init_state()
    events = list(trainer.fit(init))
    assert len(events) == trainer.steps_per_epoch == 2
    perm, _ = epoch_order(init.key, 0, trainer.num_train)
    step = jax.jit(functools.partial(dgl_step, trainer.stages))
    ref, losses = init.stages, []
    for s in range(trainer.steps_per_epoch):
        idx = perm[s * 32 : (s + 1) * 32]
        ref, m = step(ref, trainer.train_images[idx], trainer.train_labels[idx])
        losses.append(np.asarray(m["loss"]))
    got = events[-1].state.stages
    chex.assert_trees_all_close([s.params for s in got], [s.params for s in ref], rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close([s.batch_stats for s in got], [s.batch_stats for s in ref], rtol=RTOL, atol=ATOL)
    for ev, loss in zip(events, losses, strict=True):
        np.testing.assert_allclose(ev.train["loss"], loss, rtol=1e-4)
        assert ev.train["updates"] == [1.0, 1.0, 1.0]  # K ticks per step, one update each
        assert ev.train["staleness"] == [0.0, 1.0, 1.0]  # read the tick after the stage below wrote it
        assert ev.train["reuse"] == [0.0, 0.0, 0.0]
    assert int(events[-1].state.extra["tick"]) == 2 * 3


def test_cli_async_slow_stage_writes_per_stage_records(tmp_path, capsys):
    import json

    from dgl_jax import cli

    out = tmp_path / "run"
    args = ["train", "--method", "async", "--epochs", "1", "--head", "linear", "--no-progress",
            "--compilation-cache", "off", "--method-option", "capacity=5", "--method-option", "slow_stage=1",
            "--method-option", "slowdown=3",
            "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["event"] == "train"]
    assert {"updates", "staleness", "reuse"} <= set(train[0])
    totals = [sum(r["updates"] for r in train if r["stage"] == j) for j in range(3)]
    assert totals[1] < totals[0] and totals[1] < totals[2]  # the slowed stage takes fewer updates
    assert cli.main([*args[:-1], str(tmp_path / "bad"), "--method-option", "slow_stage=7"]) == 2
    assert "stage index 7" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_wallclock_settings_carry_the_injected_links_and_reject_bad_ones():
    from dgl_jax import wallclock
    from dgl_jax.trainer import TrainConfig

    def settings(**options):
        return wallclock.settings(TrainConfig(method="async", executor="threads", method_options=options))[1]

    run = settings(link_delay_s=0.01, link_bandwidth_bps=1e9, slow_stage=1, slowdown=2)
    assert run["injected"] == A.Injected(slow_stage=1, slowdown=2.0, link_delay_s=0.01, link_bandwidth_bps=1e9)
    assert settings()["injected"] == A.Injected()  # no slow stage: slowdown 1, infinite links
    for options, needle in [
        (dict(link_bandwidth_bps=0), "bandwidth must be > 0"),
        (dict(link_bandwidth_bps="fast"), "link_bandwidth_bps 'fast' is not valid; expected a number"),
        (dict(link_delay_s=-1), "link delay must be >= 0"),
        (dict(link_delay_s="soon"), "link_delay_s 'soon' is not valid; expected a number"),
        (dict(slow_stage=1, slowdown="x2"), "slow-down factor must be a number >= 1, got 'x2'"),
    ]:
        with pytest.raises(ValueError, match=needle) as e:
            settings(**options)
        assert "\n" not in str(e.value)
