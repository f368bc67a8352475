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
    assert dgl["ratio_fp32"] == 1.0 and dgl["wire_bytes_per_batch"] == saved["float32_bytes_per_batch"]
    assert dgl["ratio_bf16"] == 0.5 and dgl["codebook_bytes_per_batch"] == 0
    assert q["codecs"] == ["vq-packed:16:4"] and q["ratio_fp32"] > 1.0
    # real nbytes (dgl_jax.accounting): the stage-0 message [64, 8, 8, 8]; 2 groups of 4 channels, 4-bit codes
    # packed per example, plus the float32 codebook [2, 16, 4] on every send; labels int32 [64] in the buffers
    assert saved["boundary_shapes"] == [[8, 8, 8]] and saved["budget"]["batch_size"] == 64
    book = 2 * 16 * 4 * 4
    assert q["codebook_bytes_per_batch"] == book
    assert q["wire_bytes_per_batch"] == 64 * (8 * 8 * 2 * 4 // 8) + book
    assert dgl["wire_bytes_per_batch"] == 64 * 8 * 8 * 8 * 4
    assert q["buffer_bytes_per_batch"] == q["wire_bytes_per_batch"] + 64 * 4
    assert dgl["buffer_bytes_per_batch"] == dgl["wire_bytes_per_batch"] + 64 * 4
    assert dgl["buffer_factor"] == 1.0 and q["buffer_factor"] > 1.0
    for r in saved["rows"]:
        assert 0.0 <= r["acc_last"] <= 100.0
    assert saved["budget"]["steps"] == 4
    md = (tmp_path / "vq_sweep.md").read_text()
    assert md.startswith("# VQ sweep") and "python experiments/vq_sweep.py --tiny" in md
    assert (tmp_path / "vq_sweep.png").stat().st_size > 1000
