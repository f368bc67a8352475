"""Accuracy of the last head vs bytes sent between stages, for online-VQ DGL on Fashion-MNIST.

All VQ configurations and the unquantized DGL baseline train in ONE compiled program
(:func:`dgl_jax.vq_train.make_sweep`, ``mode="loop"`` on CPU), on the same batches from the same initial
weights; backprop trains with the same batches and initial trunk weights in its own jitted step.

Bytes are bytes: every traffic and memory figure is the ``nbytes`` of what a deployed boundary sends or a
replay buffer stores, measured by :mod:`dgl_jax.accounting` on the stages carrying the codec each
configuration stands for (``vq-packed:K:d``: packed codes plus the float32 codebook on every send; none for
float32 DGL; ``bfloat16`` for the bf16 reference).

    python experiments/vq_sweep.py                 # the reported run (reduced CPU budget, see --help)
    python experiments/vq_sweep.py --tiny --out /tmp/x   # CI smoke run: digits, a few steps

Writes ``vq_sweep.json``, ``vq_sweep.md`` and ``vq_sweep.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dgl_jax import (
    backprop_step,
    codecs,
    drop_aux_heads,
    evaluate_batch,
    init_stage_states,
    make_optimizer,
    message_specs,
    with_optimizer,
)
from dgl_jax import vq_train as vt
from dgl_jax.data import load_digits, load_fashion_mnist
from dgl_jax.files import save_figure, write_atomic
from dgl_jax.models import cifar_cnn
from dgl_jax.sweep import measure_bytes

DEFAULT_CONFIGS = "16:16,64:16,256:16,256:8,16:4"


def parse_configs(text: str) -> list[tuple[int, int]]:
    """``"K:d,K:d"`` -> ``[(num_codes, code_dim), ...]``."""
    out = []
    for item in text.split(","):
        k, d = item.split(":")
        out.append((int(k), int(d)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="digits, tiny net, a few steps (CI smoke test)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--widths", default="16,32,32,64", help="cnn4 widths (paper: 64,128,128,256)")
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="num_codes:code_dim pairs")
    p.add_argument("--buffer-batches", type=int, default=10, help="M: mini-batches per async-DGL replay buffer")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: full budget)")
    p.add_argument("--max-train-seconds", type=float, default=0, help="stop training after this long (0: no limit)")
    p.add_argument("--replot", action="store_true", help="only rewrite the markdown and PNG from --out's JSON")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    if args.replot:
        result = json.loads((Path(args.out) / "vq_sweep.json").read_text())
        write_reports(result, Path(args.out))
        return result
    if args.tiny:
        ds = load_digits()
        widths, train_n, epochs, configs = (8, 16), 256, 1, [(16, 4)]
        head, last_depth, down = "gap_linear", 1, (1,)  # 2 stages, cheap to compile
        max_steps = args.max_steps or 4
    else:
        ds = load_fashion_mnist()
        widths = tuple(int(w) for w in args.widths.split(","))
        train_n, epochs, configs, max_steps = (
            args.train_subset,
            args.epochs,
            parse_configs(args.configs),
            args.max_steps,
        )
        head, last_depth, down = "mlp_sr", 2, (1, 3)
    bs = args.batch_size
    rng = np.random.default_rng(args.seed)
    sub = rng.permutation(len(ds.train_images))[:train_n]
    xtr, ytr = ds.train_images[sub], ds.train_labels[sub]
    xte, yte = jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels)
    steps_per_epoch = len(xtr) // bs
    total_steps = steps_per_epoch * epochs if not max_steps else min(max_steps, steps_per_epoch * epochs)

    def opt(j):
        return make_optimizer("sgd", args.lr, steps_per_epoch=steps_per_epoch, decay_epochs=(max(epochs - 1, 1),))

    net = cifar_cnn(widths, down, head=head, last_head_depth=last_depth)
    stages = with_optimizer(net, opt)
    bp_stages = with_optimizer(drop_aux_heads(net), opt)
    key, vq_key = jax.random.key(args.seed), jax.random.key(args.seed + 1)
    x0 = jnp.asarray(xtr[:bs])
    plans = [None] + [vt.VQConfig(num_codes=k, code_dim=d) for k, d in configs]
    sweep = vt.make_sweep(stages, plans, mode="loop")
    states0 = init_stage_states(stages, key, x0)
    carry = sweep.init(states0, vq_key, x0)
    shapes = [list(m.shape[1:]) for m in message_specs(stages, states0, x0)]
    bp_states = init_stage_states(bp_stages, key, x0)
    print(f"init done {time.time() - t_start:.1f} s", flush=True)

    sweep_step = jax.jit(sweep.step, donate_argnums=0)
    sweep_eval = jax.jit(sweep.evaluate)
    bp_step = jax.jit(lambda s, x, y: backprop_step(bp_stages, s, x, y), donate_argnums=0)
    bp_eval = jax.jit(lambda s, x, y: evaluate_batch(bp_stages, s, x, y).per_head)

    step, t_train, history = 0, 0.0, []
    last_metrics = []
    for epoch in range(epochs):
        perm = np.random.default_rng((args.seed, epoch)).permutation(len(xtr))
        for b in range(steps_per_epoch):
            if step >= total_steps or (args.max_train_seconds and t_train > args.max_train_seconds):
                break
            idx = perm[b * bs : (b + 1) * bs]
            x, y = jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx])
            t0 = time.time()
            carry, metrics = sweep_step(carry, x, y, jax.random.fold_in(vq_key, step))
            bp_states, _ = bp_step(bp_states, x, y)
            if step == 0:
                jax.block_until_ready(metrics)
                print(f"first step (compile) done {time.time() - t_start:.1f} s", flush=True)
            if step % 25 == 0 or step == total_steps - 1:
                jax.block_until_ready(metrics)
                vt.check_metrics(jax.tree.map(lambda *a: jnp.stack(a), *metrics))
                history.append({"step": step, "loss_last": [float(m["loss"][-1]) for m in metrics]})
                print(f"step {step}/{total_steps} loss(last head) {history[-1]['loss_last']}", flush=True)
            last_metrics = [*last_metrics[-19:], metrics]  # the last 20 steps
            t_train += time.time() - t0
            step += 1
    jax.block_until_ready(carry)

    # Test accuracy (every head; quantized boundaries encode/decode at test time too).
    t0 = time.time()
    correct, bp_correct = 0, 0
    for i in range(0, len(xte), 500):
        correct = correct + sweep_eval(carry, xte[i : i + 500], yte[i : i + 500])
        bp_correct = bp_correct + bp_eval(bp_states, xte[i : i + 500], yte[i : i + 500])
    acc = np.asarray(correct) / len(xte) * 100
    bp_acc = float(np.asarray(bp_correct)[-1] / len(xte) * 100)
    t_eval = time.time() - t0

    # Bytes: the nbytes of the wires and buffer items of the codec each configuration stands for.
    y0 = jnp.asarray(ytr[:bs])
    measure = lambda c: measure_bytes(stages, c, key, x0, y0, args.buffer_batches)  # noqa: E731
    bf16 = measure(codecs.cast(jnp.bfloat16))
    rows = []
    for i, (plan, (k, d)) in enumerate(zip(plans, [(None, None)] + configs, strict=True)):
        b = measure(vt.as_codecs(plan, len(stages), packed=True))
        mean = lambda f, i=i: [float(np.mean([m[i][f][j] for m in last_metrics])) for j in range(len(shapes))]  # noqa: E731
        rows.append(
            {
                "method": "dgl" if plan is None else "dgl+vq",
                "num_codes": k,
                "code_dim": d,
                "groups": None if k is None else [s[-1] // d for s in shapes],
                "codecs": b["codecs"],
                "acc_last": float(acc[i, -1]),
                "acc_heads": [float(a) for a in acc[i]],
                "wire_bytes_per_batch": b["wire_bytes"],
                "codebook_bytes_per_batch": b["codebook_bytes"],
                "wire_bytes_per_sample": b["wire_bytes"] / bs,
                "ratio_fp32": b["float32_bytes"] / b["wire_bytes"],
                "ratio_bf16": bf16["wire_bytes"] / b["wire_bytes"],
                "buffer_bytes_per_batch": b["buffer_bytes"] / args.buffer_batches,
                "buffer_factor": b["buffer_bytes_fp32"] / b["buffer_bytes"],
                "distortion": None if plan is None else mean("distortion"),
                "coverage": None if plan is None else mean("coverage"),
                "perplexity": None if plan is None else mean("perplexity"),
            }
        )
    float_bytes = rows[0]["wire_bytes_per_batch"]
    rows.append(
        {"method": "backprop", "num_codes": None, "code_dim": None, "acc_last": bp_acc, "wire_bytes_per_batch": None}
    )
    wall = time.time() - t_start
    result = {
        "experiment": "vq_sweep",
        "tiny": args.tiny,
        "dataset": ds.name,
        "model": f"cifar_cnn widths={widths} downsample_at={down} {head} heads, last head depth {last_depth}",
        "boundary_shapes": shapes,
        "budget": {
            "train_examples": len(xtr),
            "test_examples": int(len(xte)),
            "epochs": epochs,
            "batch_size": bs,
            "steps": step,
            "planned_steps": total_steps,
            "max_train_seconds": args.max_train_seconds,
            "optimizer": f"sgd lr={args.lr} momentum=0.9 wd=5e-4, x0.2 at epoch {max(epochs - 1, 1)}",
        },
        "vq": "EMA k-means, decay 0.99, eps 1e-5, restart_threshold 1e-2, sync_every 1, init from first batch; "
        "bytes of codec vq-packed:K:d (packed codes + float32 codebook per send)",
        "seeds": {"data_subset": args.seed, "weights": args.seed, "vq": args.seed + 1},
        "rows": rows,
        "buffer_batches": args.buffer_batches,
        "dgl_acc": float(acc[0, -1]),
        "backprop_acc": bp_acc,
        "float32_bytes_per_batch": float_bytes,
        "float32_bytes_per_sample": float_bytes / bs,
        "timing_s": {"wall": wall, "train_loop": t_train, "eval": t_eval},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
            "jax_backend": jax.default_backend(),
            "note": "2 shared vCPUs, other jobs running (timings noisy)",
        },
        "versions": {"python": sys.version.split()[0], "jax": jax.__version__, "numpy": np.__version__},
        "command": "python experiments/vq_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "vq_sweep.json", json.dumps(result, indent=1))
    write_reports(result, out)
    return result


def write_reports(result: dict, out: Path) -> None:
    write_atomic(out / "vq_sweep.md", markdown(result))
    plot(result, out / "vq_sweep.png")
    print(markdown(result))


def markdown(r: dict) -> str:
    b = r["budget"]
    lines = [
        f"# VQ sweep: {r['dataset']}, {r['model']}",
        "",
        f"{b['train_examples']} training examples, {b['epochs']} epochs planned, batch {b['batch_size']}, "
        f"{b['steps']} of {b.get('planned_steps', b['steps'])} planned steps done; "
        f"test on {b['test_examples']}. Wall time {r['timing_s']['wall']:.0f} s. Float32 messages: "
        f"{r['float32_bytes_per_batch']} bytes per batch ({r['float32_bytes_per_sample']:.0f} per sample) over "
        f"{len(r['boundary_shapes'])} boundaries {r['boundary_shapes']}.",
        "",
        f"Command: `{r['command']}`",
        "",
        "| method | K | d | bytes/batch sent (codebook) | vs fp32 | vs bf16 | buffer B/batch | buffer memory "
        f"(M={r['buffer_batches']}) vs fp32 | acc last head | Δ vs DGL | coverage | rel. distortion |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        if row["method"] == "backprop":
            lines.append(
                f"| backprop | | | | | | | | {row['acc_last']:.2f} | {row['acc_last'] - r['dgl_acc']:+.2f} | | |"
            )
            continue
        q = row["num_codes"] is not None
        fmt = lambda v: "" if v is None else "/".join(f"{x:.2f}" for x in v)  # noqa: E731
        lines.append(
            f"| {row['method']} | {row['num_codes'] or ''} | {row['code_dim'] or ''} | "
            f"{row['wire_bytes_per_batch']} ({row['codebook_bytes_per_batch']}) | "
            f"{row['ratio_fp32']:.1f}x | {row['ratio_bf16']:.1f}x | {row['buffer_bytes_per_batch']:.0f} | "
            f"{row['buffer_factor']:.1f}x | "
            f"{row['acc_last']:.2f} | {row['acc_last'] - r['dgl_acc']:+.2f} | "
            f"{fmt(row['coverage']) if q else ''} | {fmt(row['distortion']) if q else ''} |"
        )
    lines += [
        "",
        "Bytes are the nbytes of the arrays (dgl_jax.accounting), summed over boundaries, for the codec each row "
        "stands for: float32 messages for DGL, vq-packed:K:d for DGL+VQ (ceil(log2 K)-bit codes packed per example, "
        "plus the float32 codebook [G, K, d] sent with every wire, in brackets); vs bf16: the same messages cast to "
        "bfloat16. Buffer B/batch: bytes one replay-buffer item (wire and labels) takes; buffer memory: float32 "
        "buffers of M items at every boundary over the stored ones. Coverage / distortion per boundary, mean of the "
        "last 20 steps.",
    ]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    vq_rows = [row for row in r["rows"] if row["method"] == "dgl+vq"]
    for d in sorted({row["code_dim"] for row in vq_rows}):
        rs = sorted((row for row in vq_rows if row["code_dim"] == d), key=lambda row: row["wire_bytes_per_sample"])
        xs = [row["wire_bytes_per_sample"] for row in rs]
        ax.plot(xs, [row["acc_last"] for row in rs], "o-", label=f"DGL+VQ d={d}")
        for row in rs:
            ax.annotate(f"K={row['num_codes']}", (row["wire_bytes_per_sample"], row["acc_last"]), fontsize=7)
    f32 = r["float32_bytes_per_sample"]
    ax.axhline(r["dgl_acc"], color="k", ls="--", label=f"DGL fp32 ({f32:.0f} B/sample)")
    ax.axhline(r["backprop_acc"], color="gray", ls=":", label="backprop")
    ax.axvline(f32 / 32, color="r", lw=0.8, label="32x less than fp32")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per sample sent between stages (all boundaries, codes + codebook)")
    ax.set_ylabel("test accuracy, last head (%)")
    ax.set_title(f"{r['dataset']}: online VQ between DGL stages")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
