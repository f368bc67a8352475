"""``python -m dgl_jax train|eval``: train with a progress bar into a run folder, resume, evaluate.

Run folder (``--out``, default ``runs/<dataset>-<model>-<method>-<time>``)::

    config.json          the resolved TrainConfig (``--resume`` reads it back)
    run.json             how it was started: command line, preset, plugins (--import), versions, devices,
                         processes; stage-parallel runs add the wire bytes per step (measured, accounted)
    metrics.jsonl        one JSON line per logged chunk per stage ("train") and per epoch per stage ("eval")
    summary.json         final per-stage accuracies, status (completed / interrupted), timings
    learning_curves.png  per-stage test accuracy vs epoch
    checkpoints/<step>/  orbax checkpoints of the whole run state (the last --keep)

Over many processes (``--coordinator``/``--num-processes``/``--process-id``, or a cluster's environment)
process 0 writes these files and every process writes its part of the checkpoints.

Every JSON file and the PNG are written atomically (temporary file + ``os.replace``). Bad input gets one
line on stderr naming the bad value and the accepted ones, exit code 2, and no run folder is created:
everything (names, ranges, K against the model, batch size against the data) is checked first.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

from dgl_jax.arguments import TRAIN_FIELDS, add_fields, explicit_fields, key_value
from dgl_jax.files import check_creatable, json_clean, save_figure, write_atomic, write_json
from dgl_jax.host import keep_freed_memory

EXIT_BAD_INPUT = 2  # bad input, a run folder in use by another process, no usable checkpoint
EXIT_DIVERGED = 3  # NaN/inf in the training state: the last finite checkpoint is kept
EXIT_WRITE_ERROR = 4  # the run folder could not be written (full disk, permissions): resumable
EXIT_INTERRUPTED = 130  # SIGINT; SIGTERM gives 143 (128 + the signal number)


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from dgl_jax.presets import PRESETS

    parser = _Parser(prog="python -m dgl_jax", description="Decoupled Greedy Learning of CNNs in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    presets = "\n".join(f"  {name}: {p.description}" for name, p in PRESETS.items())
    train = sub.add_parser(
        "train",
        help="train a model (default: small_cnn, 3 stages, DGL, digits)",
        description="Train a model into a run folder. Presets (--preset NAME):\n" + presets,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--preset", help=f"start from a paper recipe: one of {', '.join(PRESETS)}")
    add_fields(train, TRAIN_FIELDS)
    train.add_argument(
        "--method-option",
        dest="method_options",
        type=key_value,
        action="append",
        help="KEY=VALUE (JSON value), repeatable; e.g. --method async: capacity=5 policy=priority_lifo "
        "slow_stage=2 slowdown=1.5 delay=0 schedule=paper max_reuse=null",
    )
    train.add_argument(
        "--model-option",
        dest="model_options",
        type=key_value,
        action="append",
        help="zoo KEY=VALUE, e.g. width_mult=0.25",
    )
    train.add_argument("--out", help="run folder (default runs/<dataset>-<model>-<method>-<time>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    train.add_argument("--checkpoint-every", type=int, default=1, help="checkpoint every N epochs (default 1)")
    train.add_argument("--coordinator", metavar="HOST:PORT", help="many processes: process 0's address (all three)")
    train.add_argument("--num-processes", type=int, help="many processes: how many take part")
    train.add_argument("--process-id", type=int, help="many processes: this one's index, 0..N-1 (0 writes the files)")
    _common(train)
    ev = sub.add_parser("eval", help="evaluate the last checkpoint of a run folder")
    ev.add_argument("run_dir")
    ev.add_argument("--data-dir", help="override the data folder recorded in the run")
    _common(ev)
    from dgl_jax.sweep import build_parser as sweep_parser

    _common(sweep_parser(sub))
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--import",
        dest="imports",
        metavar="MODULE",
        action="append",
        default=[],
        help="import MODULE first (repeatable; the current folder is on the path): a plugin that registers "
        "models (dgl_jax.register_model) or methods, then usable with --model / --method",
    )
    p.add_argument(
        "--compilation-cache",
        default=None,
        help="persistent XLA compilation cache folder, or 'off' (default ~/.cache/dgl_jax/jax or $DGL_JAX_CACHE_DIR; "
        "process-wide: applied by default only when run as a program, not from dgl_jax.cli.main(argv))",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--malloc",
        choices=["keep", "default"],
        default=None,
        help="keep: glibc keeps freed host memory for reuse (no page faults on every step's XLA buffers; "
        "dgl_jax.host.keep_freed_memory); default: glibc's own settings. Process-wide: 'keep' is the default "
        "only when run as a program, not from dgl_jax.cli.main(argv)",
    )


def import_plugins(modules: list[str]) -> None:
    """Imports each of ``modules`` (the current folder on ``sys.path``); a failure is a one-line UsageError."""
    import importlib

    if modules and not ({"", os.getcwd()} & set(sys.path)):
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UsageError(f"--import {name}: {type(e).__name__}" + (f": {first}" if first else "")) from None


def _imports_hint(run_dir: Path, given: list[str]) -> str:
    """A note naming the ``--import`` s that ``run.json`` records but were not given now ('' if none)."""
    try:
        recorded = json.loads((Path(run_dir) / "run.json").read_text()).get("imports") or []
    except (OSError, ValueError, AttributeError):
        return ""
    missing = [m for m in recorded if m not in given]
    return f" (the run was trained with {' '.join('--import ' + m for m in missing)})" if missing else ""


def setup_compilation_cache(path: str) -> str | None:
    """Turns on JAX's persistent compilation cache in ``path`` (every program, however fast to compile)."""
    import jax

    if not path or path.lower() in ("off", "none", "0"):
        return None
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# ----------------------------------------------------------------------------------------------------------
# Files (writers in dgl_jax.files; write_atomic / write_json re-exported here)
# ----------------------------------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (a line cut short by a full disk or a crash is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line) if line.strip() else None
            if isinstance(row, dict):
                rows.append(row)
    return rows


