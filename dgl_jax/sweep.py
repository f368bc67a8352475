"""``python -m dgl_jax sweep``: a jitted VQ ablation (unquantized DGL and boundary codecs, over seeds) in a folder.

    python -m dgl_jax sweep --codecs vq-packed:16:4,vq-packed:64:16 --seeds 0,1,2 [train options] --out DIR

For each seed, the unquantized DGL baseline and every codec (applied to every stage boundary) are trained
from the same initial weights on the same batches; codecs with the same group layout (code dim ``d`` or
groups ``G``) form one *group*, trained by one compiled program (:func:`dgl_jax.vq_train.make_sweep`: one
``vmap`` over members padded to the group's largest codebook, or one call per member inside the same
program, ``--mode``). A *cell* is one group x one seed (or, when codecs are added to a group whose cell is
done, those codecs x one seed). Run folder::

    sweep.json   git sha, the command that reproduces the whole table, seeds, codecs, config, machine and
                 versions, bytes per codec, every finished cell (written as soon as it finishes, with the git
                 sha and machine it ran on; per member the per-head test accuracy, its learning curve after
                 every epoch, the code entropy), the summary and best_ratio_at_1pt (mean over all the seeds)
    sweep.md     per codec: bytes per step, ratio vs float32, replay-buffer bytes, seeds done, per-head
                 accuracy mean +- std over seeds, last-head loss vs the baseline, empirical entropy of the
                 codes; the last head's learning curves
    frontier.png traffic reduction (log x) vs last-head accuracy loss (y), one point per codec

Bytes are the ``nbytes`` of the wires a deployed boundary sends (:mod:`dgl_jax.accounting` on the stages
carrying the codec: packed codes plus the float32 codebook on every send), never ideal bit counts; the
entropy column is a separate figure: what entropy coding of the codes could reach.

    partial/     the running cell's newest checkpoint (every ``--checkpoint-every`` steps and on Ctrl-C),
                 removed once the cell is saved (when the next cell starts, or at the end of the run); a cell
                 this run does not plan keeps its own

Re-running the same command skips the finished cells and resumes the running one from its checkpoint,
bit-identical to an uninterrupted run. A re-run may add codecs or seeds: only the new (codec, seed) pairs
train (a codec added to a finished group gets a cell of its own, ``d8/seed0+vq-packed:128:8``; every member
trains from its seed's initial weights and batches whatever cell it is in; in ``--mode loop``, the CPU default,
its figures are bitwise those it would have had in company, while ``vmap`` pads codebooks to the group's
largest) and the table holds them all. A different train config in an existing folder is refused.
``--head-reads-wire``: every quantized stage trains its auxiliary head on the decoded wire it sends, with a
straight-through gradient to its block (``TrainConfig.head_reads_wire``); part of the train config, so a grid of its
own.
Bad input: one line on stderr, exit 2. Ctrl-C: the finished cells and the running cell's state stay, exit 130.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dgl_jax import cells as cells_lib
from dgl_jax import provenance
from dgl_jax.arguments import add_fields, explicit_fields, fields, key_value

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
BASELINE = "float32"  # the member name of the unquantized DGL baseline
MODES = ("auto", "vmap", "loop")
PARTIAL = "partial"  # run-folder subfolder holding the running cell's checkpoints
_VQ_NAME = re.compile(r"(vq|vq-packed):(\d+):(g?)(\d+)((?::[a-z]+=[^:]*)*)")


class SweepError(ValueError):
    """Bad input to the sweep: reported as one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------
