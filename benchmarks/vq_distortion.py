"""Product VQ or residual VQ at the same bytes? Distortion of real boundary features per byte sent.

    python benchmarks/vq_distortion.py            # Fashion-MNIST, cnn4 x0.5, mlp-sr: 1 epoch, then the codecs
    python benchmarks/vq_distortion.py --tiny     # digits, seconds; used by the tests

A screening step before a converged accuracy cell: it ranks codecs (and a codec's options) by how well they
reconstruct the features a trained network sends, at what each codec's wire costs. Steps:

1. float32 DGL trains the sweep's recipe (``python -m dgl_jax sweep``'s model, heads and optimizer) for
   ``--train-steps`` steps with ``--train-seed``; the network is then frozen;
2. per codec seed, every codec (``--codecs``, :func:`dgl_jax.codecs.parse_codec` specs) encodes the train-mode
   messages of every boundary for ``--codec-steps`` batches of the training set, online (its EMA k-means
   learns as it does in training), keyed by the seed;
3. on ``--eval-batches`` test batches, with the codec states frozen, the relative squared error
   ``sum ||x - decode(encode(x))||^2 / sum ||x||^2`` per boundary.

Resumable codec by codec (a grid of :mod:`dgl_jax.cells`, one cell per codec, with its commit and machine):
the JSON is rewritten after each codec (``complete`` false until the last), and the
trained network is kept next to it (``<out>.states``, git-ignored), so a re-run with the same settings skips
the training and the codecs already measured; codecs added to ``--codecs`` are measured on the same network.
Other settings in an existing ``--out`` stop the run with one line.

Bytes are the ``nbytes`` of one step's wires over all boundaries (:func:`dgl_jax.codecs.wire_bytes`: packed codes
plus the codebook on every send); ``ratio`` is float32's bytes over the codec's. Distortion on a frozen network is
a proxy: in training the features adapt to the codec. The JSON holds, per codec, bytes, ratio and per-boundary
distortion per seed with its mean and std over seeds.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine  # noqa: E402

from dgl_jax import cells, codecs, provenance  # noqa: E402
from dgl_jax.config import TrainConfig, build_stages, validate_config  # noqa: E402
from dgl_jax.data import load_dataset  # noqa: E402
from dgl_jax.files import write_atomic  # noqa: E402
from dgl_jax.stage import init_stage_states  # noqa: E402
from dgl_jax.steps import dgl_step  # noqa: E402
from dgl_jax.vq_train import message_features  # noqa: E402

# Pairs at equal code bits per pixel group: product VQ (one level, K codes) against residual VQ (L levels of
# K**(1/L) codes), at code dim 8 and 16; then vq-packed:256:16's options one at a time: k-means++ seeding, a
# faster EMA, no dead-code restarts.
CODECS = (
    "vq-packed:64:8,vq-packed:8:8:levels=2,"
    "vq-packed:256:8,vq-packed:16:8:levels=2,vq-packed:4:8:levels=4,"
    "vq-packed:16:16,vq-packed:4:16:levels=2,"
    "vq-packed:256:16,vq-packed:16:16:levels=2,"
    "vq-packed:256:16:init=kmeans++,vq-packed:256:16:decay=0.9,vq-packed:256:16:restart=0"
)
TINY_CODECS = "vq-packed:16:4,vq-packed:4:4:levels=2"


def recipe(tiny: bool) -> TrainConfig:
    """The sweep's converged recipe (experiments/README.md), or a small digits one."""
    if tiny:
        config = TrainConfig(method="dgl", model="small_cnn", dataset="digits", batch_size=32, lr=0.05)
    else:
        config = TrainConfig(
            method="dgl", model="cnn4", model_options={"width_mult": 0.5}, head="mlp_sr",
            dataset="fashion_mnist", batch_size=128, lr=0.05,
        )  # fmt: skip
    validate_config(config)
    return config


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, count: int):
    """``count`` shuffled batches (epoch after epoch) as float32 device arrays."""
    rng = np.random.default_rng(seed)
    n = len(labels) // batch_size * batch_size
    done = 0
    while done < count:
        order = rng.permutation(len(labels))[:n].reshape(-1, batch_size)
        for idx in order[: count - done]:
            yield jnp.asarray(images[idx], jnp.float32), jnp.asarray(labels[idx], jnp.int32)
        done += min(len(order), count - done)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codecs", default=None, help="comma-separated codec specs (default: the product/residual pairs)")
    p.add_argument("--seeds", default="0,1,2", help="codec seeds (initialisation, restarts, batch order)")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=None, help="float32 DGL steps before freezing (default 1 epoch)")
    p.add_argument("--codec-steps", type=int, default=200, help="training batches each codec learns on")
    p.add_argument("--eval-batches", type=int, default=20, help="test batches the distortion is measured on")
    p.add_argument("--out", default="benchmarks/results/vq_distortion.json")
    p.add_argument("--tiny", action="store_true", help="digits, small_cnn, a few steps")
    args = p.parse_args(argv)
    seeds = [int(t) for t in args.seeds.split(",") if t.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        p.error(f"--seeds {args.seeds!r}: expected distinct integers")
    specs = [s.strip() for s in (args.codecs or (TINY_CODECS if args.tiny else CODECS)).split(",") if s.strip()]
    try:
        named = {c.name: c for c in map(codecs.parse_codec, specs)}
    except ValueError as e:
        p.error(str(e).splitlines()[0])
    config = recipe(args.tiny)
    data = load_dataset(config.dataset)
    steps_per_epoch = len(data.train_labels) // config.batch_size
    train_steps = steps_per_epoch if args.train_steps is None else args.train_steps
    if args.tiny:
        args.codec_steps, args.eval_batches = min(args.codec_steps, 8), min(args.eval_batches, 2)

    settings = {
        "config": {k: v for k, v in vars(config).items() if not k.startswith("_")},
        "train_seed": args.train_seed,
        "train_steps": train_steps,
        "seeds": seeds,
        "codec_steps": args.codec_steps,
        "eval_batches": min(args.eval_batches, len(data.test_labels) // config.batch_size),
    }
    out, states_path = Path(args.out), Path(args.out + ".states")
    try:
        stored = cells.open_grid(out, settings)
    except cells.GridError as e:
        p.error(str(e).splitlines()[0])

    stages = build_stages(config, data.num_classes, steps_per_epoch)
    x0 = jnp.zeros((config.batch_size, *data.image_shape), jnp.float32)
    states = init_stage_states(stages, jax.random.key(args.train_seed), x0)
    train_s = stored.get("train_seconds")
    if stored["cells"] and states_path.exists():  # the network this JSON's codecs were measured on
        states = serialization.from_bytes(states, states_path.read_bytes())
        print(f"float32 DGL: the trained network of {out} ({states_path})", flush=True)
    else:
        out.unlink(missing_ok=True)  # a new network: every codec is measured again
        step = jax.jit(lambda s, x, y, k: dgl_step(stages, s, x, y, k), donate_argnums=0)
        t0 = time.perf_counter()
        key = jax.random.key(args.train_seed)
        train = batches(data.train_images, data.train_labels, config.batch_size, args.train_seed, train_steps)
        for i, (x, y) in enumerate(train):
            states, metrics = step(states, x, y, jax.random.fold_in(key, i))
            if (i + 1) % 100 == 0 or i + 1 == train_steps:
                print(f"float32 DGL step {i + 1}/{train_steps}: loss {np.asarray(metrics['loss']).round(3)}",
                      flush=True)  # fmt: skip
        train_s = time.perf_counter() - t0
        states_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(states_path, serialization.to_bytes(jax.device_get(states)))
    feats = lambda x: message_features(stages, states, x)  # noqa: E731
    shapes = [tuple(f.shape) for f in jax.eval_shape(feats, x0)]
    float32_bytes = sum(int(np.prod(s)) * 4 for s in shapes)
    test = [
        jnp.asarray(data.test_images[i * config.batch_size : (i + 1) * config.batch_size], jnp.float32)
        for i in range(settings["eval_batches"])
    ]
    test_feats = [feats(x) for x in test]

    def measure(name: str, codec: codecs.Codec) -> dict:
        encode = jax.jit(codec.encode)
        decode = jax.jit(codec.decode)
        per_seed, wire_bytes = [], None
        for seed in seeds:
            cstates = [codec.init(jax.ShapeDtypeStruct(s, jnp.float32), jax.random.key(seed)) for s in shapes]
            stream = batches(data.train_images, data.train_labels, config.batch_size, 1000 + seed, args.codec_steps)
            for t, (x, _) in enumerate(stream):
                k = jax.random.fold_in(jax.random.key(seed), t)
                encoded = [
                    encode(c, f, jax.random.fold_in(k, j))
                    for j, (c, f) in enumerate(zip(cstates, feats(x), strict=True))
                ]
                cstates = [o[0] for o in encoded]
            err, norm = np.zeros(len(shapes)), np.zeros(len(shapes))
            for fs in test_feats:
                # the frozen codebooks' codes (the new states are dropped)
                wires = [encode(c, f, None)[1] for c, f in zip(cstates, fs, strict=True)]
                wire_bytes = sum(codecs.wire_bytes(w) for w in wires)  # the nbytes of one step's wires
                for j, (f, wire) in enumerate(zip(fs, wires, strict=True)):
                    err[j] += float(jnp.sum((f - decode(wire)) ** 2))
                    norm[j] += float(jnp.sum(f**2))
            per_seed.append((err / norm).tolist())
        d = np.asarray(per_seed)  # [seeds, boundaries]
        print(f"{name}: {wire_bytes} B/step ({float32_bytes / wire_bytes:.1f}x), distortion per boundary "
              f"{np.round(d.mean(0), 4).tolist()}", flush=True)  # fmt: skip
        return {
            "wire_bytes": int(wire_bytes),
            "ratio": float32_bytes / wire_bytes,
            "distortion": per_seed,
            "distortion_mean": d.mean(0).tolist(),
            "distortion_std": d.std(0, ddof=1).tolist() if len(seeds) > 1 else None,
            "distortion_all_mean": float(d.mean()),
        }

    header = {
        "benchmark": "vq_distortion",
        "command": provenance.command("python benchmarks/vq_distortion.py", argv if argv is not None else sys.argv[1:]),
        "seeds": seeds,
        "train_seconds": train_s,
        "boundary_shapes": [list(s) for s in shapes],
        "float32_bytes": float32_bytes,
        "machine": machine(),
    }
    grid_cells = [(name, functools.partial(measure, name, codec)) for name, codec in named.items()]
    complete = lambda grid: grid.update(complete=all(n in grid["cells"] for n in named))  # noqa: E731
    cells.run_grid(out, settings, grid_cells, header, derive=complete)
    print(f"wrote {out}")
    return json.loads(out.read_text())  # as written


if __name__ == "__main__":
    main()