def plot_learning_curves(run_dir: Path, title: str = "") -> Path | None:
    """``learning_curves.png``: per-stage (and ensemble) evaluation accuracy vs epoch from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(run_dir) if r.get("event") == "eval" and r.get("accuracy") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name in sorted({str(r["stage"]) for r in rows}, key=lambda s: (s == "ensemble", s)):
        pts = sorted((r["epoch"], 100 * r["accuracy"]) for r in rows if str(r["stage"]) == name)
        label = name if name == "ensemble" else f"stage {int(name) + 1}"
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, ls="--" if name == "ensemble" else "-", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return save_figure(fig, Path(run_dir) / "learning_curves.png")
    finally:
        plt.close(fig)


def format_table(accuracy: list[float], ensemble: float, layers: list[tuple[str, ...]]) -> str:
    """The per-stage accuracy table printed at the end of ``train`` and by ``eval``."""
    lines = ["stage  layers                 test acc", "-----  ---------------------  --------"]
    for j, (acc, names) in enumerate(zip(accuracy, layers, strict=True)):
        text = ",".join(names)
        text = text if len(text) <= 21 else text[:18] + "..."
        acc_text = "     -" if acc is None or not math.isfinite(acc) else f"{100 * acc:7.2f}%"
        lines.append(f"{j + 1:>5}  {text:<21}  {acc_text}")
    lines.append(f"{'ens':>5}  {'weighted heads':<21}  {100 * ensemble:7.2f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------
# What --resume may change: the length of the run, where the data is, and the devices it runs on (a
# checkpoint saved on N devices restores on any other count: the arrays are resharded).
RESUME_MAY_CHANGE = (
    "epochs",
    "data_dir",
    "devices",
    "parallel",
    "stage_groups",
    "executor",
    "ray_address",
    "ray_checkpoint_every",
)


def resolve_config(args: argparse.Namespace):
    """TrainConfig from defaults <- preset <- explicit options (or from the run folder with --resume)."""
    from dgl_jax.presets import PRESETS, preset_config
    from dgl_jax.trainer import config_from_dict

    explicit = explicit_fields(args, TRAIN_FIELDS)
    for name in ("method_options", "model_options"):
        if getattr(args, name):
            explicit[name] = dict(getattr(args, name))
    if args.resume:
        run = Path(args.resume)
        path = run / "config.json"
        if not path.is_file():
            raise UsageError(f"--resume {args.resume!r}: no config.json there; expected a run folder made by train")
        extra = sorted(set(explicit) - set(RESUME_MAY_CHANGE))
        if extra or args.preset or args.out:
            bad = extra + (["preset"] if args.preset else []) + (["out"] if args.out else [])
            flags = ", ".join("--" + f.replace("_", "-") for f in RESUME_MAY_CHANGE)
            raise UsageError(f"--resume cannot change {bad}; only {flags} may be given")
        try:
            d = json.loads(path.read_text())
            d.update(explicit)
            return config_from_dict(d)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--resume {args.resume!r}: config.json is invalid: {e}") from None
    if args.preset is not None and args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; expected one of {sorted(PRESETS)}")
    if "devices" not in explicit:  # the command line uses every local device unless told otherwise
        import jax

        explicit["devices"] = jax.device_count()
    try:
        return preset_config(args.preset or "quickstart", **explicit)
    except TypeError as e:
        raise UsageError(str(e)) from None


class _Stop(BaseException):
    """Raised by the signal handler to stop at once (start-up, or a second signal): not an ``Exception``, so
    nothing on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Interrupt:
    """SIGINT/SIGTERM over a whole command, exit code ``128 + signal`` (130, 143):

    * during start-up (until the first chunk of training is done) a signal stops at once (:class:`_Stop`):
      there is nothing to save yet;
    * during training it sets :attr:`signal`, checked after every chunk: the state is checkpointed, the
      summary written, and the command ends;
    * a second signal stops at once, except inside :meth:`critical` (a checkpoint being written), which
      finishes first.
    """

    def __init__(self, restore: bool = True):
        self.signal: int | None = None
        self.count = 0
        self.training = False
        self.finished = False  # the command's last line is out: later signals change nothing
        self._critical = 0
        self._restore = restore
        self._old = {}
        self.as_keyboard_interrupt = False  # raise KeyboardInterrupt instead (commands that save on it: sweep)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.count += 1
        if self.signal is None:
            self.signal = signum
        if self.as_keyboard_interrupt:
            raise KeyboardInterrupt
        if not self._critical and self._at_once():
            raise _Stop(self.signal)

    def _at_once(self) -> bool:
        return self.signal is not None and not self.finished and (not self.training or self.count > 1)

    @contextlib.contextmanager
    def critical(self):
        """A section that a signal never cuts short: a stop requested meanwhile happens at its end."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self._at_once():
            raise _Stop(self.signal)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal or signal.SIGINT).name

    def __exit__(self, *exc):
        self.finished = True
        if self._restore:  # as the program, the handlers stay: a late signal cannot raise during the exit
            for sig, old in self._old.items():
                signal.signal(sig, old)


_fault_hits: dict[str, int] = {}


def _fault_wait(point: str, interrupt: _Interrupt) -> None:
    """Test hook: with ``DGL_JAX_FAULT_WAIT=POINT[:N][,...]`` the N-th time (default 1) the run reaches
    ``POINT`` (``startup``: run folder written, nothing compiled; ``save``: a checkpoint written but not yet
    committed; ``epoch-end``: an epoch's checkpoint committed) it prints ``fault-wait POINT`` on stdout and
    waits for a signal (at most 120 s), so that a test sends its signal at exactly that moment."""
    spec = os.environ.get("DGL_JAX_FAULT_WAIT", "")
    if not spec:
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    for item in spec.split(","):
        name, _, n = item.strip().partition(":")
        if name == point and _fault_hits[point] == int(n or 1):
            print(f"fault-wait {point}", flush=True)
            deadline = time.monotonic() + 120
            while interrupt.signal is None and time.monotonic() < deadline:
                time.sleep(0.01)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _finite_check():
    """``(stages, extra) -> bool [K + 1]``: whether every float of each stage state (params, model state,
    optimizer state, codec state) and of the method's state is finite. One jitted reduction per stage (a
    stage's state lives on its own devices when the stages run in parallel), one transfer for all."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    @jax.jit
    def ok(tree):
        leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_float(x)]
        return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)

    def check(stages, extra):
        flags = [ok(s) for s in stages]
        try:
            flags.append(ok(extra))
        except ValueError:  # the method's state spread over several devices: leaf by leaf
            flags.append([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(extra) if _is_float(x)])
        return np.array([bool(np.all(f)) for f in jax.device_get(flags)])

    return check


