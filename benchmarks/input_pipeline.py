"""Does the input pipeline starve the step? Epoch throughput of the Trainer vs the pure step, and start-up.

    python benchmarks/input_pipeline.py          # the 4-stage paper CNN, batch 128, 32x32x3 (a few minutes)
    python benchmarks/input_pipeline.py --tiny   # seconds; used by the tests

(a) **Epoch vs step.** ``pure``: the jitted ``dgl_step`` called ``steps`` times in a row on one batch already on
    device (states donated, one ``block_until_ready`` at the end): the ceiling. ``epoch``: the same number of
    steps through :meth:`dgl_jax.trainer.Trainer.fit` on a synthetic in-memory dataset (data on device, batch
    gathered from the epoch permutation inside jit, augmentation inside jit when ``--augment``, metrics
    fetched once per chunk), evaluation excluded. Both run alternately ``--repeats`` times after a warm-up;
    the ratio of medians ``epoch_over_pure_throughput`` is the figure (target >= 0.9).
(b) **Start-up.** ``python -m dgl_jax train`` (the default quick-start run) in a subprocess, twice with an
    empty persistent compilation cache folder and twice with it filled: seconds to the first log line, to the
    first epoch line, and to exit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from common import machine, paper_step, summarize, time_alternating, write_json  # noqa: E402

from dgl_jax.data import Dataset  # noqa: E402
from dgl_jax.host import keep_freed_memory  # noqa: E402
from dgl_jax.trainer import TrainConfig, Trainer  # noqa: E402


def synthetic_dataset(n: int, size: int, channels: int) -> Dataset:
    """``n`` random training images ``[n, size, size, channels]`` (float32) with labels in 0..9."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, size, size, channels), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return Dataset("synthetic", x, y, x[:256], y[:256], 10)


def epoch_vs_step(args: argparse.Namespace) -> dict:
    n = args.steps * args.batch
    config = TrainConfig(
        model=args.model,
        split=args.split,
        head="mlp_sr",
        dataset="cifar10",  # its augmentation recipe (crop 4 + flip); the data is the synthetic set
        epochs=args.warmup + args.repeats,
        batch_size=args.batch,
        optimizer="sgd",
        lr=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        decay_epochs=None,
        augment=args.augment,
        chunk_steps=args.steps,
    )
    trainer = Trainer(config, dataset=synthetic_dataset(n, args.size, args.channels), log=lambda s: None)
    trainer.evaluate = lambda states, *a, **k: {"accuracy": [], "loss": [], "ensemble": 0.0}  # not timed here
    step, states, x, y = paper_step(
        "dgl", model=args.model, split=args.split, batch=args.batch, size=args.size, channels=args.channels
    )

    def pure():
        nonlocal states
        for _ in range(args.steps):
            states, metrics = step(states, x, y)
        return states

    fit = trainer.fit(trainer.init_state())

    def epoch():
        event = next(fit)
        assert event.steps == args.steps
        return event.state.stages

    times = time_alternating({"pure": pure, "epoch": epoch}, args.repeats, args.warmup)
    out = {
        name: {**summarize(ts), "images_per_s": args.steps * args.batch / summarize(ts)["median_s"]}
        for name, ts in times.items()
    }
    out["epoch_over_pure_throughput"] = out["pure"]["median_s"] / out["epoch"]["median_s"]
    return out


def _time_cli(cache: str, env: dict) -> dict:
    cmd = [sys.executable, "-m", "dgl_jax", "train", "--no-progress", "--compilation-cache", cache]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [*cmd, "--out", str(Path(out) / "run")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        first_line = first_epoch = None
        lines = []
        for line in proc.stdout:
            now = time.perf_counter() - t0
            lines.append(line)
            first_line = first_line if first_line is not None else now
            if first_epoch is None and line.startswith("epoch 1:"):
                first_epoch = now
        rc = proc.wait()
        total = time.perf_counter() - t0
    if rc != 0 or first_epoch is None:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}):\n{''.join(lines[-20:])}")
    return {"first_log_line_s": first_line, "first_epoch_line_s": first_epoch, "total_s": total}


def startup(rounds: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = {"cold": [], "warm": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as cache:
            res["cold"].append(_time_cli(cache, env))
            res["warm"].append(_time_cli(cache, env))
    return {k: {m: float(np.median([r[m] for r in v])) for m in v[0]} | {"runs": v} for k, v in res.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn4")
    p.add_argument("--split", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--startup-rounds", type=int, default=2, help="cold+warm CLI start-up pairs (0: skip)")
    p.add_argument("--out", default="benchmarks/results/input_pipeline.json")
    p.add_argument("--tiny", action="store_true", help="small model and batch: checks the script runs")
    args = p.parse_args(argv)
    malloc_kept = keep_freed_memory()  # as python -m dgl_jax train does
    if args.tiny:
        args.model, args.split, args.batch, args.size, args.channels = "small_cnn", 3, 8, 8, 1
        args.steps, args.repeats, args.warmup = 3, 2, 1
    result = {
        "benchmark": "input_pipeline",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine(malloc_kept),
        "epoch_vs_step": epoch_vs_step(args),
    }
    if args.startup_rounds > 0:
        result["startup"] = startup(args.startup_rounds)
    write_json(args.out, result)
    e = result["epoch_vs_step"]
    for name in ("pure", "epoch"):
        print(
            f"{name:6s} median {e[name]['median_s'] * 1e3:8.1f} ms per {args.steps} steps, "
            f"{e[name]['images_per_s']:.0f} images/s"
        )
    if "startup" in result:
        for k, v in result["startup"].items():
            print(
                f"CLI start-up, {k} compilation cache: first log line {v['first_log_line_s']:.2f} s, "
                f"first epoch line {v['first_epoch_line_s']:.2f} s, exit {v['total_s']:.2f} s"
            )
    print(f"epoch / pure-step throughput: {e['epoch_over_pure_throughput']:.3f}")
    return result


if __name__ == "__main__":
    main()
