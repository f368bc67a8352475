"""The command line: a smoke run on digits (exit 0, complete run folder, accuracy floor), eval, Ctrl-C in a
subprocess then --resume giving bit-identically the uninterrupted run, and every bad input -> exit 2 with a
one-line message and no run folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import pytest

from dgl_jax import cli
from dgl_jax.checkpoint import Checkpointer

sys.path.insert(0, str(Path(__file__).parent))
from _processes import xla_flags  # noqa: E402

# the same recipe for the straight run and the interrupted one: 3 epochs of 22 steps, 2 steps per log line
RECIPE = ["--epochs", "3", "--chunk-steps", "2", "--devices", "1", "--no-progress", "--compilation-cache", "off"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "straight"
    rc = cli.main(["train", *RECIPE, "--out", str(out)])
    return rc, out


def final_tree(run_dir: Path):
    ck = Checkpointer(run_dir / "checkpoints")
    step = ck.latest_step()
    return ck.read(step), step


def test_smoke_run_folder_complete(straight_run, capsys):
    rc, out = straight_run
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "run.json", "metrics.jsonl", "summary.json", "learning_curves.png", "checkpoints"} <= names
    assert not [n for n in names if n.endswith(".tmp")]  # atomic writes left no temporaries
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    assert summary["final_accuracy"] >= 0.8, summary
    assert summary["eval_examples"] == 359 and summary["examples_used_per_epoch"] == 1408
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    evals = [r for r in rows if r["event"] == "eval"]
    assert len(train) == 3 * 11 * 3  # 11 chunks per epoch x 3 epochs x 3 stages
    assert {"loss", "accuracy", "lr", "examples_per_s", "global_step", "stage"} <= set(train[0])
    assert sorted({r["epoch"] for r in evals}) == [1, 2, 3] and len(evals) == 3 * 4  # 3 stages + ensemble
    assert (out / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 3 and config["method"] == "dgl" and config["model"] == "small_cnn"


def test_eval_command(straight_run, capsys):
    rc, out = straight_run
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--compilation-cache", "off"]) == 0
    text = capsys.readouterr().out
    final = json.loads((out / "summary.json").read_text())["test_accuracy"][-1]
    assert f"{100 * final:7.2f}%" in text and "ens" in text


def test_interrupt_then_resume_matches_straight_run(straight_run, tmp_path):
    rc, straight = straight_run
    out = tmp_path / "interrupted"
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "dgl_jax", "train", *RECIPE[:-1], str(cache), "--out", str(out)]
    # the same XLA:CPU setup as this process (4 fake devices), where the run is resumed and compared
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(4)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == cli.EXIT_INTERRUPTED, (stdout, stderr)
    assert "--resume" in stderr and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_completed"] < 3
    # continue in-process to the end: identical to never stopping
    assert cli.main(["train", "--resume", str(out), "--no-progress", "--compilation-cache", "off"]) == 0
    resumed, step = final_tree(out)
    reference, ref_step = final_tree(straight)
    assert step == ref_step == 66
    chex.assert_trees_all_equal(jax.device_get(resumed), jax.device_get(reference))
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    # no duplicated log lines after the resume: one line per (step, stage)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["event"], r["global_step"], r["stage"]) for r in rows]
    assert len(keys) == len(set(keys)) == len((straight / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--model", "resnet7"], ["resnet7", "small_cnn"]),
        (["--dataset", "cifar11"], ["cifar11", "cifar10"]),
        (["--method", "magic"], ["magic", "backprop"]),
        (["--split", "7"], ["K=7", "1 <= K <= 3"]),
        (["--lr", "-0.1"], ["-0.1", "> 0"]),
        (["--batch-size", "5000"], ["5000", "1438"]),
        (["--head", "tiny"], ["tiny", "mlp_sr"]),
        (["--preset", "nope"], ["nope", "learning_curves"]),
        (["--epochs", "two"], ["two", "int"]),
        (["--dataset", "cifar10", "--data-dir", "EMPTY"], ["cifar10", "tfds build"]),
        (["--head-reads-wire"], ["--head-reads-wire needs --codec"]),
        (["--codec", "vq:16:4", "--head-reads-wire", "maybe"], ["maybe", "true/false"]),
    ],
)
def test_bad_input_exit_2_one_line_no_folder(tmp_path, capsys, args, needles):
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    rc = cli.main(["train", *args, "--out", str(out), "--no-progress", "--compilation-cache", "off"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()


def test_resume_refuses_other_options_and_missing_folder(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path), "--compilation-cache", "off"]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert cli.main(["train", "--resume", str(tmp_path), "--lr", "0.1", "--compilation-cache", "off"]) == 2
    assert "cannot change ['lr']" in capsys.readouterr().err


def test_help_lists_presets(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("dni_comparison", "aux_head_study", "learning_curves", "buffer_net", "resnet110_k2",
                 "imagenet_vgg19_k4", "imagenet_resnet152_k2"):  # fmt: skip
        assert name in text


def test_keep_freed_memory_applies_on_linux_glibc():
    import platform

    from dgl_jax.host import keep_freed_memory

    applied = keep_freed_memory()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert applied is True
    else:
        assert applied is False
