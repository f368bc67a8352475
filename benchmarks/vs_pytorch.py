"""dgl_jax's ``dgl_step`` / ``backprop_step`` vs the same model and step written in PyTorch, on one machine.

    pip install torch==2.13.0          # optional, benchmark-only dependency
    python benchmarks/vs_pytorch.py    # the 4-stage paper CNN (64-128-128-256, mlp-sr heads), 32x32x1, batch 128
    python benchmarks/vs_pytorch.py --tiny

Variants: PyTorch eager (NCHW), eager channels_last, ``torch.compile`` (one compiled function per stage
update), dgl_jax (jitted, states donated), and dgl_jax with other convolutions (``--jax-convs``):
``jax_direct_*`` without Winograd (the library's direct convolutions only) and ``jax_xla_*`` with XLA's own
convolutions and gradients. Every repeat runs every variant once, alternating, so machine noise hits all
alike; medians and quartiles go to JSON and the JAX/PyTorch ratios are printed last. By default the process
first calls ``dgl_jax.host.keep_freed_memory()``, as ``python -m dgl_jax train`` does; it applies to both
frameworks (``--malloc default`` leaves glibc's settings).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CONV_VARIANTS, conv_variant, machine, paper_step, summarize, time_alternating, time_call, write_json  # noqa: E402

from dgl_jax.host import keep_freed_memory  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# PyTorch side: the same architecture as dgl_jax.models.cifar_cnn with mlp_sr heads
# ----------------------------------------------------------------------------------------------------------
def torch_model(widths, downsample_at, in_ch, num_classes, last_head_depth):
    import torch.nn as nn

    def conv_unit(cin, cout, pool):
        layers = [nn.MaxPool2d(2)] if pool else []
        return nn.Sequential(*layers, nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class MLPSR(nn.Module):
        def __init__(self, c, size):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(math.ceil(size / 4))
            self.convs = nn.Sequential(
                *[m for _ in range(3) for m in (nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())]
            )
            self.pool2 = nn.AdaptiveAvgPool2d(2)
            self.mlp = nn.Sequential(
                *[m for _ in range(3) for m in (nn.Linear(4 * c, 4 * c, bias=False), nn.BatchNorm1d(4 * c), nn.ReLU())],
                nn.Linear(4 * c, num_classes),
            )

        def forward(self, x):
            return self.mlp(self.pool2(self.convs(self.pool(x))).flatten(1))

    class MLPHead(nn.Module):
        def __init__(self, c, depth):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.mlp = nn.Sequential(
                *[
                    m
                    for _ in range(depth)
                    for m in (nn.Linear(4 * c, 4 * c, bias=False), nn.BatchNorm1d(4 * c), nn.ReLU())
                ],
                nn.Linear(4 * c, num_classes),
            )

        def forward(self, x):
            return self.mlp(self.pool(x).flatten(1))

    return conv_unit, MLPSR, MLPHead


def torch_stages(args, method, channels_last):
    """The PyTorch stages (``ModuleDict`` of block ``b`` and head ``h``; backprop: last head only), one SGD
    optimizer per stage, and a random batch ``(x, y)`` in the chosen memory format."""
    import torch

    torch.manual_seed(0)
    widths, down = (64, 128, 128, 256), (1, 3)
    conv_unit, MLPSR, MLPHead = torch_model(widths, down, args.channels, 10, 2)
    blocks, heads, size, cin = [], [], args.size, args.channels
    for i, w in enumerate(widths):
        size = size // 2 if i in down else size
        blocks.append(conv_unit(cin, w, i in down))
        last = i == len(widths) - 1
        heads.append(MLPHead(w, 2) if last else (MLPSR(w, size) if method == "dgl" else None))
        cin = w
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    mods = [
        torch.nn.ModuleDict({"b": b, **({"h": h} if h is not None else {})}) for b, h in zip(blocks, heads, strict=True)
    ]
    mods = [m.to(memory_format=fmt) for m in mods]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in mods]
    x = torch.randn(args.batch, args.channels, args.size, args.size).to(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,))
    return mods, opts, x, y


def torch_local_update(m, opt, h, y):
    """One DGL local update in PyTorch of stage ``m`` (``ModuleDict`` of block ``b`` and head ``h``) on input
    ``h``: forward, cross-entropy of the head, backward, optimizer step; returns the detached block output."""
    import torch

    out = m["b"](h)
    loss = torch.nn.functional.cross_entropy(m["h"](out), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return out.detach()


def build_torch(args, method, channels_last, compiled):
    import torch

    if compiled:
        # Dynamo compiles ``SGD.step`` once per optimizer object: with one optimizer per stage and variant the
        # default limit (8) is hit and the later stages' steps would silently fall back to eager.
        torch._dynamo.config.recompile_limit = 64
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 256)
    mods, opts, x, y = torch_stages(args, method, channels_last)
    ce = torch.nn.functional.cross_entropy

    if method == "dgl":
        fns = [lambda h, m=m, o=o: torch_local_update(m, o, h, y) for m, o in zip(mods, opts, strict=True)]
        if compiled:
            fns = [torch.compile(f) for f in fns]

        def step():
            h = x
            for f in fns:
                h = f(h)
            return h

    else:

        def full(h):
            for m in mods:
                h = m["b"](h)
            loss = ce(mods[-1]["h"](h), y)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            return loss.detach()

        fn = torch.compile(full) if compiled else full
        step = functools.partial(fn, x)
    return step


# ----------------------------------------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------------------------------------
def build_jax(args, method, conv="dgl_jax"):
    with conv_variant(conv):
        jitted, states, x, y = paper_step(
            method, dtype=args.dtype, batch=args.batch, size=args.size, channels=args.channels
        )
        holder = {"states": states}

        def step():
            holder["states"], metrics = jitted(holder["states"], x, y)
            return metrics

        time_call(step)  # traced and compiled here, inside the context
    return step


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (slow to build)")
    p.add_argument(
        "--jax-convs",
        type=lambda t: [c for c in t.split(",") if c],
        default=["direct", "xla"],
        help=f"extra dgl_jax variants built with other convolutions, comma-separated: {list(CONV_VARIANTS)[1:]}",
    )
    p.add_argument(
        "--malloc",
        choices=["keep", "default"],
        default="keep",
        help="keep: dgl_jax.host.keep_freed_memory() first, as the CLI does (both frameworks share the process)",
    )
    p.add_argument("--out", default="benchmarks/results/vs_pytorch.json")
    p.add_argument("--tiny", action="store_true", help="batch 4, 8x8 inputs, 2 repeats, no torch.compile")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.size, args.repeats, args.warmup, args.no_compile = 4, 8, 2, 1, True
    unknown = [c for c in args.jax_convs if c not in CONV_VARIANTS]
    if unknown:
        p.error(f"unknown --jax-convs {unknown}; expected some of {list(CONV_VARIANTS)}")
    malloc_kept = args.malloc == "keep" and keep_freed_memory()
    import torch

    torch.set_num_threads(max(1, __import__("os").cpu_count() or 1))
    variants = {}
    for method in ("dgl", "backprop"):
        variants[f"torch_eager_{method}"] = build_torch(args, method, False, False)
        variants[f"torch_channels_last_{method}"] = build_torch(args, method, True, False)
        if not args.no_compile:
            variants[f"torch_compile_{method}"] = build_torch(args, method, False, True)
        variants[f"jax_{method}"] = build_jax(args, method)
        for conv in args.jax_convs:
            variants[f"jax_{conv}_{method}"] = build_jax(args, method, conv)
    times = time_alternating(variants, args.repeats, args.warmup)
    result = {
        "benchmark": "vs_pytorch",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            **machine(malloc_kept),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "variants": {k: summarize(v) for k, v in times.items()},
    }
    ratios = {}
    for method in ("dgl", "backprop"):
        jax_t = result["variants"][f"jax_{method}"]["median_s"]
        for k, v in result["variants"].items():
            if k.startswith("torch") and k.endswith(method):
                ratios[f"jax_over_{k}"] = jax_t / v["median_s"]
        for conv in args.jax_convs:
            ratios[f"jax_over_jax_{conv}_{method}"] = jax_t / result["variants"][f"jax_{conv}_{method}"]["median_s"]
        best = min(v["median_s"] for k, v in result["variants"].items() if k.startswith("torch") and k.endswith(method))
        ratios[f"jax_over_best_torch_{method}"] = jax_t / best
    result["ratios"] = ratios
    write_json(args.out, result)
    for k, v in result["variants"].items():
        print(f"{k:28s} median {v['median_s'] * 1e3:8.1f} ms  (q1 {v['q1_s'] * 1e3:.1f}, q3 {v['q3_s'] * 1e3:.1f})")
    for k, v in ratios.items():
        print(f"{k:40s} {v:.3f}")
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
