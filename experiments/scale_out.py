"""Scale-out model: step time, speed-up and time-to-accuracy of DGL and backprop schemes on K devices over
real links, predicted from a measured per-stage profile, and validated against the threaded executor on fake
CPU devices with injected stage times, link delays and emulated link bandwidth (resumable).

    python experiments/scale_out.py            # profile cnn4 (width 0.5, 1) and VGG-19, validate (~20 min here)
    python experiments/scale_out.py --tiny     # small_cnn, 2 validation cells (one with bandwidth; used by the tests)

**Inputs (measured here, each model one cell).** Batch 128 of 32x32x3 (VGG-19: 32), SGD. For every trunk
unit (conv layer) ``i`` of the model alone (one stage per unit, its auxiliary head; the last unit: the classifier):
``fwd[i]`` (block forward), ``head[i]`` (the head's forward + gradients) and ``lu[i]`` (the whole local update,
``stage_step``), parts timed as ``benchmarks/profile_step.py`` does. The DGL cost of a contiguous stage
``[a, b)`` is ``sum(lu[i] - head[i] for i in [a, b)) + head[b-1]``; the best split per K minimises the
slowest stage. For that split the stages' real ``stage_step`` and block forward are then measured (the
inputs of the model) with the bytes of their wires (``accounting.nbytes`` of the identity and of the
``vq-packed:256:16`` codec's wire, plus the int32 labels). Backprop: ``backprop_step`` of the same model
on one device (``t_bp``), its gradient bytes (``nbytes`` of the parameters) and per stage the activation
bytes (the float32 message); a backprop stage's time is ``t_bp`` shared in proportion to its units' trunk
costs ``lu[i] - head[i]``.

**Model** (pure functions below; ``c`` link time of ``n`` bytes = ``latency + 8 n / bandwidth``):

* one device: DGL ``sum_j t_j``; backprop ``t_bp``. Speed-up = one-device step / K-device step, same method.
* synchronous pipelined DGL (K stages, K devices, links overlap compute): steady step
  ``max(max_j t_j, max_j 8 b_j / bw)``; latency adds to the pipeline's fill only (:func:`pipeline_makespan`).
* asynchronous DGL with buffers: each stage updates at its own pace, ``max_j t_j``; a slow link does not stall
  it but makes it re-read buffered items: reuse factor ``supply rate / own rate`` (:func:`async_reuse`).
* DGL with VQ: the synchronous formula with the VQ wire bytes (the encode/decode compute is not in ``t_j``).
* backprop data-parallel: ``t_bp / K + 2 (K-1) latency + 2 (K-1)/K * 8 G / bw`` (ring all-reduce of G
  gradient bytes, not overlapped with the backward; ideal split of the batch's compute).
* GPipe: M micro-batches, ``(M + K - 1) max_j(tb_j / M, 8 a_j / (M bw)) + sum_j 2 (latency + 8 a_j/(M bw))``
  (forward activations and backward gradients, duplex links, bubble ``(K-1)/(M+K-1)``).
* time-to-accuracy = steps-to-accuracy x step time, steps from ``experiments/results/num_stages.json`` (the
  6-layer net on Fashion-MNIST, K = 1, 2, 4: first epoch whose last head reaches the target, x steps per
  epoch; one seed, epoch resolution). Not given where no curve exists (K=8, VQ, async).

``--compute-scale`` multiplies every measured compute time (1: this CPU; 0.01: a device 100x faster, an
assumption for GPU-class devices, not a measurement).

**Validation.** These 2 shared cores cannot compute K stages in parallel, so the validation uses
latency-bound stages: each stage of a tiny CNN waits in a host callback inside its compiled step (``wait``
ms, proportional to the measured cnn4 best split's stage times), so cores stay idle and only the executor
and the links decide the overlap. ``asynchronous.run_threaded(lockstep=True)`` (pipelined synchronous DGL,
one thread per stage on its own fake CPU device) runs N batches; its wall time (median over repeats) is
compared with :func:`pipeline_makespan` of the stages' measured times alone (hops: :func:`validation_hops`).

* Latency cells (``link_delay_s`` of injected latency, infinite bandwidth) test the fill term. The
  executor's latency starts when the sender puts the item: for stage 0 at dispatch (its output is ready
  ``t_0`` later, so the hop adds ``max(0, L - t_0)``), for later stages once their step is done (``L``).
* Bandwidth cells (``link_bandwidth_bps`` emulated as well, ``link_ratio`` x: the largest wire's sending
  time ``8 b / bw`` is that many times the slowest stage's wait, b the real bytes of the float32 message and
  int32 labels, ``accounting.nbytes``) test the steady-state term ``max(max_j t_j, max_j 8 b_j / bw)``: with
  ratio > 1 the link is the bottleneck, near 1 link and stage are comparable. Each link sends one item at a
  time once it is computed (:func:`dgl_jax.asynchronous.link_schedule`), so a hop is ``L + 8 b_j / bw`` and
  the link is busy ``8 b_j / bw`` per item.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from common import time_call  # noqa: E402
from profile_step import jax_parts  # noqa: E402

from dgl_jax import (  # noqa: E402
    backprop_step,
    drop_aux_heads,
    get_model,
    init_stage_states,
    make_optimizer,
    provenance,  # noqa: E402
    stage_step,
    with_codec,
    with_optimizer,
)
from dgl_jax.accounting import boundary_traffic, float32_bytes, nbytes  # noqa: E402
from dgl_jax.asynchronous import AsyncConfig, Injected, buffer_items, run_threaded  # noqa: E402
from dgl_jax.cells import GridError, run_grid  # noqa: E402
from dgl_jax.codecs import parse_codec  # noqa: E402
from dgl_jax.files import write_atomic  # noqa: E402
from dgl_jax.models import cifar_cnn  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GBIT = 1e9
SCHEMES = ("dgl_sync", "dgl_async", "dgl_vq", "bp_data_parallel", "bp_gpipe")
MODELS = {  # name: (zoo model, options, batch (0: --batch), VQ codec (None: --vq))
    "cnn4_w0.5": ("cnn4", {"width_mult": 0.5}, 0, None),
    "cnn4_w1": ("cnn4", {}, 0, None),
    # VGG-19 (CIFAR layout) at batch 32 to fit the default run's time on 2 shared cores; its 2x2 messages hold
    # 128 vectors per group at that batch, so 128 codes (the codebook is seeded from one message)
    "vgg19": ("vgg19", {"num_classes": 10, "classifier_hidden": 512, "classifier_pool": 1}, 32, "vq-packed:128:16"),
}


# ----------------------------------------------------------------------------------------------------------
# The analytical model: pure functions of seconds, bytes, bit/s
# ----------------------------------------------------------------------------------------------------------
def link_time(nbytes_: float, bandwidth_bps: float, latency_s: float) -> float:
    """Seconds for one message of ``nbytes_`` bytes: ``latency + 8 nbytes / bandwidth``."""
    return latency_s + 8.0 * nbytes_ / bandwidth_bps


def pipeline_makespan(stage_s: Sequence[float], hop_s: Sequence[float], occupancy_s: Sequence[float], n: int) -> float:
    """Seconds for ``n`` batches through K stages (``stage_s`` [K]) joined by K-1 links, each adding ``hop_s``
    to a message's trip and busy ``occupancy_s`` per message (one at a time): the fill ``sum(stage_s) +
    sum(hop_s)`` then ``n - 1`` periods of the busiest resource (unbounded queues between them)."""
    period = max([*stage_s, *occupancy_s])
    return sum(stage_s) + sum(hop_s) + (n - 1) * period


def dgl_sync_step(stage_s: Sequence[float], wire_bytes: Sequence[float], bandwidth_bps: float) -> float:
    """Steady-state step of synchronous pipelined DGL: the busiest stage or link (latency only fills)."""
    return max([*stage_s, *(8.0 * b / bandwidth_bps for b in wire_bytes)])


def dgl_async_step(stage_s: Sequence[float]) -> float:
    """Step of asynchronous DGL with replay buffers: every stage at its own pace, the slowest sets the
    updates per second (links never stall a stage, see :func:`async_reuse`)."""
    return max(stage_s)


def async_reuse(stage_s: Sequence[float], wire_bytes: Sequence[float], bandwidth_bps: float) -> list[float]:
    """Per stage j: how often it reads each item on average, ``max(1, supply period / own period)``, the
    supply period being that of the slowest stage or link below it (1 for stage 0)."""
    out, supply = [1.0], stage_s[0]
    for j in range(1, len(stage_s)):
        supply = max(supply, 8.0 * wire_bytes[j - 1] / bandwidth_bps)
        out.append(max(1.0, supply / stage_s[j]))
        supply = max(supply, stage_s[j])
    return out


def ring_allreduce_bytes(grad_bytes: float, k: int) -> float:
    """Bytes each device sends in a ring all-reduce of ``grad_bytes``: ``2 (K-1)/K * G``."""
    return 2.0 * (k - 1) / k * grad_bytes


def data_parallel_step(t_bp: float, grad_bytes: float, k: int, bandwidth_bps: float, latency_s: float) -> float:
    """Backprop on K data-parallel devices: ``t_bp / K`` compute then a ring all-reduce (``2 (K-1)`` messages
    of ``G / K`` bytes, each paying the latency)."""
    if k == 1:
        return t_bp
    return t_bp / k + 2 * (k - 1) * latency_s + 8.0 * ring_allreduce_bytes(grad_bytes, k) / bandwidth_bps


def gpipe_step(
    stage_bp_s: Sequence[float], act_bytes: Sequence[float], m: int, bandwidth_bps: float, latency_s: float
) -> float:
    """GPipe with ``m`` micro-batches on K stages (backprop times ``stage_bp_s`` [K] per full batch, boundary
    activations ``act_bytes`` [K-1] per full batch): ``(m + K - 1)`` slots of the busiest stage or link per
    micro-batch plus the forward and backward crossings of each boundary in the fill."""
    per = [t / m for t in stage_bp_s] + [8.0 * a / (m * bandwidth_bps) for a in act_bytes]
    fill = sum(2 * link_time(a / m, bandwidth_bps, latency_s) for a in act_bytes)
    return (m + len(stage_bp_s) - 1) * max(per) + fill


def best_split(unit_cost: Sequence[float], head_cost: Sequence[float], k: int) -> tuple[list[int], list[float]]:
    """The contiguous split of the units into ``k`` stages whose slowest stage is fastest, stage ``[a, b)``
    costing ``sum(unit_cost[a:b]) + head_cost[b-1]`` (ties: the smaller sum). Returns (units per stage, costs)."""
    n = len(unit_cost)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = list(zip((0, *cuts), (*cuts, n), strict=True))
        costs = [sum(unit_cost[a:b]) + head_cost[b - 1] for a, b in bounds]
        rank = (max(costs), sum(costs))
        if best is None or rank < best[0]:
            best = (rank, [b - a for a, b in bounds], costs)
    return best[1], best[2]


def steps_to_accuracy(curves: dict[int, list[float]], steps_per_epoch: int, target: float) -> dict[int, int | None]:
    """Per K: steps until the last head's test accuracy first reaches ``target`` (epoch resolution), or None."""
    out = {}
    for k, accs in curves.items():
        hit = next((e for e, a in enumerate(accs, 1) if a >= target), None)
        out[k] = None if hit is None else hit * steps_per_epoch
    return out


