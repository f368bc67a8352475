"""One process of the two-process SPMD test (launched by ``tests/test_multiprocess.py``, not collected).

Usage: ``python tests/_multiprocess_worker.py PROCESS_ID PORT OUT.npz``. Each process has 2 fake CPU
devices; CPU collectives go through gloo. The 4 global devices form a ``('stage', 'data')`` mesh of 2 x 2:
stage 0 on process 0, stage 1 on process 1, so every message crosses processes through ``lax.ppermute``.
Process 0 writes the final per-stage states and the ``[T, K]`` losses to OUT.npz.
"""

import os
import sys

T, BATCH = 3, 16


def problem():
    """The model, initial states and batches, identical in every process and in the test."""
    import jax
    import numpy as np

    from dgl_jax import get_model, init_stage_states, make_optimizer, with_optimizer

    x = np.asarray(jax.random.normal(jax.random.key(1), (T, BATCH, 8, 8, 1)))
    y = np.asarray(jax.random.randint(jax.random.key(2), (T, BATCH), 0, 10))
    stages = with_optimizer(get_model("small_cnn", split=2), lambda j: make_optimizer("sgd", 0.05))
    states = init_stage_states(stages, jax.random.key(0), x[0])
    return stages, states, x, y


def main(process_id: int, port: int, out: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _processes import xla_flags

    os.environ["XLA_FLAGS"] = xla_flags(2)
    import jax
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
    )
    from jax.sharding import AxisType

    from dgl_jax.parallel import SpmdPipeline

    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    stages, states, x, y = problem()
    mesh = jax.make_mesh((2, 2), ("stage", "data"), axis_types=(AxisType.Auto, AxisType.Auto))
    pipe = SpmdPipeline(stages, mesh, states, x[0], data_axis="data")
    state, metrics = pipe.run(pipe.init(states), [(x[t], y[t]) for t in range(T)])
    final = pipe.unpack(state)
    if process_id == 0:
        leaves = {f"leaf{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(final))}
        np.savez(out, loss=metrics["loss"], **leaves)
    jax.distributed.shutdown()
    print(f"process {process_id} done", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
