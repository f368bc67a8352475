"""One trainer for every method: configs as code, data on device, several steps per dispatch.

* :class:`TrainConfig`: the whole recipe as a frozen dataclass (JSON round-trip with :func:`config_to_dict`
  / :func:`config_from_dict`); method-specific options live in ``method_options``.
* :data:`METHODS` / :func:`register_method`: the method registry. A :class:`Method` says how to prepare the
  stages, how to take one step (``make_step``), how many phases the schedule has (sequential greedy: one per
  stage), what extra run state it carries (e.g. replay buffers) and what cached inputs a phase uses.
* :class:`Trainer`: loads the data onto the device, builds stages and jitted chunk/eval functions once, and
  :meth:`Trainer.fit` yields an :class:`Event` after every chunk of ``chunk_steps`` optimizer steps (one
  dispatch: the batches are gathered from a per-epoch permutation derived from ``(seed, epoch)`` and
  augmented inside ``lax.scan``). A :class:`RunState` is everything needed to continue bit-identically.
  With ``loader='grain'`` the training split stays on the host and a grain pipeline reads the same batches
  (same per-epoch permutation) on background threads, one jitted step per batch: same results, bit for bit.

Typical use::

    trainer = Trainer(TrainConfig(epochs=3))
    state = trainer.init_state()
    for event in trainer.fit(state):
        if event.eval is not None:
            print(event.epoch, event.eval["accuracy"])
    state = event.state
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dgl_jax.data import (
    DATASETS,
    RESIZED,
    ArraySource,
    Dataset,
    TrainSource,
    augment_batch,
    default_crop_padding,
    load_dataset,
    load_train_source,
    memory_loader_error,
)
from dgl_jax.layers import HEADS
from dgl_jax.models import MODELS, get_model
from dgl_jax.stage import Stage, StageState, drop_aux_heads, init_stage_states, make_optimizer, with_optimizer
from dgl_jax.train import backprop_step, dgl_step, evaluate_batch, forward_features, sequential_step

PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
OPTIMIZERS = ("sgd", "adam")
LOOPS = ("auto", "scan", "dispatch")
LOADERS = ("memory", "grain")
GRAIN_THREADS = min(8, os.cpu_count() or 1)  # host threads reading (and decoding) batches ahead of the step
GRAIN_PREFETCH = max(4, GRAIN_THREADS)  # batches read ahead, each already on the device


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A full training recipe. ``split``/``head`` ``None`` keep the model's defaults; ``epochs`` is per
    phase (sequential greedy trains each stage for ``epochs``); ``decay_epochs``: int (every n epochs),
    tuple (at those epochs) or ``None`` (constant LR); ``chunk_steps``: optimizer steps per dispatch (0:
    ``min(steps_per_epoch, 50)``); ``loop``: ``scan`` runs a chunk as one ``lax.scan`` dispatch,
    ``dispatch`` as one jitted step per batch with no host synchronisation inside the chunk, ``auto`` picks
    ``dispatch`` on CPU (XLA:CPU runs these convolutions ~4x slower inside a loop) and ``scan`` elsewhere;
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
    centre crop S, on the host; ``None``: the dataset's default, 224), an error for any other dataset."""

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