def _is_float(x) -> bool:
    import jax.numpy as jnp

    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def _join(where: list[str]) -> str:
    """``['stage 1', 'stage 3']`` -> ``'stages 1, 3'``; anything else joined with commas."""
    stages = [w.split()[1] for w in where if w.startswith("stage ")]
    if len(stages) > 1:
        return ", ".join([f"stages {', '.join(stages)}"] + [w for w in where if not w.startswith("stage ")])
    return ", ".join(where)


def _resume_command(run_dir: Path) -> str:
    return f"python -m dgl_jax train --resume {run_dir}"


def _check_labels(trainer) -> None:
    """One line (UsageError) if a label of the training or evaluation split is outside [0, num_classes)."""
    import numpy as np

    k = trainer.data.num_classes
    sets = [("training", getattr(trainer.source, "labels", None) if trainer.source else trainer.data.train_labels)]
    sets.append(("evaluation", trainer.data.test_labels))
    for name, labels in sets:
        if labels is None or not len(labels):
            continue
        labels = np.asarray(labels)
        bad = (labels < 0) | (labels >= k)
        if bad.any():
            raise UsageError(
                f"{trainer.data.name}: {int(bad.sum())} {name} labels are outside [0, {k}) (e.g. "
                f"{int(labels[bad][0])} at index {int(np.flatnonzero(bad)[0])}); expected class indices 0..{k - 1}"
            )


