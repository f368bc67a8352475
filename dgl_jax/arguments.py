"""What the command-line parsers (``train``, ``eval``, ``sweep``) share: argument types, each of which turns a
string into a value or raises ``argparse.ArgumentTypeError`` with one line, and the table of ``TrainConfig``
fields settable from the command line (:data:`TRAIN_FIELDS`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any, NamedTuple


def int_list(text: str) -> int | tuple[int, ...]:
    try:
        parts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or a comma-separated list of integers") from None
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} is empty")
    return parts[0] if len(parts) == 1 and "," not in text else tuple(parts)


def decay_list(text: str) -> int | tuple[int, ...] | None:
    return None if text.lower() in ("none", "off", "constant") else int_list(text)


def boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; expected true/false")


def key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    k, v = text.split("=", 1)
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


class Field(NamedTuple):
    """A ``TrainConfig`` field settable from the command line."""

    flag: str
    field: str
    type: Any
    help: str


# (flag, TrainConfig field, type, help); every train flag whose value maps to one TrainConfig field
TRAIN_FIELDS: tuple[Field, ...] = tuple(
    Field(*row)
    for row in [
        ("--method", "method", str, "training method (dgl, backprop, sequential, + registered ones)"),
        ("--model", "model", str, "model zoo name (small_cnn, cnn4, vgg13, resnet110_cifar, ...)"),
        ("--split", "split", int_list, "K stages (balanced by layer count) or units per stage, e.g. 2,1"),
        ("--head", "head", str, "auxiliary head: mlp_sr, mlp, cnn, linear, dni, gap_linear"),
        ("--dataset", "dataset", str, "digits, fashion_mnist, mnist, cifar10, cifar100, svhn_cropped, imagenet2012"),
        (
            "--data-dir",
            "data_dir",
            str,
            "folder with the data (IDX files for fashion_mnist, a tfds data_dir otherwise)",
        ),
        ("--validation", "validation", float, "hold out this fraction of train as the evaluation split"),
        ("--epochs", "epochs", int, "epochs (per stage for sequential)"),
        ("--batch-size", "batch_size", int, "training batch size"),
        ("--eval-batch-size", "eval_batch_size", int, "evaluation batch size"),
        ("--optimizer", "optimizer", str, "sgd or adam"),
        ("--lr", "lr", float, "learning rate"),
        ("--momentum", "momentum", float, "SGD momentum"),
        ("--weight-decay", "weight_decay", float, "coupled weight decay"),
        ("--decay-epochs", "decay_epochs", decay_list, "LR step schedule: every N epochs, at E1,E2,..., or none"),
        ("--decay-factor", "decay_factor", float, "LR multiplier at each decay"),
        ("--seed", "seed", int, "PRNG seed (init, data order, augmentation)"),
        ("--dtype", "dtype", str, "compute dtype: float32, bfloat16, float16"),
        ("--augment", "augment", boolean, "random crop + flip on device (true/false)"),
        ("--chunk-steps", "chunk_steps", int, "optimizer steps per dispatch/log line (0: auto)"),
        ("--loop", "loop", str, "chunk execution: auto, scan, dispatch"),
        ("--loader", "loader", str, "training input: memory (whole split on device) or grain (streamed from the host)"),
        (
            "--image-size",
            "image_size",
            int,
            "imagenet2012 (grain): S of the [S,S,3] images (resize to S*256/224, crop S)",
        ),
        ("--codec", "codec", str, "boundary codec (dgl, async): identity, bfloat16, vq:K:d, vq-packed:K:d"),
        ("--head-reads-wire", "head_reads_wire", boolean, "each stage's head trains on its decoded wire (true/false)"),
        ("--devices", "devices", int, "local devices to use (default: all; CPU: 1 unless fake devices are set)"),
        ("--parallel", "parallel", str, "data (default), stages, or stages+data: how the devices share the work"),
        ("--stage-groups", "stage_groups", int, "positions on the stage axis (default: one per stage)"),
        ("--executor", "executor", str, "spmd or threads (stage-parallel dgl); async: threads or ray; dgl: ray"),
        ("--ray-address", "ray_address", str, "--executor ray: HOST:PORT of a Ray cluster (default: a local instance)"),
        ("--ray-checkpoint-every", "ray_checkpoint_every", int, "--executor ray: updates between actor checkpoints"),
    ]
)


def fields(*flags: str) -> tuple[Field, ...]:
    """The rows of :data:`TRAIN_FIELDS` for ``flags``, in that order (KeyError names an unknown flag)."""
    by_flag = {f.flag: f for f in TRAIN_FIELDS}
    return tuple(by_flag[flag] for flag in flags)


def add_fields(parser: argparse.ArgumentParser, rows: Sequence[Field]) -> None:
    """Adds ``rows`` to ``parser``, each defaulting to None (not given); a boolean flag alone means true."""
    for row in rows:
        flag_only = {"nargs": "?", "const": True} if row.type is boolean else {}  # --augment means --augment true
        parser.add_argument(row.flag, dest=row.field, type=row.type, default=None, help=row.help, **flag_only)


def explicit_fields(args: argparse.Namespace, rows: Sequence[Field]) -> dict[str, Any]:
    """``{field: value}`` of the ``rows`` given on the command line."""
    return {row.field: getattr(args, row.field) for row in rows if getattr(args, row.field) is not None}
