"""Does Winograd's rounding change what DGL learns? The same run trained with each convolution algorithm.

    python benchmarks/winograd_accuracy.py            # Fashion-MNIST 12k, cnn4 x0.5, mlp-sr, 5 epochs (minutes)
    python benchmarks/winograd_accuracy.py --tiny     # digits, seconds; used by the tests

The run is the DGL row of ``experiments/paper_tables.py sequential_vs_parallel`` (CPU budget), trained for
each seed once with the library's convolutions (``dgl_jax``: Winograd where ``dgl_jax.conv.conv_algorithm``
picks it) and once with the direct convolution everywhere (``direct``), one after the other in one process.
Rounding differences grow chaotically through training, so the Winograd - direct difference is set against
the spread between seeds of the direct runs. The JSON holds per-epoch test accuracy of every head, the final
figures, the differences and the wall time of each run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "experiments"))
import paper_tables  # noqa: E402
from common import conv_variant, machine, write_json  # noqa: E402

from dgl_jax.data import load_dataset  # noqa: E402
from dgl_jax.host import keep_freed_memory  # noqa: E402

VARIANTS = ("dgl_jax", "direct")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=None, help="override the table's epochs")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--out", default="benchmarks/results/winograd_accuracy.json")
    p.add_argument("--tiny", action="store_true", help="digits, 1 epoch, narrow network")
    args = p.parse_args(argv)
    malloc_kept = keep_freed_memory()
    seeds = [int(t) for t in args.seeds.split(",") if t]
    if not seeds:
        p.error("--seeds needs at least one seed")
    table = paper_tables.TABLES["sequential_vs_parallel"]
    run = next(r for r in table.runs if r.label == "DGL")
    budget = "tiny" if args.tiny else "cpu"
    configs = [paper_tables.run_config(table, run, budget, seed) for seed in seeds]
    if args.epochs is not None:
        configs = [c.__class__(**{**paper_tables.config_to_dict(c), "epochs": args.epochs}) for c in configs]
    dataset = load_dataset(configs[0].dataset, configs[0].data_dir)
    if not args.tiny:
        dataset = paper_tables.subset(dataset, paper_tables.CPU_TRAIN_SUBSET)
    runs = {name: [] for name in VARIANTS}
    for seed, config in zip(seeds, configs, strict=True):
        for name in VARIANTS:
            print(f"seed {seed}, {name}: training", flush=True)
            with conv_variant(name):
                runs[name].append(paper_tables.train_one(config, dataset))
    final = {k: np.array([r["final_test_accuracy"] for r in runs[k]]) * 100 for k in VARIANTS}  # [seeds, heads]
    diff = final["dgl_jax"] - final["direct"]
    result = {
        "benchmark": "winograd_accuracy",
        "config": paper_tables.config_to_dict(configs[0]),
        "seeds": seeds,
        "dataset": dataset.name,
        "machine": machine(malloc_kept),
        "runs": runs,
        "final_test_accuracy_points": {k: v.tolist() for k, v in final.items()},
        "winograd_minus_direct_points": diff.tolist(),
        "mean_winograd_minus_direct_points": diff.mean(0).tolist(),
        "direct_seed_spread_points": (final["direct"].max(0) - final["direct"].min(0)).tolist(),
        "wall_s_ratio": sum(r["wall_s"] for r in runs["dgl_jax"]) / sum(r["wall_s"] for r in runs["direct"]),
    }
    write_json(args.out, result)
    fmt = lambda v: ", ".join(f"{a:+.2f}" for a in v)  # noqa: E731
    for k in VARIANTS:
        for seed, acc in zip(seeds, final[k], strict=True):
            print(f"{k:8s} seed {seed}: final test accuracy per head {', '.join(f'{a:.2f}' for a in acc)}")
    print(f"Winograd - direct, points per head, mean over seeds: {fmt(result['mean_winograd_minus_direct_points'])}")
    print(f"direct, max - min over seeds, points per head: {fmt(result['direct_seed_spread_points'])}")
    print(f"wall time ratio Winograd / direct: {result['wall_s_ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
