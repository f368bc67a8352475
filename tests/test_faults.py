"""Faults through the command line, each in subprocesses: signals at every moment (start-up, mid-chunk, epoch
boundary, during a checkpoint write, twice), SIGKILL during a checkpoint write, a flipped bit and a truncated
file in a checkpoint, a full disk, two processes on one run folder, divergence, and bad input found before any
work. Each case asserts the exit code, the one message line on stderr (no traceback) and, where the run can
continue, that the continuation is bit-identical to a run that was never disturbed.

The moments are reached with the CLI's test hook ``DGL_JAX_FAULT_WAIT=POINT[:N]`` (the process prints
``fault-wait POINT`` and waits for a signal there) or by waiting for the first metrics line, never by timing.
Every run is 2 epochs of 22 steps on digits, 4 steps per chunk, sharing the session's compilation cache."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import cli
from dgl_jax.checkpoint import Checkpointer

RECIPE = ["--epochs", "2", "--chunk-steps", "4", "--devices", "1", "--no-progress"]
FINAL_STEP = 44  # 2 epochs x 22 steps


def start(*args, wait=None, env=None):
    """``python -m dgl_jax ARGS`` in a subprocess (the session's compilation cache through the environment)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    env.pop("DGL_JAX_FAULT_WAIT", None)
    if wait:
        env["DGL_JAX_FAULT_WAIT"] = wait
    cmd = [sys.executable, "-m", "dgl_jax", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(proc, marker: str) -> str:
    """Reads ``proc``'s stdout up to the line ``marker``; fails (with its output) if it ends first."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.strip() == marker:
            return "".join(seen)
    out, err = proc.communicate(timeout=60)
    pytest.fail(f"no {marker!r} line; rc {proc.returncode}\n{''.join(seen)}{out}\n{err}")


def finish(proc, timeout=400) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run(*args, **kwargs) -> tuple[int, str, str]:
    return finish(start(*args, **kwargs))


def message(err: str, *needles: str) -> str:
    """The one line on stderr (progress-bar lines aside): no traceback, every needle in it."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "step/s" not in ln]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def steps(run_dir: Path) -> list[int]:
    return Checkpointer(run_dir / "checkpoints").steps()


def assert_same_final(run_dir: Path, reference: Path) -> None:
    """The continued run ends exactly where the undisturbed one does: same final step, same arrays."""
    assert steps(run_dir)[-1] == steps(reference)[-1] == FINAL_STEP
    ours, theirs = Checkpointer(run_dir / "checkpoints").read(), Checkpointer(reference / "checkpoints").read()
    chex.assert_trees_all_equal(jax.device_get(ours), jax.device_get(theirs))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["test_accuracy"] == json.loads((reference / "summary.json").read_text())["test_accuracy"]
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.isdigit() and "corrupt" not in p.name]


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The undisturbed run every continuation is compared with."""
    out = tmp_path_factory.mktemp("faults") / "straight"
    rc, _, err = run("train", *RECIPE, "--out", str(out))
    assert rc == 0 and not err.strip(), err
    assert steps(out) == [22, 44]
    return out


def copy_run(straight: Path, dest: Path, keep_steps=(22, 44)) -> Path:
    shutil.copytree(straight, dest)
    for s in steps(dest):
        if s not in keep_steps:
            shutil.rmtree(dest / "checkpoints" / str(s))
    return dest


# ----------------------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------------------
def test_startup_signals_and_the_run_folder_lock(straight, tmp_path):
    """Ctrl-C during start-up: exit 130, one line; the folder (config, no checkpoint) resumes from scratch. A
    second process on a locked folder exits 2 naming the holder's pid; SIGTERM gives 143; a stale lock (dead
    pid) is taken over."""
    out = tmp_path / "run"
    a = start("train", *RECIPE, "--out", str(out), wait="startup")
    wait_for(a, "fault-wait startup")
    a.send_signal(signal.SIGINT)
    rc, _, err = finish(a)
    assert rc == 130
    message(err, "SIGINT", "start-up", "--resume")
    assert summary_of(out)["status"] == "interrupted" and steps(out) == []
    # two processes on one folder: the one that comes second is refused, naming the holder
    holder = start("train", "--resume", str(out), "--no-progress", wait="startup")
    wait_for(holder, "fault-wait startup")
    second = start("train", "--resume", str(out), "--no-progress")
    fresh = start("train", *RECIPE, "--out", str(out))
    for proc in (second, fresh):
        rc, _, err = finish(proc)
        assert rc == 2
        message(err, f"in use by process {holder.pid}")
    holder.send_signal(signal.SIGTERM)
    rc, _, err = finish(holder)
    assert rc == 143
    message(err, "SIGTERM", "start-up")
    (out / ".lock").write_text(f"{second.pid}\n")  # a lock file naming a dead process is stale
    rc, stdout, err = run("train", "--resume", str(out), "--no-progress")
    assert rc == 0 and not err.strip(), err
    assert "starts from the beginning" in stdout
    assert_same_final(out, straight)


def test_sigterm_mid_chunk_then_resume(straight, tmp_path):
    out = tmp_path / "run"
    proc = start("train", *RECIPE, "--out", str(out))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:  # the first chunk is logged: training is under way
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    rc, _, err = finish(proc)
    assert rc == 143, err
    message(err, "SIGTERM", "--resume")
    summary = summary_of(out)
    assert summary["status"] == "interrupted" and 0 < summary["global_step"] < FINAL_STEP
    assert steps(out)[-1] == summary["global_step"]
    rc, _, err = run("train", "--resume", str(out), "--no-progress")
    assert rc == 0 and not err.strip(), err
    assert_same_final(out, straight)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["event"], r["global_step"], r["stage"]) for r in rows]
    assert len(keys) == len(set(keys)) == len((straight / "metrics.jsonl").read_text().splitlines())


def test_sigint_at_epoch_boundary_saves_once(straight, tmp_path):
    """The epoch's checkpoint has just been written when Ctrl-C comes: no second save of the same step."""
    out = tmp_path / "run"
    proc = start("train", *RECIPE, "--out", str(out), wait="epoch-end:1")
    wait_for(proc, "fault-wait epoch-end")
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc)
    assert rc == 130
    message(err, "SIGINT", "epoch 1 step 0", "checkpoints/22")
    assert steps(out) == [22] and summary_of(out)["status"] == "interrupted"
    rc, _, err = run("train", "--resume", str(out), "--no-progress")
    assert rc == 0 and not err.strip(), err
    assert_same_final(out, straight)


