"""``python -m dgl_jax train|eval``: train with a progress bar into a run folder, resume, evaluate.

Run folder (``--out``, default ``runs/<dataset>-<model>-<method>-<time>``)::

    config.json          the resolved TrainConfig (``--resume`` reads it back)
    run.json             how it was started: command line, preset, plugins (--import), versions, devices
    metrics.jsonl        one JSON line per logged chunk per stage ("train") and per epoch per stage ("eval")
    summary.json         final per-stage accuracies, status (completed / interrupted), timings
    learning_curves.png  per-stage test accuracy vs epoch
    checkpoints/<step>/  orbax checkpoints of the whole run state (the last --keep)

Every JSON file and the PNG are written atomically (temporary file + ``os.replace``). Bad input gets one
line on stderr naming the bad value and the accepted ones, exit code 2, and no run folder is created:
everything (names, ranges, K against the model, batch size against the data) is checked first.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from dgl_jax.files import json_clean, save_figure, write_atomic, write_json
from dgl_jax.host import keep_freed_memory

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(f"{self.prog}: {message}")


def _int_list(text: str) -> int | tuple[int, ...]:
    try:
        parts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or a comma-separated list of integers") from None
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} is empty")
    return parts[0] if len(parts) == 1 and "," not in text else tuple(parts)


def _decay(text: str) -> int | tuple[int, ...] | None:
    return None if text.lower() in ("none", "off", "constant") else _int_list(text)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; expected true/false")


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    k, v = text.split("=", 1)
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


# TrainConfig fields settable from the command line: (flag, field, type, help)
_FIELDS = [
    ("--method", "method", str, "training method (dgl, backprop, sequential, + registered ones)"),
    ("--model", "model", str, "model zoo name (small_cnn, cnn4, vgg13, resnet110_cifar, ...)"),
    ("--split", "split", _int_list, "K stages (balanced by layer count) or units per stage, e.g. 2,1"),
    ("--head", "head", str, "auxiliary head: mlp_sr, mlp, cnn, linear, dni, gap_linear"),
    ("--dataset", "dataset", str, "digits, fashion_mnist, mnist, cifar10, cifar100, svhn_cropped, imagenet2012"),
    ("--data-dir", "data_dir", str, "folder with the data (IDX files for fashion_mnist, a tfds data_dir otherwise)"),
    ("--validation", "validation", float, "hold out this fraction of train as the evaluation split"),
    ("--epochs", "epochs", int, "epochs (per stage for sequential)"),
    ("--batch-size", "batch_size", int, "training batch size"),
    ("--eval-batch-size", "eval_batch_size", int, "evaluation batch size"),
    ("--optimizer", "optimizer", str, "sgd or adam"),
    ("--lr", "lr", float, "learning rate"),
    ("--momentum", "momentum", float, "SGD momentum"),
    ("--weight-decay", "weight_decay", float, "coupled weight decay"),
    ("--decay-epochs", "decay_epochs", _decay, "LR step schedule: every N epochs, at E1,E2,..., or none"),
    ("--decay-factor", "decay_factor", float, "LR multiplier at each decay"),
    ("--seed", "seed", int, "PRNG seed (init, data order, augmentation)"),
    ("--dtype", "dtype", str, "compute dtype: float32, bfloat16, float16"),
    ("--augment", "augment", _bool, "random crop + flip on device (true/false)"),
    ("--chunk-steps", "chunk_steps", int, "optimizer steps per dispatch/log line (0: auto)"),
    ("--loop", "loop", str, "chunk execution: auto, scan, dispatch"),
    ("--loader", "loader", str, "training input: memory (whole split on device) or grain (streamed from the host)"),
    ("--image-size", "image_size", int, "imagenet2012 (grain): S of the [S,S,3] images (resize to S*256/224, crop S)"),
    ("--codec", "codec", str, "boundary codec (dgl, async): identity, bfloat16, vq:K:d, vq-packed:K:d"),
]


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
    for flag, field, typ, text in _FIELDS:
        train.add_argument(flag, dest=field, type=typ, default=None, help=text)
    train.add_argument(
        "--method-option",
        dest="method_options",
        type=_option,
        action="append",
        help="KEY=VALUE (JSON value), repeatable; e.g. --method async: capacity=5 policy=priority_lifo "
        "slow_stage=2 slowdown=1.5 delay=0 schedule=paper max_reuse=null",
    )
    train.add_argument(
        "--model-option",
        dest="model_options",
        type=_option,
        action="append",
        help="zoo KEY=VALUE, e.g. width_mult=0.25",
    )
    train.add_argument("--out", help="run folder (default runs/<dataset>-<model>-<method>-<time>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    train.add_argument("--checkpoint-every", type=int, default=1, help="checkpoint every N epochs (default 1)")
    _common(train)
    ev = sub.add_parser("eval", help="evaluate the last checkpoint of a run folder")
    ev.add_argument("run_dir")
    ev.add_argument("--data-dir", help="override the data folder recorded in the run")
    _common(ev)
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
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
def resolve_config(args: argparse.Namespace):
    """TrainConfig from defaults <- preset <- explicit options (or from the run folder with --resume)."""
    from dgl_jax.presets import PRESETS, preset_config
    from dgl_jax.trainer import config_from_dict

    explicit = {field: getattr(args, field) for _, field, _, _ in _FIELDS if getattr(args, field) is not None}
    for name in ("method_options", "model_options"):
        if getattr(args, name):
            explicit[name] = dict(getattr(args, name))
    if args.resume:
        run = Path(args.resume)
        path = run / "config.json"
        if not path.is_file():
            raise UsageError(f"--resume {args.resume!r}: no config.json there; expected a run folder made by train")
        extra = sorted(set(explicit) - {"epochs", "data_dir"})
        if extra or args.preset or args.out:
            bad = extra + (["preset"] if args.preset else []) + (["out"] if args.out else [])
            raise UsageError(f"--resume cannot change {bad}; only --epochs and --data-dir may be given")
        try:
            d = json.loads(path.read_text())
            d.update(explicit)
            return config_from_dict(d)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--resume {args.resume!r}: config.json is invalid: {e}") from None
    if args.preset is not None and args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; expected one of {sorted(PRESETS)}")
    try:
        return preset_config(args.preset or "quickstart", **explicit)
    except TypeError as e:
        raise UsageError(str(e)) from None


class _Interrupt:
    """Turns SIGINT/SIGTERM into a flag checked between chunks (a second signal exits at once)."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def cmd_train(args: argparse.Namespace, t_start: float) -> int:
    from dgl_jax.checkpoint import Checkpointer, CheckpointError, state_tree
    from dgl_jax.trainer import Trainer, config_to_dict

    config = resolve_config(args)
    if args.keep < 1 or args.checkpoint_every < 1:
        raise UsageError(f"--keep {args.keep} / --checkpoint-every {args.checkpoint_every}: expected integers >= 1")
    notes: list[str] = []
    try:
        trainer = Trainer(config, log=notes.append)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        hint = _imports_hint(Path(args.resume), args.imports) if args.resume else ""
        raise UsageError((str(e).splitlines()[0] if str(e) else type(e).__name__) + hint) from None
    if args.resume:
        run_dir = Path(args.resume).absolute()
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out or f"runs/{config.dataset}-{config.model}-{config.method}-{stamp}").absolute()
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(f"--out {str(run_dir)!r} exists and is not empty; pick another folder or use --resume")
    # ---- everything validated: from here on the run folder exists ----
    import jax

    ckpt_dir = run_dir / "checkpoints"
    print(trainer.describe(), flush=True)
    try:
        state = trainer.init_state()  # methods check what needs the built model here (e.g. a stage index)
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    if args.resume:
        try:
            checkpointer = Checkpointer(ckpt_dir, args.keep)
            tree, meta = checkpointer.restore(state_tree(state.stages, state.extra, state.key))
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        state = state._replace(
            stages=tree["stages"],
            extra=tree["extra"],
            key=jax.random.wrap_key_data(tree["key"]),
            epoch=int(meta["epoch"]),
            step=int(meta["step"]),
        )
        done = int(meta["global_step"])
        kept = [r for r in read_metrics(run_dir) if r.get("global_step", 0) <= done]
        write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        write_json(run_dir / "config.json", config_to_dict(config))
        print(f"resumed {run_dir} at epoch {state.epoch} step {state.step} (global step {done})", flush=True)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", config_to_dict(config))
        write_json(
            run_dir / "run.json",
            {
                "argv": sys.argv,
                "preset": args.preset,
                "imports": args.imports,
                "jax": jax.__version__,
                "devices": [str(d) for d in jax.devices()],
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            },
        )
        checkpointer = Checkpointer(ckpt_dir, args.keep)
    for note in notes:
        print(note, flush=True)
    return _train_loop(trainer, state, run_dir, checkpointer, args, t_start)