def predict(profile: dict, k: int, bandwidth_bps: float, latency_s: float, scale: float, micro: int) -> dict:
    """Step seconds and speed-up of every scheme for one model profile, K, link and compute scale."""
    sp = profile["splits"][str(k)]
    t = [scale * s for s in sp["stage_s"]]
    tb = [scale * s for s in sp["stage_bp_s"]]
    t_bp = scale * profile["backprop_s"]
    one = {"dgl": sum(t), "bp": t_bp}
    steps = {
        "dgl_sync": dgl_sync_step(t, sp["float32_bytes"], bandwidth_bps),
        "dgl_async": dgl_async_step(t),
        "dgl_vq": dgl_sync_step(t, sp["vq_bytes"], bandwidth_bps),
        "bp_data_parallel": data_parallel_step(t_bp, profile["grad_bytes"], k, bandwidth_bps, latency_s),
        "bp_gpipe": gpipe_step(tb, sp["act_bytes"], micro, bandwidth_bps, latency_s),
    }
    out = {}
    for s, step in steps.items():
        base = one["dgl" if s.startswith("dgl") else "bp"]
        out[s] = {"step_s": step, "speedup": base / step, "images_per_s": profile["batch"] / step}
    out["dgl_async"]["max_reuse"] = max(async_reuse(t, sp["float32_bytes"], bandwidth_bps))
    out["one_device_s"] = one
    return out


