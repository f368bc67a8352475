"""Two processes on localhost (gloo CPU collectives, 2 fake devices each) run the SPMD pipeline; the
result must equal T single-device ``dgl_step`` calls. Bounded by subprocess timeouts: never hangs CI."""

import functools
import os
import pathlib
import sys

import chex
import jax
import numpy as np

from dgl_jax import dgl_step

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
import _multiprocess_worker as worker  # noqa: E402
from _processes import free_port, run_together  # noqa: E402

TIMEOUT_S = 240
RTOL, ATOL = 1e-4, 1e-5  # float reassociation (data-parallel gradient sums, packed vs tree updates)


def test_two_processes_agree_with_single_device(tmp_path):
    out = tmp_path / "result.npz"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # the worker sets its device count
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    worker_argv = [sys.executable, str(HERE / "_multiprocess_worker.py")]
    logs = run_together([[*worker_argv, str(i), str(port), str(out)] for i in range(2)], env, TIMEOUT_S)
    tails = "\n".join(log[-3000:] for log in logs)
    assert "process 0 done" in logs[0] and "process 1 done" in logs[1], tails

    stages, states, x, y = worker.problem()
    step = jax.jit(functools.partial(dgl_step, stages))
    losses = []
    for t in range(worker.T):
        states, m = step(states, x[t], y[t])
        losses.append(np.asarray(m["loss"]))
    got = np.load(out)
    ref_leaves = jax.tree.leaves(jax.device_get(states))
    got_leaves = [got[f"leaf{i}"] for i in range(len(ref_leaves))]
    chex.assert_trees_all_close(got_leaves, ref_leaves, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["loss"], np.stack(losses), rtol=RTOL, atol=ATOL)