# the train flags a sweep takes (the method is dgl, and the executor and data layout are the sweep's own)
TRAIN_FLAGS = fields(
    "--model",
    "--split",
    "--head",
    "--dataset",
    "--data-dir",
    "--validation",
    "--epochs",
    "--batch-size",
    "--eval-batch-size",
    "--optimizer",
    "--lr",
    "--momentum",
    "--weight-decay",
    "--decay-epochs",
    "--decay-factor",
    "--dtype",
    "--head-reads-wire",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the ``sweep`` command on ``p``."""
    p.add_argument("--codecs", required=True, help="comma-separated codec specs: vq:K:d, vq-packed:K:d, ...:gG")
    p.add_argument("--seeds", default="0", help="comma-separated distinct seeds (default 0)")
    p.add_argument("--out", required=True, help="run folder (re-run the same command there to resume)")
    add_fields(p, TRAIN_FLAGS)
    p.add_argument(
        "--model-option", dest="model_options", type=key_value, action="append", default=[], metavar="KEY=VALUE"
    )
    p.add_argument("--train-subset", type=int, default=0, help="train on the first N training examples (0: all)")
    p.add_argument("--max-steps", type=int, default=0, help="stop each cell after this many steps (0: all epochs)")
    p.add_argument("--mode", default="auto", choices=MODES, help="group members: vmap, loop (auto: loop on CPU)")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        metavar="N",
        help="save the running cell's state every N steps and on Ctrl-C, to resume mid-cell (0: only on Ctrl-C)",
    )


def build_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``sweep`` subparser to an argparse ``subparsers`` object and returns it."""
    p = subparsers.add_parser(
        "sweep", help="jitted VQ ablation: DGL baseline + codecs x seeds into a run folder", allow_abbrev=False
    )
    add_arguments(p)
    p.set_defaults(func=run_sweep)
    return p


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ``SweepError`` on an empty list, a non-integer or a repeated seed."""
    items = [s.strip() for s in str(text).split(",")]
    if not items or any(not re.fullmatch(r"\d+", s) for s in items):
        raise SweepError(f"--seeds {text!r}: expected distinct non-negative integers, e.g. 0,1,2")
    seeds = [int(s) for s in items]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise SweepError(f"--seeds {text!r}: seed {repeated[0]} is repeated; expected distinct seeds")
    return seeds


def parse_codecs(text: str) -> list[str]:
    """Canonical names of the comma-separated VQ codec specs in ``text`` (``parse_codec``'s error on a bad
    one); ``SweepError`` on an empty list, a non-VQ codec or a repeated codec."""
    from dgl_jax.codecs import parse_codec

    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise SweepError("--codecs is empty; expected comma-separated specs such as vq-packed:16:4,vq-packed:64:16")
    names = []
    for spec in items:
        try:
            name = parse_codec(spec).name
        except ValueError as e:
            raise SweepError(str(e).splitlines()[0]) from None
        if not _VQ_NAME.fullmatch(name):
            raise SweepError(f"--codecs: {spec!r} is not a VQ codec; a sweep compares vq:K:d / vq-packed:K:d codecs")
        if ":levels=" in name:
            raise SweepError(
                f"--codecs: {spec!r} is residual VQ; the sweep's jitted ablation runs one VQ level per boundary "
                "(train residual VQ with python -m dgl_jax train --codec)"
            )
        if name in names:
            raise SweepError(f"--codecs: {name} is repeated; expected distinct codecs")
        names.append(name)
    return names


def vq_config(name: str) -> tuple[Any, bool]:
    """``(VQConfig, packed)`` of a canonical VQ codec name (``vq-packed:16:4``, ``vq:256:g8``)."""
    from dgl_jax.vq_train import VQConfig

    m = _VQ_NAME.fullmatch(name)
    if m is None:
        raise SweepError(f"{name!r} is not a VQ codec name")
    k, v = int(m.group(2)), int(m.group(4))
    opts = dict(item.split("=", 1) for item in filter(None, m.group(5).split(":")))
    kw = dict(
        init=opts.get("init", "sample"),
        decay=float(opts.get("decay", 0.99)),
        restart_threshold=float(opts.get("restart", 1e-2)),
    )
    layout = dict(num_codes=k, groups=v, code_dim=None) if m.group(3) else dict(num_codes=k, code_dim=v)
    return VQConfig(**layout, **kw), m.group(1) == "vq-packed"


def group_of(name: str) -> str:
    """The group (compiled program) of a codec: its layout and options, ``d4`` or ``g2:decay=0.9``; the
    baseline's is ``float32``."""
    if name == BASELINE:
        return BASELINE
    m = _VQ_NAME.fullmatch(name)
    cfg, _ = vq_config(name)
    layout = f"d{cfg.code_dim}" if cfg.code_dim is not None else f"g{cfg.groups}"
    return layout + m.group(5)


def group_codecs(names: Sequence[str]) -> dict[str, list[str]]:
    """``{group: [member names]}``: the baseline first, then the codec groups in order of appearance."""
    out: dict[str, list[str]] = {BASELINE: [BASELINE]}
    for n in names:
        out.setdefault(group_of(n), []).append(n)
    return out


def train_config(args: argparse.Namespace) -> Any:
    """The validated :class:`~dgl_jax.config.TrainConfig` (method dgl) of the train options."""
    from dgl_jax.config import TrainConfig, validate_config

    explicit = explicit_fields(args, TRAIN_FLAGS)
    if args.model_options:
        explicit["model_options"] = dict(args.model_options)
    try:
        config = TrainConfig(method="dgl", **explicit)
        validate_config(dataclasses.replace(config, head_reads_wire=False))  # the codecs are the members
    except (ValueError, TypeError) as e:
        raise SweepError(str(e).splitlines()[0]) from None
    return config


def sweep_config(config: Any, args: argparse.Namespace) -> dict:
    """What identifies a sweep's results (besides the codecs): the train config and the sweep's own budget
    options, JSON-normalised so that it compares equal to what ``sweep.json`` holds."""
    from dgl_jax.config import config_to_dict

    if args.train_subset < 0 or args.max_steps < 0:
        raise SweepError("--train-subset and --max-steps must be integers >= 0 (0: all)")
    if getattr(args, "checkpoint_every", 0) < 0:
        raise SweepError("--checkpoint-every must be an integer >= 0")
    d = {**config_to_dict(config), "train_subset": args.train_subset, "max_steps": args.max_steps}
    if not d.get("head_reads_wire"):  # absent when off: folders made before the option keep their identity
        d.pop("head_reads_wire", None)
    for k in ("seed", "codec", "devices", "parallel", "stage_groups", "executor", "method_options"):
        d.pop(k, None)  # not used by a sweep
    return json.loads(json.dumps(d))


# ----------------------------------------------------------------------------------------------------------
# Model, data and bytes
# ----------------------------------------------------------------------------------------------------------
def build_stages(config: Any, num_classes: int, steps_per_epoch: int) -> list:
    """The model's stages with the config's optimizer (as :class:`dgl_jax.trainer.Trainer` builds them)."""
    from dgl_jax import config as configs

    try:
        stages = configs.build_stages(config, num_classes, steps_per_epoch)
    except (ValueError, TypeError) as e:
        raise SweepError(str(e).splitlines()[0]) from None
    if len(stages) < 2:
        raise SweepError(f"model {config.model!r} has {len(stages)} stage: a sweep needs >= 2 stages (--split)")
    return stages


def boundary_shapes(stages: Sequence[Any], example: Any) -> list[tuple[int, ...]]:
    """Shapes of the float messages ``[batch, ..., C]`` at every boundary (abstract: nothing is computed)."""
    import jax

    from dgl_jax.stage import init_stage_states, message_specs

    states = jax.eval_shape(lambda: init_stage_states(stages, jax.random.key(0), example))
    return [tuple(m.shape) for m in message_specs(stages, states, example)]


def check_codecs(names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> None:
    """``SweepError`` naming the codec and boundary where a code dim (or group count) does not divide the
    channels, or where one batch has fewer vectors than codes to seed."""
    for name in names:
        cfg, _ = vq_config(name)
        for j, shape in enumerate(shapes):
            c, what = shape[-1], (f"code dim {cfg.code_dim}" if cfg.code_dim is not None else f"{cfg.groups} groups")
            if c % (cfg.code_dim or cfg.groups):
                raise SweepError(
                    f"codec {name}: {what} does not divide the {c} channels of boundary {j} -> {j + 1} "
                    f"(message {list(shape)})"
                )
            if math.prod(shape[:-1]) < cfg.num_codes:
                raise SweepError(
                    f"codec {name}: boundary {j} -> {j + 1} (message {list(shape)}) has {math.prod(shape[:-1])} "
                    f"vectors per batch, fewer than the {cfg.num_codes} codes to seed; use a larger --batch-size"
                )


def measure_bytes(stages, boundary_codecs, key, x, y, buffer_batches: int) -> dict:
    """Per-step traffic and replay-buffer memory (summed over the boundaries) of ``stages`` with
    ``boundary_codecs`` (one codec or ``None`` per boundary, or one for all), from :mod:`dgl_jax.accounting`:
    the nbytes of the wires each step sends and of async-DGL buffers of ``buffer_batches`` items ``(wire,
    labels)``. Everything is abstract (``jax.eval_shape``): nothing is allocated or computed."""
    import jax

    from dgl_jax import accounting, codecs
    from dgl_jax.asynchronous import AsyncConfig, init_async
    from dgl_jax.stage import init_stage_states, message_specs, wire_spec, with_codec

    coded = with_codec(stages, boundary_codecs)
    states = jax.eval_shape(lambda: init_stage_states(coded, key, x))
    traffic = accounting.boundary_traffic(coded, states, x)
    messages = message_specs(coded, states, x)
    wires = [wire_spec(s, st.codec, m) for s, st, m in zip(coded[:-1], states[:-1], messages, strict=True)]
    book = sum(accounting.nbytes(w.codebook) for w in wires if isinstance(w, codecs.VQWire))
    bufs = jax.eval_shape(lambda: init_async(coded, states, x, y, AsyncConfig(capacity=buffer_batches), key).buffers)
    memory = accounting.buffer_memory(coded, bufs)
    return {
        "codecs": [t["codec"] for t in traffic],
        "wire_bytes": sum(t["wire_bytes"] for t in traffic),
        "codebook_bytes": book,
        "float32_bytes": sum(t["float32_bytes"] for t in traffic),
        "buffer_bytes": sum(m["stored_bytes"] for m in memory),
        "buffer_bytes_fp32": sum(m["float32_bytes"] for m in memory),
    }


def codec_bytes(stages: Sequence[Any], names: Sequence[str], x: Any, y: Any) -> dict[str, dict]:
    """Per codec name (and the baseline): :func:`measure_bytes` with a replay buffer of one batch, plus
    ``ratio``: float32 bytes over the real wire bytes."""
    import jax

    from dgl_jax.codecs import parse_codec

    out = {}
    for name in [BASELINE, *names]:
        codec = None if name == BASELINE else parse_codec(name)
        b = measure_bytes(stages, codec, jax.random.key(0), x, y, 1)
        out[name] = {**b, "ratio": b["float32_bytes"] / b["wire_bytes"]}
    return out


# ----------------------------------------------------------------------------------------------------------
# One cell: a group of configurations x one seed
# ----------------------------------------------------------------------------------------------------------
def code_entropy(hist: np.ndarray) -> float:
    """Mean over groups of the empirical entropy (bits) of code histograms ``[G, K]``."""
    h = np.asarray(hist, np.float64)
    p = h / np.maximum(h.sum(-1, keepdims=True), 1)
    return float(np.mean(-np.sum(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0.0), -1)))


def _histograms(stages, plan, states, x, mask):
    """Per quantized boundary, ``[G, K]`` counts of the codes (receiver's codebook, eval mode) of ``x``."""
    import jax
    import jax.numpy as jnp

    from dgl_jax import vq
    from dgl_jax.objective import stage_apply

    out = []
    for stage, st, cfg in zip(stages[:-1], states[:-1], plan, strict=True):
        x = stage_apply(stage, st.params, st.model_state, x, train=False).features
        if cfg is None:
            out.append(None)
            continue
        b = st.codec
        codes = vq.encode(b.sender._replace(codebook=b.receiver), x)
        g, k = b.receiver.shape[0], b.receiver.shape[1]
        onehot = jax.nn.one_hot(codes.reshape(codes.shape[0], -1, g), k, dtype=jnp.int32)
        out.append(jnp.sum(onehot * mask[:, None, None, None].astype(jnp.int32), axis=(0, 1)))
        x = vq.decode(b.receiver, codes)
    return out


class Group:
    """The compiled pieces of one group: its :class:`~dgl_jax.vq_train.Sweep`, jitted step, evaluation and
    code histograms (compiled on first use, shared by every seed); ``init_states(key, x)``: the jitted
    initial stage states (shared by every group: one compilation)."""

    def __init__(self, stages: Sequence[Any], members: Sequence[str], mode: str, init_states: Any):
        import jax

        from dgl_jax import vq_train as vt

        self.members = list(members)
        self.plans = [None if n == BASELINE else vq_config(n)[0] for n in members]
        self.sweep = vt.make_sweep(stages, self.plans, mode=mode)
        self.stages = list(stages)
        self.init_states = init_states
        self.step = jax.jit(self.sweep.step, donate_argnums=0)
        self.evaluate = jax.jit(self.sweep.evaluate)
        plans = self.sweep.plans
        self.hist = [
            None if plans[i][0] is None else jax.jit(functools.partial(_histograms, tuple(stages), plans[i]))
            for i in range(len(plans))
        ]


def _batches(n: int, batch_size: int, seed: int, epochs: int, max_steps: int):
    """``(step, indices)`` of every training batch: a permutation per ``(seed, epoch)``, last partial batch
    dropped; at most ``max_steps`` (0: all)."""
    per_epoch, step = n // batch_size, 0
    for epoch in range(epochs):
        perm = np.random.default_rng((seed, epoch)).permutation(n)
        for b in range(per_epoch):
            if max_steps and step >= max_steps:
                return
            yield step, perm[b * batch_size : (b + 1) * batch_size]
            step += 1


class CellCheckpoints(NamedTuple):
    """Where and how often :func:`run_cell` saves its training state: every ``every`` steps (and on Ctrl-C)
    into ``directory`` (a :class:`dgl_jax.checkpoint.Checkpointer` folder holding the newest one), so an
    interrupted cell resumes from its last checkpoint, bit-identical to a run without interruption."""

    directory: Path
    every: int


def _restore(ckpt: Any, carry: Any, members: Sequence[str]) -> tuple[Any, dict]:
    """The newest checkpoint in ``ckpt`` restored into ``carry``'s structure, with its metadata; ``SweepError``
    (one line) when it was saved by a cell of other members (a re-run with other codecs in the same group) or
    does not fit. A checkpoint that does not name its members is taken as is."""
    from dgl_jax.checkpoint import CheckpointError

    fix = f"re-run with the codecs it was saved with, or delete {ckpt.directory} to start the cell afresh"
    try:
        carry, meta = ckpt.restore(carry)
    except CheckpointError as e:
        raise SweepError(f"{str(e).splitlines()[0]}; {fix}") from None
    saved = meta.get("members")
    if saved is not None and list(saved) != list(members):
        raise SweepError(f"{ckpt.directory} holds the running cell of {','.join(saved)}; {fix}")
    return carry, meta


def num_steps(n: int, batch_size: int, epochs: int, max_steps: int) -> int:
    """Training steps of one cell: ``epochs`` x full batches per epoch, at most ``max_steps`` (0: all)."""
    total = epochs * (n // batch_size)
    return min(total, max_steps) if max_steps else total


def test_accuracy(group: Group, carry: Any, data: Any, batch_size: int, histograms: bool = False) -> tuple:
    """``(acc, hists)``: the per-head test accuracy ``[members, heads]`` (%) of ``group``'s members in ``carry``
    and, with ``histograms``, per member its code histograms per boundary (``None`` for the baseline)."""
    import jax.numpy as jnp

    n_test, eb = len(data.test_labels), batch_size
    pad = -n_test % eb
    xte = np.concatenate([data.test_images, np.zeros((pad, *data.test_images.shape[1:]), np.float32)])
    yte = np.concatenate([data.test_labels, np.full(pad, -1, data.test_labels.dtype)])  # -1: never correct
    valid = np.arange(len(yte)) < n_test
    correct, hists = 0, [None] * len(group.members)
    for i in range(0, len(yte), eb):
        xb, yb, mb = jnp.asarray(xte[i : i + eb]), jnp.asarray(yte[i : i + eb]), jnp.asarray(valid[i : i + eb])
        correct = correct + group.evaluate(carry, xb, yb)
        for m, fn in enumerate(group.hist if histograms else ()):
            if fn is not None:
                h = fn(group.sweep.select(carry, m), xb, mb)
                hists[m] = h if hists[m] is None else [a + b for a, b in zip(hists[m], h, strict=True)]
    return np.asarray(correct) / n_test * 100, hists


def run_cell(
    group: Group,
    data: Any,
    config: Any,
    seed: int,
    max_steps: int,
    checkpoints: CellCheckpoints | None = None,
    log: Any = None,
) -> dict:
    """Trains every member of ``group`` from seed ``seed`` (same initial weights and batches for all) and
    evaluates it on the test split: per member the per-head test accuracy (%), its learning curve (the
    per-head test accuracy after every epoch, ``acc_curve: [epochs][heads]``; the last entry is
    ``acc_heads``), the last step's training loss per head and the code entropy (bits/code, ``None`` for the
    baseline). With ``checkpoints`` the training state (and the curve so far) is saved there as it goes and
    the cell resumes from the newest checkpoint found; ``log(line)`` receives a progress line at the end of
    every epoch."""
    import jax
    import jax.numpy as jnp

    from dgl_jax import vq_train as vt
    from dgl_jax.checkpoint import Checkpointer

    t0 = time.perf_counter()
    images, labels = data.train_images, data.train_labels
    bs = config.batch_size
    per_epoch = len(labels) // bs
    total = num_steps(len(labels), bs, config.epochs, max_steps)
    key = jax.random.key(seed)
    first = next(_batches(len(labels), bs, seed, 1, 1))[1]
    x0 = jnp.asarray(images[first])
    states0 = group.init_states(jax.random.fold_in(key, 0), x0)
    carry = group.sweep.init(states0, jax.random.fold_in(key, 1), x0)
    ckpt = Checkpointer(checkpoints.directory, max_to_keep=1) if checkpoints else None
    start, before, curve = 0, 0.0, []  # curve None: not recorded (resumed from a checkpoint saved without it)
    if ckpt is not None and ckpt.latest_step() is not None:
        ckpt.cleanup()
        carry, meta = _restore(ckpt, carry, group.members)
        start, before, curve = int(meta["step"]), float(meta["seconds"]), meta.get("curve")
        if not 0 < start < total:
            raise SweepError(f"{ckpt.directory}: a checkpoint at step {start} of a cell of {total} steps")
        if log:
            log(f"resumed at step {start} of {total} from {ckpt.directory}")
        if curve is not None and start % per_epoch == 0 and len(curve) < start // per_epoch:
            # interrupted at an epoch's end before its evaluation
            curve.append(test_accuracy(group, carry, data, config.eval_batch_size)[0].tolist())

    def save(done: int) -> None:
        seconds = before + time.perf_counter() - t0
        ckpt.save(done, carry, {"step": done, "seconds": seconds, "members": list(group.members), "curve": curve})

    step_key, metrics, done, saved = jax.random.fold_in(key, 2), None, start, start
    try:
        for step, idx in _batches(len(labels), bs, seed, config.epochs, total):
            if step < start:
                continue
            x, y = jnp.asarray(images[idx]), jnp.asarray(labels[idx])
            carry, metrics = group.step(carry, x, y, jax.random.fold_in(step_key, step))
            done = step + 1
            if curve is not None and done % per_epoch == 0 and done < total:  # the last point: the final evaluation
                curve.append(test_accuracy(group, carry, data, config.eval_batch_size)[0].tolist())
            if ckpt is not None and checkpoints.every and done % checkpoints.every == 0 and done < total:
                save(done)
                saved = done
            if log and (done % per_epoch == 0 or done == total):
                rate = (time.perf_counter() - t0) / (done - start)
                line = (
                    f"epoch {-(-done // per_epoch)}/{-(-total // per_epoch)}, step {done}/{total} ({rate:.2f} s/step)"
                )
                if done < total and curve:
                    line += ", test last head " + " / ".join(f"{a[-1]:.2f}%" for a in curve[-1])
                log(line)
    except KeyboardInterrupt:
        if ckpt is not None and saved < done < total:
            with contextlib.suppress(Exception):  # a step interrupted mid-call leaves a donated carry
                save(done)
        raise
    vt.check_metrics(jax.tree.map(lambda *a: jnp.stack(a), *metrics))

    acc, hists = test_accuracy(group, carry, data, config.eval_batch_size, histograms=True)
    members = {}
    for m, name in enumerate(group.members):
        entropy = None
        if hists[m] is not None:
            per_boundary = [code_entropy(h) for h in hists[m]]
            counts = [int(np.asarray(h).sum()) for h in hists[m]]
            entropy = {"bits_per_code": float(np.dot(per_boundary, counts) / sum(counts)), "boundaries": per_boundary}
        members[name] = {
            "acc_heads": [float(a) for a in acc[m]],
            "train_loss_last": [float(v) for v in np.asarray(metrics[m]["loss"])],
            "entropy": entropy,
        }
        if curve is not None:
            members[name]["acc_curve"] = [*(c[m] for c in curve), [float(a) for a in acc[m]]]
    out = {"seed": seed, "steps": done, "seconds": before + time.perf_counter() - t0, "members": members}
    return {**out, "resumed_at_step": start} if start else out


# ----------------------------------------------------------------------------------------------------------
# Summary and reports
# ----------------------------------------------------------------------------------------------------------
def cell_id(group: str, seed: int, members: Sequence[str] = ()) -> str:
    """``d8/seed0``; with ``members`` (codecs added to a group after its cell ran) ``d8/seed0+vq-packed:128:8``."""
    return f"{group}/seed{seed}" + "".join(f"+{m}" for m in members)


def member_results(cells: dict) -> dict[tuple[str, int], dict]:
    """``{(member, seed): result}`` over every finished cell."""
    return {(name, c["seed"]): r for c in cells.values() for name, r in c["members"].items()}


def plan_cells(names: Sequence[str], seeds: Sequence[int], cells: dict) -> list[tuple[str, str, int, list[str]]]:
    """``(cell id, group, seed, members)`` of what is left to train: per seed and group, the members with no
    result in ``cells`` yet. A member trains from the seed's initial weights and batches whatever cell it is
    in, so codecs added to a finished group form a cell of their own (:func:`cell_id` with ``members``)."""
    trained = member_results(cells)
    todo = []
    for s in seeds:
        for g, members in group_codecs(names).items():
            missing = [m for m in members if (m, s) not in trained]
            if missing:
                cid = cell_id(g, s) if cell_id(g, s) not in cells else cell_id(g, s, missing)
                todo.append((cid, g, s, missing))
    return todo


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """:func:`dgl_jax.cells.mean_std` over seeds as JSON numbers (None, None when no seed is done)."""
    if not values:
        return None, None
    mean, std = cells_lib.mean_std(values)
    return float(mean), float(std)


def summarize(result: dict) -> list[dict]:
    """One row per member (the baseline first): bytes, ratio, buffer bytes, per-head accuracy mean/std over
    the finished seeds, last-head accuracy loss vs the baseline (points, paired by seed) and the entropy."""
    rows = []
    trained = member_results(result["cells"])
    base = {s: trained[BASELINE, s] for s in result["seeds"] if (BASELINE, s) in trained}
    for name in [BASELINE, *result["codecs"]]:
        runs = {s: trained[name, s] for s in result["seeds"] if (name, s) in trained}
        b = result["bytes"][name]
        heads = list(zip(*[r["acc_heads"] for r in runs.values()], strict=True)) if runs else []
        losses = [base[s]["acc_heads"][-1] - r["acc_heads"][-1] for s, r in runs.items() if s in base]
        ent = [r["entropy"]["bits_per_code"] for r in runs.values() if r["entropy"] is not None]
        curves = {s: [a[-1] for a in r["acc_curve"]] for s, r in runs.items() if "acc_curve" in r}
        longest = max(map(len, curves.values()), default=0)  # a cell resumed from an older checkpoint may lack
        curves = {s: c for s, c in curves.items() if len(c) == longest}  # epochs: only full curves are averaged
        rows.append(
            {
                "codec": name,
                "seeds_done": sorted(runs),
                "wire_bytes": b["wire_bytes"],
                "codebook_bytes": b["codebook_bytes"],
                "ratio": b["ratio"],
                "buffer_bytes": b["buffer_bytes"],
                "acc_heads_mean": [_mean_std(h)[0] for h in heads],
                "acc_heads_std": [_mean_std(h)[1] for h in heads],
                "loss_last_mean": _mean_std(losses)[0],
                "loss_last_std": _mean_std(losses)[1],
                "entropy_bits_mean": _mean_std(ent)[0],
                # the last head's test accuracy after each epoch, mean over the seeds that recorded it
                "curve_seeds": sorted(curves),
                "curve_last_head_mean": [_mean_std(e)[0] for e in zip(*curves.values(), strict=True)],
            }
        )
    return rows


def best_ratio_at_1pt(rows: Sequence[dict], seeds: Sequence[int]) -> float | None:
    """The largest real-bytes traffic reduction among codecs whose last-head loss, averaged over the seeds
    ``seeds``, is <= 1.0 point (a codec, or a baseline, with seeds still to run does not count; a single seed may
    lose more)."""
    full = sorted(seeds)
    if not rows or rows[0]["seeds_done"] != full:
        return None
    done = [r for r in rows[1:] if r["seeds_done"] == full]
    ok = [r["ratio"] for r in done if r["loss_last_mean"] is not None and r["loss_last_mean"] <= 1.0]
    return max(ok) if ok else None


def markdown(result: dict) -> str:
    """``sweep.md``: the command and the per-codec table."""
    c = result["config"]
    pm = lambda m, s, n: "" if m is None else f"{m:.2f} ± {s:.2f}" if n > 1 else f"{m:.2f}"  # noqa: E731
    lines = [
        f"# VQ sweep: {c['model']} on {c['dataset']}, seeds {result['seeds']}",
        "",
        f"Command: `{result['command']}`  ",
        f"git {str(result['git_sha'])[:12]}; boundaries {result['boundary_shapes']} (batch first); "
        f"best traffic reduction whose last-head loss, averaged over all the seeds, is <= 1 point: "
        + (f"{result['best_ratio_at_1pt']:.1f}x" if result["best_ratio_at_1pt"] else "none"),
        "",
        "| codec | bytes/step (codebook) | vs float32 | buffer bytes (1 batch) | seeds done "
        "| accuracy per head (mean ± std) | last-head loss vs float32 (points) "
        "| entropy bits/code (achievable with entropy coding) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["summary"]:
        n = len(r["seeds_done"])  # one seed: no spread to show
        heads = " / ".join(pm(m, s, n) for m, s in zip(r["acc_heads_mean"], r["acc_heads_std"], strict=True))
        ent = "" if r["entropy_bits_mean"] is None else f"{r['entropy_bits_mean']:.2f}"
        lines.append(
            f"| {r['codec']} | {r['wire_bytes']} ({r['codebook_bytes']}) | {r['ratio']:.1f}x | {r['buffer_bytes']} "
            f"| {','.join(map(str, r['seeds_done'])) or '-'} | {heads} "
            f"| {pm(r['loss_last_mean'], r['loss_last_std'], n)} | {ent} |"
        )
    lines += [
        "",
        "Bytes/step: the nbytes of the wires sent per training step over all boundaries (dgl_jax.accounting; "
        "packed codes plus the float32 codebook sent with every wire, in brackets). Buffer bytes: one "
        "replay-buffer item (wire and labels) per boundary. Loss: baseline minus codec test accuracy of the "
        "last head, paired by seed. Entropy: empirical entropy of the test-set code histogram per group, an "
        "estimate of what entropy coding could reach, not bytes sent.",
    ]
    curves = [r for r in result["summary"] if r.get("curve_last_head_mean")]
    if curves:
        lines += [
            "",
            "Learning curves: the last head's test accuracy after each epoch (mean over the seeds named).",
            "",
        ]
        for r in curves:
            points = " ".join(f"{a:.2f}" for a in r["curve_last_head_mean"])
            lines.append(f"- {r['codec']} (seeds {r['curve_seeds']}): {points}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """``frontier.png``: traffic reduction (log x) vs last-head accuracy loss (y), one point per codec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dgl_jax.files import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in result["summary"]:
        if r["codec"] == BASELINE or r["loss_last_mean"] is None:
            continue
        ax.errorbar(r["ratio"], r["loss_last_mean"], yerr=r["loss_last_std"], fmt="o", capsize=3)
        ax.annotate(
            r["codec"], (r["ratio"], r["loss_last_mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.axhline(0.0, color="k", lw=0.8)
    ax.axhline(1.0, color="r", ls="--", lw=0.8, label="1 point")
    ax.set_xscale("log")
    ax.set_xlabel("traffic reduction vs float32 (real bytes per step)")
    ax.set_ylabel("last-head accuracy loss vs float32 DGL (points)")
    ax.set_title(f"{result['config']['dataset']}: VQ between DGL stages, seeds {result['seeds']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------
def _argv(args: argparse.Namespace) -> list[str]:
    """The sweep's own arguments (``main`` records them; under the CLI they follow ``sweep`` in sys.argv)."""
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = sys.argv[1:]
        argv = argv[argv.index("sweep") + 1 :] if "sweep" in argv else argv
    return list(argv)


def _log(prefix: str, line: str) -> None:
    print(f"{prefix}: {line}", flush=True)


def _drop_stored_codecs(path: Path) -> None:
    """Folders written before a re-run could add codecs kept the codecs in the grid's identity: they are
    rewritten with the train config alone as identity, so that such a folder grows like any other."""
    from dgl_jax.files import write_json

    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: open_grid reports it
        return
    if isinstance(stored.get("ident"), dict) and "codecs" in stored["ident"]:
        del stored["ident"]["codecs"]
        write_json(path, stored)


def _derive(result: dict) -> None:
    result["summary"] = summarize(result)
    result["best_ratio_at_1pt"] = best_ratio_at_1pt(result["summary"], result["seeds"])


def _command(argv: Sequence[str], codecs: Sequence[str], seeds: Sequence[int]) -> str:
    """The command that reproduces the whole table: ``argv`` with ``--codecs`` and ``--seeds`` set to every
    codec and seed the folder holds (a re-run may have added some)."""
    values = {"--codecs": ",".join(codecs), "--seeds": ",".join(map(str, seeds))}
    out, rest = [], list(argv)
    while rest:
        a = rest.pop(0)
        flag = a.split("=", 1)[0]
        if flag in values:
            if "=" not in a and rest:
                rest.pop(0)
            continue
        out.append(a)
    return "python -m dgl_jax sweep " + " ".join([*(f"{k} {v}" for k, v in values.items()), *out])


def _print(line: str) -> None:
    print(line, flush=True)


def partial_folder(out: Path, cid: str) -> Path:
    """The folder of cell ``cid``'s checkpoints while it runs."""
    return out / PARTIAL / cid.replace("/", "-")


def run_sweep(args: argparse.Namespace) -> int:
    """The ``sweep`` command: returns 0, 2 (bad input), 3 (non-finite features) or 130 (interrupted)."""
    out = Path(args.out)
    try:
        names = parse_codecs(args.codecs)
        seeds = parse_seeds(args.seeds)
        config = train_config(args)
        ident = sweep_config(config, args)
        return _run(args, out, names, seeds, config, ident)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # before the first cell (loading, checks): nothing to lose
        print(f"interrupted: re-run the same command to resume in {out}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _run(args, out: Path, names: list[str], seeds: list[int], config: Any, ident: dict) -> int:
    import jax
    import jax.numpy as jnp

    from dgl_jax import vq
    from dgl_jax.data import load_dataset
    from dgl_jax.files import FolderLock, FolderLockedError, write_atomic
    from dgl_jax.stage import init_stage_states

    try:
        data = load_dataset(config.dataset, config.data_dir, config.validation)
    except (ValueError, FileNotFoundError) as e:
        raise SweepError(str(e).splitlines()[0]) from None
    if args.train_subset:
        data = data._replace(
            train_images=data.train_images[: args.train_subset], train_labels=data.train_labels[: args.train_subset]
        )
    n = len(data.train_labels)
    if config.batch_size > n:
        raise SweepError(f"batch size {config.batch_size} is larger than the {n} training examples of {data.name}")
    stages = build_stages(config, data.num_classes, n // config.batch_size)
    x0 = jax.ShapeDtypeStruct((config.batch_size, *data.image_shape), jnp.float32)
    y0 = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)
    shapes = boundary_shapes(stages, x0)
    check_codecs(names, shapes)
    mode = args.mode if args.mode != "auto" else ("loop" if jax.default_backend() == "cpu" else "vmap")

    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = FolderLock(out).acquire()
    except FolderLockedError as e:
        raise SweepError(str(e).splitlines()[0]) from None
    try:
        path = out / "sweep.json"
        _drop_stored_codecs(path)
        try:
            stored = cells_lib.open_grid(path, {"config": ident})
        except cells_lib.GridError as e:
            raise SweepError(str(e).splitlines()[0]) from None
        # a re-run may add codecs and seeds: the table holds every finished one, and only new pairs train
        every = [*stored.get("codecs", []), *(n for n in names if n not in stored.get("codecs", []))]
        header = {
            "experiment": "sweep",
            "git_dirty": provenance.git_dirty(),
            "seeds": (every_seed := sorted({c["seed"] for c in stored["cells"].values()} | set(seeds))),
            "command": _command(_argv(args), every, every_seed),
            "codecs": every,
            "config": ident,
            "mode": mode,
            "dataset": data.name,
            "boundary_shapes": [list(s) for s in shapes],
            "bytes": codec_bytes(stages, every, x0, y0),
            "machine": provenance.machine(),
        }

        def tables(result: dict) -> None:  # the tables follow the JSON cell by cell
            if result["cells"]:
                write_atomic(out / "sweep.md", markdown(result))
                plot(result, out / "frontier.png")

        todo = plan_cells([n for n in every if n in names], seeds, stored["cells"])
        built: dict[tuple[str, ...], Group] = {}
        init_states = jax.jit(functools.partial(init_stage_states, stages))  # one compilation for all cells

        def cell(i: int, cid: str, g: str, s: int, members: list[str]) -> dict:
            for done in todo[: i - 1]:  # finished and saved: their checkpoints are no longer needed
                shutil.rmtree(partial_folder(out, done[0]), ignore_errors=True)
            if tuple(members) not in built:
                built[tuple(members)] = Group(stages, members, mode, init_states)
            log = functools.partial(_log, f"[{i}/{len(todo)}] {cid}")
            checkpoints = CellCheckpoints(partial_folder(out, cid), args.checkpoint_every)
            result = run_cell(built[tuple(members)], data, config, s, args.max_steps, checkpoints, log)
            accs = ", ".join(f"{m} {r['acc_heads'][-1]:.2f}%" for m, r in result["members"].items())
            log(f"{result['steps']} steps, last head {accs} ({result['seconds']:.1f} s)")
            return {"group": g, **result}

        cells = [(cid, functools.partial(cell, i, cid, g, s, ms)) for i, (cid, g, s, ms) in enumerate(todo, 1)]
        if stored["cells"]:
            _print(f"{len(stored['cells'])} cells done already in {path}; {len(todo)} to run")
        try:
            result = cells_lib.run_grid(path, {"config": ident}, cells, header, _print, _derive, tables)
        except cells_lib.GridError as e:
            raise SweepError(str(e).splitlines()[0]) from None
        except KeyboardInterrupt:
            # a planned cell's folder is removed once the cell is saved: one left with files is the running one's
            # (a cell this run does not plan keeps its folder, but that is not the running cell's)
            saved = any(p.is_dir() and any(p.iterdir()) for p in (partial_folder(out, cid) for cid, *_ in todo))
            line = (
                f"the running cell resumes from its checkpoint in {out / PARTIAL}"
                if saved
                else "the running cell had saved no checkpoint: a re-run starts it afresh"
            )
            print(line, file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        except vq.NonFiniteError as e:  # training diverged (vq_train.check_metrics)
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
            return EXIT_DIVERGED
        for cid, *_ in todo:  # a cell this run did not plan (e.g. a codec left out of --codecs) keeps its state
            shutil.rmtree(partial_folder(out, cid), ignore_errors=True)
        with contextlib.suppress(OSError):
            (out / PARTIAL).rmdir()  # when empty
        print(f"wrote {out}/sweep.json, sweep.md, frontier.png; best_ratio_at_1pt {result['best_ratio_at_1pt']}")
        return 0
    finally:
        lock.release()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise SweepError(f"{self.prog}: {message}")


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m dgl_jax sweep ...``): returns the exit code."""
    p = _Parser(prog="python -m dgl_jax sweep", description=__doc__.splitlines()[0], allow_abbrev=False)
    add_arguments(p)
    try:
        args = p.parse_args(argv)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
