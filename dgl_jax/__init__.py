"""dgl-jax: Decoupled Greedy Learning of CNNs in JAX/Flax."""

from dgl_jax.models import MODELS, get_model
from dgl_jax.objective import cross_entropy, greedy_loss, stage_apply, stage_loss
from dgl_jax.stage import Stage, StageState, drop_aux_heads, init_stage_states, make_optimizer, with_optimizer
from dgl_jax.train import (
    StepMetrics,
    backprop_step,
    dgl_step,
    evaluate_batch,
    forward_features,
    sequential_step,
    stage_step,
)

__version__ = "0.1.0"
__all__ = [
    "MODELS",
    "Stage",
    "StageState",
    "StepMetrics",
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
    "sequential_step",
    "stage_apply",
    "stage_loss",
    "stage_step",
    "with_optimizer",
]
