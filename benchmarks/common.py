"""Shared helpers of the benchmark scripts: machine description, timing, atomic JSON output."""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from dgl_jax import (
    backprop_step,
    dgl_step,
    drop_aux_heads,
    get_model,
    init_stage_states,
    make_optimizer,
    with_optimizer,
)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def time_call(fn: Callable[[], Any]) -> float:
    """Wall time of ``fn()`` including device completion (``block_until_ready`` on its result)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def summarize(times: list[float]) -> dict[str, float]:
    """Median and quartiles of a list of times, in seconds."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "repeats": len(times)}


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Writes ``payload`` as JSON atomically (temp file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def paper_stages(
    method: str,
    *,
    model: str = "cnn4",
    split: int = 4,
    head: str = "mlp_sr",
    dtype: str = "float32",
    batch: int = 128,
    size: int = 32,
    channels: int = 3,
):
    """The stages of a zoo model for ``method`` (``dgl``: auxiliary heads; ``backprop``: last head only) with
    the paper's SGD recipe, their initial states and a random batch: ``(stages, states, x, y)``."""
    stages = get_model(model, split=split, head=head, dtype=jnp.dtype(dtype))
    if method == "backprop":
        stages = drop_aux_heads(stages)
    stages = with_optimizer(stages, lambda j: make_optimizer("sgd", 0.1, momentum=0.9, weight_decay=5e-4))
    x = jax.random.normal(jax.random.key(1), (batch, size, size, channels))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    return stages, init_stage_states(stages, jax.random.key(0), x), x, y


def paper_step(method: str, **kwargs: Any):
    """The jitted ``dgl_step`` or ``backprop_step`` (states donated) of :func:`paper_stages`'s model, its
    initial states and a random batch: ``(step, states, x, y)``."""
    stages, states, x, y = paper_stages(method, **kwargs)
    fn = {"dgl": dgl_step, "backprop": backprop_step}[method]
    return jax.jit(functools.partial(fn, stages), donate_argnums=0), states, x, y
