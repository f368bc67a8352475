"""Nearest-centroid search of :func:`dgl_jax.vq.encode`: one block against row blocks, side by side.

    python benchmarks/vq_search.py             # the converged VQ sweep's boundary shapes, its codebook sizes
    python benchmarks/vq_search.py --tiny      # seconds; used by the tests

``encode`` computes the scores ``[G, rows, K]`` of a block of rows and their argmin. With one block (every row at
once) the scores of a boundary ``[128, 28, 28, 32]`` at ``K = 256`` are 200 MB; on CPU ``encode`` uses blocks of
:func:`dgl_jax.vq.block_rows` rows instead. Per (shape, codec), both variants are jitted once and timed
alternately (medians over ``--repeats``); the JSON holds the times, the speed-up (one block's median over the
blocks' median) and whether both gave the same codes.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, summarize, time_alternating, write_json  # noqa: E402

from dgl_jax import vq  # noqa: E402

SHAPES = "128x28x28x32,128x14x14x64"  # the converged sweep's boundaries (cnn4 x0.5 on Fashion-MNIST, batch 128)
CODECS = "256:16,64:16,128:8,64:8"  # K:d


def nearest(state: vq.VQState, x: jax.Array, one_block: bool) -> jax.Array:
    """The nearest-centroid search of :func:`dgl_jax.vq.encode` on ``x``, with every row in one block or in
    blocks of :func:`dgl_jax.vq.block_rows` rows."""
    flat = vq._flatten(state, x)
    return vq._nearest(state, flat, rows=flat.shape[0] if one_block else None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES, help="boundary shapes BxHxWxC, comma-separated")
    p.add_argument("--codecs", default=CODECS, help="K:d pairs, comma-separated")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--tiny", action="store_true", help="one small shape and codec, 3 repeats")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "vq_search.json"))
    args = p.parse_args(argv)
    if args.tiny:
        args.shapes, args.codecs, args.repeats = "8x24x24x16", "64:8", 3
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        pairs = [tuple(int(v) for v in c.split(":")) for c in args.codecs.split(",")]
        if any(len(s) != 4 for s in shapes) or any(len(c) != 2 for c in pairs) or args.repeats < 1:
            raise ValueError
    except ValueError:
        p.error(f"--shapes BxHxWxC,... and --codecs K:d,... and --repeats >= 1, got {args.shapes!r} {args.codecs!r}")
    rows = []
    for shape in shapes:
        for k, d in pairs:
            if shape[-1] % d:
                p.error(f"code dim {d} does not divide the {shape[-1]} channels of {shape}")
            x = jax.random.normal(jax.random.key(1), shape)
            state = vq.init_from_data(vq.init(k, d, shape[-1] // d, key=jax.random.key(0)), x, key=jax.random.key(2))
            fns = {n: jax.jit(functools.partial(nearest, one_block=n == "one_block")) for n in ("one_block", "blocks")}
            same = bool(np.array_equal(np.asarray(fns["one_block"](state, x)), np.asarray(fns["blocks"](state, x))))
            times = time_alternating({n: (lambda f=f, s=state, x=x: f(s, x)) for n, f in fns.items()}, args.repeats, 1)
            row = {"shape": list(shape), "num_codes": k, "code_dim": d, "same_codes": same,
                   "block_rows": vq.block_rows(int(np.prod(shape[:-1])), shape[-1] // d, k),
                   **{n: summarize(t) for n, t in times.items()}}  # fmt: skip
            row["speedup"] = row["one_block"]["median_s"] / row["blocks"]["median_s"]
            rows.append(row)
            print(f"{shape} K={k} d={d}: one block {row['one_block']['median_s']:.4f} s, "
                  f"blocks of {row['block_rows']} rows {row['blocks']['median_s']:.4f} s, x{row['speedup']:.2f}, "
                  f"same codes: {same}", flush=True)  # fmt: skip
    result = {"benchmark": "vq_search", "block_scores": vq.BLOCK_SCORES, "rows": rows, "machine": machine(),
              "seeds": {"codebook": 0, "features": 1, "seeding": 2}, "repeats": args.repeats}  # fmt: skip
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
