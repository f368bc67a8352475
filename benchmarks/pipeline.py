"""Stages on separate devices, measured: overlap of the pipelined executor, per-stage compute balance of the
paper CNN, and bytes sent between stages.

    python benchmarks/pipeline.py             # full run (a few minutes on 2 shared vCPUs)
    python benchmarks/pipeline.py --tiny      # seconds; used by the tests

(a) **Overlap efficiency.** Every stage's local update (a tiny CNN stage) also waits ``--wait-ms`` in a
    ``jax.pure_callback``, so the cores are idle and only the executor decides whether stages overlap.
    K = 2 and 4 such stages run through :class:`dgl_jax.parallel.PipelinedDGL` on K fake CPU devices (a
    thread per stage) and, as the baseline, one after the other on one device from one thread (what
    ``dgl_step`` does). ``efficiency = speed-up / K`` (1.0 = perfect overlap; the fill/drain of K-1 steps
    over N steps caps it at N / (N + K - 1)). The same executor with all K stages on ONE device is reported
    too. No ``block_until_ready`` or host round-trip per step: only the end of a run is waited for.
(b) **Balance.** Median time of each stage's jitted local update (``stage_step``) of ``get_model("cnn4")``
    at batch 128 on 32x32x3, for every contiguous split of its 4 conv layers into K = 2, 3, 4 stages; the
    speed-up a split predicts on K real devices is ``sum(stage times) / max(stage times)`` (pipeline steady
    state, transfers ignored); the best split per K is the one with the smallest slowest stage.
(c) **Bytes per step** crossing each boundary: float32 features (+ int32 labels), and VQ codes
    (the ``vq-packed:K:d`` codec: ceil(log2 K) bits per code, plus the codebook every step), as the ``nbytes``
    of the wires the codecs produce (``dgl_jax.accounting``).

This machine's 2 vCPUs do not compute in parallel, so (b) is a prediction, not a measured speed-up; the
cores are shared with other jobs, so every timing is a median over repeats and (a) is run twice.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summarize, time_call, write_json  # noqa: E402

from dgl_jax import get_model, init_stage_states, make_optimizer, stage_step, with_codec, with_optimizer  # noqa: E402
from dgl_jax.accounting import boundary_traffic, nbytes  # noqa: E402
from dgl_jax.codecs import parse_codec  # noqa: E402
from dgl_jax.models import cifar_cnn  # noqa: E402
from dgl_jax.parallel import PipelinedDGL, make_placement  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# (a) overlap efficiency
# ----------------------------------------------------------------------------------------------------------
def _sleep_identity(wait_s: float, x: np.ndarray) -> np.ndarray:
    time.sleep(wait_s)
    return x


def waiting_step(stage, wait_s: float, state, x, labels, key=None):
    """``stage_step`` whose output passes through a host callback that sleeps ``wait_s`` (latency-bound)."""
    state, out, m = stage_step(stage, state, x, labels, key)
    out = jax.pure_callback(functools.partial(_sleep_identity, wait_s), jax.ShapeDtypeStruct(out.shape, out.dtype), out)
    return state, out, m


def overlap(k: int, args: argparse.Namespace) -> dict:
    """Throughput of K waiting stages: pipelined on K devices, pipelined on 1 device, sequential on 1."""
    stages = cifar_cnn((8,) * k, (), head="linear", last_head_depth=1)
    stages = with_optimizer(stages, lambda j: make_optimizer("sgd", 0.01))
    x = jax.random.normal(jax.random.key(1), (args.overlap_batch, 8, 8, 1))
    y = jax.random.randint(jax.random.key(2), (args.overlap_batch,), 0, 10)
    states = init_stage_states(stages, jax.random.key(0), x)
    fns = [functools.partial(waiting_step, s, args.wait_ms / 1000) for s in stages]
    batches = [(x, y)] * args.steps

    pipes = {
        "k_devices": PipelinedDGL(stages, make_placement(k, num_devices=k), fns),
        "one_device_threads": PipelinedDGL(stages, make_placement(k, assignment=[0] * k), fns),
    }
    placed = {}
    for name, pipe in pipes.items():
        placed[name] = pipe.place(states)
        pipe.compile(placed[name], x, y)
    seq = []
    h = x
    for f, s in zip(fns, states, strict=True):
        seq.append(jax.jit(f).lower(s, h, y).compile())
        h = jax.eval_shape(f, s, h, y)[1]
        h = jnp.zeros(h.shape, h.dtype)
    seq_states = list(jax.device_get(states))

    def run_sequential():
        nonlocal seq_states
        out = None
        for xb, yb in batches:
            h = xb
            for j, f in enumerate(seq):
                seq_states[j], h, m = f(seq_states[j], h, yb)
                loss = m["loss"]
            out = loss
        return out  # waited for by time_call at the end only

    times = {"sequential_one_device": [], "k_devices": [], "one_device_threads": []}
    for _ in range(args.repeats):  # interleaved so that machine noise hits every variant alike
        times["sequential_one_device"].append(time_call(run_sequential))
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            placed[name], _ = pipe.run(placed[name], batches, timeout_s=600)  # returns host metrics: waits
            times[name].append(time.perf_counter() - t0)
    res = {name: {**summarize(ts), "steps_per_s": args.steps / statistics.median(ts)} for name, ts in times.items()}
    base = res["sequential_one_device"]["steps_per_s"]
    for name in ("k_devices", "one_device_threads"):
        res[name]["speedup_vs_sequential"] = res[name]["steps_per_s"] / base
        res[name]["efficiency"] = res[name]["speedup_vs_sequential"] / k
    res["ideal_steps_per_s_k_devices"] = 1000 / args.wait_ms * args.steps / (args.steps + k - 1)
    res["efficiency_cap_fill_drain"] = args.steps / (args.steps + k - 1)
    return res


# ----------------------------------------------------------------------------------------------------------
# (b) per-stage compute and balance
# ----------------------------------------------------------------------------------------------------------
def compositions(n: int, k: int) -> list[tuple[int, ...]]:
    """Every way to cut n units into k non-empty contiguous stages (units per stage)."""
    return [
        tuple(b - a for a, b in zip((0, *cuts), (*cuts, n), strict=True))
        for cuts in itertools.combinations(range(1, n), k - 1)
    ]


def balance(args: argparse.Namespace) -> dict:
    x = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, args.channels))
    y = jax.random.randint(jax.random.key(2), (args.batch,), 0, 10)
    n_units = len(get_model(args.model, split=None))
    cache: dict[tuple[int, int, bool], float] = {}  # (first unit, end unit, is last) -> median seconds
    splits = {}
    for k in args.ks:
        if k > n_units:
            continue
        for sizes in compositions(n_units, k):
            stages = with_optimizer(
                get_model(args.model, split=list(sizes), head=args.head), lambda j: make_optimizer("sgd", 0.1)
            )
            states = init_stage_states(stages, jax.random.key(0), x)
            h, starts, times = x, np.cumsum((0, *sizes)), []
            for j, (stage, st) in enumerate(zip(stages, states, strict=True)):
                key = (int(starts[j]), int(starts[j + 1]), j == k - 1)
                f = jax.jit(functools.partial(stage_step, stage))
                out = f(st, h, y)
                if key not in cache:
                    for _ in range(args.warmup):
                        time_call(lambda f=f, st=st, h=h: f(st, h, y))
                    cache[key] = statistics.median(
                        time_call(lambda f=f, st=st, h=h: f(st, h, y)) for _ in range(args.repeats)
                    )
                times.append(cache[key])
                h = out[1]
            splits[str(list(sizes))] = {
                "k": k,
                "stage_ms": [1000 * t for t in times],
                "sum_ms": 1000 * sum(times),
                "slowest_ms": 1000 * max(times),
                "predicted_speedup": sum(times) / max(times),
            }
    best = {}
    for k in args.ks:
        cands = {s: r for s, r in splits.items() if r["k"] == k}
        if cands:
            s = min(cands, key=lambda s: cands[s]["slowest_ms"])
            best[str(k)] = {"split": s, **cands[s]}
    return {
        "model": args.model,
        "batch": args.batch,
        "input": [args.size, args.size, args.channels],
        "splits": splits,
        "best_split_per_k": best,
    }


# ----------------------------------------------------------------------------------------------------------
# (c) bytes between stages
# ----------------------------------------------------------------------------------------------------------
def traffic(args: argparse.Namespace) -> dict:
    x = jax.ShapeDtypeStruct((args.batch, args.size, args.size, args.channels), jnp.float32)
    stages = with_optimizer(
        get_model(args.model, split=args.traffic_split, head=args.head), lambda j: make_optimizer("sgd", 0.1)
    )
    out = {"model": args.model, "split": args.traffic_split, "batch": args.batch, "boundaries": []}
    labels = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    spec = f"vq-packed:{args.vq_codes}:{args.vq_dim}"
    codecs = {"float32": None, spec: parse_codec(spec)}
    rows = {}
    for name, codec in codecs.items():  # bytes of the wires the codecs really produce (accounting.nbytes)
        cs = with_codec(stages, codec)
        states = jax.eval_shape(lambda cs=cs: init_stage_states(cs, jax.random.key(0), x))
        rows[name] = boundary_traffic(cs, states, x)
    for j, (f, q) in enumerate(zip(rows["float32"], rows[list(codecs)[1]], strict=True)):
        lb = nbytes(labels)
        out["boundaries"].append(
            {
                "boundary": f"{j}->{j + 1}",
                "float32_bytes": f["wire_bytes"] + lb,
                "vq_packed_bytes": q["wire_bytes"] + lb,
                "codec": q["codec"],
                "ratio": (f["wire_bytes"] + lb) / (q["wire_bytes"] + lb),
            }
        )
    out["total_float32_bytes_per_step"] = sum(r["float32_bytes"] for r in out["boundaries"])
    out["total_vq_bytes_per_step"] = sum(r["vq_packed_bytes"] for r in out["boundaries"])
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn4")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--head", default="mlp_sr", help="auxiliary head of the balance/traffic model")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--traffic-split", type=int, default=4)
    p.add_argument("--vq-dim", type=int, default=16)
    p.add_argument("--vq-codes", type=int, default=256)
    p.add_argument("--wait-ms", type=float, default=50.0)
    p.add_argument("--steps", type=int, default=40, help="batches per overlap run")
    p.add_argument("--overlap-batch", type=int, default=8)
    p.add_argument("--overlap-ks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--rounds", type=int, default=2, help="independent overlap measurements (re-runs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/pipeline.json")
    p.add_argument("--tiny", action="store_true", help="small model and few steps: checks the script runs")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.batch, args.size, args.channels, args.ks, args.head = "small_cnn", 8, 8, 1, [2], "linear"
        args.traffic_split, args.vq_dim, args.vq_codes = 3, 16, 16
        args.wait_ms, args.steps, args.overlap_ks, args.rounds, args.repeats, args.warmup = 20.0, 6, [2], 1, 2, 1
    if max(args.overlap_ks) > jax.device_count():
        raise ValueError(f"overlap K={max(args.overlap_ks)} needs that many devices, found {jax.device_count()}")

    result = {
        "benchmark": "pipeline",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {**machine(), "note": "2 vCPUs shared with other jobs: timings are noisy"},
    }
    result["overlap"] = {f"round{r}": {f"K={k}": overlap(k, args) for k in args.overlap_ks} for r in range(args.rounds)}
    result["balance"] = balance(args)
    result["traffic"] = traffic(args)
    write_json(args.out, result)
    for r, res in result["overlap"].items():
        for k, v in res.items():
            print(
                f"overlap {r} {k}: {v['k_devices']['steps_per_s']:.2f} steps/s on K devices vs "
                f"{v['sequential_one_device']['steps_per_s']:.2f} sequential -> efficiency "
                f"{v['k_devices']['efficiency']:.3f} (cap {v['efficiency_cap_fill_drain']:.3f}); "
                f"1 device threaded {v['one_device_threads']['efficiency']:.3f}"
            )
    for k, b in result["balance"]["best_split_per_k"].items():
        print(
            f"K={k}: best split {b['split']} stage ms {[round(t, 1) for t in b['stage_ms']]} "
            f"predicted speed-up {b['predicted_speedup']:.2f}"
        )
    print(
        f"bytes per step: float32 {result['traffic']['total_float32_bytes_per_step']}, "
        f"vq {result['traffic'].get('total_vq_bytes_per_step')}"
    )
    return result


if __name__ == "__main__":
    main()