def _train_loop(trainer, state, run_dir: Path, checkpointer, args, t_start: float) -> int:
    from tqdm import tqdm

    from dgl_jax.checkpoint import state_tree

    cfg = trainer.config
    spe = trainer.steps_per_epoch

    def global_step(st):
        return st.epoch * spe + st.step

    def save(st):
        checkpointer.save(
            global_step(st),
            state_tree(st.stages, st.extra, st.key),
            {"epoch": st.epoch, "step": st.step, "config": cfg.model},
        )

    total = trainer.total_epochs * spe
    bar = tqdm(
        total=total,
        initial=global_step(state),
        disable=args.no_progress,
        dynamic_ncols=True,
        unit="step",
        file=sys.stderr,
    )
    metrics_file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finally
    status, last_eval, t0, first = "completed", None, time.perf_counter(), True
    timings: dict[str, float] = {}
    try:
        with _Interrupt() as interrupt:
            for ev in trainer.fit(state):
                state = ev.state
                g = global_step(state)
                if first:
                    timings["first_chunk_s"] = time.perf_counter() - t_start
                    first = False
                for j in range(trainer.num_stages):
                    loss, acc = ev.train["loss"][j], ev.train["accuracy"][j]
                    if loss is None or not math.isfinite(loss):
                        continue
                    row = {"event": "train", "epoch": ev.epoch + 1, "phase": ev.phase, "global_step": g, "stage": j}
                    row.update(loss=loss, accuracy=acc, lr=ev.train["lr"][j])
                    row["examples_per_s"] = ev.train["examples_per_s"]
                    for name, v in ev.train.items():  # the method's other per-stage / scalar metrics
                        if name not in row:
                            row[name] = v[j] if isinstance(v, list) and len(v) == trainer.num_stages else v
                    metrics_file.write(json.dumps(json_clean(row)) + "\n")
                post = " ".join(
                    f"s{j + 1} {ev.train['loss'][j]:.3f}/{100 * ev.train['accuracy'][j]:.0f}%"
                    for j in range(trainer.num_stages)
                    if math.isfinite(ev.train["loss"][j])
                )
                bar.set_description(f"epoch {ev.epoch + 1}/{trainer.total_epochs}", refresh=False)
                bar.set_postfix_str(post, refresh=False)
                bar.update(ev.steps)
                if ev.eval is not None:
                    last_eval = ev.eval
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
                metrics_file.flush()
                end_of_run = state.epoch >= trainer.total_epochs
                if ev.eval is not None and (state.epoch % args.checkpoint_every == 0 or end_of_run):
                    save(state)
                if interrupt.signal is not None and not end_of_run:
                    save(state)
                    status = "interrupted"
                    break
    finally:
        bar.close()
        metrics_file.close()
    if last_eval is None:
        last_eval = trainer.evaluate(state.stages, extra=state.extra)
    summary = {
        "status": status,
        "epochs_completed": state.epoch,
        "total_epochs": trainer.total_epochs,
        "global_step": global_step(state),
        "test_accuracy": last_eval["accuracy"],
        "test_loss": last_eval["loss"],
        "ensemble_accuracy": last_eval["ensemble"],
        "final_accuracy": last_eval["accuracy"][-1],
        "examples_used_per_epoch": trainer.used_per_epoch,
        "train_examples": trainer.num_train,
        "eval_examples": trainer.num_test,
        "eval_split": trainer.data.name,
        "wall_s": time.perf_counter() - t0,
        **timings,
    }
    write_json(run_dir / "summary.json", summary)
    plot_learning_curves(run_dir, f"{cfg.method} {cfg.model} on {trainer.data.name}")
    print(format_table(last_eval["accuracy"], last_eval["ensemble"], [s.layers for s in trainer.stages]))
    if status == "interrupted":
        print(
            f"interrupted at epoch {state.epoch} step {state.step}: checkpoint saved; continue with "
            f"python -m dgl_jax train --resume {run_dir}",
            flush=True,
        )
        return EXIT_INTERRUPTED
    print(f"run folder: {run_dir}", flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import jax

    from dgl_jax.checkpoint import Checkpointer, CheckpointError, state_tree
    from dgl_jax.trainer import Trainer, config_from_dict

    run = Path(args.run_dir)
    if not (run / "config.json").is_file():
        raise UsageError(f"{args.run_dir!r} has no config.json; expected a run folder made by train")
    try:
        config = config_from_dict(json.loads((run / "config.json").read_text()))
        if args.data_dir:
            config = dataclasses.replace(config, data_dir=args.data_dir)
        trainer = Trainer(config, log=lambda s: None)
        state = trainer.init_state()
        tree, meta = Checkpointer(run / "checkpoints").restore(state_tree(state.stages, state.extra, state.key))
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, CheckpointError) as e:
        raise UsageError(str(e).splitlines()[0] + _imports_hint(run, args.imports)) from None
    del jax
    out = trainer.evaluate(tree["stages"], extra=tree["extra"])
    print(f"{run}: checkpoint at epoch {meta['epoch']} step {meta['step']}, {trainer.num_test} eval examples")
    print(format_table(out["accuracy"], out["ensemble"], [s.layers for s in trainer.stages]))
    return 0


def main(argv: list[str] | None = None, *, process_settings: bool | None = None) -> int:
    """Entry point: returns the exit code (0 ok, 2 bad input, 130 interrupted).

    ``process_settings``: apply the process-wide defaults (``--malloc keep``, the persistent compilation
    cache); None means only when running as the program (``argv`` None: ``python -m dgl_jax``, ``dgl-jax``).
    Called from another program, ``main(argv)`` leaves them alone unless ``--malloc`` / ``--compilation-cache``
    are given: explicit flags always apply."""
    t_start = time.perf_counter()
    if process_settings is None:
        process_settings = argv is None
    try:
        args = build_parser().parse_args(argv)
        malloc = args.malloc or ("keep" if process_settings else "default")
        cache = args.compilation_cache
        if cache is None and process_settings:
            cache = os.environ.get("DGL_JAX_CACHE_DIR", os.path.expanduser("~/.cache/dgl_jax/jax"))
        if malloc == "keep":
            keep_freed_memory()
        if cache is not None:
            setup_compilation_cache(cache)
        import_plugins(args.imports)  # before the config is resolved: plugins register models / methods
        if args.command == "train":
            return cmd_train(args, t_start)
        return cmd_eval(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