def _too_small(trainer, error: Exception) -> str:
    """The one line for a model too deep for its inputs: which unit of which stage gets too few pixels."""
    import jax

    shape = trainer.example_batch.shape[1:3]
    what = f"model {trainer.config.model} is too deep for {shape[0]}x{shape[1]} inputs"
    x, key = trainer.example_batch, jax.random.key(0)
    for j, stage in enumerate(trainer.stages):
        units = getattr(stage.block, "layers", None)
        if units is None or len(units) != len(stage.layers):
            break
        for name, unit in zip(stage.layers, units, strict=True):
            try:
                x = jax.eval_shape(lambda a, u=unit: u.init_with_output(key, a, False)[0], x)
            except ValueError as e:
                return f"{what}: layer {name} (stage {j + 1}): {str(e).splitlines()[0]}"
        if stage.head is not None:
            try:
                jax.eval_shape(lambda a, h=stage.head: h.init_with_output(key, a, False)[0], x)
            except ValueError as e:
                return f"{what}: the head of stage {j + 1} ({x.shape[1]}x{x.shape[2]} pixels): {str(e).splitlines()[0]}"
    return f"{what}: {str(error).splitlines()[0]}"


def _prepare_out(run_dir: Path, lock) -> bool:
    """Checks a fresh run's ``--out`` before any data loads; takes its lock if it exists. True when it is a run
    folder whose first checkpoint never came (config.json, no checkpoint): it is then reused from scratch."""
    from dgl_jax.checkpoint import Checkpointer
    from dgl_jax.files import FolderLockedError

    problem = check_creatable(run_dir)
    if problem:
        raise UsageError(f"--out {str(run_dir)!r} cannot be created: {problem}")
    if not run_dir.exists():
        return False
    names = {p.name for p in run_dir.iterdir()} - {lock.NAME}
    if not names and not (run_dir / lock.NAME).exists():
        return False
    if names and "config.json" not in names:
        raise UsageError(f"--out {str(run_dir)!r} exists and is not empty; pick another folder or use --resume")
    try:
        lock.acquire()
    except FolderLockedError as e:
        raise UsageError(str(e)) from None
    if names and Checkpointer(run_dir / "checkpoints").steps():
        raise UsageError(
            f"--out {str(run_dir)!r} holds a run with checkpoints; continue it with --resume or pick another folder"
        )
    return bool(names)


def _join_processes(args: argparse.Namespace) -> None:
    """Many processes: ``jax.distributed.initialize`` with ``--coordinator/--num-processes/--process-id``, or
    from the cluster's environment (SLURM, Open MPI, Cloud TPU) when it holds several processes; nothing
    otherwise. Processes that do not join within ``DGL_JAX_INIT_TIMEOUT_S`` (default 50) seconds end with
    one line and exit code 2."""
    from dgl_jax import distributed

    try:
        spec = distributed.check_process_flags(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if spec is None and distributed.detect_cluster() is None:
        return
    timeout = float(os.environ.get("DGL_JAX_INIT_TIMEOUT_S", distributed.INIT_TIMEOUT_S))
    try:
        distributed.initialize(*(spec or (None, None, None)), timeout_s=timeout)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e).splitlines()[0]) from None


def cmd_train(args: argparse.Namespace, t_start: float, interrupt: _Interrupt | None = None) -> int:
    from dgl_jax.distributed import agree, broadcast, is_primary
    from dgl_jax.files import FolderLock, FolderLockedError

    interrupt = interrupt or _Interrupt()  # not installed: never set
    _join_processes(args)
    config = resolve_config(args)
    if args.keep < 1 or args.checkpoint_every < 1:
        raise UsageError(f"--keep {args.keep} / --checkpoint-every {args.checkpoint_every}: expected integers >= 1")
    if args.resume:
        run_dir = Path(args.resume).absolute()
        problem = check_creatable(run_dir)
        if problem:
            raise UsageError(f"--resume {args.resume!r}: cannot write there: {problem}")
    else:
        now = broadcast(int(time.time())) if args.out is None else 0  # process 0's clock names the folder
        stamp = datetime.datetime.fromtimestamp(now).strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out or f"runs/{config.dataset}-{config.model}-{config.method}-{stamp}").absolute()
    lock = FolderLock(run_dir)
    try:
        error, reuse = None, False
        try:
            if is_primary() and args.resume:  # many processes: process 0 holds the run folder
                try:
                    lock.acquire()
                except FolderLockedError as e:
                    raise UsageError(str(e)) from None
            elif is_primary():
                reuse = _prepare_out(run_dir, lock)
        except UsageError as e:
            error = str(e)
        error = agree("run-folder", error)  # the other processes stop with process 0
        if error is not None:
            raise UsageError(error if is_primary() else f"process 0: {error}")
        return _train(args, config, run_dir, lock, reuse, t_start, interrupt)
    finally:
        lock.release()


