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
    result = async_buffer.main(["--tiny", "--seeds", "0", "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    runs = list(saved["cells"].values())
    # per seed: synchronous DGL, and per buffer size the round-robin control plus every slow-down
    assert len(runs) == len(result["runs"]) == 1 + len(saved["buffers"]) * (1 + len(saved["slowdowns"]))
    assert saved["git_sha"] and all(r["git_sha"] and r["machine"]["versions"]["jax"] for r in runs)
    ticks = saved["budget"]["ticks"]
    for r in runs:
        assert 0.0 <= r["test_acc_last"] <= 1.0
        assert sum(r["stage_updates"]) <= ticks  # the paper's schedule: at most one stage per tick
    sync = next(r for r in runs if r["method"] == "sync_dgl")
    assert sync["stage_updates"] == [ticks // 3] * 3 and sync["stage_max_reuse"] == [0, 0, 0]
    rr = next(r for r in runs if r["method"] == "async_rr")
    assert rr["schedule"] == "round_robin" and rr["stage_updates"] == [ticks // 3] * 3
    md = out.with_suffix(".md").read_text()
    assert "| M \\ S |" in md and "Synchronous DGL" in md and "round-robin" in md
    assert out.with_suffix(".png").stat().st_size > 0
    again = async_buffer.main(["--tiny", "--seeds", "0", "--out", str(out)])  # every cell done: nothing re-run
    assert again["cells"] == saved["cells"]


def test_async_buffer_tiny_vq(tmp_path):
    """``--vq K:d``: the VQ cells run with packed-VQ codecs on the stages; their buffers store fewer bytes than
    float32 (buffer_memory, real nbytes), and they are evaluated through the codecs."""
    out = tmp_path / "async_vq_tiny"
    result = async_buffer.main(["--tiny", "--seeds", "0", "--vq", "16:4", "--slowdowns", "2", "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["vq"]["codec"] == "vq-packed:16:4" and saved["vq"]["packed"] is True
    runs = {r["method"]: r for r in result["runs"]}
    assert sorted(runs) == ["async", "async_rr", "async_vq", "sync_dgl"] and len(saved["cells"]) == 4
    flt, coded = runs["async"], runs["async_vq"]
    assert flt["stored_bytes"] == flt["float32_bytes"] == coded["float32_bytes"]
    assert coded["stored_bytes"] < coded["float32_bytes"] and coded["buffer_memory_factor"] > 1.0
    assert coded["stored_bytes"] == sum(coded["buffer_stored_bytes"]) and len(coded["buffer_stored_bytes"]) == 2
    assert all(w < f for w, f in zip(coded["wire_bytes_per_step"], flt["wire_bytes_per_step"], strict=True))
    for name in ("test_acc_last", "test_acc_ensemble", "test_acc_last_float_messages"):
        assert 0.0 <= coded[name] <= 1.0
    assert len(coded["test_distortion"]) == 2 and all(0.0 <= d < 1.0 for d in coded["test_distortion"])
    md = out.with_suffix(".md").read_text()
    assert "vq-packed:16:4" in md and "| async_vq | 2 | 2 |" in md
