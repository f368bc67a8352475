# Your own Flax model as DGL stages (the README's example, run by the tests): BatchNorm and Dropout, three
# stages with their own heads, one local loss that is not plain cross-entropy, bit-packed VQ on one boundary.
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dgl_jax
from dgl_jax.codecs import vq
from dgl_jax.data import load_digits


class ConvBlock(nn.Module):  # any linen module called as module(x, train=...)
    width: int

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(self.width, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.relu(x)


class Head(nn.Module):
    classes: int = 10

    @nn.compact
    def __call__(self, x, train):
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(0.2, deterministic=not train)(nn.relu(nn.Dense(64)(x)))
        return nn.Dense(self.classes)(x)


def ce_plus_mse(logits, labels):  # a local loss of your own: cross-entropy plus an MSE term on probabilities
    one_hot = jax.nn.one_hot(labels, logits.shape[-1])
    return dgl_jax.cross_entropy(logits, labels) + dgl_jax.mse(jax.nn.softmax(logits), one_hot)


stages = [
    dgl_jax.Stage(ConvBlock(32), Head(), tx=optax.adam(3e-3)),
    dgl_jax.Stage(ConvBlock(64), Head(), tx=optax.adam(3e-3), loss_fn=ce_plus_mse),
    dgl_jax.Stage(ConvBlock(64), Head(), tx=optax.adamw(3e-3, weight_decay=1e-4)),
]
stages = dgl_jax.with_codec(stages, [vq(16, code_dim=4, packed=True), None])  # 4-bit codes on boundary 1 -> 2

data = load_digits()
x_train, y_train = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)
batch = 64
example = jax.ShapeDtypeStruct((batch, *x_train.shape[1:]), x_train.dtype)
states = dgl_jax.init_stage_states(stages, jax.random.key(0), example)
step = jax.jit(functools.partial(dgl_jax.dgl_step, stages))
evaluate = jax.jit(functools.partial(dgl_jax.evaluate_batch, stages))

key = jax.random.key(1)
steps_per_epoch = len(y_train) // batch
for epoch in range(12):
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), len(y_train))
    for s in range(steps_per_epoch):
        idx = perm[s * batch : (s + 1) * batch]
        states, metrics = step(states, x_train[idx], y_train[idx], jax.random.fold_in(key, epoch * 1000 + s))

out = evaluate(states, jnp.asarray(data.test_images), jnp.asarray(data.test_labels))  # eval mode, codecs on
accuracy = np.asarray(out.per_head) / len(data.test_labels)
for j, a in enumerate(accuracy):
    print(f"head {j + 1} test accuracy: {100 * a:.2f}%")
print(f"last head test accuracy: {100 * accuracy[-1]:.2f}%")