def json_ready(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def validate_config(config: TrainConfig) -> None:
    """Checks names and ranges that need no data or model; raises ``ValueError`` naming the bad value and
    the accepted ones."""

    def bad(name, value, accepted):
        raise ValueError(f"{name} {value!r} is not valid; expected {accepted}")

    if config.method not in METHODS:
        bad("method", config.method, f"one of {sorted(METHODS)}")
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
    if not config.momentum >= 0:
        bad("momentum", config.momentum, "a number >= 0")
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
    METHODS[config.method].validate(config)


# ----------------------------------------------------------------------------------------------------------
# Method registry
# ----------------------------------------------------------------------------------------------------------
StepFn = Callable[[list[StageState], PyTree, jax.Array, jax.Array, jax.Array], tuple[list[StageState], PyTree, dict]]


def _no_extra(stages, states, config, key, example):
    return {}


def _one_phase(num_stages: int, config: TrainConfig) -> int:
    return 1


def _no_validation(config: TrainConfig) -> None:
    if config.method_options:
        raise ValueError(f"method {config.method!r} takes no method options, got {sorted(config.method_options)}")


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method as a set of hooks (all pure; the trainer jits what they return).

    * ``make_step(stages, config, phase, features) -> step``; ``step(states, extra, x, y, key) -> (states,
      extra, metrics)`` takes one optimizer step on a batch ``x: [batch, H, W, C]`` (``features`` is True
      when ``x`` holds the phase's cached inputs from ``phase_inputs`` instead of images); ``metrics`` is a
      dict of arrays, at least ``loss`` and ``accuracy`` of shape ``[K]`` (NaN for
      stages not trained by this step). Any other ``[K]`` or scalar entry is logged as well.
    * ``prepare_stages(stages, config)``: e.g. drop the auxiliary heads for backprop.
    * ``init_extra(stages, states, config, key, example)``: method state carried between steps and saved in
      checkpoints (replay buffers, codebooks, ...); ``{}`` by default.
    * ``num_phases(K, config)``: the schedule has ``num_phases * epochs`` epochs (sequential greedy: K).
    * ``phase_inputs(trainer, states, phase)``: an array replacing the training images during ``phase`` (the
      frozen features of sequential greedy), or ``None``.
    * ``validate(config)``: raise ``ValueError`` for bad ``method_options``.
    * ``eval_messages(extra)``: K-1 optional maps applied to the messages between stages at evaluation
      (:func:`dgl_jax.train.evaluate_batch`), e.g. VQ encode/decode with the codebooks held in ``extra``;
      ``None``: float features.
    """

    name: str
    description: str
    make_step: Callable[[Sequence[Stage], TrainConfig, int, bool], StepFn]
    prepare_stages: Callable[[list[Stage], TrainConfig], list[Stage]] = lambda stages, config: stages
    init_extra: Callable[..., PyTree] = _no_extra
    num_phases: Callable[[int, TrainConfig], int] = _one_phase
    phase_inputs: Callable[[Trainer, list[StageState], int], jax.Array | None] | None = None
    validate: Callable[[TrainConfig], None] = _no_validation
    eval_messages: Callable[[PyTree], Sequence[Callable[[jax.Array], jax.Array] | None] | None] = lambda extra: None


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Adds ``method`` to :data:`METHODS` (then ``--method NAME`` and ``TrainConfig(method=NAME)`` use it)."""
    if method.name in METHODS and not replace:
        raise ValueError(f"method {method.name!r} is already registered; pass replace=True to override it")
    METHODS[method.name] = method
    return method


def _metrics(m) -> dict:
    return {"loss": m.loss, "accuracy": m.accuracy}


def _dgl_make_step(stages, config, phase, features):
    def step(states, extra, x, y, key):
        states, m = dgl_step(stages, states, x, y)
        return states, extra, _metrics(m)

    return step


def _backprop_make_step(stages, config, phase, features):
    def step(states, extra, x, y, key):
        states, m = backprop_step(stages, states, x, y)
        return states, extra, _metrics(m)

    return step


def _sequential_make_step(stages, config, phase, features):
    def step(states, extra, x, y, key):
        states, m = sequential_step(stages, states, phase, x, y, features=features)
        return states, extra, _metrics(m)

    return step


def _sequential_phase_inputs(trainer: Trainer, states: list[StageState], phase: int) -> jax.Array | None:
    config = trainer.config
    if phase == 0 or config.augment or config.feature_cache_mb <= 0:
        return None
    shape = jax.eval_shape(
        lambda x: forward_features(trainer.stages[:phase], states[:phase], x), trainer.train_images[:1]
    ).shape
    nbytes = trainer.num_train * int(np.prod(shape[1:])) * 4
    if nbytes > config.feature_cache_mb * 2**20:
        trainer.log(
            f"sequential phase {phase}: frozen features need {nbytes / 2**20:.0f} MiB > feature_cache_mb="
            f"{config.feature_cache_mb:g}; recomputing them every step instead"
        )
        return None
    return trainer.frozen_features(states, phase)


register_method(Method("dgl", "synchronous decoupled greedy learning (Algorithm 1)", _dgl_make_step))
register_method(
    Method(
        "backprop",
        "end-to-end backprop through the trunk and the last head (aux heads dropped)",
        _backprop_make_step,
        prepare_stages=lambda stages, config: drop_aux_heads(stages),
    )
)
register_method(
    Method(
        "sequential",
        "sequential greedy: stage j trains for `epochs` on the frozen stages below it",
        _sequential_make_step,
        num_phases=lambda k, config: k,
        phase_inputs=_sequential_phase_inputs,
    )
)


# ----------------------------------------------------------------------------------------------------------
# Run state and events
# ----------------------------------------------------------------------------------------------------------
class RunState(NamedTuple):
    """Everything that determines the rest of a run: the stage states, the method's ``extra`` state, the
    base PRNG ``key`` (typed key; every per-epoch permutation and per-step key is derived from it), the
    next ``epoch`` (global over phases) and the next ``step`` within it (a chunk boundary)."""

    stages: list[StageState]
    extra: PyTree
    key: jax.Array
    epoch: int
    step: int


class Event(NamedTuple):
    """What :meth:`Trainer.fit` yields after each chunk: the new ``state``; ``epoch``/``phase``/``steps``
    (0-based epoch and phase of the chunk, number of optimizer steps it ran); ``train``: per-stage means of
    the step metrics over the chunk (lists of floats, NaN for untrained stages) plus ``lr`` and
    ``examples_per_s``; ``eval``: at the end of an epoch, the evaluation (see :meth:`Trainer.evaluate`)."""

    state: RunState
    epoch: int
    phase: int
    steps: int
    train: dict
    eval: dict | None


# ----------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------
class Trainer:
    """Builds stages, data and jitted functions for ``config`` (validated first: ``ValueError`` on bad
    input, before anything is written). ``dataset`` overrides loading ``config.dataset``; ``log`` receives
    one-line notes (dropped examples, cache decisions). With ``config.loader == 'grain'`` the training
    split is ``self.source`` (read on the host) and ``self.train_images``/``self.train_labels`` are ``None``."""

    def __init__(self, config: TrainConfig, dataset: Dataset | None = None, log: Callable[[str], None] = print):
        validate_config(config)
        self.config = config
        self.log = log
        self.method = METHODS[config.method]
        self.source: TrainSource | None = None
        self.eval_source: TrainSource | None = None  # the evaluation split, when it is streamed as well
        if config.loader == "grain":
            if dataset is not None:
                self.data, self.source = dataset, ArraySource(dataset.train_images, dataset.train_labels)
            else:
                self.source, self.data, self.eval_source = load_train_source(
                    config.dataset, config.data_dir, config.validation, image_size=config.image_size
                )
            n = len(self.source)
        else:
            self.data = (
                dataset if dataset is not None else load_dataset(config.dataset, config.data_dir, config.validation)
            )
            n = len(self.data.train_labels)
        if config.batch_size > n:
            raise ValueError(
                f"batch size {config.batch_size} is larger than the {n} training examples of {self.data.name}; "
                f"expected 1 <= batch size <= {n}"
            )
        self.num_train = n
        self.steps_per_epoch = n // config.batch_size
        self.chunk_steps = config.chunk_steps or min(self.steps_per_epoch, 50)
        self.chunks_per_epoch = -(-self.steps_per_epoch // self.chunk_steps)
        if config.loop not in LOOPS:
            raise ValueError(f"loop {config.loop!r} is not valid; expected one of {list(LOOPS)}")
        self.loop = config.loop if config.loop != "auto" else ("dispatch" if jax.default_backend() == "cpu" else "scan")
        self.used_per_epoch = self.steps_per_epoch * config.batch_size
        kwargs = {"num_classes": self.data.num_classes, "dtype": DTYPES[config.dtype]}
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
            steps_per_epoch=self.steps_per_epoch,
            decay_epochs=config.decay_epochs,
            decay_factor=config.decay_factor,
        )
        self.stages = self.method.prepare_stages(with_optimizer(stages, lambda j: tx()), config)
        self.num_stages = len(self.stages)
        self.num_phases = self.method.num_phases(self.num_stages, config)
        self.total_epochs = self.num_phases * config.epochs
        self.has_head = [s.head is not None for s in self.stages]
        info = DATASETS.get(config.dataset)
        size = self.data.image_shape[0]
        self.augment = (default_crop_padding(size), bool(info and info.flip)) if config.augment else None
        if self.source is None:  # data on device once; batches are gathered inside jit
            self.train_images = jnp.asarray(self.data.train_images)
            self.train_labels = jnp.asarray(self.data.train_labels)
            self._example = self.train_images[:1]
        else:
            self.train_images = self.train_labels = None
            self._example = jnp.asarray(self.source.read(np.arange(1))[0])
        self._stream: tuple[int, int, Iterator] | None = None  # (epoch, next step, batch iterator) of grain
        if self.eval_source is None:
            self._eval_data = self._pad_eval(self.data.test_images, self.data.test_labels, config.eval_batch_size)
            self.num_test = len(self.data.test_labels)
        else:
            self._eval_data, self.num_test = None, len(self.eval_source)
        self._chunk_fns: dict[tuple[int, bool], Callable] = {}
        self._eval_fn = jax.jit(functools.partial(_eval_all, self.stages, self.method.eval_messages))
        self._eval_batch_fn = jax.jit(functools.partial(_eval_batch, self.stages, self.method.eval_messages))
        self._phase = None
        self._phase_x = None
        self._order = None
        self._initial = None
        self._order_fn = jax.jit(functools.partial(_epoch_order, n=n))

    # -- state -------------------------------------------------------------------------------------------
    def init_state(self) -> RunState:
        """Fresh run state from ``config.seed`` (stage params from ``fold_in(key, 0)``); computed once per
        trainer (the arrays are immutable and never donated, so the cached state can be handed out again)."""
        if self._initial is None:
            key = jax.random.key(self.config.seed)
            example = self._example
            states = init_stage_states(self.stages, jax.random.fold_in(key, 0), example)
            extra = self.method.init_extra(self.stages, states, self.config, jax.random.fold_in(key, 3), example)
            self._initial = RunState(states, extra, key, 0, 0)
        return self._initial

    def describe(self) -> str:
        """One line about the data actually used per epoch (the last partial batch is dropped)."""
        dropped = self.num_train - self.used_per_epoch
        note = f", the last {dropped} of each epoch's permutation dropped" if dropped else ""
        return (
            f"{self.data.name}: {self.num_train} train / {self.num_test} eval examples; "
            f"{self.used_per_epoch} used per epoch ({self.steps_per_epoch} steps of {self.config.batch_size}{note}); "
            f"{self.chunk_steps} steps per dispatch; {self.num_stages} stages, method {self.config.method}"
        )

    # -- jitted pieces -----------------------------------------------------------------------------------
    def _chunk_fn(self, phase: int, features: bool) -> Callable:
        """``run(states, extra, images, labels, perm, step_base, start) -> (states, extra, metrics [steps])``:
        one ``lax.scan`` dispatch (``loop='scan'``) or one dispatch per step without host synchronisation
        (``loop='dispatch'``; faster on XLA:CPU, where convolutions inside a loop run ~4x slower). With the
        grain loader ``images`` is the epoch's batch iterator (see :meth:`_batches`) and ``labels``/``perm``
        are unused: one dispatch per step on the batches it yields."""
        if (phase, features) not in self._chunk_fns:
            step = self.method.make_step(self.stages, self.config, phase, features)
            static = (self.config.batch_size, self.steps_per_epoch, self.augment)
            if self.source is not None:
                one = jax.jit(functools.partial(_streamed_step, step, self.augment))

                def run(states, extra, batches, labels, perm, step_base, start):
                    ms = []
                    for s in range(start, min(start + self.chunk_steps, self.steps_per_epoch)):
                        x, y = next(batches)
                        states, extra, m = one(states, extra, x, y, step_base, jnp.int32(s))
                        ms.append(m)
                    return states, extra, jax.tree.map(lambda *a: jnp.stack(a), *ms)

                self._chunk_fns[phase, features] = run
            elif self.loop == "scan":
                self._chunk_fns[phase, features] = jax.jit(
                    functools.partial(_run_chunk, step, self.chunk_steps, *static)
                )
            else:
                one = jax.jit(functools.partial(_one_step, step, *static))

                def run(states, extra, images, labels, perm, step_base, start):
                    ms = []
                    for s in range(start, min(start + self.chunk_steps, self.steps_per_epoch)):
                        states, extra, m = one(states, extra, images, labels, perm, step_base, jnp.int32(s))
                        ms.append(m)
                    return states, extra, jax.tree.map(lambda *a: jnp.stack(a), *ms)

                self._chunk_fns[phase, features] = run
        return self._chunk_fns[phase, features]

    def _batches(self, perm: jax.Array, start: int) -> Iterator[tuple[jax.Array, jax.Array]]:
        """grain pipeline over the epoch's batches ``start..steps_per_epoch-1``: batch ``s`` is examples
        ``perm[s*B:(s+1)*B]`` read from :attr:`source` on ``GRAIN_THREADS`` background threads, ``GRAIN_PREFETCH``
        batches ahead, and put on the device: ``(images [B, H, W, C], labels [B])``."""
        import grain  # lazy: only the streaming loader needs it

        b, order, source = self.config.batch_size, np.asarray(jax.device_get(perm)), self.source

        def read(s: int) -> tuple[jax.Array, jax.Array]:
            x, y = source.read(order[s * b : (s + 1) * b])
            return jax.device_put(x), jax.device_put(y)

        ds = grain.MapDataset.range(start, self.steps_per_epoch).map(read)
        return iter(
            ds.to_iter_dataset(grain.ReadOptions(num_threads=GRAIN_THREADS, prefetch_buffer_size=GRAIN_PREFETCH))
        )

    def frozen_features(self, states: list[StageState], phase: int) -> jax.Array:
        """Output of the frozen stages ``0..phase-1`` (eval-mode BN) on every training image, computed in
        batches of ``eval_batch_size``: ``[num_train, H', W', C']``."""
        b = self.config.eval_batch_size
        n = self.num_train
        pad = -n % b
        x = jnp.pad(self.train_images, ((0, pad),) + ((0, 0),) * 3).reshape(-1, b, *self.train_images.shape[1:])
        fn = jax.jit(lambda st, xs: jax.lax.map(lambda xb: forward_features(self.stages[:phase], st, xb), xs))
        out = fn(states[:phase], x)
        return out.reshape(-1, *out.shape[2:])[:n]

    @staticmethod
    def _pad_eval(x: np.ndarray, y: np.ndarray, batch: int):
        n = len(y)
        b = min(batch, n)
        pad = -n % b
        xs = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(-1, b, *x.shape[1:])
        ys = np.concatenate([y, np.zeros((pad,), y.dtype)]).reshape(-1, b)
        mask = (np.arange(n + pad) < n).reshape(-1, b)
        return jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(mask)

    def _evaluate_streamed(self, states: list[StageState], extra: PyTree) -> PyTree:
        """Sums of :func:`dgl_jax.train.evaluate_batch` over :attr:`eval_source`, read in batches of
        ``min(eval_batch_size, num_test)`` (the last one zero-padded and masked) on ``GRAIN_THREADS``
        background threads, ``GRAIN_PREFETCH`` batches ahead; one jitted call per batch ``[b, H, W, C]``."""
        import grain  # lazy: only the streaming loader needs it

        n, source = self.num_test, self.eval_source
        b = min(self.config.eval_batch_size, n)

        def read(i: int) -> tuple[jax.Array, jax.Array, jax.Array]:
            x, y = source.read(np.arange(i * b, min((i + 1) * b, n)))
            pad = b - len(y)
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros((pad,), y.dtype)])
            return jax.device_put(x), jax.device_put(y), jax.device_put(np.arange(b) < b - pad)

        ds = grain.MapDataset.range(-(-n // b)).map(read)
        options = grain.ReadOptions(num_threads=GRAIN_THREADS, prefetch_buffer_size=GRAIN_PREFETCH)
        total = None
        for x, y, mask in ds.to_iter_dataset(options):
            out = self._eval_batch_fn(states, extra, x, y, mask)
            total = out if total is None else jax.tree.map(jnp.add, total, out)
        return total

    def evaluate(self, states: list[StageState], images=None, labels=None, extra: PyTree = None) -> dict:
        """Accuracy and mean loss of every head on the whole evaluation split (no example dropped: the last
        batch is padded and masked), plus the weighted ensemble: ``{'accuracy': [K], 'loss': [K],
        'ensemble': float}`` (NaN for stages without head). ``extra``: the method's state (e.g. the codebooks
        that quantize messages between stages, see ``Method.eval_messages``); None: float messages. The
        evaluation split is streamed from :attr:`eval_source` when there is one (``images`` None)."""
        extra = {} if extra is None else extra
        if images is None and self.eval_source is not None:
            out, n = self._evaluate_streamed(states, extra), self.num_test
        else:
            if images is None:
                (xs, ys, mask), n = self._eval_data, self.num_test
            else:
                xs, ys, mask = self._pad_eval(np.asarray(images), np.asarray(labels), self.config.eval_batch_size)
                n = len(labels)
            out = self._eval_fn(states, extra, xs, ys, mask)
        out = jax.device_get(out)
        has = np.asarray(self.has_head)
        acc = np.where(has, np.asarray(out.per_head) / n, np.nan)
        loss = np.where(has, np.asarray(out.loss) / n, np.nan)
        return {"accuracy": acc.tolist(), "loss": loss.tolist(), "ensemble": float(out.ensemble) / n}

    # -- the loop ----------------------------------------------------------------------------------------
    def fit(self, state: RunState) -> Iterator[Event]:
        """Trains from ``state`` to the end of the schedule, yielding an :class:`Event` after each chunk.

        Breaking out of the loop between events leaves ``event.state`` consistent: resuming from it gives
        bit-identically the same run as never stopping.
        """
        cfg = self.config
        self._phase = self._phase_x = None  # phase inputs are recomputed from the state being resumed
        self._stream = None  # and the grain iterator restarts at the state's step
        while state.epoch < self.total_epochs:
            phase = state.epoch // cfg.epochs
            if phase != self._phase:
                self._phase = phase
                make = self.method.phase_inputs if self.source is None else None
                self._phase_x = make(self, state.stages, phase) if make else None
            images = self.train_images if self._phase_x is None else self._phase_x
            t0 = time.perf_counter()
            if self._order is None or self._order[0] != state.epoch:
                self._order = (state.epoch, self._order_fn(state.key, jnp.int32(state.epoch)))
            perm, step_base = self._order[1]
            if self.source is not None:
                if self._stream is None or self._stream[:2] != (state.epoch, state.step):
                    self._stream = (state.epoch, state.step, self._batches(perm, state.step))
                images = self._stream[2]
            stages, extra, metrics = self._chunk_fn(phase, self._phase_x is not None)(
                state.stages, state.extra, images, self.train_labels, perm, step_base, state.step
            )
            metrics = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            steps = min(self.chunk_steps, self.steps_per_epoch - state.step)
            if self._stream is not None:
                self._stream = (state.epoch, state.step + steps, self._stream[2])
            train = {k: _nanmean(v[:steps]) for k, v in metrics.items()}
            train["lr"] = [
                float(s.schedule(int(st.step))) if s.schedule else float("nan")
                for s, st in zip(self.stages, stages, strict=True)
            ]
            train["examples_per_s"] = steps * cfg.batch_size / dt
            step = state.step + steps
            epoch = state.epoch
            ev = None
            if step >= self.steps_per_epoch:
                epoch, step = epoch + 1, 0
                ev = self.evaluate(stages, extra=extra)
            new = RunState(stages, extra, state.key, epoch, step)
            yield Event(new, state.epoch, phase, steps, train, ev)
            state = new


def _nanmean(v: np.ndarray) -> Any:
    v = np.asarray(v, np.float64)
    if v.ndim == 1:
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    ok = np.isfinite(v).any(axis=0)
    sums = np.where(np.isfinite(v), v, 0.0).sum(axis=0)
    counts = np.isfinite(v).sum(axis=0)
    return np.where(ok, sums / np.maximum(counts, 1), np.nan).tolist()


def _epoch_order(key, epoch, n):
    """The epoch's example order ``perm`` (a permutation of ``n`` from ``fold_in(fold_in(key, 1), epoch)``)
    and the base of its step keys ``fold_in(fold_in(key, 2), epoch)``."""
    perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 1), epoch), n)
    return perm, jax.random.fold_in(jax.random.fold_in(key, 2), epoch)


