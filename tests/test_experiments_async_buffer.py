"""experiments/async_buffer.py runs end to end in its tiny configuration and writes JSON, markdown and PNG."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("async_buffer", ROOT / "experiments" / "async_buffer.py")
async_buffer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(async_buffer)


def test_async_buffer_tiny(tmp_path):
    out = tmp_path / "async_tiny"
    result = async_buffer.main(["--tiny", "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    runs = saved["runs"]
    assert len(runs) == len(result["runs"]) == 1 + len(saved["buffers"]) * len(saved["slowdowns"])
    ticks = saved["budget"]["ticks"]
    for r in runs:
        assert 0.0 <= r["test_acc_last"] <= 1.0
        assert sum(r["stage_updates"]) <= ticks  # the paper's schedule: at most one stage per tick
    sync = next(r for r in runs if r["method"] == "sync_dgl")
    assert sync["stage_updates"] == [ticks // 3] * 3 and sync["stage_max_reuse"] == [0, 0, 0]
    md = out.with_suffix(".md").read_text()
    assert "| M \\ S |" in md and "Synchronous DGL" in md
    assert out.with_suffix(".png").stat().st_size > 0