def _train(args, config, run_dir: Path, lock, reuse: bool, t_start: float, interrupt: _Interrupt) -> int:
    from dgl_jax.checkpoint import Checkpointer, CheckpointError, state_tree
    from dgl_jax.distributed import agree, is_primary
    from dgl_jax.files import FolderLockedError
    from dgl_jax.layers import InputTooSmallError
    from dgl_jax.trainer import Trainer, config_to_dict

    notes: list[str] = []
    try:
        trainer = Trainer(config, log=notes.append)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        hint = _imports_hint(Path(args.resume), args.imports) if args.resume else ""
        raise UsageError((str(e).splitlines()[0] if str(e) else type(e).__name__) + hint) from None
    _check_labels(trainer)
    import jax

    print(trainer.describe(), flush=True)
    try:
        state = trainer.init_state()  # methods check what needs the built model here (e.g. a stage index)
    except InputTooSmallError as e:
        raise UsageError(_too_small(trainer, e)) from None
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    try:  # Ray: reach the cluster, check its resources, start the actors (their files under ray/)
        trainer.start_executor(run_dir / "ray")
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    checkpointer = Checkpointer(run_dir / "checkpoints", args.keep)
    saved = None  # (global step, epoch, step) of the newest checkpoint of the run
    primary = is_primary()  # many processes: process 0 writes the run folder's files, all write checkpoints
    error = None
    try:
        if args.resume:
            if primary:
                checkpointer.cleanup()  # what an interrupted save left (we hold the lock)
            if checkpointer.steps():
                try:
                    tree, meta = checkpointer.restore(state_tree(state.stages, state.extra, state.key), warn=_warn)
                except CheckpointError as e:
                    raise UsageError(str(e)) from None
                for bad, _ in checkpointer.skipped if primary else ():  # newer but unusable: kept aside, redone
                    checkpointer.set_aside(bad)
                state = state._replace(
                    stages=tree["stages"],
                    extra=tree["extra"],
                    key=jax.random.wrap_key_data(tree["key"]),
                    epoch=int(meta["epoch"]),
                    step=int(meta["step"]),
                )
                saved = (int(meta["global_step"]), state.epoch, state.step)
            else:
                print(f"{run_dir}: no checkpoint yet, the run starts from the beginning", flush=True)
            if trainer.total_epochs < state.epoch:
                phases = trainer.num_phases
                raise UsageError(
                    f"--epochs {config.epochs}: the run in {run_dir} has done {state.epoch} epochs already; "
                    f"expected --epochs >= {-(-state.epoch // phases)}"
                    + (f" (epochs per phase, {phases} phases)" if phases > 1 else "")
                )
            done = saved[0] if saved else 0
            if primary:
                kept = [r for r in read_metrics(run_dir) if r.get("global_step", 0) <= done]
                write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
                write_json(run_dir / "config.json", config_to_dict(config))
            print(f"resumed {run_dir} at epoch {state.epoch} step {state.step} (global step {done})", flush=True)
        elif primary:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not lock.held:
                try:
                    lock.acquire()
                except FolderLockedError as e:
                    raise UsageError(str(e)) from None
            if reuse:  # a run folder whose first checkpoint never came: started again from scratch
                checkpointer.cleanup()
                for name in ("summary.json", "learning_curves.png"):
                    (run_dir / name).unlink(missing_ok=True)
                print(f"{run_dir}: reusing this run folder (it has no checkpoint)", flush=True)
            write_atomic(run_dir / "metrics.jsonl", "")
            write_json(run_dir / "config.json", config_to_dict(config))
            write_json(
                run_dir / "run.json",
                {
                    "argv": sys.argv,
                    "preset": args.preset,
                    "imports": args.imports,
                    "jax": jax.__version__,
                    "devices": [str(d) for d in jax.devices()],
                    "processes": jax.process_count(),
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                },
            )
    except OSError as e:
        error = f"cannot write {e.filename or run_dir}: {e.strerror or e}"
    error = agree("run-files", error)  # the other processes stop with process 0
    if error is not None:
        print(f"error: {error if primary else 'process 0: ' + error}", file=sys.stderr, flush=True)
        return EXIT_WRITE_ERROR
    for note in notes:
        print(note, flush=True)
    return _train_loop(trainer, state, run_dir, checkpointer, args, t_start, interrupt, saved)


