"""Each paper table runs end to end in its tiny configuration (digits, one epoch, narrow networks)."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("paper_tables", ROOT / "experiments" / "paper_tables.py")
paper_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paper_tables)


@pytest.mark.parametrize(
    "table,runs",
    [
        ("dni_comparison", "cDNI"),
        ("sequential_vs_parallel", "sequential"),
        ("aux_heads", "mlp_sr"),
        ("num_stages", "K=2"),
    ],
)
def test_table_runs_tiny(tmp_path, table, runs):
    result = paper_tables.main([table, "--tiny", "--seeds", "0", "--runs", runs, "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / f"{table}_tiny.json").read_text())
    assert list(saved["runs"]) == runs.split(",") == list(result["runs"])
    for r in saved["runs"].values():
        acc = [a for a in r["final_test_accuracy_mean"] if a is not None]
        assert 0.0 <= acc[-1] <= 1.0
    assert (tmp_path / f"{table}_tiny.md").read_text().startswith(f"# {table}")
    assert (tmp_path / f"{table}_tiny.png").stat().st_size > 1000


def test_every_table_config_is_valid_in_every_budget():
    from dgl_jax.trainer import validate_config

    for table in paper_tables.TABLES.values():
        for run in table.runs:
            assert "," not in run.label  # --runs takes comma-separated labels
            for budget in ("converged", "cpu", "paper", "tiny"):
                validate_config(paper_tables.run_config(table, run, budget, seed=0))


def test_cells_resume_and_differences_are_called_only_beyond_the_spread(tmp_path, capsys):
    args = ["sequential_vs_parallel", "--tiny", "--runs", "DGL", "--out-dir", str(tmp_path)]
    first = paper_tables.main([*args, "--seeds", "0,1"])
    assert sorted(first["cells"]) == ["DGL/0", "DGL/1"]
    assert first["runs"]["DGL"]["seeds"] == [0, 1] and first["seeds"] == [0, 1]
    capsys.readouterr()
    again = paper_tables.main([*args, "--seeds", "1"])  # finished: nothing re-run
    assert "done already" in capsys.readouterr().out
    assert again["cells"]["DGL/1"] == first["cells"]["DGL/1"]
    cell = again["cells"]["DGL/0"]
    assert cell["git_sha"] == again["git_sha"] and cell["machine"]["versions"]["jax"] and cell["wall_s"] > 0

    def run(mean, std, seeds=(0, 1, 2)):
        return {"final_test_accuracy_mean": [mean], "final_test_accuracy_std": [std], "seeds": list(seeds)}

    assert "(called" in paper_tables.called(run(0.90, 0.002), run(0.88, 0.002))
    assert "not called: within" in paper_tables.called(run(0.90, 0.01), run(0.89, 0.01))
    assert "fewer than 2 seeds" in paper_tables.called(run(0.90, 0.0, [0]), run(0.80, 0.0, [0]))


def test_sequential_same_total_epochs_divides_the_epochs_and_the_decay():
    table = paper_tables.TABLES["sequential_vs_parallel"]
    run = next(r for r in table.runs if r.label == "sequential (same total epochs)")
    cfg = paper_tables.run_config(table, run, "converged", seed=0)
    full = paper_tables.run_config(table, table.runs[0], "converged", seed=0)
    assert cfg.method == "sequential" and cfg.epochs == full.epochs // 4
    assert all(0 < e < cfg.epochs for e in (cfg.decay_epochs or ()))


def test_unknown_run_label_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        paper_tables.main(["num_stages", "--tiny", "--runs", "K=9"])
    assert e.value.code == 2
    assert "unknown runs ['K=9']" in capsys.readouterr().err


def test_devices_accuracy_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("devices_accuracy", ROOT / "experiments" / "devices_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--tiny", "--out", str(tmp_path / "dev")])
    one, spmd = result["cells"]["1 device/0"], result["cells"]["stages x3 (spmd)/0"]
    assert one["test_accuracy"] == spmd["test_accuracy"]  # stage-parallel gives the one-device run exactly
    assert spmd["wire_bytes_measured"] == spmd["wire_bytes_accounted"] > 0
    assert "stages x3" in (tmp_path / "dev.md").read_text()
