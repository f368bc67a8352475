"""Resumable experiment grids (dgl_jax.cells) and provenance (dgl_jax.provenance)."""

import json

import pytest

from dgl_jax import cells, provenance


def _cell(calls: list, name: str, value: int):
    def fn():
        calls.append(name)
        return {"value": value}

    return (name, fn)


def test_finished_cells_are_written_at_once_and_skipped_on_rerun(tmp_path):
    path = tmp_path / "grid.json"
    calls = []
    grid = cells.run_grid(path, {"budget": "x"}, [_cell(calls, "a/0", 1), _cell(calls, "a/1", 2)], {"seeds": [0, 1]})
    assert calls == ["a/0", "a/1"]
    stored = json.loads(path.read_text())
    assert stored == json.loads(json.dumps(grid))
    assert stored["seeds"] == [0, 1] and stored["ident"] == {"budget": "x"}
    cell = stored["cells"]["a/1"]
    assert cell["value"] == 2 and cell["wall_s"] >= 0
    assert set(cell) >= {"git_sha", "git_dirty", "machine"}
    assert set(cell["machine"]["versions"]) >= {"python", "jax", "flax", "optax"}
    assert stored["git_sha"] == cell["git_sha"]

    calls.clear()
    cells.run_grid(path, {"budget": "x"}, [_cell(calls, "a/0", 9), _cell(calls, "b/0", 3)])
    assert calls == ["b/0"]  # a/0 was finished
    stored = json.loads(path.read_text())
    assert stored["cells"]["a/0"]["value"] == 1 and stored["cells"]["b/0"]["value"] == 3


def test_interrupt_keeps_the_finished_cells(tmp_path):
    path = tmp_path / "grid.json"
    lines, calls = [], []

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cells.run_grid(path, {}, [_cell(calls, "a", 1), ("b", interrupted), _cell(calls, "c", 3)], log=lines.append)
    assert list(json.loads(path.read_text())["cells"]) == ["a"]
    assert "1 of 3 cells saved" in lines[-1] and "re-run" in lines[-1]


def test_a_rerun_writes_its_header_and_derived_fields_before_its_first_cell(tmp_path):
    path = tmp_path / "grid.json"
    cells.run_grid(path, {}, [_cell([], "a", 1)], {"command": "first"})

    def interrupted():
        raise KeyboardInterrupt

    def derive(grid):
        grid["total"] = sum(c["value"] for c in grid["cells"].values())

    with pytest.raises(KeyboardInterrupt):
        cells.run_grid(path, {}, [("b", interrupted)], {"command": "second"}, log=lambda _: None, derive=derive)
    stored = json.loads(path.read_text())
    assert stored["command"] == "second" and stored["total"] == 1 and list(stored["cells"]) == ["a"]


def test_a_grid_of_another_configuration_is_refused(tmp_path):
    path = tmp_path / "grid.json"
    cells.run_grid(path, {"epochs": 3}, [_cell([], "a", 1)])
    with pytest.raises(cells.GridError, match="differs in epochs"):
        cells.run_grid(path, {"epochs": 4}, [_cell([], "a", 1)])
    path.write_text("{not json")
    with pytest.raises(cells.GridError, match="unreadable"):
        cells.open_grid(path, {})


def test_a_grid_written_before_identities_is_checked_on_its_fields_of_the_same_names(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"config": {"lr": 0.1, "epochs": 3}, "runs": {}}))  # no "ident", no "cells"
    with pytest.raises(cells.GridError, match=r"differs in config\.lr\)"):
        cells.open_grid(path, {"config": {"lr": 0.2, "epochs": 3}, "codecs": ["a"]})
    grid = cells.open_grid(path, {"config": {"lr": 0.1, "epochs": 3}, "codecs": ["a"]})
    assert grid["ident"] == {"config": {"lr": 0.1, "epochs": 3}, "codecs": ["a"]} and grid["cells"] == {}


def test_provenance_names_the_checkout():
    sha = provenance.git_sha()
    assert sha is None or len(sha) == 40
    assert provenance.versions(("jax", "no-such-package-xyz")) == {
        "python": provenance.versions()["python"],
        "jax": provenance.versions()["jax"],
        "no-such-package-xyz": None,
    }


def test_the_recorded_command_survives_the_shell():
    import shlex

    argv = ["sequential_vs_parallel", "--runs", "sequential (same total epochs)", "--seeds", "0,1"]
    line = provenance.command("paper_tables.py", argv)
    assert shlex.split(line) == ["paper_tables.py", *argv]


def test_mean_std_over_seeds():
    import numpy as np

    mean, std = cells.mean_std([[90.0, 80.0], [92.0, np.nan], [94.0, np.nan]])
    np.testing.assert_allclose(mean, [92.0, 80.0])
    np.testing.assert_allclose(std[0], 2.0)  # sample std (ddof 1)
    assert np.isnan(std[1])  # one finite seed: no spread
    mean, std = cells.mean_std([93.0])
    assert (float(mean), float(std)) == (93.0, 0.0)
    assert all(np.isnan(v) for v in cells.mean_std([]))


def test_a_results_file_being_filled_does_not_make_the_tree_dirty(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    (tmp_path / "experiments" / "results").mkdir(parents=True)
    (tmp_path / "experiments" / "results" / "grid.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "x")
    assert provenance.git_dirty(tmp_path) is False
    (tmp_path / "experiments" / "results" / "grid.json").write_text('{"cells": {}}')
    assert provenance.git_dirty(tmp_path) is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance.git_dirty(tmp_path) is True
