"""Checkpointer: exact round trip of a run-state pytree (NamedTuples, optax states, PRNG key), keep-last-N,
absolute paths, and one-line errors for incompatible or corrupted checkpoints."""

import os

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from dgl_jax.checkpoint import Checkpointer, CheckpointError, signature, state_tree
from dgl_jax.stage import StageState


def make_tree(width=4, seed=0):
    k = jax.random.key(seed)
    params = {"conv": {"kernel": jax.random.normal(k, (3, 3, 1, width))}, "bias": jnp.zeros((width,))}
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    st = StageState(params, {"bn": {"mean": jnp.ones((width,))}}, tx.init(params), jnp.int32(7))
    return state_tree([st, st], {"buffer": jnp.arange(6.0)}, jax.random.key(42))


def test_roundtrip_keep_last_and_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree = make_tree()
    ck = Checkpointer("relative/ck", max_to_keep=2)
    assert ck.directory.is_absolute()
    for step in (10, 20, 30):
        moved = jax.tree.map(lambda a, s=step: a + s if a.dtype != jnp.uint32 else a, tree)
        ck.save(step, moved, {"epoch": step // 10, "step": 0})
    assert sorted(os.listdir(tmp_path / "relative/ck")) == ["20", "30"]
    restored, meta = Checkpointer(tmp_path / "relative/ck").restore(make_tree(seed=1))
    chex.assert_trees_all_equal(restored, jax.tree.map(lambda a: a + 30 if a.dtype != jnp.uint32 else a, tree))
    assert meta["epoch"] == 3 and meta["global_step"] == 30
    assert type(restored["stages"][0]) is StageState
    assert jax.random.key_data(jax.random.wrap_key_data(restored["key"])).tolist() == restored["key"].tolist()


def test_incompatible_checkpoint_is_one_clear_error(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, make_tree(width=4), {"epoch": 0, "step": 1})
    with pytest.raises(CheckpointError, match=r"does not match this run's model/method.*\(4,\).*\(8,\)") as e:
        ck.restore(make_tree(width=8))
    assert "\n" not in str(e.value)


def test_corrupted_checkpoint_is_one_clear_error(tmp_path):
    ck = Checkpointer(tmp_path / "ck")
    ck.save(5, make_tree(), {"epoch": 0, "step": 5})
    for root, _, files in os.walk(tmp_path / "ck" / "5"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")
    with pytest.raises(CheckpointError, match="unreadable") as e:
        Checkpointer(tmp_path / "ck").restore(make_tree())
    assert "\n" not in str(e.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        Checkpointer(tmp_path / "empty").restore(make_tree())


def test_signature_names_paths_shapes_dtypes():
    sig = signature({"a": jnp.zeros((2, 3)), "b": [jnp.int32(1)]})
    assert sig == ["['a'] (2, 3) float32", "['b'][0] () int32"]
