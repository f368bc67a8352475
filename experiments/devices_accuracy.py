"""Final test accuracy of the command line's device layouts on digits against one device (resumable).

    python experiments/devices_accuracy.py            # 4 layouts x 3 seeds, 3 epochs each (a few minutes on 2 CPUs)
    python experiments/devices_accuracy.py --tiny     # 1 epoch, 2 layouts, 1 seed (used by the tests)

Each cell (layout x seed) runs ``python -m dgl_jax train --epochs E --seed S <layout>`` in a subprocess with
``--xla_force_host_platform_device_count=4`` added to the caller's other ``XLA_FLAGS`` and records every
head's final test accuracy, the measured and accounted bytes per step crossing the stage boundaries
(stage-parallel layouts) and the wall time. A finished cell is written to the JSON at once
(:func:`dgl_jax.cells.run_grid`) and is not run again.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from common import machine  # noqa: E402

from dgl_jax.cells import run_grid  # noqa: E402
from dgl_jax.files import write_atomic  # noqa: E402
from dgl_jax.sweep import parse_seeds  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BASE = "1 device"
LAYOUTS = {
    "1 device": ["--devices", "1"],
    "data x4": ["--devices", "4", "--parallel", "data"],
    "stages x3 (spmd)": ["--devices", "3", "--parallel", "stages"],
    "stages x2 + data x2": ["--devices", "4", "--parallel", "stages+data", "--stage-groups", "2", "--split", "2"],
}


def run_cell(flags: list[str], seed: int, epochs: int) -> dict:
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]  # the caller's other flags
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*kept, "--xla_force_host_platform_device_count=4"]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "dgl_jax", "train", "--epochs", str(epochs), "--seed", str(seed)]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, *flags, "--out", str(out), "--no-progress"], env=env, capture_output=True,
                              text=True)  # fmt: skip
        if proc.returncode:
            raise RuntimeError(f"{' '.join(flags)} seed {seed}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
        summary = json.loads((out / "summary.json").read_text())
        config = json.loads((out / "config.json").read_text())
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        wires = [r for r in rows if r.get("event") == "train" and "wire_bytes_measured" in r]
        return {
            "test_accuracy": summary["test_accuracy"],
            "decay_epochs": config["decay_epochs"],
            "wire_bytes_measured": wires[-1]["wire_bytes_measured"] if wires else None,
            "wire_bytes_accounted": wires[-1]["wire_bytes_accounted"] if wires else None,
            "wall_s": time.perf_counter() - t0,
        }


def render(result: dict) -> str:
    lines = [
        f"# Device layouts on digits ({result['epochs']} epochs, seeds {result['seeds']}, git {result['git_sha'][:8]})",
        "",
        "Last head's final test accuracy (%); mean +- std over the seeds; the difference from one device with the "
        "same seed (points; within 1: the issue's criterion). Bytes: per step across the boundaries. "
        f"LR decay at epochs {_decay(result)} (the default recipe's, scaled to the run).",
        "",
        "| layout | per seed | mean +- std | vs 1 device, per seed | bytes measured / accounted |",
        "|---|---|---|---|---|",
    ]
    base = {s: result["cells"].get(f"{BASE}/{s}") for s in result["seeds"]}
    for name in result["layouts"]:
        cells = {s: result["cells"].get(f"{name}/{s}") for s in result["seeds"]}
        accs = [100 * c["test_accuracy"][-1] for c in cells.values() if c]
        spread = f"{statistics.mean(accs):.2f} +- {statistics.stdev(accs):.2f}" if len(accs) > 1 else "-"
        diffs = [
            100 * (c["test_accuracy"][-1] - base[s]["test_accuracy"][-1]) for s, c in cells.items() if c and base[s]
        ]
        diff = ", ".join(f"{d:+.2f}" for d in diffs) if name != BASE else "-"
        b = next((c for c in cells.values() if c and c["wire_bytes_measured"] is not None), None)
        bytes_ = f"{b['wire_bytes_measured']:.0f} / {b['wire_bytes_accounted']:.0f}" if b else "-"
        lines.append(f"| {name} | {', '.join(f'{a:.2f}' for a in accs)} | {spread} | {diff} | {bytes_} |")
    return "\n".join(lines) + "\n"


def _decay(result: dict) -> str:
    decays = {json.dumps(c.get("decay_epochs")) for c in result["cells"].values()}
    return ", ".join(sorted(decays))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(RESULTS / "devices_accuracy"), help="path without suffix")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    layouts = dict(LAYOUTS)
    if args.tiny:
        args.epochs, args.seeds = 1, "0"
        layouts = {k: LAYOUTS[k] for k in ("1 device", "stages x3 (spmd)")}
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    out = Path(args.out)
    cells = [
        (f"{name}/{seed}", functools.partial(run_cell, flags, seed, args.epochs))
        for name, flags in layouts.items()
        for seed in seeds
    ]
    header = dict(epochs=args.epochs, seeds=seeds, layouts=list(layouts), machine=machine())
    result = run_grid(out.with_suffix(".json"), {"epochs": args.epochs}, cells, header)
    write_atomic(out.with_suffix(".md"), render(result))
    return result


if __name__ == "__main__":
    main()