def _batch_at(images, labels, perm, step_base, s, batch, steps_per_epoch, augment):
    """Batch ``s`` of the epoch: ``perm[s*batch:(s+1)*batch]`` gathered, then :func:`_augment_at`."""
    idx = jax.lax.dynamic_slice_in_dim(perm, jnp.minimum(s, steps_per_epoch - 1) * batch, batch)
    return _augment_at(images[idx], labels[idx], step_base, s, augment)


def _augment_at(x, y, step_base, s, augment):
    """Batch ``s`` (``x: [batch, H, W, C]``) augmented with ``fold_in(fold_in(step_base, s), 0)`` when
    ``augment`` is ``(padding, flip)``; returns ``(x, y, key)`` with the step's method key ``fold_in(..., 1)``."""
    skey = jax.random.fold_in(step_base, s)
    if augment is not None:
        x = augment_batch(jax.random.fold_in(skey, 0), x, *augment)
    return x, y, jax.random.fold_in(skey, 1)


def _streamed_step(step_fn, augment, states, extra, x, y, step_base, s):
    """One optimizer step on batch ``s`` read by the host (``x: [batch, H, W, C]``, ``y: [batch]``)."""
    x, y, k = _augment_at(x, y, step_base, s, augment)
    return step_fn(states, extra, x, y, k)


