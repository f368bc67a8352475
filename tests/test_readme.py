"""The README's examples are the files in examples/ (verbatim) and run; its tables name every dataset and preset."""

import pathlib
import re
import runpy

import pytest

from dgl_jax.data import DATASETS
from dgl_jax.presets import PRESETS

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def _body(path: pathlib.Path) -> str:
    """The example without its first line (a comment naming it)."""
    return path.read_text().split("\n", 1)[1]


def test_examples_exist():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_readme_shows_example_verbatim(path):
    assert f"```python\n{_body(path)}```" in README, f"README's code block differs from {path.name}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, capsys):
    runpy.run_path(str(path), run_name="__main__")
    if path.name == "own_model.py":  # the promise: the last head reaches 90% on digits
        last = capsys.readouterr().out.strip().splitlines()[-1]
        m = re.fullmatch(r"last head test accuracy: (\d+\.\d\d)%", last)
        assert m, f"last line is {last!r}"
        assert float(m.group(1)) >= 90.0, last


def test_readme_lists_datasets_and_presets():
    missing = [f"`{d}`" for d in DATASETS if f"`{d}`" not in README]
    missing += [f"`{p}`" for p in PRESETS if f"| `{p}` |" not in README]
    assert not missing, f"README does not list {missing}"
