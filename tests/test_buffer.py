"""Replay buffer semantics against a small pure-Python model of the rules."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgl_jax import buffer

CAP = 4


class PyBuffer:
    """The rules, written plainly: a list of slots [value, uses, seq, tick]; the write position wraps."""

    def __init__(self, cap):
        self.cap, self.slots, self.write, self.count = cap, [None] * cap, 0, 0

    def push(self, value, tick):
        self.slots[self.write] = [value, 0, self.count, tick]
        self.write = (self.write + 1) % self.cap
        self.count += 1

    def eligible(self, max_reuse):
        return [i for i, s in enumerate(self.slots) if s is not None and (max_reuse is None or s[1] < max_reuse)]

    def sample(self, policy, max_reuse):
        ok = self.eligible(max_reuse)
        if not ok:
            return None
        if policy == "priority_lifo":
            i = min(ok, key=lambda i: (self.slots[i][1], -self.slots[i][2]))
        elif policy == "lifo":
            i = max(ok, key=lambda i: self.slots[i][2])
        else:  # fifo
            i = min(ok, key=lambda i: self.slots[i][2])
        self.slots[i][1] += 1
        return self.slots[i][0]


EXAMPLE = (jnp.zeros((2, 3), jnp.float32), jnp.zeros((2,), jnp.int32))


def item(v):
    return (jnp.full((2, 3), v, jnp.float32), jnp.full((2,), v, jnp.int32))


push = jax.jit(buffer.push)


@functools.cache
def sampler(policy, max_reuse):
    return jax.jit(functools.partial(buffer.sample, policy=policy, max_reuse=max_reuse))


@pytest.mark.parametrize("policy", ["priority_lifo", "lifo", "fifo"])
@pytest.mark.parametrize("max_reuse", [None, 2])
def test_matches_python_model_on_random_sequences(policy, max_reuse):
    rng = np.random.default_rng(hash((policy, max_reuse)) % 2**32)
    ref, st = PyBuffer(CAP), buffer.init(CAP, EXAMPLE)
    sample = sampler(policy, max_reuse)
    v = 0
    for t in range(60):
        if rng.random() < 0.4:  # ~ 24 pushes: the ring wraps several times
            v += 1
            ref.push(v, t)
            st = push(st, item(v), tick=t)
        else:
            expect = ref.sample(policy, max_reuse)
            (x, y), valid, st = sample(st, key=jax.random.key(t))
            assert bool(valid) == (expect is not None), (t, expect)
            if expect is not None:
                assert int(y[0]) == expect and float(x[0, 0]) == expect, (t, policy, int(y[0]), expect)
        uses = np.array([0 if s is None else s[1] for s in ref.slots])
        np.testing.assert_array_equal(np.asarray(st.uses), uses)
        assert int(st.size) == sum(s is not None for s in ref.slots)
        assert int(st.write) == ref.write


def test_priority_lifo_recency_across_the_wrap():
    st = buffer.init(3, EXAMPLE)
    for v in range(1, 6):  # 5 pushes into 3 slots: slots hold 4, 5, 3; the newest (5) is in slot 1
        st = push(st, item(v), tick=v)
    sample = sampler("priority_lifo", None)
    got = []
    for t in range(6):
        (_, y), valid, st = sample(st, key=jax.random.key(t))
        got.append(int(y[0]))
    # least used first, ties by most recent: 5, 4, 3, then again 5, 4, 3
    assert got == [5, 4, 3, 5, 4, 3]
    np.testing.assert_array_equal(np.asarray(st.ticks), [4, 5, 3])


def test_max_reuse_exhausts_and_push_revives():
    st = buffer.init(2, EXAMPLE)
    sample = sampler("priority_lifo", 1)
    _, valid, st = sample(st, key=jax.random.key(0))
    assert not bool(valid)  # empty: consumer skips, state unchanged
    assert int(st.uses.sum()) == 0
    st = push(st, item(7), tick=0)
    _, valid, st = sample(st, key=jax.random.key(1))
    assert bool(valid)
    _, valid, st2 = sample(st, key=jax.random.key(2))
    assert not bool(valid) and not bool(buffer.can_sample(st, max_reuse=1))
    chex.assert_trees_all_equal(st, st2)  # an invalid sample leaves the state alone
    st = push(st, item(8), tick=1)
    (_, y), valid, st = sample(st, key=jax.random.key(3))
    assert bool(valid) and int(y[0]) == 8


def test_uniform_only_returns_eligible_slots_and_covers_them():
    st = buffer.init(5, EXAMPLE)
    for v in (1, 2, 3):
        st = push(st, item(v))
    sample = sampler("uniform", None)
    seen = set()
    for t in range(40):
        (_, y), valid, st = sample(st, key=jax.random.key(t))
        assert bool(valid)
        seen.add(int(y[0]))
    assert seen == {1, 2, 3}


def test_delay_hides_recent_items():
    st = buffer.init(3, EXAMPLE)
    st = push(st, item(1), tick=0)
    st = push(st, item(2), tick=5)
    (_, y), valid, _ = buffer.sample(st, policy="lifo", now=6, delay=3)
    assert bool(valid) and int(y[0]) == 1  # item 2 is not old enough
    _, valid, _ = buffer.sample(st, policy="lifo", now=2, delay=3)
    assert not bool(valid)


def test_integer_codes_and_masked_push_under_vmap_and_scan():
    codes = jnp.zeros((4, 4, 2), jnp.uint8)  # e.g. VQ indices
    st = buffer.init(3, codes)
    assert st.items.dtype == jnp.uint8 and st.items.shape == (3, 4, 4, 2)

    def body(s, t):
        s = buffer.push(s, jnp.full((4, 4, 2), t, jnp.uint8), tick=t, valid=t % 2 == 0)
        x, valid, s = buffer.sample(s, policy="priority_lifo")
        return s, (x[0, 0, 0], valid)

    run = jax.jit(lambda s: jax.lax.scan(body, s, jnp.arange(6)))
    st, (x, valid) = run(st)
    assert int(st.count) == 3  # only even ticks pushed
    np.testing.assert_array_equal(np.asarray(valid), [True] * 6)
    # the newest unused item first, else the least used: 0, 0 (reused), 2, 2, 4, 4
    np.testing.assert_array_equal(np.asarray(x), [0, 0, 2, 2, 4, 4])
    many = jax.vmap(lambda s: run(s)[0])(jax.tree.map(lambda a: jnp.stack([a, a]), buffer.init(3, codes)))
    assert many.uses.shape == (2, 3)


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="capacity.*0"):
        buffer.init(0, EXAMPLE)
    with pytest.raises(ValueError, match="'newest'"):
        buffer.sample(buffer.init(1, EXAMPLE), policy="newest")
    with pytest.raises(ValueError, match="max_reuse.*0"):
        buffer.sample(buffer.init(1, EXAMPLE), max_reuse=0)
