# Asynchronous DGL simulated inside jit: stage 2 of 3 is 1.5x slower, buffers of 5 batches (run by the tests).
import jax
from dgl_jax import asynchronous as adgl
from dgl_jax import get_model, init_stage_states, make_optimizer, with_optimizer

stages = with_optimizer(get_model("small_cnn"), lambda j: make_optimizer("sgd", 0.05, momentum=0.9))
images = jax.random.normal(jax.random.key(1), (512, 8, 8, 1))  # [N, H, W, C]
labels = jax.random.randint(jax.random.key(2), (512,), 0, 10)
input_fn = adgl.epoch_input_fn(images, labels, batch_size=32, key=jax.random.key(3))  # stage 1's fresh batches
states = init_stage_states(stages, jax.random.key(0), images[:32])
config = adgl.AsyncConfig(capacity=5, policy="priority_lifo")  # one replay buffer per boundary
state = adgl.init_async(stages, states, images[:32], labels[:32], config, jax.random.key(4))
schedule = adgl.paper_schedule(len(stages), slow_stage=1, slowdown=1.5)  # each tick draws one stage
run = adgl.make_async_run(stages, config, input_fn, num_ticks=60)  # one jitted lax.scan over 60 ticks
state, records = run(state, schedule)  # records: [ticks, K] arrays (stage, loss, staleness, ...)
print({k: v.tolist() for k, v in adgl.summarize(records).items() if k in ("updates", "mean_staleness")})