def _add_to_run_json(run_dir: Path, **entries) -> None:
    """``entries`` added to ``run.json`` (nothing if it is missing or unreadable)."""
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(run, dict):
        write_json(run_dir / "run.json", {**run, **entries})


def _train_loop(trainer, state, run_dir: Path, checkpointer, args, t_start: float, interrupt, saved) -> int:
    from tqdm import tqdm

    from dgl_jax.checkpoint import CheckpointWriteError, state_tree
    from dgl_jax.distributed import is_primary

    primary = is_primary()

    def files(write):  # the run folder's files are process 0's; the other processes skip them
        return write if primary else (lambda *a, **k: None)

    cfg = trainer.config
    spe = trainer.steps_per_epoch
    k = trainer.num_stages
    finite_fn = _finite_check()

    def global_step(st):
        return st.epoch * spe + st.step

    def save(st):
        """Checkpoints ``st`` unless it already is (exactly once per state); a signal waits for the end."""
        nonlocal saved
        g = global_step(st)
        if saved is not None and saved[0] == g:
            return
        with interrupt.critical():
            checkpointer.save(
                g,
                state_tree(st.stages, st.extra, st.key),
                {"epoch": st.epoch, "step": st.step, "config": cfg.model},
                before_commit=lambda _: _fault_wait("save", interrupt),
            )
            saved = (g, st.epoch, st.step)

    def kept() -> str:
        if saved is None:
            return "no checkpoint yet: --resume starts the run from the beginning"
        return f"checkpoint {checkpointer.path(saved[0])} (epoch {saved[1]} step {saved[2]})"

    def summary(status: str, last_eval: dict | None, **more) -> dict:
        g, epoch, _ = saved if saved is not None else (0, 0, 0)
        ev = last_eval or {}
        return {
            "status": status,
            "epochs_completed": epoch,
            "total_epochs": trainer.total_epochs,
            "global_step": g,
            "test_accuracy": ev.get("accuracy"),
            "test_loss": ev.get("loss"),
            "ensemble_accuracy": ev.get("ensemble"),
            "final_accuracy": ev["accuracy"][-1] if ev else None,
            "examples_used_per_epoch": trainer.used_per_epoch,
            "train_examples": trainer.num_train,
            "eval_examples": trainer.num_test,
            "eval_split": trainer.data.name,
            "wall_s": time.perf_counter() - t0,
            **timings,
            **more,
        }

    def flush_metrics():
        try:
            metrics_file.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(run_dir / "metrics.jsonl")) from None

    total = trainer.total_epochs * spe
    bar = tqdm(
        total=total,
        initial=global_step(state),
        disable=args.no_progress or not primary,
        dynamic_ncols=True,
        unit="step",
        file=sys.stderr,
    )
    status, last_eval, last_eval_step, t0, first = "completed", None, None, time.perf_counter(), True
    timings: dict[str, float] = {}
    reported: dict[int, int] = {}  # stage -> the phase in which it last reported a finite loss
    diverged = None
    metrics_file = None
    try:
        metrics_file = open(run_dir / "metrics.jsonl" if primary else os.devnull, "a")  # noqa: SIM115 - closed in finally
        _fault_wait("startup", interrupt)
        if interrupt.signal is not None:  # a start-up signal that something swallowed: stop here
            raise _Stop(interrupt.signal)
        for ev in trainer.fit(state):
            before, state = state, ev.state
            interrupt.training = True  # from here a signal is a request, honoured after the chunk
            g = global_step(state)
            if first:
                timings["first_chunk_s"] = time.perf_counter() - t_start
                first = False
                if trainer.wire_bytes is not None:  # stage-parallel: bytes per step between stage groups
                    files(_add_to_run_json)(run_dir, wire_bytes_per_step=trainer.wire_bytes)
            finite = finite_fn(state.stages, state.extra)
            for j in range(k):
                loss, acc = ev.train["loss"][j], ev.train["accuracy"][j]
                ok = loss is not None and math.isfinite(loss)
                if ok:
                    reported[j] = ev.phase
                elif finite[j] and reported.get(j) != ev.phase:
                    continue  # a stage this phase does not train (or without a head)
                row = {"event": "train", "epoch": ev.epoch + 1, "phase": ev.phase, "global_step": g, "stage": j}
                row.update(loss=loss, accuracy=acc, lr=ev.train["lr"][j])
                row["examples_per_s"] = ev.train["examples_per_s"]
                for name, v in ev.train.items():  # the method's other per-stage / scalar metrics
                    if name not in row:
                        row[name] = v[j] if isinstance(v, list) and len(v) == k else v
                metrics_file.write(json.dumps(json_clean(row)) + "\n")
            if not finite.all():
                where = [f"stage {j + 1}" for j in range(k) if not finite[j]] + (
                    [] if finite[k] else ["the method's state"]
                )
                diverged = {
                    "where": where,
                    "epoch": ev.epoch + 1,
                    "steps": [before.step + 1, before.step + ev.steps],
                    "global_step": g,
                }
                status = "diverged"
                flush_metrics()
                break
            post = " ".join(
                f"s{j + 1} {ev.train['loss'][j]:.3f}/{100 * ev.train['accuracy'][j]:.0f}%"
                for j in range(k)
                if math.isfinite(ev.train["loss"][j])
            )
            bar.set_description(f"epoch {ev.epoch + 1}/{trainer.total_epochs}", refresh=False)
            bar.set_postfix_str(post, refresh=False)
            bar.update(ev.steps)
            if ev.eval is not None:
                last_eval, last_eval_step = ev.eval, g
                for j, (acc, loss) in enumerate(zip(ev.eval["accuracy"], ev.eval["loss"], strict=True)):
                    if math.isfinite(acc):
                        row = {"event": "eval", "epoch": ev.epoch + 1, "global_step": g, "stage": j}
                        metrics_file.write(json.dumps(json_clean({**row, "accuracy": acc, "loss": loss})) + "\n")
                row = {"event": "eval", "epoch": ev.epoch + 1, "global_step": g, "stage": "ensemble"}
                metrics_file.write(json.dumps({**row, "accuracy": ev.eval["ensemble"]}) + "\n")
                accs = " ".join(
                    f"s{j + 1} {100 * a:.2f}" for j, a in enumerate(ev.eval["accuracy"]) if math.isfinite(a)
                )
                bar.write(f"epoch {ev.epoch + 1}: test acc {accs} ens {100 * ev.eval['ensemble']:.2f}")
            flush_metrics()
            end_of_run = state.epoch >= trainer.total_epochs
            if ev.eval is not None and (state.epoch % args.checkpoint_every == 0 or end_of_run):
                save(state)
                _fault_wait("epoch-end", interrupt)
            if interrupt.signal is not None and not end_of_run:
                save(state)
                status = "interrupted"
                break
        bar.close()
        if status == "diverged":
            files(write_json)(run_dir / "summary.json", summary(status, last_eval, diverged=diverged))
            files(plot_learning_curves)(run_dir, f"{cfg.method} {cfg.model} on {trainer.data.name}")
            a, b = diverged["steps"]
            interrupt.finished = True
            last = f"{checkpointer.path(saved[0])} (epoch {saved[1]} step {saved[2]})" if saved else "none"
            print(
                f"error: training diverged: NaN/inf in {_join(diverged['where'])} in epoch {diverged['epoch']}, "
                f"{f'step {a}' if a == b else f'steps {a}-{b}'} (global step {diverged['global_step']}); no "
                f"non-finite checkpoint was written, the last finite one is kept: {last}; try a lower --lr",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_DIVERGED
        if last_eval is None or last_eval_step != global_step(state):
            last_eval = trainer.evaluate(state.stages, extra=state.extra)
        files(write_json)(run_dir / "summary.json", summary(status, last_eval))
        files(plot_learning_curves)(run_dir, f"{cfg.method} {cfg.model} on {trainer.data.name}")
        print(format_table(last_eval["accuracy"], last_eval["ensemble"], [s.layers for s in trainer.stages]))
        interrupt.finished = True
        if interrupt.signal is not None:
            what = "after the run completed" if status == "completed" else f"at epoch {state.epoch} step {state.step}"
            resume = "" if status == "completed" else f"; continue with: {_resume_command(run_dir)}"
            print(
                f"interrupted by {interrupt.name} {what}: the run folder keeps {kept()}{resume}",
                file=sys.stderr,
                flush=True,
            )
            return interrupt.exit_code
        print(f"run folder: {run_dir}", flush=True)
        return 0
    except _Stop:
        bar.close()
        with contextlib.suppress(OSError, _Stop):
            files(write_json)(run_dir / "summary.json", summary("interrupted", last_eval))
        interrupt.finished = True
        when = "during start-up" if first else "a second time: stopped at once"
        print(
            f"interrupted by {interrupt.name} {when}; the run folder keeps {kept()}; continue with: "
            f"{_resume_command(run_dir)}",
            file=sys.stderr,
            flush=True,
        )
        return interrupt.exit_code
    except (CheckpointWriteError, OSError) as e:
        bar.close()
        with contextlib.suppress(OSError):
            files(write_json)(run_dir / "summary.json", summary("failed", last_eval, error=str(e)))
        interrupt.finished = True
        if isinstance(e, CheckpointWriteError):
            what = str(e)
        else:
            what = f"cannot write {e.filename or run_dir}: {e.strerror or e}"
        print(
            f"error: {what}; the run folder keeps {kept()}; continue with: {_resume_command(run_dir)}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_WRITE_ERROR
    finally:
        bar.close()
        trainer.close(status)
        if metrics_file is not None:
            with contextlib.suppress(OSError):
                metrics_file.close()


def cmd_eval(args: argparse.Namespace, interrupt: _Interrupt | None = None) -> int:

    from dgl_jax.checkpoint import Checkpointer, CheckpointError, state_tree
    from dgl_jax.layers import InputTooSmallError
    from dgl_jax.trainer import Trainer, config_from_dict

    run = Path(args.run_dir)
    if not (run / "config.json").is_file():
        raise UsageError(f"{args.run_dir!r} has no config.json; expected a run folder made by train")
    try:
        config = config_from_dict(json.loads((run / "config.json").read_text()))
        if args.data_dir:
            config = dataclasses.replace(config, data_dir=args.data_dir)
        trainer = Trainer(config, log=lambda s: None)
        try:
            state = trainer.init_state()
        except InputTooSmallError as e:
            raise UsageError(_too_small(trainer, e)) from None
        tree, meta = Checkpointer(run / "checkpoints").restore(
            state_tree(state.stages, state.extra, state.key), warn=_warn
        )
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, CheckpointError) as e:
        raise UsageError(str(e).splitlines()[0] + _imports_hint(run, args.imports)) from None
    finite = _finite_check()(tree["stages"], tree["extra"])
    if not finite.all():
        where = [f"stage {j + 1}" for j in range(len(finite) - 1) if not finite[j]]
        _warn(
            f"the checkpoint at epoch {meta['epoch']} step {meta['step']} holds NaN/inf values in "
            f"{_join(where or ['the method state'])}: the run diverged, the accuracies below are meaningless"
        )
    out = trainer.evaluate(tree["stages"], extra=tree["extra"])
    print(f"{run}: checkpoint at epoch {meta['epoch']} step {meta['step']}, {trainer.num_test} eval examples")
    print(format_table(out["accuracy"], out["ensemble"], [s.layers for s in trainer.stages]))
    return 0


def main(argv: list[str] | None = None, *, process_settings: bool | None = None) -> int:
    """Entry point: returns the exit code (0 ok, 2 bad input, 3 diverged, 4 write error, 128 + the signal when
    interrupted: 130 SIGINT, 143 SIGTERM; README, "Faults").

    ``process_settings``: apply the process-wide defaults (``--malloc keep``, the persistent compilation
    cache); None means only when running as the program (``argv`` None: ``python -m dgl_jax``, ``dgl-jax``).
    Called from another program, ``main(argv)`` leaves them alone unless ``--malloc`` / ``--compilation-cache``
    are given: explicit flags always apply."""
    t_start = time.perf_counter()
    if process_settings is None:
        process_settings = argv is None
    command = "train"
    with _Interrupt(restore=not process_settings) as interrupt:
        try:
            args = build_parser().parse_args(argv)
            command = args.command
            malloc = args.malloc or ("keep" if process_settings else "default")
            cache = args.compilation_cache
            if cache is None and process_settings:
                cache = os.environ.get("DGL_JAX_CACHE_DIR", os.path.expanduser("~/.cache/dgl_jax/jax"))
            if malloc == "keep":
                keep_freed_memory()
            if cache is not None:
                setup_compilation_cache(cache)
            if process_settings:  # orbax's and asyncio's error logs: the failures are reported in one line
                from dgl_jax.checkpoint import silence_closed_loop_errors

                logging.getLogger("absl").setLevel(logging.CRITICAL + 1)
                logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
                silence_closed_loop_errors()
            import_plugins(args.imports)  # before the config is resolved: plugins register models / methods
            if args.command == "train":
                return cmd_train(args, t_start, interrupt)
            if args.command == "sweep":  # reports its own errors (one line, exit 2) and interruptions
                interrupt.as_keyboard_interrupt = True  # it saves the running cell's state on KeyboardInterrupt
                code = args.func(args)
                return interrupt.exit_code if code == EXIT_INTERRUPTED and interrupt.signal else code
            return cmd_eval(args, interrupt)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
        except _Stop:
            what = "during start-up: nothing trained" if command == "train" else "before the end"
            print(f"interrupted by {interrupt.name} {what}", file=sys.stderr, flush=True)
            return interrupt.exit_code


if __name__ == "__main__":
    sys.exit(main())
