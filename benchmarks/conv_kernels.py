"""Where does the JAX/PyTorch gap of the DGL step come from? The 3x3 convolutions of the paper CNN, alone.

    pip install torch==2.13.0              # optional, benchmark-only dependency
    python benchmarks/conv_kernels.py      # the 4 conv layers of cnn4 at 32x32x1 input, batch 128
    python benchmarks/conv_kernels.py --tiny

For every 3x3 convolution of ``cnn4`` (input ``[batch, H, W, C_in]`` -> ``C_out``, 'SAME' padding, no bias)
this times, for the loss ``sum(y**2)``, the forward pass alone (``forward``: evaluation), forward + kernel
gradient (``dgl``: what a DGL block's convolution needs, its input being a constant) and forward + input and
kernel gradients (``backprop``), in:

- ``xla_nhwc`` / ``xla_nchw``: ``lax.conv_general_dilated`` with XLA's own gradient;
- ``xla_im2col``: the same convolution as patches ``[batch, H, W, 9 C_in]`` times a ``[9 C_in, C_out]`` matrix;
- ``direct``: ``dgl_jax.conv.direct_conv`` (XLA's forward, input gradient as a convolution, kernel gradient
  as matmuls on CPU);
- ``winograd2`` / ``winograd4``: ``dgl_jax.conv.winograd_conv`` with F(2x2,3x3) / F(4x4,3x3);
- ``dgl_jax``: ``dgl_jax.conv.conv_general_dilated``, i.e. the algorithm the library picks
  (``dgl_jax.conv.conv_algorithm``, recorded per layer);
- ``torch_nchw`` / ``torch_channels_last``: PyTorch eager;

plus XLA's own forward, input-gradient and kernel-gradient convolutions timed alone. All variants alternate
within each repeat; medians go to JSON with the achieved GFLOP/s (direct-convolution FLOPs: 2 x the forward
MACs per pass, 1 pass for ``forward`` and for a part timed alone, 2 for ``dgl``, 3 for ``backprop``;
Winograd does fewer) and each variant's ratio to the best PyTorch layout. Without torch only JAX is timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import machine, summarize, time_alternating, write_json  # noqa: E402

from dgl_jax import conv  # noqa: E402

# (H=W, C_in, C_out) of the convolutions of cnn4 (64-128-128-256, max-pool before layers 2 and 4) at 32x32x1
CNN4_LAYERS = [(32, 1, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256)]
XLA_PARTS = ("forward", "input_grad", "kernel_grad")  # xla_nhwc's three convolutions, timed one by one
MODES = {"forward": (), "dgl": (1,), "backprop": (0, 1)}  # gradients taken: none / the kernel's / both
PASSES = {"forward": 1, "dgl": 2, "backprop": 3}
SAME = ((1, 1), (1, 1))


def im2col_conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """3x3 'SAME' convolution as one matmul: ``x`` [batch, H, W, C_in], ``w`` [3, 3, C_in, C_out] ->
    [batch, H, W, C_out] through patches [batch, H, W, 9 * C_in]."""
    _, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, i : i + h, j : j + wd, :] for i in range(3) for j in range(3)], axis=-1)
    return jnp.dot(patches, w.reshape(-1, w.shape[-1]))


def _lax(layout: str):
    return lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=(layout, "HWIO", layout))


JAX_VARIANTS = {
    "xla_nhwc": _lax("NHWC"),
    "xla_nchw": _lax("NCHW"),
    "xla_im2col": im2col_conv3x3,
    "direct": lambda x, w: conv.direct_conv(x, w, SAME),
    "winograd2": lambda x, w: conv.winograd_conv(x, w, SAME, 2),
    "winograd4": lambda x, w: conv.winograd_conv(x, w, SAME, 4),
    "dgl_jax": lambda x, w: conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=conv._NHWC),
}


def operands(batch: int, size: int, cin: int, cout: int, layout: str = "NHWC"):
    rng = np.random.default_rng(0)
    shape = (batch, cin, size, size) if layout == "NCHW" else (batch, size, size, cin)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.1, jnp.float32)
    return x, w


def jax_conv(batch: int, size: int, cin: int, cout: int, variant: str, mode: str):
    """A jitted ``() -> gradients`` of ``sum(y**2)`` for one conv layer (``variant`` of :data:`JAX_VARIANTS`)
    on fixed random data: w.r.t. the kernel (``mode='dgl'``) or the input and the kernel (``'backprop'``)."""
    x, w = operands(batch, size, cin, cout, "NCHW" if variant == "xla_nchw" else "NHWC")
    f = JAX_VARIANTS[variant]
    loss = lambda x, w: jnp.sum(f(x, w) ** 2)  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=MODES[mode]) if MODES[mode] else loss)
    jax.block_until_ready(grad(x, w))
    return lambda: grad(x, w)


def xla_part(batch: int, size: int, cin: int, cout: int, part: str):
    """A jitted call of one part of XLA's own NHWC convolution and its gradient (``part``: ``forward``,
    ``input_grad`` or ``kernel_grad``, each the single convolution XLA runs for it) on fixed random data."""
    x, w = operands(batch, size, cin, cout)
    dy = jnp.asarray(np.random.default_rng(1).standard_normal((batch, size, size, cout)), jnp.float32)

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


def torch_conv(batch: int, size: int, cin: int, cout: int, channels_last: bool, mode: str):
    import torch

    x = torch.randn(batch, cin, size, size)
    layer = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    if channels_last:
        x, layer = x.to(memory_format=torch.channels_last), layer.to(memory_format=torch.channels_last)
    x.requires_grad_(mode == "backprop")

    def run():
        if mode == "forward":
            with torch.no_grad():
                return (layer(x) ** 2).sum()
        x.grad = None
        layer.weight.grad = None
        (layer(x) ** 2).sum().backward()
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
        layers = [(4, 8, 16)]
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
        fns = {f"{v}_{mode}": jax_conv(args.batch, size, cin, cout, v, mode) for mode in MODES for v in JAX_VARIANTS}
        fns.update({f"xla_{part}": xla_part(args.batch, size, cin, cout, part) for part in XLA_PARTS})
        if have_torch:
            for mode in MODES:
                for name, cl in (("torch_nchw", False), ("torch_channels_last", True)):
                    fns[f"{name}_{mode}"] = torch_conv(args.batch, size, cin, cout, cl, mode)
        times = time_alternating(fns, args.repeats, args.warmup)
        pass_flops = 2 * args.batch * size * size * cin * cout * 9
        algorithm = conv.conv_algorithm((args.batch, size, size, cin), (3, 3, cin, cout), jnp.float32, SAME)
        entry = {"shape": {"H": size, "W": size, "C_in": cin, "C_out": cout}, "dgl_jax_algorithm": algorithm}
        for k, ts in times.items():
            passes = next((PASSES[m] for m in MODES if k.endswith(f"_{m}")), 1)
            entry[k] = {**summarize(ts), "gflop_per_s": passes * pass_flops / 1e9 / summarize(ts)["median_s"]}
        if have_torch:
            for mode in MODES:
                best = min(entry[f"torch_nchw_{mode}"]["median_s"], entry[f"torch_channels_last_{mode}"]["median_s"])
                entry[f"over_best_torch_{mode}"] = {v: entry[f"{v}_{mode}"]["median_s"] / best for v in JAX_VARIANTS}
        result["layers"].append(entry)
        print(f"{size}x{size} {cin:>3d}->{cout:<3d} (dgl_jax: {algorithm[0]} {algorithm[1] or ''}):", flush=True)
        for k in times:
            print(
                f"    {k:28s} {entry[k]['median_s'] * 1e3:8.1f} ms  {entry[k]['gflop_per_s']:6.0f} GFLOP/s", flush=True
            )
    timed = [k for k, v in result["layers"][0].items() if isinstance(v, dict) and "median_s" in v]
    total = {k: sum(e[k]["median_s"] for e in result["layers"]) for k in timed}
    result["total_median_s"] = total
    if have_torch:
        result["total_over_best_torch"] = {}
        for mode in MODES:
            best = min(total[f"torch_nchw_{mode}"], total[f"torch_channels_last_{mode}"])
            result["total_over_best_torch"][mode] = {v: total[f"{v}_{mode}"] / best for v in JAX_VARIANTS}
            ratios = ", ".join(f"{v} {r:.2f}" for v, r in result["total_over_best_torch"][mode].items())
            print(f"all layers, {mode}, time / best PyTorch layout: {ratios}")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
