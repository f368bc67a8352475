"""Throughput, bytes per step and peak memory of dgl vs backprop on every device layout of the machine.

    python benchmarks/accelerator.py                 # a GPU/TPU machine: cnn4 and VGG-19 K=4, batch 256 (<= 8 min)
    python benchmarks/accelerator.py --tiny          # seconds, on CPU: one cell per layout (used by the tests)
    python benchmarks/accelerator.py --cells "vgg19/*"   # only the cells matching these fnmatch patterns

For each model (``cnn4``, ``vgg19`` with K=4 stages, random 32x32x3 images) and each layout that the
machine's devices allow (1 device; data-parallel on all devices; stage-parallel on all devices with the SPMD
executor: K stage groups, the rest data-parallel), it runs the trainer (:class:`dgl_jax.trainer.Trainer`)
for ``--warmup`` chunks (compilation) then ``--chunks`` timed chunks of ``--chunk-steps`` steps, and
records images/s (median over chunks), the bytes per step crossing the stage boundaries (measured from the
compiled program, and the accounting), with float32 messages and with the ``vq-packed`` codec, and each
device's peak memory (``device.memory_stats()['peak_bytes_in_use']`` where the backend reports it). The
figures are written to ``--out`` (JSON, with git SHA, machine, versions) as each cell finishes; a cell
already in the file is not run again (resumable).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_json  # noqa: E402

from dgl_jax.data import Dataset  # noqa: E402
from dgl_jax.provenance import git_sha  # noqa: E402
from dgl_jax.trainer import TrainConfig, Trainer  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def synthetic(n: int, size: int) -> Dataset:
    """``n`` random ``size x size x 3`` images with random labels (throughput only; accuracy is meaningless)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, size, size, 3), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return Dataset("synthetic", x, y, x[:256], y[:256], 10)


def layouts(n: int, k: int) -> dict[str, dict]:
    out = {"one_device": dict(devices=1)}
    if n > 1:
        out["data_parallel"] = dict(devices=n)
    if n >= k and n % k == 0:
        mode = "stages" if n == k else "stages+data"
        out["stage_parallel"] = dict(devices=n, parallel=mode, stage_groups=k)
    return out


def peak_memory() -> list[int | None]:
    peaks = []
    for d in jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        peaks.append(None if not stats else int(stats.get("peak_bytes_in_use", 0)))
    return peaks


def run_cell(args, model: str, method: str, layout: dict, codec: str | None) -> dict:
    opts = {"width_mult": args.width} if model == "cnn4" and args.width != 1.0 else {}
    data = synthetic(args.batch * args.chunk_steps * (args.chunks + args.warmup), args.size)
    config = TrainConfig(model=model, method=method, split=args.k, head="mlp_sr", dataset="digits", epochs=1,
                         batch_size=args.batch, chunk_steps=args.chunk_steps, model_options=opts, codec=codec,
                         decay_epochs=None, lr=0.01, **layout)  # fmt: skip
    trainer = Trainer(config, dataset=data, log=lambda s: None)
    state, times = trainer.init_state(), []
    for i, ev in enumerate(trainer.fit(state)):
        times.append(ev.steps * args.batch / ev.train["examples_per_s"])
        if i + 1 >= args.warmup + args.chunks:
            break
    timed = times[args.warmup :]
    return {
        "images_per_s": args.batch * args.chunk_steps / statistics.median(timed),
        "chunk_s": timed,
        "wire_bytes_per_step": trainer.wire_bytes,
        "peak_bytes_per_device": peak_memory(),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn4,vgg19")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=float, default=1.0, help="cnn4 width multiplier")
    p.add_argument("--chunk-steps", type=int, default=10)
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--codec", default="vq-packed:256:16", help="the quantized codec of the stage-parallel rows")
    p.add_argument("--out", default=str(RESULTS / f"accelerator_{jax.default_backend()}.json"))
    p.add_argument(
        "--cells", default="*", help="comma-separated patterns (fnmatch) of the cells to run, e.g. '*/dgl/*'"
    )
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:  # one cell per layout, both methods and the codec: checks the script runs
        args.models, args.batch, args.width, args.chunk_steps, args.chunks, args.k = "cnn4", 16, 0.125, 2, 1, 2
        args.codec = "vq-packed:16:4"
        args.cells = "*/one_device/dgl/*,*/data_parallel/backprop/*,*/stage_parallel/dgl/vq*"
    patterns = args.cells.split(",")
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update({"benchmark": "accelerator", "git_sha": git_sha(), "machine": machine(), "config": vars(args)})
    result.setdefault("cells", {})
    n = jax.local_device_count()
    t0 = time.perf_counter()
    for model in args.models.split(","):
        for name, layout in layouts(n, args.k).items():
            for method in ("dgl", "backprop") if name != "stage_parallel" else ("dgl",):
                codecs = [None, args.codec] if name == "stage_parallel" else [None]
                for codec in codecs:
                    cell = f"{model}/{name}/{method}/{codec or 'float32'}"
                    if cell in result["cells"] or not any(fnmatch.fnmatch(cell, q) for q in patterns):
                        continue
                    result["cells"][cell] = run_cell(args, model, method, layout, codec)
                    write_json(out, result)  # each cell as soon as it finishes
                    print(cell, f"{result['cells'][cell]['images_per_s']:.0f} images/s", flush=True)
    result["wall_s"] = time.perf_counter() - t0
    write_json(out, result)
    return result


if __name__ == "__main__":
    main()