def _one_step(step_fn, batch, steps_per_epoch, augment, states, extra, images, labels, perm, step_base, s):
    """One optimizer step on batch ``s`` (gathered inside jit): ``(states, extra, metrics)``."""
    x, y, k = _batch_at(images, labels, perm, step_base, s, batch, steps_per_epoch, augment)
    return step_fn(states, extra, x, y, k)


def _run_chunk(step_fn, chunk, batch, steps_per_epoch, augment, states, extra, images, labels, perm, step_base, start):
    """``chunk`` optimizer steps from step ``start`` inside one ``lax.scan``; steps past the end of the epoch
    are skipped (``lax.cond``) and report NaN metrics, so one compiled program serves every chunk."""
    args = (images, labels, perm, step_base)
    x0, y0, k0 = _batch_at(*args, jnp.int32(0), batch, steps_per_epoch, augment)
    metric_shapes = jax.eval_shape(step_fn, states, extra, x0, y0, k0)[2]

    def body(carry, i):
        s = start + i

        def run(c):
            st, ex, m = _one_step(step_fn, batch, steps_per_epoch, augment, c[0], c[1], *args, s)
            return (st, ex), m

        def skip(c):
            return c, jax.tree.map(lambda a: jnp.full(a.shape, jnp.nan, a.dtype), metric_shapes)

        return jax.lax.cond(s < steps_per_epoch, run, skip, carry)

    (states, extra), metrics = jax.lax.scan(body, (list(states), extra), jnp.arange(chunk))
    return states, extra, metrics


def _eval_batch(stages, eval_messages, states, extra, x, y, mask):
    """:func:`evaluate_batch` on one padded batch ``x: [b, H, W, C]``, ``y: [b]``, ``mask: [b]``."""
    return evaluate_batch(stages, states, x, y, mask=mask, messages=eval_messages(extra) if extra else None)


def _eval_all(stages, eval_messages, states, extra, xs, ys, mask):
    messages = eval_messages(extra) if extra else None

    def one(total, batch):
        x, y, m = batch
        out = evaluate_batch(stages, states, x, y, mask=m, messages=messages)
        return jax.tree.map(jnp.add, total, out), None

    zero = jax.eval_shape(lambda: evaluate_batch(stages, states, xs[0], ys[0], mask=mask[0], messages=messages))
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), zero)
    total, _ = jax.lax.scan(one, zero, (xs, ys, mask))
    return total


# Methods defined next to their algorithms register themselves once the registry exists.
from dgl_jax.asynchronous import register_methods as _register_async  # noqa: E402
from dgl_jax.dni import register_methods as _register_dni  # noqa: E402

_register_dni()
_register_async()
