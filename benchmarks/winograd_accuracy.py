"""Does Winograd's rounding change what DGL learns? The same run trained with each convolution algorithm.

    python benchmarks/winograd_accuracy.py            # Fashion-MNIST 12k, cnn4 x0.5, mlp-sr, 5 epochs (minutes)
    python benchmarks/winograd_accuracy.py --tiny     # digits, seconds; used by the tests

The run is the DGL row of ``experiments/paper_tables.py sequential_vs_parallel`` (CPU budget, same seed),
trained once with the library's convolutions (``dgl_jax``: Winograd where ``dgl_jax.conv.conv_algorithm``
picks it) and once with the direct convolution everywhere (``direct``), one after the other in one process.
The JSON holds per-epoch test accuracy of every head, the final figures, their differences and the
wall time of each run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/winograd_accuracy.json")
    p.add_argument("--tiny", action="store_true", help="digits, 1 epoch, narrow network")
    args = p.parse_args(argv)
    malloc_kept = keep_freed_memory()
    table = paper_tables.TABLES["sequential_vs_parallel"]
    run = next(r for r in table.runs if r.label == "DGL")
    budget = "tiny" if args.tiny else "cpu"
    config = paper_tables.run_config(table, run, budget, args.seed)
    if args.epochs is not None:
        config = config.__class__(**{**paper_tables.config_to_dict(config), "epochs": args.epochs})
    dataset = load_dataset(config.dataset, config.data_dir)
    if not args.tiny:
        dataset = paper_tables.subset(dataset, paper_tables.CPU_TRAIN_SUBSET)
    runs = {}
    for name in VARIANTS:
        print(f"{name}: training", flush=True)
        with conv_variant(name):
            runs[name] = paper_tables.train_one(config, dataset)
    final = {k: runs[k]["final_test_accuracy"] for k in VARIANTS}
    result = {
        "benchmark": "winograd_accuracy",
        "config": paper_tables.config_to_dict(config),
        "dataset": dataset.name,
        "machine": machine(malloc_kept),
        "runs": runs,
        "final_test_accuracy": final,
        "winograd_minus_direct_points": [100 * (a - b) for a, b in zip(final["dgl_jax"], final["direct"], strict=True)],
        "wall_s_ratio": runs["dgl_jax"]["wall_s"] / runs["direct"]["wall_s"],
    }
    write_json(args.out, result)
    for k in VARIANTS:
        acc = ", ".join(f"{100 * a:.2f}" for a in final[k])
        print(f"{k:8s} final test accuracy per head: {acc}  ({runs[k]['wall_s']:.0f} s)")
    diff = ", ".join(f"{d:+.2f}" for d in result["winograd_minus_direct_points"])
    print(f"Winograd - direct, points per head: {diff}; wall time ratio {result['wall_s_ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
