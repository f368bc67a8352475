"""Asynchronous DGL with a slowed stage and replay buffers (the papers' section on asynchrony, at CPU scale).

    python experiments/async_buffer.py                 # Fashion-MNIST grid, writes experiments/results/async_buffer.*
    python experiments/async_buffer.py --tiny          # digits, a few ticks (CI smoke test)
    python experiments/async_buffer.py --vq 64:8 --buffers 5 --slowdowns 1.5   # float vs VQ-code buffers

A 6-stage CNN (conv3x3 widths 8,8,16,16,32,32, max-pool before layers 3 and 5, one conv per stage, ``mlp``
heads) is trained with simulated asynchrony (:mod:`dgl_jax.asynchronous`): each tick one stage is drawn
from the paper's categorical schedule where the slowed middle stage (index ``--slow-stage``, default 2)
has weight 1/S. Grid: S in {1.0, 1.11, 1.25, 1.5, 2.0, 3.0} x buffer size M in {1, 5, 30} (priority-LIFO
sampling, ordered warm-up of M rounds), plus synchronous DGL (round-robin, M=1, which equals ``dgl_step``).
Every run gets the same number of ticks (= the same number of stage updates in total), so a slow stage
gets fewer updates and the stages above it reuse older features. One compiled program per M; the schedule
is an argument, so the S sweep does not recompile. Reports test accuracy of the last head.

``--vq K:d``: every (M, S) cell is run twice, with float buffers and with buffers of packed VQ codes: the
stages get the codec ``dgl_jax.codecs.vq(K, code_dim=d, packed=True)`` on every boundary
(:func:`dgl_jax.with_codec`; ``K`` codes of dimension ``d`` per channel group, sender-side EMA codebooks), so
each buffered item is a self-contained wire: the codes bit-packed to ``ceil(log2 K)`` bits in uint8 bytes
plus the float32 codebook they index, and the labels. Writes ``experiments/results/async_vq.{json,md}`` with
the accuracy (the VQ runs are evaluated with :func:`dgl_jax.evaluate_batch` on the coded stages, as deployed:
each boundary encodes with the sender's codebook and the next stage decodes; the same weights with float
messages are reported for reference), the relative squared error of each decoded boundary on the test set,
and the buffer memory from :func:`dgl_jax.accounting.buffer_memory` (the ``nbytes`` of every stored slot,
wires and labels, vs the same slots holding float32 messages).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dgl_jax import (  # noqa: E402
    accounting,
    codecs,
    evaluate_batch,
    forward_features,
    init_stage_states,
    make_optimizer,
    provenance,
    vq,
    with_codec,
    with_optimizer,
)
from dgl_jax import asynchronous as A  # noqa: E402
from dgl_jax.cells import GridError, mean_std, run_grid  # noqa: E402
from dgl_jax.data import load_digits, load_fashion_mnist  # noqa: E402
from dgl_jax.files import save_figure, write_atomic  # noqa: E402
from dgl_jax.models import cifar_cnn  # noqa: E402
from dgl_jax.stage import decode_message, encode_message  # noqa: E402

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
    p.add_argument(
        "--tiny", action="store_true", help="digits, 3 stages, few ticks, S in {1, 2} and M=2 unless given (CI)"
    )
    p.add_argument("--slowdowns", type=float, nargs="+", default=None, help="default 1 1.11 1.25 1.5 2 3")
    p.add_argument("--buffers", type=int, nargs="+", default=None, help="default 1 5 30")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
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
    command = provenance.command("python experiments/async_buffer.py", argv)
    vq_cfg = None
    if args.vq is not None:
        try:
            num_codes, code_dim = (int(v) for v in args.vq.split(":"))
            codec = codecs.vq(num_codes, code_dim=code_dim, packed=True)
        except ValueError as e:
            p.error(f"--vq expects K:d with K >= 2 (e.g. 64:8), got {args.vq!r} ({e})")
        vq_cfg = {
            "codec": codec.name,
            "num_codes": num_codes,
            "code_dim": code_dim,
            "packed": True,
            "bits_per_code": vq.index_bits(num_codes),
            "decay": 0.99,
        }
    if args.out is None:
        args.out = str(RESULTS / ("async_buffer" if vq_cfg is None else "async_vq"))
    if args.tiny:
        args.widths, args.downsample_at = [8, 8, 16], [1, 2]
        args.train_size, args.batch, args.updates = 512, 16, 6
        args.slow_stage = 1
    if args.slowdowns is None:
        args.slowdowns = [1.0, 2.0] if args.tiny else [1.0, 1.11, 1.25, 1.5, 2.0, 3.0]
    if args.buffers is None:
        args.buffers = [2] if args.tiny else [1, 5, 30]
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
    vq_stages = vq_eval_fn = distortion_fn = None
    if vq_cfg is not None:  # the same stages with a packed-VQ codec on every boundary
        vq_stages = with_codec(stages, codec)
        vq_eval_fn = jax.jit(lambda st, x, y: evaluate_batch(vq_stages, st, x, y))
        distortion_fn = jax.jit(lambda st, x: boundary_distortion_sums(vq_stages, st, x))
        print(
            f"VQ cells: codec {codec.name} on every boundary, buffers of packed {vq_cfg['bits_per_code']}-bit codes "
            "+ the sender's codebook per item",
            flush=True,
        )
    ticks = args.updates * k
    example = train_x[: args.batch]

    def make_header() -> dict:
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
            "vq": vq_cfg,
            "slowdowns": args.slowdowns,
            "buffers": args.buffers,
            "seeds": args.seeds,
            "command": command,
            "drop_threshold": args.drop,
        }

    compiled: dict = {}  # (coded, M, seed) -> the async run: one program per codec, buffer size and data order

    def run_cell(label: str, m: int, s: float | None, seed: int, coded: bool, round_robin: bool) -> dict:
        key = jax.random.key(seed)
        run_stages = vq_stages if coded else stages
        config = A.AsyncConfig(capacity=m, policy=args.policy)
        if (coded, m, seed) not in compiled:  # the data order (input_fn) is baked into the program
            input_fn = A.epoch_input_fn(train_x, train_y, args.batch, jax.random.fold_in(key, 1))
            compiled[coded, m, seed] = A.make_async_run(run_stages, config, input_fn, ticks)
        run = compiled[coded, m, seed]
        # same key, same params: init_stage_states draws the codec state from its own fold of each stage's key
        states = init_stage_states(run_stages, jax.random.fold_in(key, 0), example)
        schedule = A.RoundRobin(k) if round_robin else A.paper_schedule(k, args.slow_stage, s)
        st = A.init_async(run_stages, states, example, train_y[: args.batch], config, jax.random.fold_in(key, 2))
        t0 = time.perf_counter()
        st, rec = run(st, schedule)
        jax.block_until_ready(st.states)
        wall = time.perf_counter() - t0
        summ = A.summarize(rec)
        last, ens = evaluate(eval_fn, st.states, test_x, test_y)  # float messages (no codec)
        extra = {}
        if coded:  # as deployed: every boundary through its codec; float messages for reference
            extra = {"test_acc_last_float_messages": last, "test_acc_ensemble_float_messages": ens}
            last, ens = evaluate(vq_eval_fn, st.states, test_x, test_y)
            extra["test_distortion"] = evaluate_distortion(distortion_fn, st.states, test_x)
        per_buffer = accounting.buffer_memory(run_stages, st.buffers)
        mem = {
            "stored_bytes": sum(b["stored_bytes"] for b in per_buffer),
            "float32_bytes": sum(b["float32_bytes"] for b in per_buffer),
            "buffer_stored_bytes": [b["stored_bytes"] for b in per_buffer],
            "buffer_float32_bytes": [b["float32_bytes"] for b in per_buffer],
            "wire_bytes_per_step": [
                b["wire_bytes"] for b in accounting.boundary_traffic(run_stages, st.states, example)
            ],
        }
        mem["buffer_memory_factor"] = mem["float32_bytes"] / mem["stored_bytes"]
        row = {
            "method": label,
            "buffer": m,
            "slowdown": 1.0 if s is None else s,
            "schedule": "round_robin" if round_robin else "paper",
            "seed": seed,
            "test_acc_last": last,
            "test_acc_ensemble": ens,
            **extra,
            "wall_s_incl_compile": wall,
            **mem,
            **{f"stage_{name}": np.asarray(v).tolist() for name, v in summ.items()},
        }
        print(
            f"{label:8s} M={m:3d} S={row['slowdown']:.2f} seed={seed} acc={last:.4f} ens={ens:.4f} {wall:.1f}s "
            f"buffers {mem['stored_bytes']} B{' (packed VQ)' if coded else ''}, "
            f"x{mem['buffer_memory_factor']:.1f} less than float32 updates={row['stage_updates']} "
            f"staleness={np.round(summ['mean_staleness'], 2).tolist()} "
            f"reuse={np.round(summ['mean_reuse'], 2).tolist()}",
            flush=True,
        )
        return row

    cells = []

    def add(label: str, m: int, s: float | None, seed: int, coded: bool, round_robin: bool) -> None:
        name = f"{label}/M{m}/S{1.0 if s is None else s:g}/seed{seed}"
        cells.append((name, functools.partial(run_cell, label, m, s, seed, coded, round_robin)))

    for seed in args.seeds:
        add("sync_dgl", 1, None, seed, False, True)
        for m in args.buffers:
            add("async_rr", m, None, seed, False, True)  # the cause of async's gap at S=1: random vs round-robin
            for s in args.slowdowns:
                add("async", m, s, seed, False, False)
                if vq_stages is not None:
                    add("async_vq", m, s, seed, True, False)
    ident = {**make_header(), "experiment": "async_buffer"}
    for key in ("seeds", "slowdowns", "buffers", "command"):  # a grid may grow in these
        ident.pop(key)
    out = Path(args.out)
    try:
        run_grid(out.with_suffix(".json"), ident, cells, make_header())
    except KeyboardInterrupt:
        sys.exit(130)
    except GridError as e:
        p.error(str(e))
    finally:
        if out.with_suffix(".json").exists():
            saved = json.loads(out.with_suffix(".json").read_text())
            if saved.get("cells"):
                write(with_runs(saved), out)
    result = with_runs(json.loads(out.with_suffix(".json").read_text()))
    result["wall_s"] = time.perf_counter() - t_start
    return result


def with_runs(grid: dict) -> dict:
    """The grid with ``runs``: its cells as a list of rows (what the markdown and the tests read)."""
    return {**grid, "runs": list(grid["cells"].values())}


def boundary_distortion_sums(stages, states, x):
    """Per boundary ``j -> j+1`` (eval mode, through the codecs as :func:`dgl_jax.evaluate_batch` runs them):
    ``(sum ||m - decode(encode(m))||^2, sum ||m||^2)`` of the message ``m`` stage j sends, ``[K-1]`` each."""
    err, ref = [], []
    for stage, st in zip(stages[:-1], states[:-1], strict=True):
        msg = forward_features([stage], [st], x)
        x = decode_message(stage, encode_message(stage, st.codec, msg)[1])
        sq = lambda t: sum(jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree.leaves(t))  # noqa: E731
        err.append(sq(jax.tree.map(jnp.subtract, msg, x)))
        ref.append(sq(msg))
    return jnp.stack(err), jnp.stack(ref)


def evaluate_distortion(fn, states, images, chunk=1000) -> list[float]:
    """Relative squared error of each decoded boundary over the whole test set: ``sum err / sum ||m||^2``."""
    err, ref = 0.0, 0.0
    for i in range(0, len(images), chunk):
        e, r = fn(states, images[i : i + chunk])
        err, ref = err + np.asarray(e, np.float64), ref + np.asarray(r, np.float64)
    return (err / np.maximum(ref, 1e-12)).tolist()


def write_vq_outputs(result: dict, out: Path) -> None:
    """``async_vq.{json,md}``: float vs VQ-code buffers for each (M, S) cell."""
    out.parent.mkdir(parents=True, exist_ok=True)
    b, v = result["budget"], result["vq"]
    lines = [
        f"# Asynchronous DGL with replay buffers of VQ codes ({result['dataset']})",
        "",
        f"{result['model']['stages']}-stage CNN widths {result['model']['widths']}, slowed stage "
        f"{result['slow_stage']} (paper's schedule), policy {result['policy']}; {b['ticks']} ticks "
        f"(~{b['updates_per_stage_nominal']} updates per stage), batch {b['batch']}, {b['train_size']} training "
        f"images, {b['optimizer']}; seeds {result['seeds']}. VQ: codec {v['codec']} on every boundary "
        f"(K={v['num_codes']} codes of dimension d={v['code_dim']} per channel group, sender-side EMA codebooks, "
        f"decay {v['decay']}); each buffered item is a self-contained wire: the codes packed to "
        f"{v['bits_per_code']} bits each in uint8 bytes plus the float32 codebook they index, and the labels; the "
        f"receiver decodes at read time. {provenance_line(result)}",
        "",
        "Accuracy: test set, last head and weighted ensemble; the VQ runs are evaluated with every boundary "
        "encoded by the sender's codec and decoded by the receiver (as deployed; the same weights with float "
        "messages in brackets). Memory: `dgl_jax.accounting.buffer_memory`, the nbytes of every slot of all K-1 "
        "buffers as allocated (wires and labels) vs the same slots holding float32 messages and the labels. "
        "Distortion: relative squared error ||m - decode(encode(m))||^2 / ||m||^2 of each boundary's message "
        "over the test set (eval mode).",
        "",
        "| method | M | S | seed | test acc (last) | test acc (ensemble) | stored (B) | float32 (B) | memory factor "
        "| wire per step (B) | test distortion per boundary |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def acc(r, name):
        a = f"{r[name]:.4f}"
        return a + f" ({r[name + '_float_messages']:.4f})" if name + "_float_messages" in r else a

    for r in result["runs"]:
        dist = ", ".join(f"{d:.3f}" for d in r.get("test_distortion", [])) or "-"
        wire = ", ".join(str(w) for w in r["wire_bytes_per_step"])
        lines.append(
            f"| {r['method']} | {r['buffer']} | {r['slowdown']:g} | {r['seed']} | {acc(r, 'test_acc_last')} | "
            f"{acc(r, 'test_acc_ensemble')} | {r['stored_bytes']} | {r['float32_bytes']} | "
            f"{r['buffer_memory_factor']:.1f}x | {wire} | {dist} |"
        )
    lines += ["", "Command:", "", "```", result["command"], "```", ""]
    write_atomic(out.with_suffix(".md"), "\n".join(lines))


def provenance_line(result: dict) -> str:
    """Machines, commits and the summed wall time of the grid's cells."""
    cells = result["runs"]
    shas = ", ".join(str(x)[:10] for x in result.get("git_shas", [])) or "?"
    return (
        f"Machine: {'; '.join(result.get('machines', [])) or '?'} (shared 2-vCPU box); git {shas}; "
        f"wall time {sum(c['wall_s'] for c in cells):.0f} s over {len(cells)} cells."
    )


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, std over seeds (:func:`dgl_jax.cells.mean_std`) and the number of seeds."""
    mean, std = mean_std(values)
    return float(mean), float(std), len(values)


def table(result: dict, method: str = "async") -> tuple[list[float], dict, float, float]:
    """``(slowdowns, {M: [(mean, std, n) per S]}, sync mean, sync std)`` of the last head's test accuracy."""
    runs = result["runs"]
    grid = {}
    for m in result["buffers"]:
        grid[m] = [
            _mean_std([r["test_acc_last"] for r in runs if (r["method"], r["buffer"], r["slowdown"]) == (method, m, s)])
            for s in result["slowdowns"]
        ]
    sync_mean, sync_std, _ = _mean_std([r["test_acc_last"] for r in runs if r["method"] == "sync_dgl"])
    return result["slowdowns"], grid, sync_mean, sync_std


