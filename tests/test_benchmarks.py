"""The benchmark scripts run end to end in a tiny configuration (never timed here)."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_time_benchmark_tiny(tmp_path):
    out = tmp_path / "step_time.json"
    result = load("step_time").main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["ratio_dgl_over_backprop"] == pytest.approx(result["ratio_dgl_over_backprop"])
    for m in ("dgl", "backprop"):
        assert saved[m]["repeats"] == 3 and saved[m]["median_s"] > 0
        mem = saved[m]["memory"]
        assert mem["peak_bytes"] > 0 and mem["temp_bytes"] > 0
        assert saved[m]["host"]["minor_faults_per_step"] >= 0 and saved[m]["host"]["system_s_per_step"] >= 0
        assert (
            mem["footprint_bytes"]
            == mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
        )
    assert saved["machine"]["platform"] == "cpu"
    assert saved["git_sha"] and isinstance(saved["git_dirty"], bool)  # every benchmark JSON (common.write_json)


def test_vs_pytorch_benchmark_tiny(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "vs_pytorch.json"
    load("vs_pytorch").main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert {"jax_dgl", "torch_eager_dgl", "torch_channels_last_backprop"} <= set(saved["variants"])
    assert saved["ratios"]["jax_over_best_torch_dgl"] > 0


def test_xla_flags_benchmark_tiny(tmp_path):
    out = tmp_path / "xla_flags.json"
    load("xla_flags").main(["--tiny", "--configs", "default,bfloat16", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert not saved["errors"]
    assert saved["ratio_to_default"]["default"] == 1.0 and saved["ratio_to_default"]["bfloat16"] > 0


def test_input_pipeline_benchmark_tiny(tmp_path):
    out = tmp_path / "input_pipeline.json"
    result = load("input_pipeline").main(["--tiny", "--startup-rounds", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    e = saved["epoch_vs_step"]
    assert e["pure"]["repeats"] == e["epoch"]["repeats"] == 2
    assert e["epoch_over_pure_throughput"] == pytest.approx(result["epoch_vs_step"]["epoch_over_pure_throughput"])
    assert "startup" not in saved


def test_conv_kernels_benchmark_tiny(tmp_path):
    out = tmp_path / "conv_kernels.json"
    load("conv_kernels").main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [e["shape"]["C_out"] for e in saved["layers"]] == [16]
    for e in saved["layers"]:
        for variant in ("xla_nhwc_dgl", "winograd4_dgl", "direct_backprop", "dgl_jax_backprop", "xla_kernel_grad"):
            assert e[variant]["repeats"] == 2 and e[variant]["gflop_per_s"] > 0
        assert e["dgl_jax_algorithm"] == ["direct", None]  # 4x4x8 -> 16 at batch 4: below the Winograd size


def test_profile_step_benchmark_tiny(tmp_path):
    out = tmp_path / "profile_step.json"
    load("profile_step").main(["--tiny", "--no-torch", "--out", str(out)])
    saved = json.loads(out.read_text())
    parts = {(r["stage"], r["part"]) for r in saved["rows"]}
    assert {(0, "block_backward"), (3, "local_update"), ("all", "dgl_step")} <= parts
    assert all(r["jax"]["median_s"] > 0 for r in saved["rows"])
    assert saved["totals_over_stages"]["head"]["jax_s"] > 0


def test_winograd_accuracy_benchmark_tiny(tmp_path):
    out = tmp_path / "winograd_accuracy.json"
    load("winograd_accuracy").main(["--tiny", "--seeds", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["runs"]) == {"dgl_jax", "direct"} and saved["seeds"] == [0]
    assert len(saved["winograd_minus_direct_points"][0]) == saved["runs"]["direct"][0]["num_stages"]
    assert all(0 <= a <= 100 for a in saved["final_test_accuracy_points"]["dgl_jax"][0])


def test_accelerator_benchmark_tiny(tmp_path):
    out = tmp_path / "accelerator.json"
    load("accelerator").main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    cells = saved["cells"]
    assert set(cells) == {"cnn4/one_device/dgl/float32", "cnn4/data_parallel/backprop/float32",
                          "cnn4/stage_parallel/dgl/vq-packed:16:4"}  # fmt: skip
    assert all(c["images_per_s"] > 0 for c in cells.values())
    assert saved["git_sha"] and saved["machine"]["platform"] == "cpu"


def test_vq_distortion_benchmark_tiny(tmp_path):
    """Bytes are the packed codes plus the codebooks of every boundary; a second level at a quarter of the codes
    sends the same code bits; every distortion is a finite relative error, one per seed and boundary."""
    out, bench = tmp_path / "vq_distortion.json", load("vq_distortion")
    args = ["--tiny", "--train-steps", "5", "--seeds", "0,1", "--out", str(out)]
    first = bench.main([*args, "--codecs", "vq-packed:16:4"])
    assert first["complete"] and list(first["cells"]) == ["vq-packed:16:4"]
    # resumed with one more codec: the kept network, the first codec's result as it was, the new one measured
    saved = bench.main(args)
    assert saved == json.loads(out.read_text()) and saved["complete"]
    assert saved["cells"]["vq-packed:16:4"] == first["cells"]["vq-packed:16:4"]
    with pytest.raises(SystemExit):  # other settings in the same --out: one line, nothing overwritten
        bench.main([*args[:-1], str(out), "--train-steps", "6"])
    assert json.loads(out.read_text()) == saved
    shapes = saved["boundary_shapes"]
    assert saved["float32_bytes"] == sum(4 * b * h * w * c for b, h, w, c in shapes)
    for name, levels, k in (("vq-packed:16:4", 1, 16), ("vq-packed:4:4:levels=2", 2, 4)):
        r = saved["cells"][name]
        bits = (k - 1).bit_length()
        expected = sum(b * -(-h * w * (c // 4) * levels * bits // 8) + levels * (c // 4) * k * 4 * 4
                       for b, h, w, c in shapes)  # fmt: skip
        assert r["wire_bytes"] == expected
        assert r["ratio"] == pytest.approx(saved["float32_bytes"] / expected)
        d = r["distortion"]
        assert len(d) == 2 and all(len(row) == len(shapes) and all(0 < v < 10 for v in row) for row in d)
    assert saved["seeds"] == [0, 1] and saved["git_sha"] and saved["machine"]["platform"] == "cpu"


def test_vq_search_benchmark_tiny(tmp_path):
    out = tmp_path / "vq_search.json"
    result = load("vq_search").main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == result and len(saved["rows"]) == 1
    row = saved["rows"][0]
    assert row["same_codes"] and row["block_rows"] == 2048 and row["speedup"] > 0  # 4608 rows: 3 blocks
    assert row["blocks"]["repeats"] == row["one_block"]["repeats"] == 3 and saved["machine"]["platform"] == "cpu"