# ----------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------
def _median(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        time_call(fn)
    return statistics.median(time_call(fn) for _ in range(repeats))


def model_batch(name: str, batch: int) -> int:
    """The batch a model is profiled at: its own (VGG-19: 32) or ``batch``."""
    return MODELS[name][2] or batch


def _stages(name: str, split, batch: int, size: int, head: str, codec=None):
    model, opts = MODELS[name][:2]
    stages = get_model(model, split=split, head=head, **opts)
    stages = with_optimizer(stages, lambda j: make_optimizer("sgd", 0.1, momentum=0.9, weight_decay=5e-4))
    if codec is not None:
        stages = with_codec(stages, codec)
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    return stages, x, y


def _time_stages(stages, x, y, parts: Sequence[str], repeats: int, warmup: int) -> list[dict[str, float]]:
    """Median seconds of ``parts`` (:func:`profile_step.jax_parts`) of every stage, on its real input."""
    states = init_stage_states(stages, jax.random.key(0), x)
    out, h = [], x
    for stage, st in zip(stages, states, strict=True):
        fns, nxt = jax_parts(stage, st, h, y)
        out.append({p: _median(fns[p], repeats, warmup) for p in parts})
        h = nxt
    return out


def profile_model(name: str, args: argparse.Namespace) -> dict:
    """The per-unit profile, the best split per K with its measured stages and bytes, and backprop."""
    batch = model_batch(name, args.batch)
    stages, x, y = _stages(name, None, batch, args.size, args.head)
    n = len(stages)
    units = _time_stages(stages, x, y, ("block_forward", "head", "local_update"), args.repeats, args.warmup)
    trunk = [u["local_update"] - u["head"] for u in units]
    heads = [u["head"] for u in units]

    bp = drop_aux_heads(stages)
    bp_states = init_stage_states(bp, jax.random.key(0), x)
    bp_step = jax.jit(functools.partial(backprop_step, bp))
    backprop_s = _median(lambda: bp_step(bp_states, x, y), args.repeats, args.warmup)
    grad_bytes = nbytes([s.params for s in bp_states])

    splits = {}
    vq_spec = MODELS[name][3] or args.vq
    vq = parse_codec(vq_spec)
    for k in args.ks:
        if k > n:
            continue
        sizes, predicted = best_split(trunk, heads, k)
        st, _, _ = _stages(name, sizes, batch, args.size, args.head)
        measured = _time_stages(st, x, y, ("block_forward", "local_update"), args.repeats, args.warmup)
        label_bytes = nbytes(y)
        traffic, acts = {}, []
        for cname, codec in (("float32", None), ("vq", vq)):
            cs = with_codec(st, codec)
            specs = jax.eval_shape(functools.partial(init_stage_states, cs, jax.random.key(0), x))
            rows = boundary_traffic(cs, specs, x)
            traffic[cname] = [r["wire_bytes"] + label_bytes for r in rows]
            acts = acts or [r["float32_bytes"] for r in rows]  # the float32 message: a backprop activation
        bounds = np.cumsum((0, *sizes))
        share = [sum(trunk[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        splits[str(k)] = {
            "split": sizes,
            "stage_s": [m["local_update"] for m in measured],
            "stage_forward_s": [m["block_forward"] for m in measured],
            "stage_s_from_units": predicted,
            "stage_bp_s": [backprop_s * s / sum(share) for s in share],
            "float32_bytes": traffic["float32"],
            "vq_bytes": traffic["vq"],
            "vq_codec": vq_spec,
            "act_bytes": acts,
            "predicted_speedup": sum(m["local_update"] for m in measured) / max(m["local_update"] for m in measured),
        }
        print(f"  {name} K={k}: split {sizes} stage ms {[round(1000 * m['local_update'], 1) for m in measured]}",
              flush=True)  # fmt: skip
    return {
        "batch": batch,
        "input": [args.size, args.size, 3],
        "units": len(stages),
        "unit_s": units,
        "backprop_s": backprop_s,
        "grad_bytes": grad_bytes,
        "param_float32_bytes": float32_bytes([s.params for s in bp_states]),
        "splits": splits,
    }


def _sleep_identity(wait_s: float, x: np.ndarray) -> np.ndarray:
    time.sleep(wait_s)
    return x


def waiting_loss(loss_fn, wait_s: float):
    """``loss_fn`` whose input first passes through a host callback that sleeps ``wait_s`` (a latency-bound
    stage; gradient: the identity)."""

    @jax.custom_vjp
    def wait(h):
        return jax.pure_callback(functools.partial(_sleep_identity, wait_s), jax.ShapeDtypeStruct(h.shape, h.dtype), h)

    wait.defvjp(lambda h: (wait(h), None), lambda _, g: (g,))
    return lambda out, y: loss_fn(wait(out), y)


def validation_hops(
    stage_s: Sequence[float], wire_bytes: Sequence[float], bandwidth_bps: float | None, latency_s: float
) -> tuple[list[float], list[float]]:
    """The ``(hop_s, occupancy_s)`` of :func:`pipeline_makespan` for the executor's K-1 links. Latency only
    (``bandwidth_bps=None``): the latency starts when the sender puts its item, stage 0 at dispatch (its output
    is ready ``stage_s[0]`` later, so that hop adds ``max(0, latency - stage_s[0])``), later stages once their
    step is done; links are never busy. With a bandwidth, every sender puts its item once it is computed: a
    hop is :func:`link_time` and the link is busy ``8 b / bandwidth`` per item."""
    k = len(stage_s)
    if bandwidth_bps is None:
        return [max(0.0, latency_s - stage_s[0])] + [latency_s] * (k - 2), [0.0] * (k - 1)
    hops = [link_time(b, bandwidth_bps, latency_s) for b in wire_bytes]
    return hops, [8.0 * b / bandwidth_bps for b in wire_bytes]


def validate_cell(
    waits_s: Sequence[float], latency_s: float, args: argparse.Namespace, link_ratio: float | None = None
) -> dict:
    """Measured wall time of ``args.val_steps`` batches through :func:`run_threaded` (lock-step) vs the model.
    ``link_ratio`` (None: infinite bandwidth) sets the emulated bandwidth so that the largest wire takes
    ``link_ratio`` times the slowest stage's wait on its link."""
    import dataclasses

    k = len(waits_s)
    stages = cifar_cnn((8,) * k, (), head="linear", last_head_depth=1)
    stages = [dataclasses.replace(s, loss_fn=waiting_loss(s.loss_fn, w)) for s, w in zip(stages, waits_s, strict=True)]
    stages = with_optimizer(stages, lambda j: make_optimizer("sgd", 0.01))
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
    y = jax.random.randint(jax.random.key(2), (8,), 0, 10)
    states = init_stage_states(stages, jax.random.key(0), x)
    wire_bytes = [nbytes(it) for it in buffer_items(stages, states, x, y)]  # (float32 message, int32 labels)
    bandwidth = None if link_ratio is None else 8.0 * max(wire_bytes) / (link_ratio * max(waits_s))
    alone, h = [], x  # each stage's step timed alone on one device: the model's inputs
    for stage, st in zip(stages, states, strict=True):
        f = jax.jit(functools.partial(stage_step, stage))
        alone.append(_median(lambda f=f, st=st, h=h: f(st, h, y), 7, 1))
        h = f(st, h, y)[1]
    cfg = AsyncConfig(capacity=1, policy="fifo")
    walls = []
    for r in range(1 + args.val_repeats):  # the first run warms up (first executions, threads): dropped
        res = run_threaded(stages, states, [(x, y)], cfg, num_updates=args.val_steps, devices=jax.devices()[:k],
                         injected=Injected(link_delay_s=latency_s, link_bandwidth_bps=bandwidth), lockstep=True,
                         timeout_s=300)  # fmt: skip
        if list(res.updates) != [args.val_steps] * k:
            raise RuntimeError(f"validation run took {list(res.updates)} updates, expected {args.val_steps} each")
        if r:
            walls.append(res.seconds)
    hops, busy = validation_hops(alone, wire_bytes, bandwidth, latency_s)
    predicted = pipeline_makespan(alone, hops, busy, args.val_steps)
    measured = statistics.median(walls)
    link = {}
    if bandwidth is not None:
        link = {"link_ratio": link_ratio, "bandwidth_bps": bandwidth, "wire_bytes": wire_bytes, "link_s": busy,
                "link_bound": max(busy) > max(alone)}  # fmt: skip
    return {
        "k": k,
        "waits_s": list(waits_s),
        "latency_s": latency_s,
        **link,
        "steps": args.val_steps,
        "stage_alone_s": alone,
        "walls_s": walls,
        "measured_s": measured,
        "predicted_s": predicted,
        "relative_error": (measured - predicted) / predicted,
    }


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------
def tta_curves(path: Path) -> tuple[dict[int, list[float]], int, str]:
    """Last-head test accuracy per epoch for each K of the committed num_stages table, steps per epoch."""
    d = json.loads(path.read_text())
    curves, spe = {}, None
    for name, run in d["runs"].items():
        seed = run["seeds"][0]
        curves[int(name.split("=")[1])] = [a[-1] for a in seed["test_accuracy_per_epoch"]]
        cfg = seed["config"]
    n_train = int(d["dataset"].split(":")[1].rstrip("]"))
    spe = n_train // cfg["batch_size"]
    return curves, spe, f"{path.name}: {cfg['model']} {cfg['model_options']}, {d['dataset']}, seed(s) {d['seeds']}"


def predictions(grid: dict, args: argparse.Namespace) -> dict:
    out = {}
    for name in args.models:
        prof = grid["cells"].get(f"profile/{name}")
        if prof is None:
            continue
        for k in args.ks:
            if str(k) not in prof["splits"]:
                continue
            for scale, bw, lat in itertools.product(args.compute_scale, args.bandwidths_gbit, args.latencies_s):
                p = predict(prof, k, bw * GBIT, lat, scale, args.micro_batches or 4 * k)
                out[f"{name}/K={k}/scale={scale:g}/bw={bw:g}/lat={lat:g}"] = p
    return out


def tta(pred: dict, steps: dict[int, int | None], k: int) -> dict[str, float | None]:
    """Seconds to the target accuracy of the schemes that have a steps-to-accuracy figure."""
    bp, dgl = steps.get(1), steps.get(k)
    return {
        "dgl_sync": None if dgl is None else dgl * pred["dgl_sync"]["step_s"],
        "bp_data_parallel": None if bp is None else bp * pred["bp_data_parallel"]["step_s"],
        "bp_gpipe": None if bp is None else bp * pred["bp_gpipe"]["step_s"],
    }


def render(grid: dict, preds: dict, steps: dict, args: argparse.Namespace) -> str:
    lat_show = [args.latencies_s[0], args.latencies_s[-1]]
    lines = [
        f"# Scale-out model (git {str(grid.get('git_sha'))[:8]}, {grid['machine']['cpu_model']}, "
        f"{grid['machine']['cpu_count']} CPUs)",
        "",
        "Predicted speed-up over one device running the same method (DGL: `dgl_step`; backprop: `backprop_step`),",
        f"from the per-stage profile measured on this CPU ({args.size}x{args.size}x3, batch per model below), best "
        f"split per K; GPipe with {args.micro_batches or '4K'} micro-batches. Compute scale 1 = this CPU; "
        "0.01 = an assumed device 100x faster. TTA: seconds to the target accuracy (below); - where no curve exists.",
        "",
    ]
    for name in args.models:
        prof = grid["cells"].get(f"profile/{name}")
        if prof is None:
            continue
        lines += [f"## {name} (batch {prof['batch']})", ""]
        for k, sp in prof["splits"].items():
            lines.append(
                f"- K={k}: best split {sp['split']}, stage ms {[round(1000 * s, 1) for s in sp['stage_s']]} "
                f"(from units {[round(1000 * s, 1) for s in sp['stage_s_from_units']]}), predicted speed-up "
                f"{sp['predicted_speedup']:.2f}; bytes per boundary float32 {sp['float32_bytes']}, "
                f"{sp.get('vq_codec', args.vq)} {sp['vq_bytes']}"
            )
        lines += [
            f"- backprop step {1000 * prof['backprop_s']:.1f} ms, gradient bytes {prof['grad_bytes']}",
            "",
            "| K | scale | Gbit/s | latency | DGL sync | DGL async (reuse) | DGL VQ | BP data-par. | BP GPipe | "
            "TTA s: DGL / BP-DP / GPipe |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k in args.ks:
            for scale, bw, lat in itertools.product(args.compute_scale, args.bandwidths_gbit, lat_show):
                p = preds.get(f"{name}/K={k}/scale={scale:g}/bw={bw:g}/lat={lat:g}")
                if p is None:
                    continue
                tt = tta(p, steps, k)
                ttas = " / ".join("-" if v is None else f"{v:.3g}" for v in tt.values())
                a = p["dgl_async"]
                lines.append(
                    f"| {k} | {scale:g} | {bw:g} | {1e3 * lat:g} ms | {p['dgl_sync']['speedup']:.2f} | "
                    f"{a['speedup']:.2f} ({a['max_reuse']:.1f}) | {p['dgl_vq']['speedup']:.2f} | "
                    f"{p['bp_data_parallel']['speedup']:.2f} | {p['bp_gpipe']['speedup']:.2f} | {ttas} |"
                )
        lines.append("")
    lines += [f"Steps to {args.target:.0%} (last head): {steps} ({grid.get('steps_source')}).", ""]
    lines += [
        "## Validation (threaded executor, fake CPU devices, latency-bound stages, injected link latency and "
        "emulated bandwidth)",
        "",
        "These 2 shared cores cannot compute stages in parallel: every stage sleeps in a host callback of its "
        "compiled step, and the model gets each stage's step timed alone. Link ms: the emulated sending time "
        "`8 b / bandwidth` of each hop's wire (b bytes: float32 message + int32 labels), - for infinite bandwidth.",
        "",
        "| K | stage waits ms | latency ms | link ms per hop (kbit/s) | steps | measured s (median) | predicted s | "
        "error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cid, c in grid["cells"].items():
        if cid.startswith("validate/"):
            link = "-"
            if "link_s" in c:
                link = f"{[round(1e3 * t) for t in c['link_s']]} ({c['bandwidth_bps'] / 1e3:.0f})"
            lines.append(
                f"| {c['k']} | {[round(1e3 * w) for w in c['waits_s']]} | {1e3 * c['latency_s']:g} | {link} | "
                f"{c['steps']} | {c['measured_s']:.3f} | {c['predicted_s']:.3f} | {100 * c['relative_error']:+.1f}% |"
            )
    vals = [c for cid, c in grid["cells"].items() if cid.startswith("validate/")]
    for what, sel in (("latency only", [c for c in vals if "link_s" not in c]),
                      ("with bandwidth", [c for c in vals if "link_s" in c])):  # fmt: skip
        if sel:
            worst = max(abs(c["relative_error"]) for c in sel)
            lines += ["", f"Largest |error|, {what}: {100 * worst:.1f}% (target 15%)."]
    return "\n".join(lines) + "\n"


def plot(preds: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = "vgg19" if "vgg19" in args.models else args.models[-1]
    k = 4 if 4 in args.ks else args.ks[-1]
    fig, axes = plt.subplots(1, len(args.compute_scale), figsize=(6 * len(args.compute_scale), 4), squeeze=False)
    for ax, scale in zip(axes[0], args.compute_scale, strict=True):
        for s, color in zip(SCHEMES, ("C0", "C1", "C2", "C3", "C4"), strict=True):
            for lat, style in zip((args.latencies_s[0], args.latencies_s[-1]), ("-", "--"), strict=True):
                ys = [preds.get(f"{name}/K={k}/scale={scale:g}/bw={bw:g}/lat={lat:g}") for bw in args.bandwidths_gbit]
                if all(y is not None for y in ys):
                    ax.plot(args.bandwidths_gbit, [y[s]["speedup"] for y in ys], style, color=color,
                            label=f"{s} {1e3 * lat:g} ms")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("link bandwidth (Gbit/s)")
        ax.set_ylabel(f"predicted speed-up, K={k}")
        ax.set_title(f"{name}, compute scale {scale:g}")
        ax.axhline(k, color="gray", lw=0.5)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--head", default="mlp_sr")
    p.add_argument("--vq", default="vq-packed:256:16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--bandwidths-gbit", type=float, nargs="+", default=[1, 10, 100])
    p.add_argument("--latencies-s", type=float, nargs="+", default=[10e-6, 100e-6, 1e-3, 5e-3])
    p.add_argument("--compute-scale", type=float, nargs="+", default=[1.0, 0.01])
    p.add_argument("--micro-batches", type=int, default=0, help="GPipe micro-batches (0: 4K)")
    p.add_argument("--target", type=float, default=0.85, help="test accuracy for time-to-accuracy")
    p.add_argument("--steps-from", default=str(RESULTS / "num_stages.json"))
    p.add_argument("--val-wait-ms", type=float, default=100.0, help="slowest validation stage's wait")
    p.add_argument("--val-latencies-ms", type=float, nargs="+", default=[0.0, 20.0, 120.0])
    p.add_argument("--val-link-ratios", type=float, nargs="+", default=[1.0, 2.0],
                   help="bandwidth cells: link time of the largest wire / slowest stage's wait")  # fmt: skip
    p.add_argument("--val-link-latency-ms", type=float, default=20.0, help="latency of the bandwidth cells")
    p.add_argument("--val-steps", type=int, default=20)
    p.add_argument("--val-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "scale_out"), help="path without suffix")
    p.add_argument("--tiny", action="store_true", help="small model, 2 validation cells: checks the script runs")
    args = p.parse_args(argv)
    if args.tiny:
        MODELS["tiny"] = ("small_cnn", {}, 0, None)
        args.models, args.ks, args.batch, args.size, args.repeats = ["tiny"], [2], 8, 8, 1
        args.vq, args.val_wait_ms, args.val_latencies_ms, args.val_steps, args.val_repeats = (
            "vq-packed:16:16", 20.0, [0.0], 6, 1)  # fmt: skip
        args.val_link_ratios, args.val_link_latency_ms = [2.0], 30.0
    if min(args.ks) < 2 or max(args.ks) > jax.device_count():
        p.error(f"--ks {args.ks}: need 2 <= K <= {jax.device_count()} devices")
    out = Path(args.out)
    ident = {k: v for k, v in vars(args).items() if k in ("size", "head", "vq", "repeats", "tiny")}
    header = {"seeds": [args.seed], "command": provenance.command("python experiments/scale_out.py", argv),
              "machine": provenance.machine(), "versions": provenance.versions()}  # fmt: skip
    cells = [(f"profile/{m}", functools.partial(profile_model, m, args)) for m in args.models]
    try:
        grid = run_grid(out.with_suffix(".json"), ident, cells, header)
    except GridError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
    # validation stage waits: proportional to cnn4's measured best split at the same K
    ref_name = "cnn4_w1" if "cnn4_w1" in args.models else args.models[0]
    ref = grid["cells"][f"profile/{ref_name}"]
    vcells = []
    for k in [k for k in (2, 4) if str(k) in ref["splits"]]:
        ts = ref["splits"][str(k)]["stage_s"]
        waits = [args.val_wait_ms / 1000 * t / max(ts) for t in ts]
        for lat in args.val_latencies_ms:
            cid = f"validate/K={k}/wait={args.val_wait_ms:g}ms/lat={lat:g}ms/steps={args.val_steps}"
            vcells.append((cid, functools.partial(validate_cell, waits, lat / 1000, args)))
        lat = args.val_link_latency_ms
        for ratio in args.val_link_ratios:  # bandwidth-bound links (ids of the latency-only cells unchanged)
            cid = f"validate/K={k}/wait={args.val_wait_ms:g}ms/lat={lat:g}ms/link={ratio:g}x/steps={args.val_steps}"
            vcells.append((cid, functools.partial(validate_cell, waits, lat / 1000, args, ratio)))
    grid = run_grid(out.with_suffix(".json"), ident, cells + vcells, header)

    curves, spe, source = tta_curves(Path(args.steps_from))
    steps = steps_to_accuracy(curves, spe, args.target)
    grid["steps_to_accuracy"] = {str(k): v for k, v in steps.items()}
    grid["steps_source"] = source
    grid["predictions"] = preds = predictions(grid, args)
    grid["model"] = {"schemes": list(SCHEMES), "gpipe_micro_batches": args.micro_batches or "4K",
                     "compute_scale": args.compute_scale}  # fmt: skip
    from dgl_jax.files import write_json

    write_json(out.with_suffix(".json"), grid)
    write_atomic(out.with_suffix(".md"), render(grid, preds, steps, args))
    plot(preds, args, out.with_suffix(".png"))
    for cid, c in grid["cells"].items():
        if cid.startswith("validate/"):
            print(f"{cid}: measured {c['measured_s']:.3f} s predicted {c['predicted_s']:.3f} s "
                  f"error {100 * c['relative_error']:+.1f}%")  # fmt: skip
    return grid


if __name__ == "__main__":
    main()
