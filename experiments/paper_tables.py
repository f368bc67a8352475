"""The paper's comparisons re-measured with dgl_jax: one command per table, one trainer for all of them.

    python experiments/paper_tables.py sequential_vs_parallel --budget converged   # full 60k, 3 seeds
    python experiments/paper_tables.py dni_comparison            # Fashion-MNIST 12k, CPU-sized budget, 3 seeds
    python experiments/paper_tables.py aux_heads --budget paper  # the paper's CIFAR-10 recipe (GPU + tfds data)
    python experiments/paper_tables.py num_stages --tiny         # seconds, on digits (used by the tests)

A table is a list of runs, each a set of :class:`~dgl_jax.trainer.TrainConfig` overrides on top of a budget:
``converged`` (Fashion-MNIST, all 60k training images, narrowed networks, enough epochs with LR decay that the
learning curve is flat: the markdown shows the curve and its gain over the last epochs), ``cpu`` (a 12k
training subset and few epochs: the first round's budget), ``paper`` (the paper's preset recipe on CIFAR-10)
or ``tiny``. The table is a grid of cells, run x seed (:func:`dgl_jax.cells.run_grid`): each cell is written
to ``experiments/results/<table>[_<budget>].json`` as soon as it finishes, with its git SHA, machine, package
versions and wall time, and re-running the command skips the finished cells, so a table can be completed over
several sittings. The markdown and the plot are rewritten from whatever cells exist: per-epoch test accuracy
of every head, mean +- std over the seeds, the paper's numbers, and a difference is called only where it
exceeds the seeds' spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dgl_jax import provenance
from dgl_jax.cells import GridError, mean_std, open_grid, run_grid
from dgl_jax.config import scale_decay
from dgl_jax.data import Dataset, load_dataset
from dgl_jax.files import save_figure, write_atomic
from dgl_jax.models import get_model, stage_costs
from dgl_jax.presets import preset_config
from dgl_jax.sweep import parse_seeds
from dgl_jax.trainer import TrainConfig, Trainer, config_to_dict

RESULTS = Path(__file__).resolve().parent / "results"


class Run(NamedTuple):
    label: str
    overrides: dict


class Table(NamedTuple):
    preset: str  # the paper's recipe (budget "paper")
    cpu: dict  # overrides of the CPU budget, on top of CPU_BASE
    runs: list[Run]
    paper: dict  # published numbers, by run label (ARCHITECTURE.md)
    note: str
    tiny: dict = {}  # extra overrides of the tiny budget (8x8 digits are too small for some trunks)
    converged: dict = {}  # extra overrides of the converged budget, on top of cpu and CONVERGED


CPU_BASE = dict(
    dataset="fashion_mnist",
    optimizer="sgd",
    lr=0.05,
    momentum=0.9,
    weight_decay=5e-4,
    batch_size=128,
    epochs=5,
    decay_epochs=(3,),
    decay_factor=0.2,
    augment=False,
)
CPU_TRAIN_SUBSET = 12000  # training examples of the CPU budget (all 10000 test images are kept)
TINY = dict(dataset="digits", epochs=1, batch_size=64, augment=False, eval_batch_size=500)
# The converged budget: all 60k training images, LR x0.2 at 1/2 and 3/4 of the epochs. Its epochs were chosen
# from the measured learning curve of DGL on cnn4 (the markdown of each table shows its own curves and the gain
# of the last head over the last quarter of the epochs).
CONVERGED = dict(epochs=12, decay_epochs=(6, 9))
FLAT_POINTS = 0.3  # a curve is called flat when its last quarter gains less than this (points, mean of seeds)
BUDGET_SUBSET = {"cpu": CPU_TRAIN_SUBSET, "converged": None, "tiny": None, "paper": None}

TABLES: dict[str, Table] = {
    "dni_comparison": Table(
        preset="dni_comparison",
        cpu=dict(
            model="dni_cnn",
            head="dni",
            optimizer="adam",
            lr=1e-3,
            weight_decay=0.0,
            decay_epochs=None,
            epochs=6,
            model_options={"width": 32},
        ),
        runs=[
            Run("DGL", dict(method="dgl")),
            Run("backprop", dict(method="backprop")),
            Run("DNI", dict(method="dni", method_options={"synth_width": 32, "synth_lr": 1e-4})),
            Run("cDNI", dict(method="cdni", method_options={"synth_width": 32, "synth_lr": 1e-4})),
        ],
        paper={"DGL": 85.05, "backprop": 84.35, "DNI": 63.24, "cDNI": 81.39},
        note="paper: CIFAR-10, 3-layer CNN (conv5x5 128), Adam 3e-5, 1500 epochs (official logs)",
        tiny=dict(model="small_cnn", model_options={"width_mult": 0.125}),  # dni_cnn pools 8x8 down to nothing
    ),
    "sequential_vs_parallel": Table(
        preset="learning_curves",
        cpu=dict(model="cnn4", head="mlp_sr", model_options={"width_mult": 0.5}),
        runs=[
            Run("DGL", dict(method="dgl")),
            Run("sequential", dict(method="sequential")),
            # the cause the first round named for sequential's lead: 4x more epochs in total; here E/4 per stage
            Run("sequential (same total epochs)", dict(method="sequential", epochs_divisor=4)),
        ],
        paper={"DGL": 89.86, "sequential": 89.13},
        note="paper: CIFAR-10, 4-stage CNN 64-128-128-256, mlp-sr heads, 50 epochs (official logs); sequential "
        "greedy trains each stage for the same number of epochs",
    ),
    "aux_heads": Table(
        preset="aux_head_study",
        cpu=dict(model="cnn6_aux", model_options={"width_mult": 0.25}, epochs=4),
        runs=[Run("cnn", dict(head="cnn")), Run("mlp", dict(head="mlp")), Run("mlp_sr", dict(head="mlp_sr"))],
        paper={},
        note="paper: CIFAR-10, 6-layer net 128-256-256-512-512-512; the mlp-sr head is the default because it "
        "costs a few percent of the trunk while the cnn head costs more than the trunk",
        tiny=dict(split=3),  # 3 stages of 2 layers: the same code path, half the programs to compile
    ),
    "num_stages": Table(
        preset="aux_head_study",
        cpu=dict(model="cnn6_aux", head="mlp_sr", model_options={"width_mult": 0.25}, epochs=4),
        runs=[Run(f"K={k}", dict(split=k)) for k in (1, 2, 3, 4, 6)],
        paper={},
        note="K=1 is end-to-end backprop of the same network with its last head; third-party re-runs report "
        "DGL losing accuracy as K grows (ResNet-56 CIFAR-10 error 6.77/8.88/9.65% for K=2/3/4 vs 6.19%)",
    ),
}


def run_config(table: Table, run: Run, budget: str, seed: int) -> TrainConfig:
    """The full config of one run of ``table`` under ``budget``."""
    overrides = dict(run.overrides)
    divisor = overrides.pop("epochs_divisor", 1)  # equal total epochs for sequential greedy (K stages)
    if budget == "paper":
        cfg = preset_config(table.preset, seed=seed, **overrides)
        return dataclasses.replace(cfg, epochs=max(1, cfg.epochs // divisor)) if divisor > 1 else cfg
    base = dict(config_to_dict(TrainConfig()))
    base.update(CPU_BASE)
    base.update(table.cpu)
    if budget == "converged":
        base.update(CONVERGED)
        base.update(table.converged)
    if budget == "tiny":
        base.update(TINY)
        opts = dict(base.get("model_options", {}))
        opts = {"width": 8} if "width" in opts else ({"width_mult": 0.125} if opts else opts)
        base["model_options"] = opts
        base.update(table.tiny)
    base.update(overrides)
    if divisor > 1:
        epochs = max(1, base["epochs"] // divisor)
        base.update(epochs=epochs, decay_epochs=scale_decay(base.get("decay_epochs"), base["epochs"], epochs))
    if budget == "tiny" and base.get("method_options"):
        base["method_options"] = {**base["method_options"], "synth_width": 8, "synth_kernel": 3}
    base["seed"] = seed
    for k in ("split", "decay_epochs"):
        if isinstance(base.get(k), list):
            base[k] = tuple(base[k])
    return TrainConfig(**base)


def subset(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """The first ``n`` training examples of a fixed permutation (the test split is kept whole)."""
    if n >= len(ds.train_labels):
        return ds
    idx = np.random.default_rng(seed).permutation(len(ds.train_labels))[:n]
    return ds._replace(name=f"{ds.name}[:{n}]", train_images=ds.train_images[idx], train_labels=ds.train_labels[idx])


def train_one(config: TrainConfig, dataset: Dataset) -> dict:
    """Trains one config to the end; returns per-epoch per-head test accuracy and train loss, and wall time."""
    t0 = time.time()
    trainer = Trainer(config, dataset=dataset, log=lambda s: print("   ", s, flush=True))
    curve, losses = [], []
    for event in trainer.fit(trainer.init_state()):
        if event.eval is not None:
            curve.append([None if np.isnan(a) else float(a) for a in event.eval["accuracy"]])
            losses.append([None if np.isnan(v) else float(v) for v in event.train["loss"]])
            print(f"    epoch {event.epoch + 1}/{trainer.total_epochs}: test accuracy {curve[-1]}", flush=True)
    return {
        "test_accuracy_per_epoch": curve,
        "train_loss_per_epoch": losses,
        "final_test_accuracy": curve[-1],
        "ensemble": float(event.eval["ensemble"]),
        "wall_s": time.time() - t0,
        "num_stages": trainer.num_stages,
    }


def head_costs(config: TrainConfig, image_shape: tuple[int, ...]) -> dict:
    kwargs = {"head": config.head, **config.model_options}
    if config.split is not None:
        kwargs["split"] = config.split
    stages = get_model(config.model, **kwargs)
    costs = stage_costs(stages, image_shape)
    trunk = sum(c.block_macs for c in costs)
    return {
        "trunk_macs": trunk,
        "aux_head_macs": sum(c.head_macs for c in costs[:-1]),
        "aux_heads_over_trunk": sum(c.head_macs for c in costs[:-1]) / trunk,
    }


def _nan(values) -> np.ndarray:
    return np.array([[np.nan if a is None else a for a in row] for row in values], dtype=float)


def summarize(grid: dict, labels: list[str]) -> dict:
    """Per run label: the seeds done, per-head final test accuracy mean/std, ensemble mean/std, and the mean
    learning curve of the last head (per epoch) with its gain over the last quarter of the epochs."""
    out = {}
    for label in labels:
        cells = [c for cid, c in grid["cells"].items() if cid.rsplit("/", 1)[0] == label]
        if not cells:
            continue
        finals = _nan([c["final_test_accuracy"] for c in cells])
        mean, std = mean_std(finals)
        ens_mean, ens_std = mean_std(np.array([c["ensemble"] for c in cells]))
        curves = [[[a for a in epoch if a is not None][-1] for epoch in c["test_accuracy_per_epoch"]] for c in cells]
        length = min(len(c) for c in curves)
        curve = np.mean([c[:length] for c in curves], 0)
        tail = max(1, length // 4)
        out[label] = {
            "seeds": sorted(c["config"]["seed"] for c in cells),
            "final_test_accuracy_mean": [None if np.isnan(a) else float(a) for a in mean],
            "final_test_accuracy_std": [None if np.isnan(a) else float(a) for a in std],
            "ensemble_mean": float(ens_mean),
            "ensemble_std": float(ens_std),
            "last_head_curve_mean": [float(a) for a in curve],
            "last_quarter_gain": float(curve[-1] - curve[-1 - tail]) if length > tail else None,
            "wall_s_mean": float(np.mean([c["wall_s"] for c in cells])),
        }
    return out


def called(a: dict, b: dict) -> str:
    """``b`` vs ``a`` on the last head: the difference in points, called only where it exceeds the seeds'
    spread (the two mean +- std intervals do not overlap)."""
    ma, mb = a["final_test_accuracy_mean"][-1], b["final_test_accuracy_mean"][-1]
    sa, sb = a["final_test_accuracy_std"][-1], b["final_test_accuracy_std"][-1]
    diff = 100 * (mb - ma)
    if len(a["seeds"]) < 2 or len(b["seeds"]) < 2:
        return f"{diff:+.2f} (not called: fewer than 2 seeds)"
    if abs(diff) > 100 * (sa + sb):
        return f"{diff:+.2f} (called: beyond the seeds' spread {100 * (sa + sb):.2f})"
    return f"{diff:+.2f} (not called: within the seeds' spread {100 * (sa + sb):.2f})"


def markdown(name: str, table: Table, result: dict) -> str:
    runs = result["runs"]
    lines = [f"# {name} ({result['budget']} budget)", "", table.note, ""]
    shas = result.get("git_shas") or [result.get("git_sha")]
    lines.append(
        f"Data: {result['dataset']}; seeds asked {result['seeds']}; git {', '.join(str(s)[:10] for s in shas)}; "
        f"machines: {'; '.join(result.get('machines', [])) or '?'}. Command: `python experiments/{result['command']}`."
    )
    if runs:
        cfg = next(c for c in result["cells"].values())["config"]
        lines.append(
            f"Recipe: {cfg['model']} {cfg['model_options'] or ''} heads {cfg['head']}, {cfg['epochs']} epochs "
            f"(per stage for sequential), batch {cfg['batch_size']}, {cfg['optimizer']} lr {cfg['lr']}, "
            f"LR decay at {cfg['decay_epochs']} x{cfg['decay_factor']}, weight decay {cfg['weight_decay']}; "
            f"each run's overrides in the JSON's cells."
        )
    lines += ["", "Final test accuracy (%), mean +- std over the seeds done.", ""]
    lines += ["| run | seeds | last head | per-stage heads (means) | ensemble | aux heads / trunk MACs | paper (%) |"]
    lines.append("|---|---|---|---|---|---|---|")
    for label, r in runs.items():
        acc = [a for a in r["final_test_accuracy_mean"] if a is not None]
        std = [a for a in r["final_test_accuracy_std"] if a is not None]
        per = " / ".join(f"{100 * a:.1f}" for a in acc)
        cost = f"{100 * r['costs']['aux_heads_over_trunk']:.1f}%" if "costs" in r else ""
        lines.append(
            f"| {label} | {len(r['seeds'])} | {100 * acc[-1]:.2f} +- {100 * std[-1]:.2f} | {per} | "
            f"{100 * r['ensemble_mean']:.2f} +- {100 * r['ensemble_std']:.2f} | {cost} | {table.paper.get(label, '')} |"
        )
    labels = list(runs)
    if len(labels) > 1:
        lines += ["", f"Differences of the last head against {labels[0]} (points):", ""]
        lines += [f"- {label}: {called(runs[labels[0]], runs[label])}" for label in labels[1:]]
    lines += ["", "Learning curves: the last head's test accuracy (%) per epoch, mean of the seeds; the gain over "
              f"the last quarter of the epochs (flat: under {FLAT_POINTS} points).", ""]  # fmt: skip
    for label, r in runs.items():
        curve = " ".join(f"{100 * a:.1f}" for a in r["last_head_curve_mean"])
        gain = r["last_quarter_gain"]
        flat = (
            ""
            if gain is None
            else f"; last-quarter gain {100 * gain:+.2f} ({'flat' if 100 * gain < FLAT_POINTS else 'NOT flat'})"
        )
        lines.append(f"- {label}: {curve}{flat}")
    return "\n".join(lines) + "\n"


def plot(name: str, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, lx) = plt.subplots(1, 2, figsize=(11, 4))
    for label in result["runs"]:
        cells = [c for cid, c in result["cells"].items() if cid.rsplit("/", 1)[0] == label]
        curves = [[[a for a in e if a is not None][-1] for e in c["test_accuracy_per_epoch"]] for c in cells]
        # training loss of the highest stage trained in that epoch (the last stage, but for sequential greedy)
        losses = [[next((v for v in reversed(e) if v is not None), np.nan) for e in c["train_loss_per_epoch"]]
                  for c in cells]  # fmt: skip
        for a, rows, scale in ((ax, curves, 100), (lx, losses, 1)):
            n = min(len(r) for r in rows)
            m, sd = mean_std(np.array([r[:n] for r in rows], dtype=float))
            x = np.arange(1, n + 1)
            a.plot(x, scale * m, marker="o", label=f"{label} ({len(rows)} seeds)")
            a.fill_between(x, scale * (m - sd), scale * (m + sd), alpha=0.2)
    ax.set_ylabel("test accuracy of the last head (%)")
    lx.set_ylabel("training loss (mean over the epoch)")
    for a in (ax, lx):
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(f"{name} ({result['budget']}, {result['dataset']}): mean +- std over seeds")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_outputs(name: str, result: dict, stem: Path) -> str:
    """Rewrites the markdown and the plot of ``result`` (the grid with its ``runs`` summary); returns the
    markdown."""
    text = markdown(name, TABLES[name], result)
    write_atomic(stem.with_suffix(".md"), text)
    if result["runs"]:
        plot(name, result, stem.with_suffix(".png"))
    return text


def render(json_path: str | os.PathLike) -> str:
    """Rewrites the markdown table and the plot next to a results JSON (after a change of format)."""
    path = Path(json_path)
    return write_outputs(json.loads(path.read_text())["table"], json.loads(path.read_text()), path.with_suffix(""))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--budget", default="cpu", choices=["converged", "cpu", "paper", "tiny"])
    p.add_argument("--tiny", action="store_true", help="same as --budget tiny")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated, distinct (default 0,1,2)")
    p.add_argument("--runs", default=None, help="comma-separated subset of the table's run labels (default: all)")
    p.add_argument("--train-subset", type=int, default=None,
                   help=f"training examples used (default: {CPU_TRAIN_SUBSET} for cpu, all otherwise)")  # fmt: skip
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    budget = "tiny" if args.tiny else args.budget
    table = TABLES[args.table]
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    runs = table.runs
    if args.runs:
        wanted = [w.strip() for w in args.runs.split(",")]
        unknown = [w for w in wanted if w not in {r.label for r in runs}]
        if unknown:
            p.error(f"unknown runs {unknown} for {args.table}; expected some of {[r.label for r in runs]}")
        runs = [r for r in runs if r.label in wanted]
    configs = {run.label: [run_config(table, run, budget, s) for s in seeds] for run in runs}
    first = next(iter(configs.values()))[0]
    dataset = load_dataset(first.dataset, args.data_dir)
    n_train = args.train_subset if args.train_subset is not None else BUDGET_SUBSET[budget]
    if n_train is not None:
        dataset = subset(dataset, n_train)
    out = Path(args.out_dir)
    stem = out / (args.table if budget == "cpu" else f"{args.table}_{budget}")
    out.mkdir(parents=True, exist_ok=True)
    ident = {
        "table": args.table,
        "budget": budget,
        "dataset": dataset.name,
        # every run of the table (a subset with --runs fills the same grid), as its fields that differ from
        # TrainConfig's defaults: a field added later with a default does not orphan finished cells
        "configs": {r.label: recipe(run_config(table, r, budget, 0)) for r in table.runs},
    }
    header = {
        "table": args.table,
        "budget": budget,
        "dataset": dataset.name,
        "command": provenance.command(Path(sys.argv[0]).name, argv),
    }
    cells = [(f"{label}/{cfg.seed}", functools.partial(_cell, args.table, cfg, dataset))
             for label, cfgs in configs.items() for cfg in cfgs]  # fmt: skip
    try:
        grid = open_grid(stem.with_suffix(".json"), ident)
    except GridError as e:
        p.error(str(e))
    # seeds: every seed with a cell in the file, and the ones asked now
    done_seeds = {c["config"]["seed"] for c in grid["cells"].values()}
    header["seeds"] = sorted(done_seeds | set(seeds))
    path = stem.with_suffix(".json")

    def derive(grid: dict) -> None:  # the per-run summary, refreshed before each write of the grid
        labels = [r.label for r in table.runs if any(c.rsplit("/", 1)[0] == r.label for c in grid["cells"])]
        grid["runs"] = summarize(grid, labels) if labels else {}
        for label, r in grid["runs"].items():
            if args.table in ("aux_heads", "num_stages"):
                cfg = next(c for cid, c in grid["cells"].items() if cid.rsplit("/", 1)[0] == label)["config"]
                r["costs"] = head_costs(_config(cfg), dataset.image_shape)

    log = lambda s: print(f"[{args.table}] {s}", flush=True)  # noqa: E731
    try:
        result = run_grid(path, ident, cells, header, log=log, derive=derive)
    except KeyboardInterrupt:
        if path.exists():  # the finished cells' tables, then exit
            saved = open_grid(path, ident)
            if saved["cells"]:
                write_outputs(args.table, saved, stem)
        sys.exit(130)
    if result["cells"]:
        write_outputs(args.table, result, stem)
    print(markdown(args.table, table, result))
    return result


def recipe(config: TrainConfig) -> dict:
    """The fields of ``config`` that differ from :class:`TrainConfig`'s defaults, seed excluded (JSON form)."""
    default = json.loads(json.dumps(config_to_dict(TrainConfig())))
    mine = json.loads(json.dumps(config_to_dict(config)))
    return {k: v for k, v in mine.items() if k != "seed" and v != default.get(k)}


def _config(d: dict) -> TrainConfig:
    d = dict(d)
    for k in ("split", "decay_epochs"):
        if isinstance(d.get(k), list):
            d[k] = tuple(d[k])
    return TrainConfig(**d)


def _cell(table: str, config: TrainConfig, dataset: Dataset) -> dict:
    print(f"[{table}] {config.method} seed {config.seed}", flush=True)
    return {"config": config_to_dict(config), **train_one(config, dataset)}


if __name__ == "__main__":
    main()