def test_two_sigints_during_a_checkpoint_write(straight, tmp_path):
    """Ctrl-C twice while a checkpoint is being written: the write completes, then the run stops at once."""
    out = tmp_path / "run"
    proc = start("train", *RECIPE, "--out", str(out), wait="save:1")
    wait_for(proc, "fault-wait save")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc)
    assert rc == 130
    message(err, "SIGINT", "checkpoints/22")
    assert steps(out) == [22] and Checkpointer(out / "checkpoints").verify(22) is None
    assert summary_of(out)["status"] == "interrupted"
    # the checkpoint is the undisturbed run's, bit for bit (resuming from it: the other tests)
    ours, theirs = (Checkpointer(r / "checkpoints").read(22) for r in (out, straight))
    chex.assert_trees_all_equal(jax.device_get(ours), jax.device_get(theirs))


def test_sigkill_during_a_checkpoint_write(straight, tmp_path):
    out = tmp_path / "run"
    proc = start("train", *RECIPE, "--out", str(out), wait="save:2")
    wait_for(proc, "fault-wait save")
    proc.kill()
    finish(proc)
    assert steps(out) == [22] and (out / "checkpoints" / f"{FINAL_STEP}.partial").is_dir()
    rc, _, err = run("train", "--resume", str(out), "--no-progress")  # the partial write is cleaned up
    assert rc == 0 and not err.strip(), err
    assert_same_final(out, straight)


