"""``python -m dgl_jax sweep``: a tiny ablation end to end, resuming, interruption and bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import pytest

from dgl_jax import accounting, init_stage_states, with_codec
from dgl_jax import sweep as sw
from dgl_jax.codecs import parse_codec
from dgl_jax.models import get_model

CODECS = "vq-packed:16:4,vq-packed:64:4"
TINY = ["--split", "2", "--model-option", "width_mult=0.25", "--epochs", "1", "--batch-size", "64"]
TINY += ["--train-subset", "256", "--max-steps", "3"]


def tiny_args(out, codecs=CODECS, seeds="0,1"):
    return ["--codecs", codecs, "--seeds", seeds, *TINY, "--out", str(out)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny sweep (2 codecs sharing a group, seeds 0 and 1), run once for the module."""
    out = tmp_path_factory.mktemp("sweep")
    rc = sw.main(tiny_args(out))
    return out, rc


def expected_wire_bytes(spec: str) -> int:
    """Bytes per step of ``spec`` on the tiny model, computed independently of the sweep."""
    stages = with_codec(get_model("small_cnn", num_classes=10, split=2, width_mult=0.25), parse_codec(spec))
    x = jax.ShapeDtypeStruct((64, 8, 8, 1), jnp.float32)
    states = jax.eval_shape(lambda: init_stage_states(stages, jax.random.key(0), x))
    return sum(t["wire_bytes"] for t in accounting.boundary_traffic(stages, states, x))


def test_sweep_writes_json_table_and_frontier(finished):
    out, rc = finished
    assert rc == 0
    result = json.loads((out / "sweep.json").read_text())
    for k in ("git_sha", "seeds", "codecs", "config", "machine", "cells", "best_ratio_at_1pt"):
        assert k in result
    assert result["seeds"] == [0, 1] and result["codecs"] == ["vq-packed:16:4", "vq-packed:64:4"]
    assert sorted(result["cells"]) == ["d4/seed0", "d4/seed1", "float32/seed0", "float32/seed1"]
    assert all(c["git_sha"] == result["git_sha"] and "cpu_model" in c["machine"] for c in result["cells"].values())
    md = (out / "sweep.md").read_text()
    rows = {r["codec"]: r for r in result["summary"]}
    for spec in ("vq-packed:16:4", "vq-packed:64:4"):
        want = expected_wire_bytes(spec)
        assert rows[spec]["wire_bytes"] == want
        assert f"| {spec} | {want} (" in md
        assert rows[spec]["ratio"] == pytest.approx(rows["float32"]["wire_bytes"] / want)
        assert 0 <= rows[spec]["entropy_bits_mean"] <= 6  # log2(64) at most
    # [64, 8, 8, 8] messages: 2 groups of 4 channels, 4-bit packed codes + the float32 codebook [2, 16, 4]
    assert rows["vq-packed:16:4"]["wire_bytes"] == 64 * 8 * 8 * 2 * 4 // 8 + 2 * 16 * 4 * 4
    assert rows["float32"]["wire_bytes"] == 64 * 8 * 8 * 8 * 4
    assert rows["vq-packed:16:4"]["buffer_bytes"] == rows["vq-packed:16:4"]["wire_bytes"] + 64 * 4  # + labels
    assert "entropy bits/code (achievable with entropy coding)" in md
    best = result["best_ratio_at_1pt"]
    ok = [r["ratio"] for r in result["summary"][1:] if r["loss_last_mean"] <= 1.0]
    assert best == (max(ok) if ok else None)
    # stage 0 never sees a codec: its head scores the same in every configuration of a seed
    cell = result["cells"]["d4/seed0"]["members"]
    base = result["cells"]["float32/seed0"]["members"]["float32"]
    assert cell["vq-packed:16:4"]["acc_heads"][0] == base["acc_heads"][0]
    assert (out / "frontier.png").stat().st_size > 1000


