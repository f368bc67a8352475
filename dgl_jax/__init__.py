"""dgl-jax: Decoupled Greedy Learning of CNNs in JAX/Flax.

The contract (see the README's "The stage contract"): a :class:`Stage` is a block, a head, a local loss,
an optimizer and the codec of its output; :func:`init_stage_states` needs no optimizer;
:func:`greedy_loss` is the objective for your own loop; :func:`stage_step` is the unit every executor
runs; :func:`dgl_step` is synchronous DGL on one device.
"""

from dgl_jax.losses import accuracy, cross_entropy, mse
from dgl_jax.models import MODELS, get_model, register_model
from dgl_jax.objective import StageOutput, greedy_loss, stage_apply, stage_loss
from dgl_jax.stage import (
    Stage,
    StageState,
    drop_aux_heads,
    init_stage_states,
    make_optimizer,
    message_specs,
    with_codec,
    with_optimizer,
)
from dgl_jax.steps import (
    Metrics,
    backprop_step,
    dgl_step,
    evaluate_batch,
    forward_features,
    sequential_step,
    stage_step,
)

__version__ = "0.2.0"
__all__ = [
    "MODELS",
    "Metrics",
    "Stage",
    "StageOutput",
    "StageState",
    "accuracy",
    "backprop_step",
    "cross_entropy",
    "dgl_step",
    "drop_aux_heads",
    "evaluate_batch",
    "forward_features",
    "get_model",
    "greedy_loss",
    "init_stage_states",
    "make_optimizer",
    "message_specs",
    "mse",
    "register_method",
    "register_model",
    "sequential_step",
    "stage_apply",
    "stage_loss",
    "stage_step",
    "with_codec",
    "with_optimizer",
]


def __getattr__(name: str):
    # register_method lives with the trainer's registry (dgl_jax.methods), imported on first use so that
    # importing dgl_jax stays light.
    if name == "register_method":
        from dgl_jax.methods import register_method

        return register_method
    raise AttributeError(f"module 'dgl_jax' has no attribute {name!r}")