def first_drop(
    slowdowns: list[float], row: list[tuple], reference: float, drop: float, reference_std: float = 0.0
) -> float | None:
    """The smallest slow-down S from which accuracy stays more than ``drop`` below ``reference`` and beyond the
    seeds' spread (mean +- std intervals apart); None if it never does (a single dip followed by recovery is
    not counted)."""
    for i, s in enumerate(slowdowns):
        if all(np.isfinite(a) and a < reference - max(drop, sd + reference_std) for a, sd, _ in row[i:]):
            return s
    return None


def cause_lines(result: dict, sync_mean: float, sync_std: float) -> list[str]:
    """The measured cause of async's gap to synchronous DGL at S=1: the same buffers under round-robin, and the
    spread of the per-stage update counts under the paper's random schedule."""
    runs = result["runs"]
    lines = [
        "",
        "Cause of the gap at S=1 (measured): the same buffers with a round-robin schedule instead of the paper's "
        "random one, and the per-stage update counts (min-max over stages, mean over seeds):",
        "",
    ]
    for m in result["buffers"]:
        rr = _mean_std([r["test_acc_last"] for r in runs if (r["method"], r["buffer"]) == ("async_rr", m)])
        rnd = [r for r in runs if (r["method"], r["buffer"], r["slowdown"]) == ("async", m, 1.0)]
        counts = [(min(r["stage_updates"]), max(r["stage_updates"])) for r in rnd]
        spread = f"{np.mean([a for a, _ in counts]):.0f}-{np.mean([b for _, b in counts]):.0f}" if counts else "-"
        rand = _mean_std([r["test_acc_last"] for r in rnd])
        lines.append(
            f"- M={m}: round-robin {rr[0]:.4f} +- {rr[1]:.4f} ({rr[2]} seeds), random schedule {rand[0]:.4f} +- "
            f"{rand[1]:.4f}; synchronous {sync_mean:.4f} +- {sync_std:.4f}; updates per stage (random) {spread}"
        )
    return lines


