"""Plugins: a module registering a model is usable from the shell with --import (train, run.json, eval); a bad
--import is exit 2 with one line; register_model refuses a taken name; dgl_jax.cli.main(argv) called from
Python leaves process-wide settings (malloc, compilation cache) alone unless the flags ask for them."""

import json
import os
import subprocess
import sys
import uuid

import jax
import pytest

import dgl_jax
from dgl_jax import cli, models

PLUGIN = """import dgl_jax


def build(**kwargs):
    return dgl_jax.get_model("small_cnn", **kwargs)


dgl_jax.register_model("{name}", build)
"""


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "DGL_JAX_CACHE_DIR": os.environ.get("DGL_JAX_CACHE_DIR", "off")}


@pytest.fixture
def plugin(tmp_path):
    """A plugin module file in ``tmp_path`` registering the model ``mine_<random>``: (module, model name)."""
    module = f"my_plugin_{uuid.uuid4().hex[:8]}"
    name = f"mine_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(name=name))
    yield module, name
    models.MODELS.pop(name, None)
    sys.modules.pop(module, None)


def test_import_plugin_model_train_then_eval(tmp_path, plugin, monkeypatch, capsys):
    module, name = plugin
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dgl_jax", "train", "--import", module, "--model", name, "--epochs", "1"]
    cmd += ["--chunk-steps", "2", "--out", str(out), "--no-progress"]  # test_cli's programs: compiled once
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert (out / "summary.json").is_file()
    assert json.loads((out / "run.json").read_text())["imports"] == [module]
    assert json.loads((out / "config.json").read_text())["model"] == name
    # eval in-process: without the plugin the model is unknown (and the message names the missing --import) ...
    assert name not in models.MODELS
    assert cli.main(["eval", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and f"--import {module}" in err, err
    # ... with it, the checkpoint evaluates (the current folder is put on sys.path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert cli.main(["eval", str(out), "--import", module]) == 0
    assert "ens" in capsys.readouterr().out


def test_import_missing_module_exit_2_one_line(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dgl_jax", "train", "--import", "does_not_exist_xyz", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --import does_not_exist_xyz: ModuleNotFoundError"), lines
    assert not out.exists()


def test_import_failing_module_names_first_line(tmp_path, monkeypatch, capsys):
    module = f"bad_plugin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text('raise RuntimeError("boom\\nsecond line")\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored afterwards: import_plugins may add the cwd
    try:
        assert cli.main(["eval", str(tmp_path), "--import", module]) == 2
    finally:
        sys.modules.pop(module, None)
    err = capsys.readouterr().err
    assert err == f"error: --import {module}: RuntimeError: boom\n"


def test_register_model_twice_is_one_line_error():
    name = f"twice_{uuid.uuid4().hex[:8]}"

    def build(**kw):
        return dgl_jax.get_model("small_cnn", **kw)

    try:
        assert dgl_jax.register_model(name, build) is build
        assert len(dgl_jax.get_model(name, split=2)) == 2
        with pytest.raises(ValueError) as e:
            dgl_jax.register_model(name, build)
        assert str(e.value) == str(e.value).splitlines()[0] and f"model {name!r} is already registered" in str(e.value)
        assert dgl_jax.register_model(name, build, replace=True) is build
        with pytest.raises(ValueError, match="already registered"):
            dgl_jax.register_model("small_cnn", build)
    finally:
        models.MODELS.pop(name, None)


@pytest.fixture
def recorded(monkeypatch):
    """Calls of cli.keep_freed_memory and cli.setup_compilation_cache, recorded instead of applied."""
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(("malloc",)) or True)
    monkeypatch.setattr(cli, "setup_compilation_cache", lambda path: calls.append(("cache", path)) or path)
    return calls


def test_main_from_python_leaves_process_settings_alone(monkeypatch, capsys):
    malloc = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: malloc.append(1) or True)
    before = jax.config.jax_compilation_cache_dir
    assert cli.main(["eval", "/nonexistent"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert jax.config.jax_compilation_cache_dir == before
    assert malloc == []


def test_main_explicit_flags_and_program_defaults_apply(recorded, monkeypatch, capsys):
    assert cli.main(["eval", "/nonexistent", "--malloc", "keep", "--compilation-cache", "/tmp/c"]) == 2
    assert recorded == [("malloc",), ("cache", "/tmp/c")]
    recorded.clear()
    monkeypatch.setenv("DGL_JAX_CACHE_DIR", "/tmp/env_cache")
    assert cli.main(["eval", "/nonexistent"], process_settings=True) == 2  # what `python -m dgl_jax` gets
    assert recorded == [("malloc",), ("cache", "/tmp/env_cache")]
    recorded.clear()
    assert cli.main(["eval", "/nonexistent", "--malloc", "default"], process_settings=True) == 2
    assert recorded == [("cache", "/tmp/env_cache")]
    recorded.clear()
    monkeypatch.setattr(sys, "argv", ["dgl-jax", "eval", "/nonexistent"])
    assert cli.main() == 2  # argv None: run as the program
    assert recorded == [("malloc",), ("cache", "/tmp/env_cache")]
    capsys.readouterr()
