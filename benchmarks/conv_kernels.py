"""Where does the JAX/PyTorch gap of the DGL step come from? The 3x3 convolutions of the paper CNN, alone.

    pip install torch==2.13.0              # optional, benchmark-only dependency
    python benchmarks/conv_kernels.py      # the 4 conv layers of cnn4 at 32x32x1 input, batch 128
    python benchmarks/conv_kernels.py --tiny

For every 3x3 convolution of ``cnn4`` (input ``[batch, H, W, C_in]`` -> ``C_out``, 'SAME' padding, no bias)
this times forward + backward (gradients of ``sum(y**2)`` w.r.t. input and kernel) in: XLA via ``jax.jit`` of
``lax.conv_general_dilated`` with its own gradient (NHWC/HWIO and NCHW), of the same convolution written as
im2col (patches ``[batch, H, W, 9 C_in]`` times a ``[9 C_in, C_out]`` matrix), of
``dgl_jax.layers.conv_general_dilated`` (what the library's layers use: XLA's forward convolution, the input
gradient as a convolution, the kernel gradient as 9 matmuls on CPU), and PyTorch eager in NCHW and
channels_last; plus XLA's forward, input-gradient and kernel-gradient convolutions timed alone. All variants
alternate within each repeat; medians go to JSON with the achieved GFLOP/s (3 x the forward MACs x 2 / time,
one third of that for a part timed alone) and the XLA/PyTorch ratio per layer. Without torch only XLA is timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import machine, summarize, time_call, write_json  # noqa: E402

from dgl_jax.layers import conv_general_dilated  # noqa: E402

# (H=W, C_in, C_out) of the convolutions of cnn4 (64-128-128-256, max-pool before layers 2 and 4) at 32x32x1
CNN4_LAYERS = [(32, 1, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256)]
XLA_PARTS = ("forward", "input_grad", "kernel_grad")  # xla_nhwc's three convolutions, timed one by one


def im2col_conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """3x3 'SAME' convolution as one matmul: ``x`` [batch, H, W, C_in], ``w`` [3, 3, C_in, C_out] ->
    [batch, H, W, C_out] through patches [batch, H, W, 9 * C_in]."""
    _, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, i : i + h, j : j + wd, :] for i in range(3) for j in range(3)], axis=-1)
    return jnp.dot(patches, w.reshape(-1, w.shape[-1]))


def jax_conv(batch: int, size: int, cin: int, cout: int, layout: str = "NHWC"):
    """A jitted ``() -> (dx, dw)`` for one conv layer on fixed random data (``layout``: NHWC, NCHW,
    ``im2col``: NHWC written as patches times a matrix, or ``dgl_jax``: NHWC through
    ``dgl_jax.layers.conv_general_dilated``, the library's convolution with its own gradient)."""
    shape = (batch, cin, size, size) if layout == "NCHW" else (batch, size, size, cin)
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.1

    def loss(x, w):
        if layout == "im2col":
            return jnp.sum(im2col_conv3x3(x, w) ** 2)
        if layout == "dgl_jax":
            y = conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jnp.sum(y**2)
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=(layout, "HWIO", layout))
        return jnp.sum(y**2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(grad(x, w))
    return lambda: grad(x, w)


def xla_part(batch: int, size: int, cin: int, cout: int, part: str):
    """A jitted call of one part of XLA's own NHWC convolution and its gradient (``part``: ``forward``,
    ``input_grad`` or ``kernel_grad``, each the single convolution XLA runs for it) on fixed random data."""
    x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.1
    dy = jax.random.normal(jax.random.key(2), (batch, size, size, cout))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fn = {
        "forward": lambda x, w, dy: conv(x, w),
        "input_grad": lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0],
        "kernel_grad": lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0],
    }[part]
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(x, w, dy))
    return lambda: jitted(x, w, dy)