def write_outputs(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    slowdowns, grid, sync_mean, sync_std = table(result)
    b = result["budget"]
    lines = [
        f"# Asynchronous DGL: slowed stage {result['slow_stage']} vs buffer size ({result['dataset']})",
        "",
        f"Test accuracy of the last head (mean +- std over seeds {result['seeds']}); {result['model']['stages']}-stage "
        f"CNN widths {result['model']['widths']}; {b['ticks']} ticks (~{b['updates_per_stage_nominal']} updates "
        f"per stage), batch {b['batch']}, {b['train_size']} training images, {b['optimizer']}; policy "
        f"{result['policy']}. {provenance_line(result)}",
        "",
        f"Synchronous DGL (round-robin, M=1): **{sync_mean:.4f}** +- {sync_std:.4f}",
        "",
        "| M \\ S | " + " | ".join(f"{s:g}" for s in slowdowns) + " |",
        "|---|" + "---|" * len(slowdowns),
    ]
    for m, row in grid.items():
        lines.append(f"| {m} | " + " | ".join(f"{a:.4f} +- {sd:.4f}" for a, sd, _ in row) + " |")
    drop = result["drop_threshold"]
    lines += [
        "",
        f"Where accuracy starts to drop (stays more than {100 * drop:g} points below the reference, and beyond the "
        "seeds' spread):",
        "",
    ]
    for m, row in grid.items():
        vs_sync = first_drop(slowdowns, row, sync_mean, drop, sync_std)
        vs_s1 = first_drop(slowdowns, row, row[0][0], drop, row[0][1]) if slowdowns and slowdowns[0] == 1.0 else None
        lines.append(f"- M={m}: vs synchronous DGL from S = {vs_sync}; vs the same M at S=1 from S = {vs_s1}")
    lines += cause_lines(result, sync_mean, sync_std)
    lines += ["", "Command:", "", "```", result["command"], "```", ""]
    write_atomic(out.with_suffix(".md"), "\n".join(lines))
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
    save_figure(fig, out.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
