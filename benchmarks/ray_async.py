"""Asynchronous DGL on Ray against the threaded executor and synchronous (lock-step) DGL.

One stage slowed ``--slowdown`` times (it sleeps ``slowdown - 1`` times each update's duration) and
``--link-delay-s`` of latency on every link, on digits batches (small_cnn, 3 stages, linear heads):

* ``ray``: one actor per stage (:class:`dgl_jax.ray_executor.RayExecutor`), free-running;
* ``threads``: :func:`dgl_jax.asynchronous.run_threaded`, free-running, one process;
* ``sync``: synchronous DGL, every wire consumed once and in order (``lockstep``), threads, same injections.

Per stage: updates/s = updates / the seconds its loop ran (median over ``--repeats``, the three executors
interleaved in each repeat); ratios ray/sync and threads/sync. Bytes per step: the ``nbytes`` of the
``(wire, targets)`` items each stage shipped over its updates, with float32 messages and with the packed VQ
codec (``--codec``). Writes ``benchmarks/results/ray_async.json``.

    python benchmarks/ray_async.py            # a few minutes on a 2-vCPU box
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import jax

from dgl_jax import asynchronous as A
from dgl_jax import files, get_model, init_stage_states, make_optimizer, provenance, with_optimizer
from dgl_jax.codecs import parse_codec
from dgl_jax.data import load_digits
from dgl_jax.ray_executor import Options, RayExecutor
from dgl_jax.stage import with_codec

OUT = Path(__file__).parent / "results" / "ray_async.json"


def build(codec: str | None, batches):
    stages = with_optimizer(get_model("small_cnn", head="linear"), lambda j: make_optimizer("sgd", 0.05))
    if codec:
        stages = with_codec(stages, parse_codec(codec))
    return stages, init_stage_states(stages, jax.random.key(0), batches[0][0])


def rates(records) -> list[float]:
    return [r["updates"] / r["wall_s"] for r in records]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=40, help="updates of stage 0 per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slow-stage", type=int, default=1)
    p.add_argument("--slowdown", type=float, default=1.5)
    p.add_argument("--link-delay-s", type=float, default=0.05)
    p.add_argument("--codec", default="vq-packed:16:4")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    import ray

    data = load_digits(seed=args.seed)
    b = args.batch_size
    n_b = len(data.train_labels) // b
    batches = [(data.train_images[i * b : (i + 1) * b], data.train_labels[i * b : (i + 1) * b]) for i in range(n_b)]
    k = 3
    cfg = A.AsyncConfig(capacity=1)
    injected = A.Injected(slow_stage=args.slow_stage, slowdown=args.slowdown, link_delay_s=args.link_delay_s)
    free = [args.updates] + [None] * (k - 1)
    ray.init(num_cpus=k, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        stages, states = build(None, batches)
        key = jax.random.key(args.seed)
        out: dict[str, list] = {"ray": [], "threads": [], "sync": []}
        bytes_per_step: dict[str, list[float]] = {}
        with RayExecutor(stages, states, batches[0], cfg, Options(queue_size=4, injected=injected), key=key) as ex:
            for _ in range(args.repeats):
                seg = ex.run(batches, free, states)
                out["ray"].append(rates(seg.records))
                bytes_per_step["float32"] = [r["bytes_sent"] / max(r["updates"], 1) for r in seg.records]
                for name, lockstep in (("threads", False), ("sync", True)):
                    res = A.run_threaded(stages, states, batches, cfg, num_updates=args.updates if lockstep else free,
                                         lockstep=lockstep, queue_size=4, key=key, injected=injected)  # fmt: skip
                    out[name].append((res.updates / res.stage_s).tolist())
        vq_stages, vq_states = build(args.codec, batches)
        with RayExecutor(vq_stages, vq_states, batches[0], cfg, Options(queue_size=4), key=key) as ex:
            seg = ex.run(batches, [10, None, None], vq_states)
            bytes_per_step[args.codec] = [r["bytes_sent"] / max(r["updates"], 1) for r in seg.records]
    finally:
        ray.shutdown()
    med = {name: [statistics.median(r[j] for r in runs) for j in range(k)] for name, runs in out.items()}
    result = {
        **provenance.provenance(),
        "seeds": [args.seed],
        "ray_version": ray.__version__,
        "setup": {
            "model": "small_cnn, 3 stages, linear heads",
            "dataset": "digits",
            "batch_size": b,
            "buffer_capacity": 1,
            "queue_size": 4,
            "updates_stage0": args.updates,
            "repeats": args.repeats,
            **injected._asdict(),
        },
        "updates_per_s": {"median": med, "runs": out},
        "ratio_vs_sync": {
            name: [a / s for a, s in zip(med[name], med["sync"], strict=True)] for name in ("ray", "threads")
        },
        "bytes_per_step": bytes_per_step,
        "bytes_ratio_vq": [
            (v / f if f else None) for v, f in zip(bytes_per_step[args.codec], bytes_per_step["float32"], strict=True)
        ],
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    files.write_json(args.out, result)
    print({k_: result[k_] for k_ in ("updates_per_s", "ratio_vs_sync", "bytes_per_step")})
    return result


if __name__ == "__main__":
    main()
