"""Where the time of one DGL step goes: every stage's parts timed alone, in dgl_jax and in PyTorch.

    python benchmarks/profile_step.py          # cnn4 (64-128-128-256), K=4, mlp-sr heads, 32x32x1, batch 128
    python benchmarks/profile_step.py --tiny   # seconds; used by the tests

For every stage ``k`` (input: the stage below's output on one random batch, computed once) each part is one
jitted function in dgl_jax and the same work in PyTorch eager channels_last (the fastest PyTorch DGL variant
of ``vs_pytorch.py``; skipped when torch is not installed):

- ``block_forward``: the block in training mode (BatchNorm batch statistics);
- ``block_backward``: forward + gradient of ``<block(x), r>`` w.r.t. the block's parameters;
- ``head``: forward + loss + gradients w.r.t. the head's parameters and its input;
- ``optimizer``: the stage's SGD update (momentum, weight decay) alone;
- ``local_update``: the whole local update (``dgl_jax.steps.stage_step`` / PyTorch's forward, backward, step);

plus the whole ``dgl_step``. Every repeat runs every part once, alternating; medians go to JSON with the
dgl_jax / PyTorch ratio of each part and each part's share of the dgl_jax step (parts fuse inside the jitted
step, so shares do not add up exactly). XLA:CPU's own per-op profile (``jax.profiler``) is not used: its
convolution and matmul thunks run asynchronously on the intra-op pool, so their trace events measure the
launch, not the work.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from common import machine, paper_stages, summarize, time_alternating, write_json  # noqa: E402

from dgl_jax import dgl_step  # noqa: E402
from dgl_jax.host import keep_freed_memory  # noqa: E402
from dgl_jax.steps import stage_step  # noqa: E402

PARTS = ("block_forward", "block_backward", "head", "optimizer", "local_update")


def jax_parts(stage, state, x: jax.Array, y: jax.Array) -> tuple[dict, jax.Array]:
    """``{part: () -> result}`` of one stage on input ``x`` and the stage's output (the next stage's input)."""
    params, stats = state.params, state.batch_stats

    def block(p, x):
        v = {"params": p, "batch_stats": stats.get("block", {})}
        return stage.block.apply(v, x, train=True, mutable=["batch_stats"])[0]

    def head_loss(p, h):
        v = {"params": p, "batch_stats": stats.get("head", {})}
        return stage.loss_fn(stage.head.apply(v, h, train=True, mutable=["batch_stats"])[0], y)

    def update(state, grads):
        updates, opt_state = stage.tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    h = jax.jit(block)(params["block"], x)
    r = jax.random.normal(jax.random.key(3), h.shape, h.dtype)
    fns = {
        "block_forward": (jax.jit(block), (params["block"], x)),
        "block_backward": (jax.jit(jax.grad(lambda p, x: jnp.vdot(block(p, x), r))), (params["block"], x)),
        "head": (jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1))), (params["head"], h)),
        "optimizer": (jax.jit(update), (state, params)),
        "local_update": (jax.jit(functools.partial(stage_step, stage)), (state, x, y)),
    }
    return {k: functools.partial(f, *a) for k, (f, a) in fns.items()}, h


def torch_parts(mod, opt, x, y) -> tuple[dict, object]:
    """The same parts in PyTorch for one stage (``mod``: ``ModuleDict`` of block ``b`` and head ``h``)."""
    import torch
    from vs_pytorch import torch_local_update

    ce = torch.nn.functional.cross_entropy
    h = mod["b"](x).detach()
    r = torch.randn_like(h)
    hin = h.clone().requires_grad_(True)

    def block_backward():
        opt.zero_grad(set_to_none=True)
        mod["b"](x).backward(r)

    def head():
        opt.zero_grad(set_to_none=True)
        hin.grad = None
        loss = ce(mod["h"](hin), y)
        loss.backward()
        return loss.detach()

    local_update = functools.partial(torch_local_update, mod, opt, x, y)

    local_update()  # gradients exist from here on, for the optimizer part

    def forward():
        return mod["b"](x)

    fns = {
        "block_forward": forward,
        "block_backward": block_backward,
        "head": head,
        "optimizer": opt.step,
        "local_update": local_update,
    }
    return fns, h


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-torch", action="store_true", help="time dgl_jax only")
    p.add_argument("--out", default="benchmarks/results/profile_step.json")
    p.add_argument("--tiny", action="store_true", help="batch 4, 8x8 inputs, 2 repeats")
    args = p.parse_args(argv)
    malloc_kept = keep_freed_memory()  # as python -m dgl_jax train does
    if args.tiny:
        args.batch, args.size, args.repeats, args.warmup = 4, 8, 2, 1
    try:
        import torch
    except ImportError:
        torch = None
    use_torch = torch is not None and not args.no_torch

    stages, states, x, y = paper_stages("dgl", batch=args.batch, size=args.size, channels=args.channels)
    fns, h = {}, x
    for k, (stage, state) in enumerate(zip(stages, states, strict=True)):
        parts, h = jax_parts(stage, state, h, y)
        fns.update({("jax", k, part): fn for part, fn in parts.items()})
    fns[("jax", "all", "dgl_step")] = functools.partial(jax.jit(functools.partial(dgl_step, stages)), states, x, y)
    if use_torch:
        from vs_pytorch import build_torch, torch_stages

        torch.set_num_threads(max(1, __import__("os").cpu_count() or 1))
        mods, opts, tx, ty = torch_stages(args, "dgl", channels_last=True)
        h = tx
        for k, (mod, opt) in enumerate(zip(mods, opts, strict=True)):
            parts, h = torch_parts(mod, opt, h, ty)
            fns.update({("torch", k, part): fn for part, fn in parts.items()})
        fns[("torch", "all", "dgl_step")] = build_torch(args, "dgl", channels_last=True, compiled=False)

    times = time_alternating(fns, args.repeats, args.warmup)
    med = {key: summarize(v) for key, v in times.items()}
    step_s = med[("jax", "all", "dgl_step")]["median_s"]
    rows = []
    for k in [*range(len(stages)), "all"]:
        for part in PARTS if k != "all" else ("dgl_step",):
            row = {"stage": k, "part": part, "jax": med[("jax", k, part)]}
            row["share_of_jax_step"] = row["jax"]["median_s"] / step_s
            if use_torch:
                row["torch_channels_last"] = med[("torch", k, part)]
                row["jax_over_torch"] = row["jax"]["median_s"] / row["torch_channels_last"]["median_s"]
            rows.append(row)
    totals = {}
    for part in PARTS:
        sel = [r for r in rows if r["part"] == part]
        totals[part] = {"jax_s": sum(r["jax"]["median_s"] for r in sel)}
        if use_torch:
            totals[part]["torch_s"] = sum(r["torch_channels_last"]["median_s"] for r in sel)
            totals[part]["jax_over_torch"] = totals[part]["jax_s"] / totals[part]["torch_s"]
    result = {
        "benchmark": "profile_step",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {**machine(malloc_kept), **({"torch": torch.__version__} if use_torch else {})},
        "rows": rows,
        "totals_over_stages": totals,
    }
    write_json(args.out, result)
    header = f"{'stage':>5s} {'part':15s} {'dgl_jax ms':>10s} {'share':>6s}"
    print(header + ("  torch ms  jax/torch" if use_torch else ""))
    for r in rows:
        line = f"{r['stage']!s:>5s} {r['part']:15s} {r['jax']['median_s'] * 1e3:10.1f} {r['share_of_jax_step']:6.2f}"
        if use_torch:
            line += f"  {r['torch_channels_last']['median_s'] * 1e3:8.1f}  {r['jax_over_torch']:9.2f}"
        print(line)
    for part, t in totals.items():
        extra = f"  torch {t['torch_s'] * 1e3:.1f} ms  jax/torch {t['jax_over_torch']:.2f}" if use_torch else ""
        print(f"sum over stages {part:15s} dgl_jax {t['jax_s'] * 1e3:.1f} ms{extra}")
    return result


if __name__ == "__main__":
    main()
