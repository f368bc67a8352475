"""Asynchronous DGL with a slowed stage and replay buffers (the papers' section on asynchrony, at CPU scale).

    python experiments/async_buffer.py                 # Fashion-MNIST grid, writes experiments/results/async_buffer.*
    python experiments/async_buffer.py --tiny          # digits, a few ticks (CI smoke test)
    python experiments/async_buffer.py --vq 64:8 --buffers 5 --slowdowns 1.5   # float vs VQ-code buffers

A 6-stage CNN (conv3x3 widths 16,16,32,32,64,64, max-pool before layers 3 and 5, one conv per stage, ``mlp``
heads) is trained with simulated asynchrony (:mod:`dgl_jax.asynchronous`): each tick one stage is drawn
from the paper's categorical schedule where the slowed middle stage (index ``--slow-stage``, default 2)
has weight 1/S. Grid: S in {1.0, 1.11, 1.25, 1.5, 2.0, 3.0} x buffer size M in {1, 5, 30} (priority-LIFO
sampling, ordered warm-up of M rounds), plus synchronous DGL (round-robin, M=1, which equals ``dgl_step``).
Every run gets the same number of ticks (= the same number of stage updates in total), so a slow stage
gets fewer updates and the stages above it reuse older features. One compiled program per M; the schedule
is an argument, so the S sweep does not recompile. Reports test accuracy of the last head.

``--vq K:d``: every (M, S) cell is run twice, with float buffers and with buffers of VQ codes (``K`` codes of
dimension ``d`` per channel group, :attr:`dgl_jax.asynchronous.AsyncConfig.vq`; sender-side EMA codebooks,
receiver copy synced every update); writes ``experiments/results/async_vq.{json,md}`` with the accuracy
(the VQ runs are evaluated through the quantized pipeline, as deployed: each boundary encodes and the next
stage decodes with the receiver's codebook) and the buffer memory (stored codes + codebooks vs float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dgl_jax import asynchronous as A  # noqa: E402
from dgl_jax import evaluate_batch, init_stage_states, make_optimizer, with_optimizer  # noqa: E402
from dgl_jax import vq_train as vt  # noqa: E402
from dgl_jax.data import load_digits, load_fashion_mnist  # noqa: E402
from dgl_jax.models import cifar_cnn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build_stages(args: argparse.Namespace):
    stages = cifar_cnn(widths=args.widths, downsample_at=args.downsample_at, split=len(args.widths), head="mlp")
    # the LR drops x0.2 after each fraction in --decay-at of the nominal per-stage updates, counted in the stage's
    # OWN updates (optax counts steps): a slowed stage reaches its drops later, as it would in a real system
    drops = tuple(sorted({max(1, round(f * args.updates)) for f in args.decay_at})) or None
    return with_optimizer(
        stages, lambda j: make_optimizer("sgd", args.lr, weight_decay=5e-4, steps_per_epoch=1, decay_epochs=drops)
    )


def evaluate(fn, states, images, labels, chunk=1000):
    last, ens, n = 0, 0, 0
    for i in range(0, len(labels), chunk):
        out = fn(states, images[i : i + chunk], labels[i : i + chunk])
        last += int(out.per_head[-1])
        ens += int(out.ensemble)
        n += len(labels[i : i + chunk])
    return last / n, ens / n


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="digits, 3 stages, S in {1, 2}, M=2, few ticks (CI)")
    p.add_argument("--slowdowns", type=float, nargs="+", default=[1.0, 1.11, 1.25, 1.5, 2.0, 3.0])
    p.add_argument("--buffers", type=int, nargs="+", default=[1, 5, 30])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--slow-stage", type=int, default=2)
    p.add_argument("--widths", type=int, nargs="+", default=[8, 8, 16, 16, 32, 32])
    p.add_argument("--downsample-at", type=int, nargs="+", default=[2, 4])
    p.add_argument("--train-size", type=int, default=12000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--updates", type=int, default=160, help="ticks = updates * K (about `updates` per stage)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--decay-at", type=float, nargs="*", default=[0.5, 0.75], help="LR x0.2 at these fractions")
    p.add_argument("--policy", default="priority_lifo")
    p.add_argument("--out", default=None, help="output path without suffix (default results/async_buffer or async_vq)")
    p.add_argument("--vq", default=None, metavar="K:d", help="also run every cell with buffers of VQ codes")
    p.add_argument("--drop", type=float, default=0.01, help="accuracy loss that counts as a drop (fraction)")
    args = p.parse_args(argv)
    command = " ".join(["python experiments/async_buffer.py", *(sys.argv[1:] if argv is None else argv)])
    vq_cfg = None
    if args.vq is not None:
        try:
            num_codes, code_dim = (int(v) for v in args.vq.split(":"))
        except ValueError:
            p.error(f"--vq expects K:d (e.g. 64:8), got {args.vq!r}")
        vq_cfg = vt.VQConfig(num_codes=num_codes, code_dim=code_dim)
    if args.out is None:
        args.out = str(RESULTS / ("async_buffer" if vq_cfg is None else "async_vq"))
    if args.tiny:
        args.slowdowns, args.buffers, args.widths, args.downsample_at = [1.0, 2.0], [2], [8, 8, 16], [1, 2]
        args.train_size, args.batch, args.updates = 512, 16, 6
        args.slow_stage = 1
    write = write_outputs if vq_cfg is None else write_vq_outputs
    t_start = time.perf_counter()
    ds = load_digits() if args.tiny else load_fashion_mnist()
    rng = np.random.default_rng(0)
    sub = rng.permutation(len(ds.train_labels))[: args.train_size]
    train_x, train_y = jnp.asarray(ds.train_images[sub]), jnp.asarray(ds.train_labels[sub])
    test_x, test_y = ds.test_images, ds.test_labels
    stages = build_stages(args)
    k = len(stages)
    eval_fn = jax.jit(lambda st, x, y: evaluate_batch(stages, st, x, y))
    vq_eval_fn = None
    if vq_cfg is not None:
        plan = vt.as_plan(vq_cfg, len(stages))
        vq_eval_fn = jax.jit(lambda st, b, x, y: vt.vq_evaluate_batch(stages, plan, st, b, x, y))
    ticks = args.updates * k
    runs: list[dict] = []

    def make_result(runs: list[dict]) -> dict:
        return {
            "experiment": "async_buffer",
            "dataset": ds.name,
            "model": {
                "widths": list(args.widths),
                "downsample_at": list(args.downsample_at),
                "stages": k,
                "head": "mlp",
            },
            "budget": {
                "train_size": args.train_size,
                "batch": args.batch,
                "ticks": ticks,
                "updates_per_stage_nominal": args.updates,
                "optimizer": f"sgd lr={args.lr} momentum=0.9 wd=5e-4, x0.2 at {args.decay_at} of the nominal updates "
                "(each stage's own step count)",
            },
            "slow_stage": args.slow_stage,
            "policy": args.policy,
            "vq": None if vq_cfg is None else dataclasses.asdict(vq_cfg),
            "slowdowns": args.slowdowns,
            "buffers": args.buffers,
            "seeds": args.seeds,
            "command": command,
            "drop_threshold": args.drop,
            "machine": {
                "platform": jax.devices()[0].platform,
                "cpu_count": os.cpu_count(),
                "processor": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "jax": jax.__version__,
                "note": "shared 2-vCPU machine, other jobs running",
            },
            "wall_s": time.perf_counter() - t_start,
            "runs": runs,
        }

    for seed in args.seeds:
        key = jax.random.key(seed)
        input_fn = A.epoch_input_fn(train_x, train_y, args.batch, jax.random.fold_in(key, 1))
        init_states = init_stage_states(stages, jax.random.fold_in(key, 0), train_x[: args.batch])
        configs = [("sync_dgl", A.AsyncConfig(capacity=1), [None])]
        for m in args.buffers:
            configs.append(("async", A.AsyncConfig(capacity=m, policy=args.policy), args.slowdowns))
            if vq_cfg is not None:
                configs.append(("async_vq", A.AsyncConfig(capacity=m, policy=args.policy, vq=vq_cfg), args.slowdowns))
        for label, config, slowdowns in configs:
            run = A.make_async_run(stages, config, input_fn, ticks)
            for s in slowdowns:
                schedule = A.RoundRobin(k) if s is None else A.paper_schedule(k, args.slow_stage, s)
                states = jax.tree.map(jnp.copy, init_states)  # the run donates its input
                st = A.init_async(
                    stages, states, train_x[: args.batch], train_y[: args.batch], config, jax.random.fold_in(key, 2)
                )
                t0 = time.perf_counter()
                st, rec = run(st, schedule)
                jax.block_until_ready(st.states)
                wall = time.perf_counter() - t0
                summ = A.summarize(rec, state=st)
                last, ens = evaluate(eval_fn, st.states, test_x, test_y)
                extra = {}
                if config.vq is not None:  # as deployed: through the codebooks; float pipeline for reference
                    extra = {"test_acc_last_float_messages": last, "test_acc_ensemble_float_messages": ens}
                    ens = None
                    last = evaluate_vq(vq_eval_fn, st.states, st.boundaries, test_x, test_y)
                mem = {n: int(np.sum(summ[n])) for n in ("buffer_bytes", "codebook_bytes", "buffer_bytes_fp32")}
                held = mem["buffer_bytes"] + mem["codebook_bytes"]
                mem["buffer_memory_factor"] = mem["buffer_bytes_fp32"] / held
                row = {
                    "method": label,
                    "buffer": config.capacity,
                    "slowdown": 1.0 if s is None else s,
                    "seed": seed,
                    "test_acc_last": last,
                    "test_acc_ensemble": ens,
                    **extra,
                    "wall_s_incl_compile": wall,
                    **mem,
                    **{f"stage_{name}": np.asarray(v).tolist() for name, v in summ.items()},
                }
                runs.append(row)
                print(
                    f"{label:8s} M={config.capacity:3d} S={row['slowdown']:.2f} seed={seed} "
                    f"acc={last:.4f} ens={ens if ens is None else round(ens, 4)} {wall:.1f}s "
                    f"buffers x{mem['buffer_memory_factor']:.1f} less than fp32 updates={row['stage_updates']} "
                    f"staleness={np.round(summ['mean_staleness'], 2).tolist()} "
                    f"reuse={np.round(summ['mean_reuse'], 2).tolist()}",
                    flush=True,
                )
                write(make_result(runs), Path(args.out))  # partial results survive an interrupted grid
    result = make_result(runs)
    write(result, Path(args.out))
    return result


def evaluate_vq(fn, states, boundaries, images, labels, chunk=1000) -> float:
    """Last-head test accuracy with every quantized boundary encoding/decoding (``vq_evaluate_batch``)."""
    correct = 0
    for i in range(0, len(labels), chunk):
        correct += int(fn(states, boundaries, images[i : i + chunk], labels[i : i + chunk])[-1])
    return correct / len(labels)


def write_vq_outputs(result: dict, out: Path) -> None:
    """``async_vq.{json,md}``: float vs VQ-code buffers for each (M, S) cell."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    b, v = result["budget"], result["vq"]
    lines = [
        f"# Asynchronous DGL with replay buffers of VQ codes ({result['dataset']})",
        "",
        f"{result['model']['stages']}-stage CNN widths {result['model']['widths']}, slowed stage "
        f"{result['slow_stage']} (paper's schedule), policy {result['policy']}; {b['ticks']} ticks "
        f"(~{b['updates_per_stage_nominal']} updates per stage), batch {b['batch']}, {b['train_size']} training "
        f"images, {b['optimizer']}; seeds {result['seeds']}. VQ: K={v['num_codes']} codes of dimension "
        f"d={v['code_dim']} per channel group at every boundary, EMA decay {v['decay']}, receiver codebook synced "
        f"every {v['sync_every']} sender update(s); buffers store uint8/uint16 codes, the receiver decodes at "
        f"read time. Machine: {result['machine']['processor']}, {result['machine']['cpu_count']} CPUs (shared), "
        f"jax {result['machine']['jax']}; wall time {result['wall_s']:.0f} s.",
        "",
        "Accuracy: last head on the test set; VQ runs through the quantized pipeline (float messages in brackets). "
        "Memory: all K-1 buffers, stored features or codes (labels not counted) + the receivers' float32 "
        "codebooks, vs the same buffers of float32 features.",
        "",
        "| method | M | S | seed | test acc | buffers (B) | codebooks (B) | float32 buffers (B) | memory factor "
        "| distortion per boundary |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        acc = f"{r['test_acc_last']:.4f}"
        if "test_acc_last_float_messages" in r:
            acc += f" ({r['test_acc_last_float_messages']:.4f})"
        dist = ", ".join(f"{d:.3f}" for d in r.get("stage_distortion", [])[:-1]) or "-"
        lines.append(
            f"| {r['method']} | {r['buffer']} | {r['slowdown']:g} | {r['seed']} | {acc} | {r['buffer_bytes']} | "
            f"{r['codebook_bytes']} | {r['buffer_bytes_fp32']} | {r['buffer_memory_factor']:.1f}x | {dist} |"
        )
    lines += ["", "Command:", "", "```", result["command"], "```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def table(result: dict) -> tuple[list[float], dict, float, float]:
    runs = result["runs"]
    sync = [r["test_acc_last"] for r in runs if r["method"] == "sync_dgl"]
    grid = {}
    for m in result["buffers"]:
        grid[m] = []
        for s in result["slowdowns"]:
            accs = [
                r["test_acc_last"] for r in runs if r["method"] == "async" and r["buffer"] == m and r["slowdown"] == s
            ]
            grid[m].append((float(np.mean(accs)), float(np.std(accs)), len(accs)) if accs else (np.nan, np.nan, 0))
    if not sync:
        return result["slowdowns"], grid, np.nan, np.nan
    return result["slowdowns"], grid, float(np.mean(sync)), float(np.std(sync))


def first_drop(slowdowns: list[float], row: list[tuple], reference: float, drop: float) -> float | None:
    """The smallest slow-down S from which accuracy stays more than ``drop`` below ``reference``; None if
    it never does (a single noisy dip followed by recovery is not counted)."""
    accs = [a for a, _, _ in row]
    for i, s in enumerate(slowdowns):
        if all(np.isfinite(a) and a < reference - drop for a in accs[i:]):
            return s
    return None


def write_outputs(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    slowdowns, grid, sync_mean, sync_std = table(result)
    b = result["budget"]
    lines = [
        f"# Asynchronous DGL: slowed stage {result['slow_stage']} vs buffer size ({result['dataset']})",
        "",
        f"Test accuracy of the last head (mean +- std over seeds {result['seeds']}); {result['model']['stages']}-stage "
        f"CNN widths {result['model']['widths']}; {b['ticks']} ticks (~{b['updates_per_stage_nominal']} updates "
        f"per stage), batch {b['batch']}, {b['train_size']} training images, {b['optimizer']}; policy "
        f"{result['policy']}. Machine: {result['machine']['processor']}, {result['machine']['cpu_count']} CPUs "
        f"(shared), jax {result['machine']['jax']}; wall time {result['wall_s']:.0f} s.",
        "",
        f"Synchronous DGL (round-robin, M=1): **{sync_mean:.4f}** +- {sync_std:.4f}",
        "",
        "| M \\ S | " + " | ".join(f"{s:g}" for s in slowdowns) + " |",
        "|---|" + "---|" * len(slowdowns),
    ]
    for m, row in grid.items():
        lines.append(f"| {m} | " + " | ".join(f"{a:.4f} +- {sd:.4f}" for a, sd, _ in row) + " |")
    drop = result["drop_threshold"]
    lines += ["", f"Where accuracy starts to drop (stays more than {100 * drop:g} points below the reference):", ""]
    for m, row in grid.items():
        vs_sync = first_drop(slowdowns, row, sync_mean, drop)
        vs_s1 = first_drop(slowdowns, row, row[0][0], drop) if slowdowns and slowdowns[0] == 1.0 else None
        lines.append(f"- M={m}: vs synchronous DGL from S = {vs_sync}; vs the same M at S=1 from S = {vs_s1}")
    lines += ["", "Command:", "", "```", result["command"], "```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m, row in grid.items():
        ax.errorbar(
            slowdowns, [a for a, _, _ in row], yerr=[sd for _, sd, _ in row], marker="o", capsize=3, label=f"M={m}"
        )
    ax.axhline(sync_mean, color="k", ls="--", lw=1, label="sync DGL")
    ax.set_xlabel(f"slow-down S of stage {result['slow_stage']}")
    ax.set_ylabel("test accuracy (last head)")
    ax.set_title(f"Async DGL, {result['dataset']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