# ----------------------------------------------------------------------------------------------------------
# Corrupt checkpoints
# ----------------------------------------------------------------------------------------------------------
def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_flipped_bit_falls_back_to_the_previous_checkpoint(straight, tmp_path):
    out = copy_run(straight, tmp_path / "run")
    bad = largest_file(out / "checkpoints" / "44")
    flip_bit(bad)
    rc, _, err = run("train", "--resume", str(out), "--no-progress")
    assert rc == 0
    message(err, "warning", str(bad), "checksum", "checkpoints/22")
    assert (out / "checkpoints" / "44.corrupt").is_dir()  # kept aside, its step redone
    assert_same_final(out, straight)


def test_truncated_checkpoints_eval_falls_back_then_exit_2(straight, tmp_path):
    out = copy_run(straight, tmp_path / "run")
    bad = largest_file(out / "checkpoints" / "44")
    truncate(bad)
    rc, stdout, err = run("eval", str(out))
    assert rc == 0
    message(err, "warning", str(bad), "truncated", "checkpoints/22")
    assert "checkpoint at epoch 1 step 0" in stdout
    truncate(largest_file(out / "checkpoints" / "22"))  # none left: one line, exit 2
    rc, _, err = run("eval", str(out))
    assert rc == 2
    message(err, "no usable checkpoint", "truncated")


# ----------------------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def test_full_disk_then_resume(straight, tmp_path):
    """The second checkpoint does not fit (a 7 MB tmpfs holds one of ~5 MB; where mounting is not permitted,
    the failure is injected in the writer): exit 4, one line naming the path and the cause, the first
    checkpoint kept, no temporary folder left; with space again, --resume completes the run bit-identically."""
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "7m")
    try:
        out = disk / "run"
        rc, _, err = run("train", *RECIPE, "--out", str(out), env={} if mounted else {"DGL_JAX_FAULT_SAVE_ERROR": "2"})
        assert rc == cli.EXIT_WRITE_ERROR
        message(err, f"{out}/checkpoints/{FINAL_STEP}", "No space left on device", "--resume")
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["22"]
        assert summary_of(out)["status"] == "failed"
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        rc, _, err = run("train", "--resume", str(out), "--no-progress")
        assert rc == 0 and not err.strip(), err
        assert_same_final(out, straight)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ----------------------------------------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------------------------------------
def test_divergence_from_the_start(tmp_path):
    out = tmp_path / "run"
    rc, _, err = run("train", *RECIPE, "--lr", "1e4", "--out", str(out))
    assert rc == cli.EXIT_DIVERGED
    message(err, "diverged", "stage", "epoch 1", "step", "last finite one is kept: none")
    assert steps(out) == []
    summary = summary_of(out)
    assert summary["status"] == "diverged" and summary["diverged"]["epoch"] == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows if r["event"] == "train"} == {0, 1, 2}  # the diverged chunk is logged


def test_divergence_keeps_the_last_finite_checkpoint_and_eval_warns(straight, tmp_path, capsys):
    out = copy_run(straight, tmp_path / "run", keep_steps=(22,))
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "lr": 1e4}))  # epoch 2 diverges
    rc = cli.main(
        ["train", "--resume", str(out), "--no-progress", "--compilation-cache", os.environ["DGL_JAX_CACHE_DIR"]]
    )
    err = capsys.readouterr().err
    assert rc == cli.EXIT_DIVERGED
    message(err, "diverged", "epoch 2", "checkpoints/22")
    assert steps(out) == [22] and summary_of(out)["status"] == "diverged"
    # a non-finite checkpoint written by other means: eval says so in one line
    from dgl_jax.checkpoint import state_tree
    from dgl_jax.trainer import Trainer, config_from_dict

    trainer = Trainer(config_from_dict(config), log=lambda s: None)
    st = trainer.init_state()
    ck = Checkpointer(out / "checkpoints")
    tree, meta = ck.restore(state_tree(st.stages, st.extra, st.key))
    tree["stages"] = jax.tree.map(lambda a: a * jnp.nan if jnp.issubdtype(a.dtype, jnp.floating) else a, tree["stages"])
    ck.save(FINAL_STEP, tree, {"epoch": 2, "step": 0})
    assert cli.main(["eval", str(out)]) == 0
    message(capsys.readouterr().err, "warning", "NaN/inf", "stages 1, 2, 3", "diverged")


