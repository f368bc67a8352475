# The greedy objective inside your own JAX training loop (the README's example, run by the tests).
import jax
import jax.numpy as jnp
import numpy as np
import optax
from dgl_jax import evaluate_batch, get_model, greedy_loss, init_stage_states
from dgl_jax.data import load_digits

data = load_digits()
x, y = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)
stages = get_model("small_cnn")  # no optimizer needed: the loop below brings its own
states = init_stage_states(stages, jax.random.key(0), x[:64])
params, model_states = [s.params for s in states], [s.model_state for s in states]
opt = optax.adam(3e-3)  # any optimizer over the list of per-stage params
opt_state = opt.init(params)


@jax.jit
def train_step(params, model_states, opt_state, xb, yb):
    def loss_fn(p):  # sum of K local losses; no gradient crosses a stage
        total, outs = greedy_loss(stages, p, model_states, xb, yb)
        return total, [o.out.model_state for o in outs]  # the updated BatchNorm statistics

    (loss, model_states), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), model_states, opt_state, loss


for i in range(150):
    idx = jax.random.permutation(jax.random.key(i), len(y))[:64]
    params, model_states, opt_state, loss = train_step(params, model_states, opt_state, x[idx], y[idx])
states = [s._replace(params=p, model_state=m) for s, p, m in zip(states, params, model_states, strict=True)]
out = evaluate_batch(stages, states, jnp.asarray(data.test_images), jnp.asarray(data.test_labels))  # eval mode
print(f"greedy loss after 150 steps: {loss:.3f}")
print("eval-mode test accuracy per head:", np.round(100 * np.asarray(out.per_head) / len(data.test_labels), 1))
