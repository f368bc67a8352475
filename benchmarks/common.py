"""Shared helpers of the benchmark scripts: machine description, timing, atomic JSON output."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dgl_jax import (
    backprop_step,
    conv,
    dgl_step,
    drop_aux_heads,
    files,
    get_model,
    init_stage_states,
    make_optimizer,
    provenance,
    with_optimizer,
)


def _direct_only(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                 feature_group_count=1, precision=None, **kwargs):  # fmt: skip
    """``dgl_jax.conv.conv_general_dilated`` with Winograd never chosen (the direct path where it would be)."""
    pads = conv._nhwc_unit_pads(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count
    )
    if pads is None or precision is not None or kwargs:
        return conv.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                         dimension_numbers, feature_group_count, precision, **kwargs)  # fmt: skip
    return conv.direct_conv(lhs, rhs, pads)


CONV_VARIANTS = {
    "dgl_jax": conv.Conv,  # what the library does: dgl_jax.conv.conv_general_dilated
    "direct": functools.partial(nn.Conv, conv_general_dilated=_direct_only),  # no Winograd
    "xla": nn.Conv,  # XLA's own convolutions and gradients
}


@contextlib.contextmanager
def conv_variant(name: str):
    """Within: the zoo's models are built with the convolutions of ``name`` in :data:`CONV_VARIANTS` (for
    A/B benchmarks; trace and compile inside the block)."""
    from dgl_jax import layers, models

    saved = layers.Conv, models.Conv
    layers.Conv = models.Conv = CONV_VARIANTS[name]
    try:
        yield
    finally:
        layers.Conv, models.Conv = saved


def machine(malloc_kept: bool | None = None) -> dict[str, Any]:
    """What the numbers were measured on (``malloc_kept``: what ``dgl_jax.host.keep_freed_memory`` returned,
    None when the script did not call it)."""
    dev = jax.devices()[0]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "cpu_model": provenance.cpu_model(),
        "avx512": " avx512f" in flags,
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "malloc_kept": malloc_kept,
        "versions": provenance.versions(),
    }


def time_call(fn: Callable[[], Any]) -> float:
    """Wall time of ``fn()`` including device completion (``block_until_ready`` on its result)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def time_alternating(fns: dict[Any, Callable[[], Any]], repeats: int, warmup: int) -> dict[Any, list[float]]:
    """``repeats`` wall times of every ``fns[k]()`` (:func:`time_call`), all of them called once per round,
    in order, so that machine noise hits every variant alike; the first ``warmup`` rounds are dropped."""
    times = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            t = time_call(fn)
            if r >= warmup:
                times[k].append(t)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median and quartiles of a list of times, in seconds."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2], "repeats": len(times)}


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Writes ``payload`` as strict JSON atomically (:func:`dgl_jax.files.write_json`), creating the folder;
    ``git_sha`` and ``git_dirty`` (the checkout that measured it) are added when the payload has none."""
    payload.setdefault("git_sha", provenance.git_sha())
    payload.setdefault("git_dirty", provenance.git_dirty())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, payload)


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