def test_rerun_skips_finished_cells(finished, capsys, monkeypatch):
    out, _ = finished
    before = json.loads((out / "sweep.json").read_text())["cells"]
    calls = []
    monkeypatch.setattr(sw, "run_cell", lambda *a, **k: calls.append(a) or pytest.fail("ran a finished cell"))
    capsys.readouterr()
    assert sw.main(tiny_args(out)) == 0
    assert calls == []
    assert json.loads((out / "sweep.json").read_text())["cells"] == before
    assert "4 cells done already" in capsys.readouterr().out


def test_a_folder_whose_identity_held_its_codecs_grows_like_any_other(finished, tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(finished[0], out)
    stored = json.loads((out / "sweep.json").read_text())
    stored["ident"]["codecs"] = stored["codecs"]  # as folders were written before re-runs could add codecs
    (out / "sweep.json").write_text(json.dumps(stored))
    capsys.readouterr()
    assert sw.main(tiny_args(out)) == 0
    assert "4 cells done already" in capsys.readouterr().out
    assert json.loads((out / "sweep.json").read_text())["ident"] == {"config": stored["ident"]["config"]}


def test_a_rerun_adds_codecs_and_trains_only_the_new_pairs(finished, tmp_path):
    out = tmp_path / "grown"
    shutil.copytree(finished[0], out)
    before = json.loads((out / "sweep.json").read_text())["cells"]
    other = out / "partial" / "d8-seed5"  # the state of a cell this run does not plan stays
    other.mkdir(parents=True)
    assert sw.main(tiny_args(out, "vq-packed:64:4,vq-packed:32:4", "0")) == 0
    assert other.is_dir() and not (out / "partial" / "d4-seed0+vq-packed:32:4").exists()
    result = json.loads((out / "sweep.json").read_text())
    assert result["codecs"] == ["vq-packed:16:4", "vq-packed:64:4", "vq-packed:32:4"] and result["seeds"] == [0, 1]
    assert {k: result["cells"][k]["members"] for k in before} == {k: c["members"] for k, c in before.items()}
    new = {k: c for k, c in result["cells"].items() if k not in before}
    assert list(new) == ["d4/seed0+vq-packed:32:4"]
    added = new["d4/seed0+vq-packed:32:4"]["members"]
    assert list(added) == ["vq-packed:32:4"]
    rows = {r["codec"]: r for r in result["summary"]}
    assert rows["vq-packed:32:4"]["seeds_done"] == [0] and rows["vq-packed:64:4"]["seeds_done"] == [0, 1]
    assert rows["vq-packed:32:4"]["wire_bytes"] == expected_wire_bytes("vq-packed:32:4")
    # a member trains the same whatever cell it is in: here with 16:4 in one program, from the start
    together = tmp_path / "together"
    assert sw.main(tiny_args(together, "vq-packed:16:4,vq-packed:32:4", "0")) == 0
    cell = json.loads((together / "sweep.json").read_text())["cells"]["d4/seed0"]["members"]
    assert cell["vq-packed:32:4"] == added["vq-packed:32:4"]


def test_interrupt_keeps_finished_cells_and_exits_130(tmp_path, capsys, monkeypatch):
    fake = {"steps": 0, "seconds": 0.0}

    def run_cell(group, data, config, seed, *_):
        if seed == 1:
            raise KeyboardInterrupt
        accs = {m: {"acc_heads": [10.0, 20.0], "train_loss_last": [1.0, 1.0], "entropy": None} for m in group.members}
        return {"seed": seed, **fake, "members": accs}

    monkeypatch.setattr(sw, "run_cell", run_cell)
    other = tmp_path / "partial" / "d8-seed5"  # a cell this run does not plan: its state is not the running cell's
    other.mkdir(parents=True)
    (other / "1").mkdir()
    assert sw.main(tiny_args(tmp_path)) == 130
    printed = capsys.readouterr()
    err = printed.err.strip().splitlines()
    assert len(err) == 1 and "the running cell had saved no checkpoint" in err[0]
    assert "interrupted: 2 of 4 cells saved" in printed.out and "re-run the same command" in printed.out
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert sorted(result["cells"]) == ["d4/seed0", "float32/seed0"]
    # the tables follow the finished cells, and no codec counts before all its seeds are done
    md = (tmp_path / "sweep.md").read_text()
    assert (
        "| vq-packed:16:4 |" in md
        and "| 4864 | 0 | 10.00 / 20.00 | 0.00 |" in md
        and (tmp_path / "frontier.png").is_file()
    )
    assert result["best_ratio_at_1pt"] is None and "averaged over all the seeds, is <= 1 point: none" in md


def test_best_ratio_counts_only_codecs_with_every_seed():
    row = lambda codec, seeds, ratio, loss: {  # noqa: E731
        "codec": codec,
        "seeds_done": seeds,
        "ratio": ratio,
        "loss_last_mean": loss,
    }
    base = row("float32", [0, 1, 2], 1.0, None)
    rows = [base, row("a", [0, 1, 2], 40.0, 0.9), row("b", [0, 1], 60.0, 0.2), row("c", [0, 1, 2], 70.0, 1.2)]
    assert sw.best_ratio_at_1pt(rows, [0, 1, 2]) == 40.0
    assert sw.best_ratio_at_1pt(rows, [0, 1]) is None  # the baseline has a third seed the grid does not name
    two = [row("float32", [0, 1], 1.0, None), *rows[1:]]
    assert sw.best_ratio_at_1pt(two, [0, 1]) == 60.0  # "b" is done on both seeds, "a" and "c" have another
    assert sw.best_ratio_at_1pt([row("float32", [0], 1.0, None), *rows[1:]], [0, 1, 2]) is None  # baseline short


def test_the_recorded_command_reproduces_every_codec_and_seed_the_folder_holds():
    argv = ["--codecs", "vq-packed:16:4", "--epochs", "2", "--seeds=1", "--out", "o"]
    got = sw._command(argv, ["vq-packed:64:4", "vq-packed:16:4"], [0, 1])
    assert got == "python -m dgl_jax sweep --codecs vq-packed:64:4,vq-packed:16:4 --seeds 0,1 --epochs 2 --out o"


def test_an_interrupted_cell_resumes_bit_identical(finished, tmp_path, capsys, monkeypatch):
    """Ctrl-C inside a cell saves its state (--checkpoint-every 0: on Ctrl-C only); a periodic checkpoint
    (--checkpoint-every 1) is resumed too; the resumed cells equal the uninterrupted ones of ``finished``."""
    real, calls = sw._batches, []

    def interrupt_at_step_2_of_call(which):
        def batches(n, batch_size, seed, epochs, max_steps):
            calls.append(max_steps)
            for step, idx in real(n, batch_size, seed, epochs, max_steps):
                if step == 2 and calls.count(3) == which and max_steps == 3:  # 3: a training call (max steps)
                    raise KeyboardInterrupt
                yield step, idx

        return batches

    args = tiny_args(tmp_path, seeds="0")
    monkeypatch.setattr(sw, "_batches", interrupt_at_step_2_of_call(1))  # float32 cell, at step 2
    assert sw.main([*args, "--checkpoint-every", "0"]) == 130
    assert "resumes from its checkpoint in" in capsys.readouterr().err
    assert (tmp_path / "partial" / "float32-seed0").is_dir()
    calls.clear()
    monkeypatch.setattr(sw, "_batches", interrupt_at_step_2_of_call(2))  # float32 resumes; d4 stops at step 2
    assert sw.main([*args, "--checkpoint-every", "1"]) == 130
    out = capsys.readouterr().out
    assert "float32/seed0: resumed at step 2 of 3" in out
    assert not (tmp_path / "partial" / "float32-seed0").exists()  # removed once the cell is saved
    monkeypatch.setattr(sw, "_batches", real)
    # the d4 checkpoint is not restored into a cell of other members: one line, exit 2
    assert sw.main(tiny_args(tmp_path, "vq:16:4,vq-packed:64:4", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "re-run with the codecs it was saved with, or delete" in err[0]
    assert sw.main(args) == 0
    assert "d4/seed0: resumed at step 2 of 3" in capsys.readouterr().out
    assert not (tmp_path / "partial").exists()  # every cell finished: no checkpoint left
    resumed = json.loads((tmp_path / "sweep.json").read_text())["cells"]
    whole = json.loads((finished[0] / "sweep.json").read_text())["cells"]
    for cid in ("float32/seed0", "d4/seed0"):
        assert resumed[cid]["resumed_at_step"] == 2 and "resumed_at_step" not in whole[cid]
        assert resumed[cid]["members"] == whole[cid]["members"]  # accuracy, last losses, code entropy: exact


def test_a_checkpoint_that_names_other_members_is_refused_even_when_its_shapes_fit():
    class Saved:
        directory = "partial/d4-seed0"

        def restore(self, carry):
            return carry, {"members": ["vq-packed:16:4", "vq-packed:64:4"]}

    assert sw._restore(Saved(), "carry", ["vq-packed:16:4", "vq-packed:64:4"]) == ("carry", Saved().restore(0)[1])
    with pytest.raises(sw.SweepError, match="holds the running cell of vq-packed:16:4,vq-packed:64:4; re-run"):
        sw._restore(Saved(), "carry", ["vq:16:4", "vq-packed:64:4"])


def test_checkpoint_every_must_not_be_negative(tmp_path, capsys):
    assert sw.main([*tiny_args(tmp_path), "--checkpoint-every", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --checkpoint-every must be an integer >= 0"


@pytest.mark.parametrize(
    "codecs, seeds, needle",
    [
        ("vq-packed:16:4,zstd", "0", "bad codec spec 'zstd'"),
        ("vq-packed:1:4", "0", "K must be >= 2"),
        ("vq-packed:16:3", "0", "code dim 3 does not divide the 8 channels of boundary 0 -> 1"),
        ("vq-packed:16:4", "0,1,0", "seed 0 is repeated"),
        ("", "0", "--codecs is empty"),
        (" , ", "0", "--codecs is empty"),
        ("vq-packed:16:4,vq-packed:16:4", "0", "repeated"),
        ("bfloat16", "0", "not a VQ codec"),
        ("vq-packed:16:4:levels=2", "0", "is residual VQ"),
        ("vq-packed:16:4", "0,x", "--seeds"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, codecs, seeds, needle):
    out = tmp_path / "run"
    assert sw.main(tiny_args(out, codecs, seeds)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], captured.err
    assert not out.exists()  # checked before any folder is made


def test_bad_flag_and_other_config_in_folder_exit_2(finished, capsys):
    out, _ = finished
    assert sw.main([*tiny_args(out), "--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another configuration" in err[0] and "lr" in err[0]
    assert sw.main([*tiny_args(out), "--no-such-flag"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sw.main(["--seeds", "0", "--out", str(out)]) == 2  # --codecs missing
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_build_parser_adds_the_sweep_subcommand():
    import argparse

    parser = argparse.ArgumentParser()
    sw.build_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sweep", "--codecs", "vq-packed:16:4", "--out", "x", "--model-option", "width_mult=0.5"])
    assert args.command == "sweep" and args.func is sw.run_sweep
    assert args.model_options == [("width_mult", 0.5)] and args.seeds == "0" and args.epochs is None


def test_sweep_is_a_command_of_the_cli(tmp_path, capsys):
    from dgl_jax.cli import main as cli_main

    assert cli_main(["sweep", "--codecs", "vq-packed:1:4", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "K" in err[0] and not (tmp_path / "s").exists()


def test_sigterm_under_the_cli_saves_the_running_cell_and_exits_143(tmp_path, capsys, monkeypatch):
    import os
    import signal

    from dgl_jax.cli import main as cli_main

    real = sw._batches

    def batches(*a):
        for step, idx in real(*a):
            if step == 2 and a[-1] == 3:  # the training loop's third step: the signal arrives mid-cell
                os.kill(os.getpid(), signal.SIGTERM)
            yield step, idx

    monkeypatch.setattr(sw, "_batches", batches)
    args = ["sweep", *tiny_args(tmp_path, codecs="vq-packed:16:4", seeds="0"), "--checkpoint-every", "0"]
    assert cli_main(args) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the running cell resumes from its checkpoint in" in err[0]
    saved = sorted(p.name for p in (tmp_path / "partial" / "float32-seed0").iterdir())
    assert saved == ["2"]  # the state after the 2 steps done when the signal came


def test_codec_options_reach_the_swept_quantizer():
    name = sw.parse_codecs("vq-packed:16:4:init=kmeans++:decay=0.9:restart=0")[0]
    cfg, packed = sw.vq_config(name)
    assert (cfg.init, cfg.decay, cfg.restart_threshold, packed) == ("kmeans++", 0.9, 0.0, True)
    assert cfg.codec(packed).name == name  # bytes are measured on the same codec
    assert sw.group_of(name) == "d4:init=kmeans++:decay=0.9:restart=0" != sw.group_of("vq-packed:16:4")


def test_the_learning_curve_is_recorded_every_epoch_and_survives_a_resume(tmp_path, capsys, monkeypatch):
    two_epochs = ["--train-subset", "128", "--max-steps", "0", "--epochs", "2"]  # 2 steps per epoch
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert sw.main([*tiny_args(whole, seeds="0"), *two_epochs]) == 0
    assert "epoch 1/2, step 2/4 (" in (out := capsys.readouterr().out) and "test last head" in out
    real = sw._batches

    def interrupted(n, batch_size, seed, epochs, max_steps):
        for step, idx in real(n, batch_size, seed, epochs, max_steps):
            if step == 3 and max_steps == 4:  # the float32 cell, in its second epoch
                raise KeyboardInterrupt
            yield step, idx

    monkeypatch.setattr(sw, "_batches", interrupted)
    assert sw.main([*tiny_args(part, seeds="0"), *two_epochs, "--checkpoint-every", "0"]) == 130
    monkeypatch.setattr(sw, "_batches", real)
    assert sw.main([*tiny_args(part, seeds="0"), *two_epochs]) == 0
    a = json.loads((whole / "sweep.json").read_text())["cells"]
    b = json.loads((part / "sweep.json").read_text())["cells"]
    assert b["float32/seed0"]["resumed_at_step"] == 3
    for cid in a:
        for name, r in a[cid]["members"].items():
            assert len(r["acc_curve"]) == 2 and r["acc_curve"][-1] == r["acc_heads"]
            assert b[cid]["members"][name] == r  # the curve saved with the checkpoint, then the rest: exact
    rows = {r["codec"]: r for r in json.loads((part / "sweep.json").read_text())["summary"]}
    base = a["float32/seed0"]["members"]["float32"]["acc_curve"]
    assert rows["float32"]["curve_last_head_mean"] == [e[-1] for e in base] and rows["float32"]["curve_seeds"] == [0]
    assert "- float32 (seeds [0]): " in (part / "sweep.md").read_text()


def test_head_reads_wire_is_a_grid_of_its_own(finished, tmp_path, capsys):
    """``--head-reads-wire`` changes the train config (refused in a folder without it); its float32 baseline
    is the plain one, and a quantized stage's own head, which now reads the decoded wire, scores differently."""
    out, _ = finished
    capsys.readouterr()
    assert sw.main([*tiny_args(out, "vq-packed:16:4", "0"), "--head-reads-wire"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "head_reads_wire" in err[0], err
    new = tmp_path / "wire"
    assert sw.main([*tiny_args(new, "vq-packed:16:4", "0"), "--head-reads-wire"]) == 0
    result = json.loads((new / "sweep.json").read_text())
    assert result["config"]["head_reads_wire"] is True and "--head-reads-wire" in result["command"]
    base = json.loads((out / "sweep.json").read_text())["cells"]
    member = lambda cells, cid, name: cells[cid]["members"][name]["acc_heads"]  # noqa: E731
    assert member(result["cells"], "float32/seed0", "float32") == member(base, "float32/seed0", "float32")
    wire, plain = member(result["cells"], "d4/seed0", "vq-packed:16:4"), member(base, "d4/seed0", "vq-packed:16:4")
    assert wire[0] != plain[0], (wire, plain)
