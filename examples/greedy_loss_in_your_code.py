# The greedy objective inside your own JAX training loop (the README's example, run by the tests).
import jax
import jax.numpy as jnp
import optax
from dgl_jax import get_model, greedy_loss, init_stage_states, make_optimizer, with_optimizer

stages = with_optimizer(get_model("small_cnn"), lambda j: make_optimizer("sgd", 0.05))
x, y = jax.random.normal(jax.random.key(1), (32, 8, 8, 1)), jnp.arange(32) % 10
states = init_stage_states(stages, jax.random.key(0), x)
params, stats = [s.params for s in states], [s.batch_stats for s in states]
loss_fn = lambda p: greedy_loss(stages, p, stats, x, y)[0]  # sum of K local losses, no gradient crosses a stage
opt = optax.adam(1e-3)  # any optimizer over the list of per-stage params
opt_state = opt.init(params)
grad_fn = jax.jit(jax.value_and_grad(loss_fn))
for _ in range(5):
    loss, grads = grad_fn(params)
    updates, opt_state = opt.update(grads, opt_state)
    params = optax.apply_updates(params, updates)
print(f"greedy loss after 5 steps: {loss:.3f}")
