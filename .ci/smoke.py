"""Packaging smoke test, run by .ci/run in a fresh virtualenv holding only the built wheel and the dependencies
pip resolved from its declared ranges: the installed package (not the checkout) imports and takes two jitted
DGL steps of the small CNN on CPU."""

import functools
import os
import sys
from importlib import metadata
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dgl_jax  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
where = Path(dgl_jax.__file__).resolve()
if REPO in where.parents:
    sys.exit(f"dgl_jax was imported from the checkout ({where}), not from the installed wheel")
if metadata.version("dgl-jax") != dgl_jax.__version__:
    sys.exit(f"wheel version {metadata.version('dgl-jax')} != dgl_jax.__version__ {dgl_jax.__version__}")
print(
    f"dgl-jax {metadata.version('dgl-jax')} from {where.parent}; jax {jax.__version__}, flax {metadata.version('flax')}"
)

stages = dgl_jax.with_optimizer(dgl_jax.get_model("small_cnn"), lambda j: dgl_jax.make_optimizer("sgd", 0.05))
x, y = jnp.zeros((16, 8, 8, 1)), jnp.arange(16) % 10
states = dgl_jax.init_stage_states(stages, jax.random.key(0), x)
step = jax.jit(functools.partial(dgl_jax.dgl_step, stages))
for i in range(2):
    states, metrics = step(states, x, y)
    loss = np.asarray(metrics["loss"] if isinstance(metrics, dict) else metrics.loss)
    if not np.all(np.isfinite(loss)):
        sys.exit(f"step {i + 1}: non-finite loss {loss.tolist()}")
    print(f"step {i + 1}: loss per stage {np.round(loss, 4).tolist()}")
