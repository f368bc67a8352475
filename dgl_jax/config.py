"""``TrainConfig``: a whole training recipe as a frozen dataclass, its JSON round trip and its checks."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax.numpy as jnp

from dgl_jax.data import DATASETS, RESIZED, memory_loader_error
from dgl_jax.files import json_ready
from dgl_jax.layers import HEADS
from dgl_jax.models import MODELS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
OPTIMIZERS = ("sgd", "adam")
LOOPS = ("auto", "scan", "dispatch")
LOADERS = ("memory", "grain")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A full training recipe. ``split``/``head`` ``None`` keep the model's defaults; ``epochs`` is per
    phase (sequential greedy trains each stage for ``epochs``); ``decay_epochs``: int (every n epochs),
    tuple (at those epochs) or ``None`` (constant LR); ``chunk_steps``: optimizer steps per dispatch (0:
    ``min(steps_per_epoch, 50)``); ``loop``: ``scan`` runs a chunk as one ``lax.scan`` dispatch,
    ``dispatch`` as one jitted step per batch with no host synchronisation inside the chunk, ``auto`` picks
    ``dispatch`` on CPU (XLA:CPU runs these convolutions slower inside a loop; README, Speed) and ``scan``
    elsewhere;
    ``feature_cache_mb``: largest cached frozen-feature array the sequential
    method keeps on device (0 disables the cache); ``method_options``: options of the chosen method;
    ``model_options``: extra keyword arguments of the zoo model (e.g. ``{"width_mult": 0.25}``);
    ``loader``: ``memory`` keeps the training split on the device and gathers batches inside jit; ``grain``
    streams it from the host (a ``grain.MapDataset`` over the tfds data source or the in-memory arrays, read
    ahead on background threads, ``device_put``, augmented inside jit) for training sets that do not fit on
    the device. Both give bit-identical runs for the same seed. With ``grain`` the loop is one dispatch
    per step (``loop`` ``auto``/``dispatch``), the evaluation split stays in memory (streamed as well for
    the datasets of ``dgl_jax.data.RESIZED``, which need ``grain``), and sequential greedy recomputes the
    frozen stages instead of caching their features; ``image_size``: side S of the ``[S, S, 3]`` images of
    the datasets whose images vary in size (``imagenet2012``: shorter side resized to ``round(S*256/224)``,
    centre crop S, on the host; ``None``: the dataset's default, 224), an error for any other dataset;
    ``codec``: the boundary codec of every stage boundary (:func:`dgl_jax.codecs.parse_codec` syntax, e.g.
    ``vq-packed:16:4``; ``None``: float32 messages), for the methods that send messages (dgl, async);
    ``head_reads_wire``: every stage with a codec trains its auxiliary head on its decoded wire, straight-through
    to its block (``Stage.head_reads_wire``; needs ``codec``);
    ``devices`` (``None``: all local devices; the command line's default), ``parallel``, ``stage_groups``
    and ``executor``: how the run uses its devices (:mod:`dgl_jax.devices`); with ``executor='ray'``,
    ``ray_address`` (``None``: a local Ray instance) and ``ray_checkpoint_every`` (updates between the
    actors' own checkpoints; :mod:`dgl_jax.ray_executor`)."""

    method: str = "dgl"
    model: str = "small_cnn"
    split: int | tuple[int, ...] | None = None
    head: str | None = None
    dataset: str = "digits"
    data_dir: str | None = None
    validation: float = 0.0
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 500
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_epochs: int | tuple[int, ...] | None = (7,)
    decay_factor: float = 0.2
    seed: int = 0
    dtype: str = "float32"
    augment: bool = False
    chunk_steps: int = 0
    loop: str = "auto"
    feature_cache_mb: float = 1024.0
    method_options: dict = dataclasses.field(default_factory=dict)
    model_options: dict = dataclasses.field(default_factory=dict)
    loader: str = "memory"
    image_size: int | None = None
    codec: str | None = None
    head_reads_wire: bool = False
    devices: int | None = 1
    parallel: str = "data"
    stage_groups: int | None = None
    executor: str = "spmd"
    ray_address: str | None = None
    ray_checkpoint_every: int = 100


def config_to_dict(config: TrainConfig) -> dict:
    """JSON-ready dict of ``config`` (tuples become lists)."""
    return json_ready(dataclasses.asdict(config))


