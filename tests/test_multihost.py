"""Many processes from the command line: two processes on localhost (2 fake CPU devices each, gloo) train
data-parallel, then resume the run stage-parallel across the processes; the checkpoints (written by both)
equal a one-process run on 4 devices and restore there. Bad process flags are one line, exit 2, no run
folder. Bounded by subprocess timeouts: never hangs CI."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _processes import free_port, run_together, xla_flags  # noqa: E402

from dgl_jax import cli
from dgl_jax.checkpoint import Checkpointer, state_tree
from dgl_jax.trainer import Trainer, config_from_dict

TIMEOUT_S = 240
ROOT = Path(__file__).parents[1]
RECIPE = ["--split", "2", "--validation", "0.9", "--chunk-steps", "2", "--no-progress"]  # 2 steps per epoch


def _env(devices: int, **more: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **more)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _two_processes(args: list[str], cwd: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "dgl_jax", "train", *args, "--coordinator", f"127.0.0.1:{port}"]
    run_together([[*cmd, "--num-processes", "2", "--process-id", str(i)] for i in range(2)], _env(2), TIMEOUT_S, cwd)


def _restored(trainer: Trainer, run: Path, step: int) -> dict:
    fresh = trainer.init_state()
    return Checkpointer(run / "checkpoints").restore(state_tree(fresh.stages, fresh.extra, fresh.key), step=step)[0]


def test_two_processes_train_data_parallel_then_resume_stage_parallel(tmp_path):
    run = tmp_path / "run"
    _two_processes([*RECIPE, "--epochs", "1", "--parallel", "data", "--out", str(run)], tmp_path)
    _two_processes(["--epochs", "2", "--parallel", "stages+data", "--stage-groups", "2", "--no-progress",
                    "--resume", str(run)], tmp_path)  # fmt: skip

    # the same two epochs in this process, on its 4 devices
    config = config_from_dict(json.loads((run / "config.json").read_text()))
    assert (config.parallel, config.stage_groups, config.devices) == ("stages+data", 2, 4)
    first = Trainer(dataclasses.replace(config, parallel="data", stage_groups=None, epochs=1), log=lambda s: None)
    state = first.init_state()
    for ev in first.fit(state):
        state = ev.state
    after_one = state
    second = Trainer(config, log=lambda s: None)
    for ev in second.fit(state._replace(stages=jax.device_get(state.stages))):
        state = ev.state

    # checkpoints written by both processes restore on one process of 4 devices and equal its run
    tol = dict(rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(
        jax.device_get(_restored(first, run, 2)["stages"]), jax.device_get(after_one.stages), **tol
    )
    chex.assert_trees_all_close(
        jax.device_get(_restored(second, run, 4)["stages"]), jax.device_get(state.stages), **tol
    )

    # process 0 alone wrote the run folder's files: each metric once, one summary, run.json of 2 processes
    rows = cli.read_metrics(run)
    keys = [(r["event"], r["global_step"], r["stage"]) for r in rows]
    assert len(keys) == len(set(keys)) and {r["global_step"] for r in rows} == {2, 4}
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    info = json.loads((run / "run.json").read_text())
    assert info["processes"] == 2 and len(info["devices"]) == 4
    assert info["wire_bytes_per_step"]["measured"] == info["wire_bytes_per_step"]["accounted"] > 0


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2"], "--process-id missing"),
        (["--num-processes", "2", "--process-id", "0"], "--coordinator missing"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "expected 0..1"),
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "is not HOST:PORT"),
        (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"], "expected an integer >= 1"),
    ],
)
def test_process_flags_that_make_no_sense_are_one_line(tmp_path, capsys, flags, match):
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *flags], process_settings=False) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and not out.exists()


def test_unreachable_coordinator_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "run"
    args = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "1"]
    p = subprocess.run(
        [sys.executable, "-m", "dgl_jax", "train", "--out", str(out), *args],
        env=_env(1, DGL_JAX_INIT_TIMEOUT_S="3"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.count("\n") == 1 and "did not join within 3 s" in p.stderr, p.stderr[-2000:]
    assert not out.exists()
