"""experiments/vq_sweep.py runs end to end in its tiny configuration (digits, a few steps)."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("vq_sweep", ROOT / "experiments" / "vq_sweep.py")
vq_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vq_sweep)


def test_vq_sweep_tiny_writes_json_markdown_and_plot(tmp_path):
    result = vq_sweep.main(["--tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "vq_sweep.json").read_text())
    assert saved["rows"] == result["rows"]
    methods = [r["method"] for r in saved["rows"]]
    assert methods == ["dgl", "dgl+vq", "backprop"]
    dgl, q, bp = saved["rows"]
    assert dgl["ratio_fp32"] == 1.0 and dgl["bits_per_sample"] == saved["float32_bits_per_sample"]
    assert q["ratio_fp32"] > 1.0 and q["buffer_bytes_per_batch"] < dgl["buffer_bytes_per_batch"]
    assert dgl["buffer_factor"] == 1.0 and q["buffer_factor"] > 1.0
    for r in saved["rows"]:
        assert 0.0 <= r["acc_last"] <= 100.0
    assert saved["budget"]["steps"] == 4
    md = (tmp_path / "vq_sweep.md").read_text()
    assert md.startswith("# VQ sweep") and "python experiments/vq_sweep.py --tiny" in md
    assert (tmp_path / "vq_sweep.png").stat().st_size > 1000