def config_from_dict(d: dict) -> TrainConfig:
    """Inverse of :func:`config_to_dict`; unknown keys are an error naming them."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; expected a subset of {sorted(names)}")
    d = dict(d)
    for k in ("split", "decay_epochs"):
        if isinstance(d.get(k), list):
            d[k] = tuple(d[k])
    return TrainConfig(**d)


def scale_decay(
    decay_epochs: int | Sequence[int] | None, recipe_epochs: int, epochs: int
) -> int | Sequence[int] | None:
    """A recipe's LR decay epochs for ``epochs`` instead of its ``recipe_epochs``, at the same fractions of
    the run (rounded, at least 1): every ``n`` epochs becomes every ``round(n * epochs / recipe_epochs)``;
    a list keeps the epochs that still fall inside the run (a tuple), ``None`` when none does (constant LR);
    ``decay_epochs`` itself when the epochs are the same."""
    if decay_epochs is None or epochs == recipe_epochs:
        return decay_epochs
    scale = epochs / recipe_epochs
    if isinstance(decay_epochs, int):
        return max(1, round(decay_epochs * scale))
    scaled = sorted({max(1, round(e * scale)) for e in decay_epochs})
    return tuple(e for e in scaled if e < epochs) or None


def validate_config(config: TrainConfig) -> None:
    """Checks names and ranges that need no data or model; raises ``ValueError`` naming the bad value and
    the accepted ones."""

    def bad(name, value, accepted):
        raise ValueError(f"{name} {value!r} is not valid; expected {accepted}")

    from dgl_jax.methods import get_method

    method = get_method(config.method)
    if config.model not in MODELS:
        bad("model", config.model, f"one of {sorted(MODELS)}")
    if config.dataset not in DATASETS:
        bad("dataset", config.dataset, f"one of {sorted(DATASETS)}")
    if config.head is not None and config.head not in HEADS:
        bad("head", config.head, f"one of {list(HEADS)}")
    if config.optimizer not in OPTIMIZERS:
        bad("optimizer", config.optimizer, f"one of {list(OPTIMIZERS)}")
    if config.dtype not in DTYPES:
        bad("dtype", config.dtype, f"one of {sorted(DTYPES)}")
    if not (isinstance(config.lr, (int, float)) and math.isfinite(config.lr) and config.lr > 0):
        bad("learning rate", config.lr, "a finite number > 0")
    if not (isinstance(config.momentum, (int, float)) and 0 <= config.momentum < 1):
        bad("momentum", config.momentum, "a number in [0, 1)")
    if not config.weight_decay >= 0:
        bad("weight decay", config.weight_decay, "a number >= 0")
    if not 0 < config.decay_factor <= 1:
        bad("decay factor", config.decay_factor, "a number in (0, 1]")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if not (isinstance(getattr(config, name), int) and getattr(config, name) >= 1):
            bad(name.replace("_", " "), getattr(config, name), "an integer >= 1")
    if not (isinstance(config.chunk_steps, int) and config.chunk_steps >= 0):
        bad("chunk steps", config.chunk_steps, "an integer >= 0 (0: automatic)")
    if config.loader not in LOADERS:
        bad("loader", config.loader, f"one of {list(LOADERS)}")
    if config.loader == "memory" and config.dataset in RESIZED:
        raise ValueError(memory_loader_error(config.dataset))
    if config.image_size is not None and not (
        config.dataset in RESIZED and isinstance(config.image_size, int) and config.image_size >= 1
    ):
        bad("image size", config.image_size, f"none, or an integer >= 1 for a dataset among {sorted(RESIZED)}")
    if config.loader == "grain" and config.loop == "scan":
        bad("loop", config.loop, "'auto' or 'dispatch' with loader 'grain' (one batch per step from the host)")
    if not 0 <= config.validation < 1:
        bad("validation fraction", config.validation, "a number in [0, 1)")
    if isinstance(config.split, int) and config.split < 1:
        bad("split", config.split, "K >= 1 or a list of units per stage")
    if isinstance(config.decay_epochs, int) and config.decay_epochs < 1:
        bad("decay epochs", config.decay_epochs, "an integer >= 1, a list of epochs, or none")
    if isinstance(config.decay_epochs, (tuple, list)) and not (
        config.decay_epochs
        and all(isinstance(e, int) and e >= 1 for e in config.decay_epochs)
        and all(a < b for a, b in zip(config.decay_epochs, config.decay_epochs[1:], strict=False))
    ):
        bad("decay epochs", ",".join(map(str, config.decay_epochs)), "positive, increasing epochs (e.g. 6,8)")
    if not (isinstance(config.ray_checkpoint_every, int) and config.ray_checkpoint_every >= 0):
        bad("ray checkpoint every", config.ray_checkpoint_every, "an integer >= 0 (0: only at set states)")
    if config.ray_address is not None and config.executor != "ray":
        raise ValueError(f"--ray-address needs --executor ray, not {config.executor!r}")
    if config.codec is not None:
        from dgl_jax.codecs import parse_codec

        parse_codec(config.codec)
        if not method.codecs:
            raise ValueError(f"--codec applies to methods that send messages between stages, not {config.method!r}")
    if not isinstance(config.head_reads_wire, bool):
        bad("head reads wire", config.head_reads_wire, "true or false")
    if config.head_reads_wire and config.codec is None:
        raise ValueError("--head-reads-wire needs --codec: a head reads its stage's decoded wire")
    method.validate(config)


def build_stages(config: TrainConfig, num_classes: int, steps_per_epoch: int) -> list:
    """The zoo model of ``config`` (split, head, dtype, model options) with one optimizer per stage built from
    the config's recipe (``steps_per_epoch`` places the LR decays)."""
    from dgl_jax.models import get_model
    from dgl_jax.stage import make_optimizer, with_optimizer

    kwargs = {"num_classes": num_classes, "dtype": DTYPES[config.dtype]}
    if config.split is not None:
        kwargs["split"] = config.split
    if config.head is not None:
        kwargs["head"] = config.head
    stages = get_model(config.model, **kwargs, **config.model_options)
    tx = functools.partial(
        make_optimizer,
        config.optimizer,
        config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        steps_per_epoch=steps_per_epoch,
        decay_epochs=config.decay_epochs,
        decay_factor=config.decay_factor,
    )
    stages = with_optimizer(stages, lambda j: tx())
    if config.head_reads_wire:
        stages = [dataclasses.replace(s, head_reads_wire=True) for s in stages]
    return stages