# ----------------------------------------------------------------------------------------------------------
# Bad input, found before any work; labels in the library
# ----------------------------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def fashion_folder(folder: Path, labels_max: int = 9) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 100), ("t10k", 20)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.minimum(np.arange(n) % 12, labels_max))
    return folder


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--momentum", "2"], ["momentum", "[0, 1)"]),
        (["--decay-epochs", "0,-3"], ["decay epochs", "0,-3", "increasing"]),
        (["--decay-epochs", "6,3"], ["decay epochs", "6,3"]),
        (["--model", "vgg11"], ["vgg11", "8x8", "layer conv", "1x1", "maxpool"]),
        (["--out", "/proc/dgl_jax_run"], ["/proc/dgl_jax_run", "cannot be created"]),
        (["--out", "FILE/run"], ["is not a folder"]),
        (["--dataset", "cifar10", "--data-dir", "EMPTY", "--out", "FILE/run"], ["--out"]),  # before the data
        (["--dataset", "fashion_mnist", "--data-dir", "TRUNCATED"], ["train-images-idx3-ubyte.gz", "gzip"]),
        (["--dataset", "fashion_mnist", "--data-dir", "LABELS"], ["labels are outside [0, 10)", "10"]),
    ],
)
def test_bad_input_one_line_before_any_work(tmp_path, capsys, args, needles):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    if "TRUNCATED" in args:
        folder = fashion_folder(tmp_path / "TRUNCATED")
        truncate(folder / "train-images-idx3-ubyte.gz")
    if "LABELS" in args:
        fashion_folder(tmp_path / "LABELS", labels_max=11)
    subst = {"FILE/run": str(tmp_path / "file" / "run"), "EMPTY": str(tmp_path / "empty")}
    args = [subst.get(a, str(tmp_path / a) if a in ("TRUNCATED", "LABELS") else a) for a in args]
    out = tmp_path / "run"
    argv = ["train", *args] + ([] if "--out" in args else ["--out", str(out)])
    assert cli.main([*argv, "--no-progress", "--compilation-cache", "off"]) == 2
    message(capsys.readouterr().err, *needles)
    assert not out.exists()


def test_read_only_out_and_resume_with_fewer_epochs(straight, tmp_path, capsys):
    ro = tmp_path / "ro"
    if _mount_tmpfs(ro, "1m") and subprocess.run(["mount", "-o", "remount,ro", str(ro)]).returncode == 0:
        try:
            assert cli.main(["train", "--out", str(ro / "run"), "--compilation-cache", "off"]) == 2
            message(capsys.readouterr().err, "Read-only file system")
        finally:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)
    out = copy_run(straight, tmp_path / "run")
    before = (out / "config.json").read_text()
    argv = ["train", "--resume", str(out), "--epochs", "1", "--no-progress", "--compilation-cache", "off"]
    assert cli.main(argv) == 2
    message(capsys.readouterr().err, "--epochs 1", "done 2 epochs", ">= 2")
    assert (out / "config.json").read_text() == before


def test_out_of_range_labels_give_nan_not_another_class():
    from dgl_jax.losses import cross_entropy

    logits = jnp.zeros((3, 10))
    assert jnp.isfinite(cross_entropy(logits, jnp.array([0, 9, 3])))
    for labels in ([0, 10, 3], [0, -1, 3]):
        loss, grad = jax.value_and_grad(cross_entropy)(logits, jnp.array(labels))
        assert jnp.isnan(loss) and jnp.isnan(grad).any()
