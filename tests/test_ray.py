"""The Ray executor: one CPU actor per stage on this machine (one Ray instance for the module).

Same updates as the threaded executor (lock-step, one-item buffers); a killed actor comes back from its
last checkpoint and the run completes; Ctrl-C on the command line, then --resume; bad input."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from dgl_jax import asynchronous as A  # noqa: E402
from dgl_jax import get_model, init_stage_states, make_optimizer, with_optimizer  # noqa: E402
from dgl_jax.asynchronous import Injected  # noqa: E402
from dgl_jax.ray_executor import Options, RayExecutor  # noqa: E402

T = 4  # batches
X = np.asarray(jax.random.normal(jax.random.key(1), (T, 16, 8, 8, 1)))
Y = np.asarray(jax.random.randint(jax.random.key(2), (T, 16), 0, 10))
BATCHES = [(X[t], Y[t]) for t in range(T)]

# How long a test waits for something that must happen (a checkpoint, a restarted actor, a process exit) before
# it fails: a bound on liveness, not a timing. Generous, because a restarted actor imports jax and compiles
# again, which takes minutes on a loaded 2-core machine.
WAIT_S = 600


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def model(k):
    stages = with_optimizer(
        get_model("small_cnn", head="linear", split=k), lambda j: make_optimizer("sgd", 0.05, steps_per_epoch=10)
    )
    return stages, init_stage_states(stages, jax.random.key(0), X[0])


def test_lockstep_one_item_buffers_make_the_threaded_executors_updates(cluster):
    stages, states = model(3)
    cfg, key = A.AsyncConfig(capacity=1), jax.random.key(5)
    th = A.run_threaded(stages, states, BATCHES, cfg, num_updates=6, lockstep=True, key=key, timeout_s=WAIT_S)
    with RayExecutor(stages, states, BATCHES[0], cfg, Options(lockstep=True, checkpoint_every=0), key=key) as ex:
        seg = ex.run(BATCHES, 6)
        manifest = json.loads((ex.directory / "manifest.json").read_text())
    assert th.updates.tolist() == [r["updates"] for r in seg.records] == [6, 6, 6]
    for j in range(3):  # the same losses, update by update, and the same final states
        np.testing.assert_allclose(seg.records[j]["loss"], th.loss[j], rtol=1e-5)
    # Up to float reassociation: the actors' processes may split XLA's CPU reductions over other thread counts.
    chex.assert_trees_all_close(jax.device_get(th.states), seg.states, rtol=1e-5, atol=1e-6)
    assert [r["bytes_sent"] for r in seg.records] == th.bytes_sent.tolist()
    assert th.bytes_sent[0] > th.bytes_sent[1] > 0 == th.bytes_sent[2]
    assert len({a["pid"] for a in manifest["actors"]}) == 3 and os.getpid() not in {
        a["pid"] for a in manifest["actors"]
    }


def test_killed_actor_restarts_from_its_last_checkpoint_and_the_run_completes(cluster, tmp_path):
    stages, states = model(2)
    every = 5
    opts = Options(checkpoint_every=every, injected=Injected(slow_stage=1, slow_extra_s=0.05))
    ex = RayExecutor(stages, states, BATCHES[0], A.AsyncConfig(capacity=2), opts, directory=tmp_path)
    out = {}
    try:
        runner = threading.Thread(target=lambda: out.update(seg=ex.run(BATCHES, [60, None])))
        runner.start()
        ckpts = tmp_path / "stage1"
        deadline = time.monotonic() + WAIT_S
        while not [p for p in ckpts.glob("*") if p.name.isdigit() and int(p.name) >= 2 * every]:
            assert time.monotonic() < deadline and runner.is_alive(), "stage 1 never reached two checkpoints"
            time.sleep(0.05)
        progress = ray.get(ex.actors[1].progress.remote())
        os.kill(ex.infos[1]["pid"], signal.SIGKILL)
        runner.join(WAIT_S)
        assert not runner.is_alive()
        seg = out["seg"]
        (event,) = seg.restarts
        assert event["stage"] == 1 and event["pid"] != ex.infos[0]["pid"]
        # at most the updates since the last checkpoint are lost
        assert progress - every <= event["restored_updates"] and event["restored_updates"] >= 2 * every
        assert event["restored_from"].endswith(f"stage1/{event['restored_updates']}")
        assert seg.records[0]["updates"] == 60 and seg.records[1]["total_updates"] >= event["restored_updates"]
        assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(seg.states))
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        assert manifest["restarts"][0]["restored_updates"] == event["restored_updates"]
        assert manifest["actors"][1]["pid"] == event["pid"]
    finally:
        ex.close()


def _cli(args, **env):
    cmd = [sys.executable, "-m", "dgl_jax", "train", "--no-progress", *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_ctrl_c_stops_the_actors_and_resume_completes(cluster, tmp_path):
    run = tmp_path / "run"
    common = ["--ray-address", cluster, "--head", "linear", "--split", "2", "--epochs", "2"]
    proc = _cli(["--method", "async", "--executor", "ray", *common, "--out", str(run)],
                DGL_JAX_FAULT_WAIT="epoch-end:1")  # fmt: skip
    line = ""
    while "fault-wait epoch-end" not in line:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 130, err
    assert "--resume" in err.splitlines()[-1]
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    manifest = json.loads((run / "ray" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    deadline = time.monotonic() + WAIT_S  # every actor's process is gone
    while any(_alive(a["pid"]) for a in manifest["actors"]):
        assert time.monotonic() < deadline, manifest["actors"]
        time.sleep(0.1)
    res = _cli(["--resume", str(run), "--ray-address", cluster])
    out, err = res.communicate(timeout=WAIT_S)
    assert res.returncode == 0, err
    assert "resumed" in out and "epoch 1 step 0" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    assert {"updates", "staleness", "buffer_fill", "bytes_sent", "updates_per_s"} <= set(train[0])
    assert sorted({r["epoch"] for r in train}) == [1, 2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_bad_input_is_one_line(cluster, tmp_path, capsys):
    from dgl_jax import cli

    stages, states = model(3)
    with pytest.raises(ValueError, match="do not fit the cluster") as e:
        RayExecutor(stages, states, BATCHES[0], A.AsyncConfig(), cpus_per_actor=2)
    assert "\n" not in str(e.value)
    out = tmp_path / "bad"
    args = ["train", "--method", "async", "--executor", "ray", "--ray-address", "127.0.0.1:1", "--out", str(out)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--ray-address '127.0.0.1:1'" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert cli.main(["train", "--method", "backprop", "--executor", "ray", "--out", str(out)]) == 2
    assert "--executor ray runs methods" in capsys.readouterr().err
