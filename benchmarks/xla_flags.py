"""Which XLA:CPU flags and compute dtypes make ``dgl_step`` faster? One subprocess per configuration (flags
are read when the backend starts), configurations run round-robin for several rounds so that machine noise
hits all alike; each run reports the median of its steps, and the JSON holds the median over rounds and the
ratio to the default configuration. A configuration's flags are added to the caller's ``XLA_FLAGS`` (usually none;
recorded as ``machine.xla_flags``).

    python benchmarks/xla_flags.py                 # 4-stage paper CNN, batch 128, 32x32x1
    python benchmarks/xla_flags.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

CONFIGS = {
    "default": ("", "float32"),
    "onednn": ("--xla_cpu_use_onednn=true", "float32"),
    "onednn_custom_call": ("--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true", "float32"),
    "xnnpack": ("--xla_cpu_use_xnnpack=true", "float32"),
    "fast_math": ("--xla_cpu_enable_fast_math=true", "float32"),
    "bfloat16": ("", "bfloat16"),
}


def worker(args: argparse.Namespace) -> None:
    from common import paper_step, time_call

    from dgl_jax.host import keep_freed_memory

    keep_freed_memory()  # as python -m dgl_jax train does

    step, states, x, y = paper_step(
        args.method,
        model=args.model,
        split=args.split,
        dtype=args.dtype,
        batch=args.batch,
        size=args.size,
        channels=args.channels,
    )
    holder = {"s": states}

    def call():
        holder["s"], m = step(holder["s"], x, y)
        return m

    times = [time_call(call) for _ in range(args.warmup + args.steps)][args.warmup :]
    print(json.dumps({"median_s": statistics.median(times)}))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="dgl", choices=["dgl", "backprop"])
    p.add_argument("--model", default="cnn4")
    p.add_argument("--split", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    p.add_argument("--out", default="benchmarks/results/xla_flags.json")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.split, args.batch, args.size = "small_cnn", 3, 4, 8
        args.steps, args.warmup, args.rounds = 2, 1, 1
    if args.worker:
        return worker(args)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; expected some of {list(CONFIGS)}")
    medians = {n: [] for n in names}
    errors = {}
    for r in range(args.rounds):
        for name in names:
            flags, dtype = CONFIGS[name]
            env = {
                **os.environ,
                "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
                "JAX_PLATFORMS": "cpu",
            }
            cmd = [sys.executable, __file__, "--worker", "--dtype", dtype, "--method", args.method]
            cmd += ["--model", args.model, "--split", str(args.split)]
            cmd += ["--batch", str(args.batch), "--size", str(args.size), "--channels", str(args.channels)]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                errors[name] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
                continue
            medians[name].append(json.loads(proc.stdout.strip().splitlines()[-1])["median_s"])
            print(f"round {r + 1}/{args.rounds} {name:20s} {medians[name][-1] * 1e3:8.1f} ms", flush=True)
    from common import machine

    summary = {n: statistics.median(v) for n, v in medians.items() if v}
    base = summary.get("default")
    result = {
        "benchmark": "xla_flags",
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "worker", "dtype")},
        "machine": machine(),
        "configs": {n: {"flags": CONFIGS[n][0], "dtype": CONFIGS[n][1], "rounds_s": medians[n]} for n in names},
        "median_s": summary,
        "ratio_to_default": {n: t / base for n, t in summary.items()} if base else {},
        "errors": errors,
    }
    write_json(args.out, result)
    for n, t in result["ratio_to_default"].items():
        print(f"{n:20s} {summary[n] * 1e3:8.1f} ms  ratio to default {t:.3f}")
    return result


if __name__ == "__main__":
    main()
