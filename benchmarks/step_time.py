"""Step time and compiled memory of ``dgl_step`` vs ``backprop_step`` on the same trunk.

    python benchmarks/step_time.py                       # the 4-stage paper CNN, batch 128, 32x32x3
    python benchmarks/step_time.py --tiny                # seconds; used by the tests

Both steps are jitted once (states donated), then timed alternately (dgl, backprop, dgl, ...) so that machine
noise hits both alike; the JSON holds medians and quartiles, the ratio is printed last. It also holds each
step's host cost over a few more calls (``getrusage``: minor page faults and system CPU seconds per step),
which ``dgl_jax.host.keep_freed_memory`` (on unless ``--malloc default``, as in the CLI) is there to remove.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, paper_step, summarize, time_alternating, time_call, write_json  # noqa: E402

from dgl_jax.host import keep_freed_memory  # noqa: E402


def build(method: str, args: argparse.Namespace):
    step, states, x, y = paper_step(
        method,
        model=args.model,
        split=args.split,
        head=args.head,
        dtype=args.dtype,
        batch=args.batch,
        size=args.size,
        channels=args.channels,
    )
    compiled = step.lower(states, x, y).compile()
    mem = compiled.memory_analysis()
    memory = {
        "peak_bytes": int(getattr(mem, "peak_memory_in_bytes", 0)),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
    }
    # what one call holds at once: inputs, outputs (donated inputs aliased into them) and XLA's temporaries
    # (activations kept for the backward pass); XLA:CPU's peak figure leaves the temporaries out
    memory["footprint_bytes"] = (
        memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"] + memory["temp_bytes"]
    )
    return compiled, states, x, y, memory


def host_cost(call, steps: int) -> dict[str, float]:
    """Minor page faults and system CPU seconds of this process per ``call()`` (each run to completion)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        time_call(call)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
        "system_s_per_step": (after.ru_stime - before.ru_stime) / steps,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn4")
    p.add_argument("--split", type=int, default=4)
    p.add_argument("--head", default="mlp_sr")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/step_time.json")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep", help="as the CLI's --malloc")
    p.add_argument("--tiny", action="store_true", help="small model and batch: checks the script runs")
    args = p.parse_args(argv)
    malloc_kept = args.malloc == "keep" and keep_freed_memory()  # as python -m dgl_jax train does
    if args.tiny:
        args.model, args.split, args.batch, args.size, args.channels = "small_cnn", 3, 8, 8, 1
        args.repeats, args.warmup = 3, 1

    runs, calls = {}, {}
    for method in ("dgl", "backprop"):
        compiled, states, x, y, memory = build(method, args)
        runs[method] = {"step": compiled, "states": states, "x": x, "y": y, "memory": memory}

        def call(run=runs[method]):
            run["states"], metrics = run["step"](run["states"], run["x"], run["y"])
            return metrics

        calls[method] = call
    for method, times in time_alternating(calls, args.repeats, args.warmup).items():
        runs[method]["times"] = times
    for method, call in calls.items():
        runs[method]["host"] = host_cost(call, 5)
    result = {
        "benchmark": "step_time",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine(malloc_kept),
        **{m: {**summarize(run["times"]), "memory": run["memory"], "host": run["host"]} for m, run in runs.items()},
    }
    result["ratio_dgl_over_backprop"] = result["dgl"]["median_s"] / result["backprop"]["median_s"]
    for name in ("peak", "temp", "footprint"):
        result[f"{name}_memory_ratio_dgl_over_backprop"] = runs["dgl"]["memory"][f"{name}_bytes"] / max(
            runs["backprop"]["memory"][f"{name}_bytes"], 1
        )
    write_json(args.out, result)
    for m in ("dgl", "backprop"):
        print(
            f"{m:9s} median {result[m]['median_s'] * 1e3:8.1f} ms  "
            f"(q1 {result[m]['q1_s'] * 1e3:.1f}, q3 {result[m]['q3_s'] * 1e3:.1f})  "
            f"footprint {result[m]['memory']['footprint_bytes'] / 2**20:.1f} MiB "
            f"(temporaries {result[m]['memory']['temp_bytes'] / 2**20:.1f} MiB), per step "
            f"{result[m]['host']['minor_faults_per_step']:.0f} page faults, "
            f"{result[m]['host']['system_s_per_step']:.3f} s system time"
        )
    print(f"memory footprint ratio dgl/backprop: {result['footprint_memory_ratio_dgl_over_backprop']:.3f}")
    print(f"step time ratio dgl/backprop: {result['ratio_dgl_over_backprop']:.3f}")
    return result


if __name__ == "__main__":
    main()