def torch_conv(batch: int, size: int, cin: int, cout: int, channels_last: bool):
    import torch

    x = torch.randn(batch, cin, size, size)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    if channels_last:
        x, conv = x.to(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def run():
        x.grad = None
        conv.weight.grad = None
        (conv(x) ** 2).sum().backward()
        return None

    run()
    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/conv_kernels.json")
    p.add_argument("--tiny", action="store_true", help="small batch and few repeats: checks the script runs")
    args = p.parse_args(argv)
    layers = CNN4_LAYERS
    if args.tiny:
        args.batch, args.repeats, args.warmup = 4, 2, 1
        layers = [(8, 1, 8), (4, 8, 16)]
    try:
        import torch

        torch.manual_seed(0)
        have_torch = True
    except ImportError:
        have_torch = False
    result = {
        "benchmark": "conv_kernels",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine(),
        "torch": torch.__version__ if have_torch else None,
        "layers": [],
    }
    for size, cin, cout in layers:
        fns = {
            "xla_nhwc": jax_conv(args.batch, size, cin, cout),
            "xla_nchw": jax_conv(args.batch, size, cin, cout, "NCHW"),
            "xla_im2col": jax_conv(args.batch, size, cin, cout, "im2col"),
            "dgl_jax": jax_conv(args.batch, size, cin, cout, "dgl_jax"),
            **{f"xla_{part}": xla_part(args.batch, size, cin, cout, part) for part in XLA_PARTS},
        }
        if have_torch:
            fns["torch_nchw"] = torch_conv(args.batch, size, cin, cout, channels_last=False)
            fns["torch_channels_last"] = torch_conv(args.batch, size, cin, cout, channels_last=True)
        times = {k: [] for k in fns}
        for r in range(args.warmup + args.repeats):
            for k, fn in fns.items():
                t = time_call(fn)
                if r >= args.warmup:
                    times[k].append(t)
        flops = 3 * 2 * args.batch * size * size * cin * cout * 9
        entry = {"shape": {"H": size, "W": size, "C_in": cin, "C_out": cout}, "gflop": flops / 1e9}
        for k, ts in times.items():
            s = summarize(ts)
            part_flops = flops / 3 if k.removeprefix("xla_") in XLA_PARTS else flops
            entry[k] = {**s, "gflop_per_s": part_flops / 1e9 / s["median_s"]}
        if have_torch:
            best = min(entry["torch_nchw"]["median_s"], entry["torch_channels_last"]["median_s"])
            entry["xla_over_best_torch"] = entry["xla_nhwc"]["median_s"] / best
            entry["dgl_jax_over_best_torch"] = entry["dgl_jax"]["median_s"] / best
        result["layers"].append(entry)
        line = f"{size}x{size} {cin:>3d}->{cout:<3d}: " + ", ".join(
            f"{k} {entry[k]['median_s'] * 1e3:.1f} ms ({entry[k]['gflop_per_s']:.0f} GFLOP/s)" for k in times
        )
        print(line, flush=True)
    total = {
        k: sum(e[k]["median_s"] for e in result["layers"])
        for k in result["layers"][0]
        if isinstance(result["layers"][0][k], dict) and "median_s" in result["layers"][0][k]
    }
    result["total_median_s"] = total
    if have_torch:
        best = min(total["torch_nchw"], total["torch_channels_last"])
        result["total_xla_over_best_torch"] = total["xla_nhwc"] / best
        result["total_dgl_jax_over_best_torch"] = total["dgl_jax"] / best
        print(f"all layers, XLA / best PyTorch layout: {result['total_xla_over_best_torch']:.3f}")
        print(f"all layers, dgl_jax / best PyTorch layout: {result['total_dgl_jax_over_best_torch']:.3f}")
    result["total_dgl_jax_over_xla"] = total["dgl_jax"] / total["xla_nhwc"]
    print(f"all layers, dgl_jax / XLA: {result['total_dgl_jax_over_xla']:.3f}")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
