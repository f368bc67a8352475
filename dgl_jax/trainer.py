"""The trainer: loops over chunks of steps, logs, evaluates; everything else lives in its own module.

* :mod:`dgl_jax.config`: :class:`~dgl_jax.config.TrainConfig` (the recipe) and its checks;
* :mod:`dgl_jax.methods`: the method registry (how a method builds its step and extra state);
* :mod:`dgl_jax.input_pipeline`: each epoch's order and each step's batch and key from the run key;
* :mod:`dgl_jax.evaluation`: padded batches, every head and the ensemble.

:class:`Trainer` loads the data onto the device, builds stages (with the config's codec) and jitted
chunk/eval functions once, and :meth:`Trainer.fit` yields an :class:`Event` after every chunk of
``chunk_steps`` optimizer steps. A :class:`RunState` is everything needed to continue bit-identically: the
per-step key that reaches every stochastic layer and codec is derived from the run key, epoch and step.

Typical use::

    trainer = Trainer(TrainConfig(epochs=3))
    state = trainer.init_state()
    for event in trainer.fit(state):
        if event.eval is not None:
            print(event.epoch, event.eval["accuracy"])
    state = event.state
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dgl_jax.accounting import nbytes
from dgl_jax.config import LOOPS, TrainConfig, build_stages, config_from_dict, config_to_dict, validate_config
from dgl_jax.data import (
    DATASETS,
    ArraySource,
    Dataset,
    TrainSource,
    default_crop_padding,
    load_dataset,
    load_train_source,
)
from dgl_jax.devices import resolve_layout, split_batch
from dgl_jax.distributed import from_process_rows, local_rows, place
from dgl_jax.evaluation import eval_all, eval_batch, pad_eval
from dgl_jax.files import json_ready
from dgl_jax.input_pipeline import augment_at, batch_at, epoch_order, one_step, run_chunk, streamed_step
from dgl_jax.methods import METHODS, Method, get_method, register_method
from dgl_jax.stage import StageState, init_stage_states, with_codec
from dgl_jax.steps import forward_features

PyTree = Any
GRAIN_THREADS = min(8, os.cpu_count() or 1)  # host threads reading (and decoding) batches ahead of the step
GRAIN_PREFETCH = max(4, GRAIN_THREADS)  # batches read ahead, each already on the device
__all__ = [
    "METHODS",
    "Event",
    "Method",
    "RunState",
    "TrainConfig",
    "Trainer",
    "config_from_dict",
    "config_to_dict",
    "json_ready",
    "register_method",
    "validate_config",
]


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
        self.method = get_method(config.method)
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
        stages = build_stages(config, self.data.num_classes, self.steps_per_epoch)
        if config.codec is not None:
            from dgl_jax.codecs import parse_codec

            stages = with_codec(stages, parse_codec(config.codec))
        self.stages = self.method.prepare_stages(stages, config)
        self.num_stages = len(self.stages)
        self.num_phases = self.method.num_phases(self.num_stages, config)
        self.total_epochs = self.num_phases * config.epochs
        self.has_head = [s.head is not None for s in self.stages]
        self.layout = resolve_layout(
            config.parallel,
            config.devices,
            config.stage_groups,
            config.executor,
            num_stages=self.num_stages,
            batch_size=config.batch_size,
            method=config.method,
        )
        # Wall-clock executors (async threads/ray, dgl ray) place the stages themselves (dgl_jax.wallclock).
        self._wallclock = None
        if config.executor == "ray" or (config.method == "async" and config.executor == "threads"):
            from dgl_jax.wallclock import WallclockChunks

            self._wallclock = WallclockChunks(self)
        # Data parallelism over more than one device: replicated data and states, batches split over 'data'.
        self._data_parallel = not self.layout.stage_parallel and self.layout.num_devices > 1 and self._wallclock is None
        self._executor = None  # the stage-parallel executor, built on the first chunk
        info = DATASETS.get(config.dataset)
        size = self.data.image_shape[0]
        self.augment = (default_crop_padding(size), bool(info and info.flip)) if config.augment else None
        if self.source is None:  # data on device once; batches are gathered inside jit
            self.train_images = self._place(jnp.asarray(self.data.train_images))
            self.train_labels = self._place(jnp.asarray(self.data.train_labels))
            self._example = self.train_images[:1]
        else:
            self.train_images = self.train_labels = None
            self._example = jnp.asarray(self.source.read(np.arange(1))[0])
        self._stream: tuple[int, int, Iterator] | None = None  # (epoch, next step, batch iterator) of grain
        if self.eval_source is None:
            self._eval_data = self._place(
                pad_eval(self.data.test_images, self.data.test_labels, config.eval_batch_size)
            )
            self.num_test = len(self.data.test_labels)
        else:
            self._eval_data, self.num_test = None, len(self.eval_source)
        self._chunk_fns: dict[tuple[int, bool], Callable] = {}
        self._batch_fn = None
        self.wire_bytes: dict[str, int] | None = None  # stage-parallel: bytes per step between stage groups
        self._eval_fn = jax.jit(functools.partial(eval_all, self.stages))
        self._eval_batch_fn = jax.jit(functools.partial(eval_batch, self.stages))
        self._phase = None
        self._phase_x = None
        self._order = None
        self._initial = None
        self._order_fn = jax.jit(functools.partial(epoch_order, n=n))
        if config.codec is not None:  # a codec that does not fit a boundary fails here, before any run folder
            try:
                jax.eval_shape(lambda: init_stage_states(self.stages, jax.random.key(0), self.example_batch))
            except ValueError as e:
                raise ValueError(f"--codec {config.codec}: {str(e).splitlines()[0]}") from None

    @property
    def example_batch(self) -> jax.ShapeDtypeStruct:
        """Shape and dtype of one training batch ``[batch_size, H, W, C]``."""
        return jax.ShapeDtypeStruct((self.config.batch_size, *self._example.shape[1:]), self._example.dtype)

    # -- state -------------------------------------------------------------------------------------------
    def init_state(self) -> RunState:
        """Fresh run state from ``config.seed`` (stage params from ``fold_in(key, 0)``); computed once per
        trainer (the arrays are immutable and never donated, so the cached state can be handed out again)."""
        if self._initial is None:
            key = jax.random.key(self.config.seed)
            example = self.example_batch
            states = init_stage_states(self.stages, jax.random.fold_in(key, 0), example)
            extra = self.method.init_extra(self.stages, states, self.config, jax.random.fold_in(key, 3), example)
            self._initial = RunState(self._place(states), self._place(extra), key, 0, 0)
        return self._initial

    def describe(self) -> str:
        """One line about the data actually used per epoch (the last partial batch is dropped) and the LR
        schedule."""
        c = self.config
        dropped = self.num_train - self.used_per_epoch
        note = f", the last {dropped} of each epoch's permutation dropped" if dropped else ""
        if c.decay_epochs is None:
            schedule = "constant"
        elif isinstance(c.decay_epochs, int):
            schedule = f"x{c.decay_factor} every {c.decay_epochs} epochs"
        else:
            schedule = f"x{c.decay_factor} at epochs {','.join(map(str, c.decay_epochs))}"
        return (
            f"{self.data.name}: {self.num_train} train / {self.num_test} eval examples; "
            f"{self.used_per_epoch} used per epoch ({self.steps_per_epoch} steps of {c.batch_size}{note}); "
            f"{self.chunk_steps} steps per dispatch; {self.num_stages} stages, method {c.method}; "
            f"{c.epochs} epochs, LR {c.lr} {schedule}"
        )

    def start_executor(self, directory: str | os.PathLike | None = None) -> None:
        """Starts a wall-clock executor now (Ray: connect, check resources, start the actors, their checkpoints
        and manifest in ``directory``) rather than on the first chunk; one-line ``ValueError`` on bad input."""
        if self._wallclock is not None:
            self._wallclock.start(directory)

    def close(self, status: str = "stopped") -> None:
        """Stops a wall-clock executor (Ray actors, and the local Ray instance it started)."""
        if self._wallclock is not None:
            self._wallclock.close(status)

    # -- jitted pieces -----------------------------------------------------------------------------------
    def _chunk_fn(self, phase: int, features: bool) -> Callable:
        """``run(states, extra, images, labels, perm, step_base, start) -> (states, extra, metrics [steps])``:
        one ``lax.scan`` dispatch (``loop='scan'``) or one dispatch per step without host synchronisation
        (``loop='dispatch'``; faster on XLA:CPU, where convolutions inside a loop run slower). With the
        grain loader ``images`` is the epoch's batch iterator (see :meth:`_batches`) and ``labels``/``perm``
        are unused: one dispatch per step on the batches it yields."""
        if self.layout.stage_parallel:
            return self._pipeline_chunk
        if self._wallclock is not None:
            return self._wallclock
        if (phase, features) not in self._chunk_fns:
            step = self.method.make_step(self.stages, self.config, phase, features)
            if self._data_parallel:
                step = split_batch(step, self.layout.batch())
            static = (self.config.batch_size, self.steps_per_epoch, self.augment)
            if self.source is not None:
                one = jax.jit(functools.partial(streamed_step, step, self.augment))

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
                    functools.partial(run_chunk, step, self.chunk_steps, *static)
                )
            else:
                one = jax.jit(functools.partial(one_step, step, *static))

                def run(states, extra, images, labels, perm, step_base, start):
                    ms = []
                    for s in range(start, min(start + self.chunk_steps, self.steps_per_epoch)):
                        states, extra, m = one(states, extra, images, labels, perm, step_base, jnp.int32(s))
                        ms.append(m)
                    return states, extra, jax.tree.map(lambda *a: jnp.stack(a), *ms)

                self._chunk_fns[phase, features] = run
        return self._chunk_fns[phase, features]

    def _place(self, tree: PyTree) -> PyTree:
        """``tree`` replicated over the data-parallel devices (unchanged on one device or stage-parallel)."""
        return place(tree, self.layout.replicated()) if self._data_parallel else tree

    def _pipeline_chunk(self, states, extra, images, labels, perm, step_base, start):
        """Stage-parallel chunk: the chunk's batches (and their step keys, as every loop derives them) through
        the stage pipeline (:class:`~dgl_jax.parallel.SpmdPipeline` or :class:`~dgl_jax.parallel.PipelinedDGL`),
        filled and drained within the chunk, so it equals the same steps of ``dgl_step``. Logs the bytes per
        step crossing the boundaries, measured (collective-permutes of the compiled SPMD program, or the
        ``nbytes`` of the arrays the threads moved) next to the accounting."""
        from dgl_jax.parallel import PipelinedDGL, Placement, SpmdPipeline

        steps = range(start, min(start + self.chunk_steps, self.steps_per_epoch))
        if self._batch_fn is None and self.source is None:
            b, spe = self.config.batch_size, self.steps_per_epoch
            self._batch_fn = jax.jit(lambda *a: batch_at(*a, b, spe, self.augment))
        elif self._batch_fn is None:  # grain: ``images`` is the epoch's batch iterator
            self._batch_fn = jax.jit(lambda x, y, base, s: augment_at(x, y, base, s, self.augment))
        if self.source is None:
            items = [self._batch_fn(images, labels, perm, step_base, jnp.int32(s)) for s in steps]
        else:
            items = [self._batch_fn(*next(images), step_base, jnp.int32(s)) for s in steps]
        batches, keys = [(x, y) for x, y, _ in items], [k for _, _, k in items]
        lay, x0, y0 = self.layout, items[0][0], items[0][1]
        group = lay.stage_group(self.num_stages)  # stage j runs on stage group group[j]
        if self._executor is None and lay.executor == "spmd":
            self._executor = SpmdPipeline(self.stages, lay.mesh(), states, x0, y0, data_axis="data", groups=group)
            probe = self._executor.init(states)
            self.wire_bytes = {
                "accounted": int(sum(self._executor.wire_bytes())),
                "measured": self._executor.measured_wire_bytes(probe),
            }
        elif self._executor is None:
            groups = np.array(lay.devices).reshape(lay.stage_groups, lay.data)
            self._executor = PipelinedDGL(self.stages, Placement(tuple(tuple(groups[g]) for g in group)))
        if lay.executor == "spmd":
            st, m = self._executor.run(self._executor.init(states), batches, keys=keys)
            states = self._executor.unpack(st)
        else:
            placed = self._executor.place(states)
            self._executor.compile(placed, x0, y0)
            final, m = self._executor.run(placed, batches, keys=keys)
            states = list(jax.device_get(final))
            crossing = [group[b] != group[b + 1] for b in range(self.num_stages - 1)]  # between stage groups
            wires = self._wire_items(states, x0, y0)
            accounted = int(sum(nbytes(w) for w, c in zip(wires, crossing, strict=True) if c))
            sent = sum(n for n, c in zip(self._executor.bytes_sent, crossing, strict=True) if c)
            self.wire_bytes = {"accounted": accounted, "measured": int(sent) // len(batches)}
        metrics = {name: jnp.asarray(m[name]) for name in ("loss", "accuracy")}
        steps_n = len(batches)
        metrics["wire_bytes_measured"] = jnp.full((steps_n,), self.wire_bytes["measured"], jnp.float32)
        metrics["wire_bytes_accounted"] = jnp.full((steps_n,), self.wire_bytes["accounted"], jnp.float32)
        return states, extra, metrics

    def _wire_items(self, states, x, y) -> list[PyTree]:
        """Shapes of what each boundary moves per step with the threads executor: the wire and the targets."""
        from dgl_jax.stage import message_specs, wire_spec

        msgs = message_specs(self.stages, states, x)
        return [(wire_spec(s, st.codec, m), y) for s, st, m in zip(self.stages[:-1], states[:-1], msgs, strict=True)]

    def _batches(self, perm: jax.Array, start: int) -> Iterator[tuple[jax.Array, jax.Array]]:
        """grain pipeline over the epoch's batches ``start..steps_per_epoch-1``: batch ``s`` is examples
        ``perm[s*B:(s+1)*B]`` read from :attr:`source` on ``GRAIN_THREADS`` background threads, ``GRAIN_PREFETCH``
        batches ahead, and put on the device: ``(images [B, H, W, C], labels [B])``. Data-parallel over many
        processes, each reads only the rows its devices hold and the global batch is assembled from them."""
        import grain  # lazy: only the streaming loader needs it

        b, order, source = self.config.batch_size, np.asarray(jax.device_get(perm)), self.source
        shared = self._data_parallel and jax.process_count() > 1  # each process reads its rows of the batch
        sharding = self.layout.batch()
        rows = local_rows(sharding, b) if shared else slice(None)

        def read(s: int) -> tuple[jax.Array, jax.Array]:
            x, y = source.read(order[s * b : (s + 1) * b][rows])
            if shared:
                return from_process_rows(sharding, x, b), from_process_rows(sharding, y, b)
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
            out = self._eval_batch_fn(states, x, y, mask)
            total = out if total is None else jax.tree.map(jnp.add, total, out)
        return total

    def evaluate(self, states: list[StageState], images=None, labels=None, extra: PyTree = None) -> dict:
        """Accuracy and mean loss of every head on the whole evaluation split (no example dropped: the last
        batch is padded and masked), plus the weighted ensemble: ``{'accuracy': [K], 'loss': [K],
        'ensemble': float}`` (NaN for stages without head). Messages go through the stages' codecs (their
        states are in ``states``); ``extra`` is not used. The evaluation split is streamed from
        :attr:`eval_source` when there is one (``images`` None)."""
        extra = {} if extra is None else extra
        if images is None and self.eval_source is not None:
            out, n = self._evaluate_streamed(states, extra), self.num_test
        else:
            if images is None:
                (xs, ys, mask), n = self._eval_data, self.num_test
            else:
                xs, ys, mask = pad_eval(np.asarray(images), np.asarray(labels), self.config.eval_batch_size)
                n = len(labels)
            out = self._eval_fn(states, xs, ys, mask)
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
