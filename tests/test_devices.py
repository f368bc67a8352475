"""Many devices from the trainer (4 fake CPU devices): stage-parallel modes equal one device, bytes measured
from the compiled program equal the accounting, data-parallel steps match, checkpoints reshard, the zoo runs
under Explicit and Auto meshes, and bad layouts are one line."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_until
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dgl_jax import dgl_step, get_model, init_stage_states, make_optimizer, with_optimizer
from dgl_jax.checkpoint import Checkpointer, state_tree
from dgl_jax.devices import resolve_layout
from dgl_jax.trainer import TrainConfig, Trainer

BASE = TrainConfig(epochs=1, chunk_steps=4, eval_batch_size=200)


def trained(small, **kw):
    trainer = Trainer(dataclasses.replace(BASE, **kw), dataset=small, log=lambda s: None)
    return trainer, run_until(trainer, trainer.init_state())


@pytest.fixture(scope="module")
def one_device(small):
    return trained(small)


@pytest.mark.parametrize(
    "kw",
    [dict(devices=3, parallel="stages"), dict(devices=3, parallel="stages", executor="threads")],
    ids=["spmd", "threads"],
)
def test_stage_parallel_trainer_equals_one_device(small, one_device, kw):
    trainer, state = trained(small, **kw)
    chex.assert_trees_all_close(jax.device_get(state.stages), jax.device_get(one_device[1].stages), rtol=1e-5,
                                atol=1e-6)  # fmt: skip
    w = trainer.wire_bytes
    assert w["measured"] == w["accounted"] > 0  # bytes from the program / the moved arrays == accounting


@pytest.mark.parametrize("executor", ["spmd", "threads"])
def test_stage_groups_of_several_stages_equal_one_device(small, one_device, executor):
    # 3 stages in 2 groups ([0, 0, 1]): stages 0 and 1 share a device, only the wire between groups crosses.
    # One step: fused in one program, the group's stages round differently (1e-7), and on digits a second step
    # can already amplify that 1000-fold (measured on an AMD EPYC: 2e-4 after 2 steps; max-pool ties and the
    # BatchNorm of nearly constant channels), so the states are compared after the step that shows the contract.
    config = dataclasses.replace(BASE, chunk_steps=1)
    trainer = Trainer(dataclasses.replace(config, devices=2, parallel="stages", stage_groups=2, executor=executor),
                      dataset=small, log=lambda s: None)  # fmt: skip
    state = run_until(trainer, trainer.init_state(), stop_after_chunks=1)
    one = Trainer(config, dataset=small, log=lambda s: None)
    ref = run_until(one, one.init_state(), stop_after_chunks=1)
    assert trainer.layout.stage_group(3) == [0, 0, 1]
    chex.assert_trees_all_close(jax.device_get(state.stages), jax.device_get(ref.stages), rtol=1e-5, atol=1e-6)
    w, wire_bytes = trainer.wire_bytes, _boundary_bytes(trainer)
    extra = 8 + 1 if executor == "spmd" else 0  # SPMD sends the batch's key data (uint32[2]) and valid flag too
    assert w["measured"] == w["accounted"] == wire_bytes[1] + extra  # boundary 0 stays inside group 0


def _boundary_bytes(trainer):
    """Bytes per step of each of the K-1 boundaries' wires with their int32 targets (float32 features here)."""
    from dgl_jax.stage import message_specs

    x = trainer.example_batch
    msgs = message_specs(trainer.stages, trainer.init_state().stages, x)
    return [int(np.prod(m.shape)) * 4 + x.shape[0] * 4 for m in msgs]


def test_stages_plus_data_step_equals_one_device_with_the_same_split(small):
    def first_step(**kw):
        trainer = Trainer(dataclasses.replace(BASE, split=2, chunk_steps=1, **kw), dataset=small, log=lambda s: None)
        return trainer, next(iter(trainer.fit(trainer.init_state()))).state

    _, ref = first_step()
    trainer, state = first_step(devices=4, parallel="stages+data", stage_groups=2)
    chex.assert_trees_all_close(jax.device_get(state.stages), jax.device_get(ref.stages), rtol=1e-5, atol=1e-5)
    assert trainer.wire_bytes["measured"] == trainer.wire_bytes["accounted"]


def test_vq_codec_bytes_are_measured_on_the_stage_parallel_wire(small):
    trainer, _ = trained(small, devices=3, parallel="stages", codec="vq-packed:16:4")
    float_trainer, _ = trained(small, devices=3, parallel="stages", epochs=1, chunk_steps=9)
    w = trainer.wire_bytes
    assert w["measured"] == w["accounted"] and 8 * w["measured"] < float_trainer.wire_bytes["measured"]


def test_heads_reading_their_wire_train_alike_on_one_device_and_stage_parallel_threads(small):
    kw = dict(codec="vq-packed:16:4", head_reads_wire=True, epochs=1, chunk_steps=9)
    trainer, one = trained(small, **kw)
    assert all(s.head_reads_wire for s in trainer.stages)
    _, threads = trained(small, devices=3, parallel="stages", executor="threads", **kw)
    chex.assert_trees_all_close(jax.device_get(threads.stages), jax.device_get(one.stages), rtol=1e-5, atol=1e-6)
    _, plain = trained(small, **{**kw, "head_reads_wire": False})
    a, b = (jax.device_get(s.stages[0].params["block"]) for s in (one, plain))
    assert not all(np.allclose(x, y, atol=1e-6) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_data_parallel_step_matches_one_device_and_resume_is_bit_identical(small, tmp_path):
    one = Trainer(dataclasses.replace(BASE, chunk_steps=1), dataset=small, log=lambda s: None)
    four = Trainer(dataclasses.replace(BASE, chunk_steps=1, devices=4), dataset=small, log=lambda s: None)
    a = next(iter(one.fit(one.init_state()))).state
    b = next(iter(four.fit(four.init_state()))).state
    assert b.stages[0].params["block"]["layers_0"]["Conv_0"]["kernel"].sharding.num_devices == 4
    chex.assert_trees_all_close(jax.device_get(b.stages), jax.device_get(a.stages), rtol=1e-5, atol=1e-5)
    # resume on the same mesh is bit-identical; a checkpoint of 4 devices restores on 1 and on 2
    trainer = Trainer(dataclasses.replace(BASE, devices=4), dataset=small, log=lambda s: None)
    straight = run_until(trainer, trainer.init_state())
    stopped = run_until(trainer, trainer.init_state(), stop_after_chunks=1)
    ck = Checkpointer(tmp_path / "ck")
    ck.save(4, state_tree(stopped.stages, stopped.extra, stopped.key), {"epoch": stopped.epoch, "step": stopped.step})
    for n in (4, 2, 1):
        t = Trainer(dataclasses.replace(BASE, devices=n), dataset=small, log=lambda s: None)
        fresh = t.init_state()
        tree, meta = Checkpointer(tmp_path / "ck").restore(state_tree(fresh.stages, fresh.extra, fresh.key))
        leaf = jax.tree.leaves(tree["stages"])[0]
        assert leaf.sharding.num_devices == n
        if n == 4:
            resumed = run_until(t, fresh._replace(stages=tree["stages"], epoch=meta["epoch"], step=meta["step"]))
            chex.assert_trees_all_equal(resumed.stages, straight.stages)


@pytest.mark.parametrize(
    "kw",
    [dict(devices=3, parallel="stages"), dict(devices=2, parallel="stages", stage_groups=2, executor="threads")],
    ids=["spmd", "threads-groups"],
)
def test_stage_parallel_resume_from_a_checkpoint_is_bit_identical(small, tmp_path, kw):
    trainer = Trainer(dataclasses.replace(BASE, **kw), dataset=small, log=lambda s: None)
    straight = run_until(trainer, trainer.init_state())
    stopped = run_until(trainer, trainer.init_state(), stop_after_chunks=1)
    Checkpointer(tmp_path).save(4, state_tree(stopped.stages, stopped.extra, stopped.key), {})
    fresh = trainer.init_state()
    tree, _ = Checkpointer(tmp_path).restore(state_tree(fresh.stages, fresh.extra, fresh.key))
    resumed = run_until(trainer, stopped._replace(stages=tree["stages"], key=jax.random.wrap_key_data(tree["key"])))
    chex.assert_trees_all_equal(jax.device_get(resumed.stages), jax.device_get(straight.stages))


def test_vq_codes_reach_the_receiver_as_uint8_on_its_device():
    from dgl_jax.accounting import nbytes
    from dgl_jax.codecs import parse_codec
    from dgl_jax.parallel import PipelinedDGL, SpmdPipeline, make_placement
    from dgl_jax.stage import with_codec
    from dgl_jax.steps import stage_step

    stages = with_codec(with_optimizer(get_model("small_cnn", split=2), lambda j: make_optimizer("sgd", 0.05)),
                        parse_codec("vq-packed:16:4"))  # fmt: skip
    x, y = jax.random.normal(jax.random.key(1), (8, 8, 8, 1)), jnp.arange(8) % 10
    states = init_stage_states(stages, jax.random.key(0), x)
    receiver = jax.devices()[1]
    # threads: what stage 1's thread receives is the wire put on its device, codes still uint8
    pipe = PipelinedDGL(stages, make_placement(2, devices=jax.devices()[:2]))
    placed = pipe.place(states)
    pipe.compile(placed, x, y)
    wire = stage_step(stages[0], states[0], x, y, jax.random.key(2))[1]
    got = pipe.put(1, wire)
    assert got.codes.data.dtype == jnp.uint8 and got.codes.data.devices() == {receiver}
    _, _ = pipe.run(placed, [(x, y)] * 2)
    assert pipe.bytes_sent == [2 * (nbytes(wire) + nbytes(y))]  # what the threads moved
    # SPMD: row 1 of the inbox (stage 1's) lives on the stage axis' second device, as uint8 codes
    mesh = jax.make_mesh((2,), ("stage",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    spmd = SpmdPipeline(stages, mesh, states, x, y)
    st, _ = spmd.run(spmd.init(states), [(x, y)])
    (shard,) = [s for s in st.inbox[0][0].codes.data.addressable_shards if s.index[0].start == 1]
    assert shard.data.dtype == jnp.uint8 and shard.device == receiver


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("model", ["small_cnn", "cnn4"])
def test_zoo_under_explicit_and_auto_meshes(axis_type, model):
    opts = {"width_mult": 0.25} if model == "cnn4" else {}
    shape = (8, 32, 32, 3) if model == "cnn4" else (8, 8, 8, 1)
    stages = with_optimizer(get_model(model, **opts), lambda j: make_optimizer("sgd", 0.05))
    x, y = jax.random.normal(jax.random.key(1), shape), jnp.arange(8) % 10
    states = init_stage_states(stages, jax.random.key(0), x)
    step = jax.jit(functools.partial(dgl_step, stages))
    _, ref = step(states, x, y, jax.random.key(2))
    mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
    with jax.set_mesh(mesh):
        batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        _, m = step(jax.device_put(states, rep), jax.device_put(x, batch), jax.device_put(y, batch), jax.random.key(2))
    np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(parallel="stages", devices=4, stage_groups=5), "more than the 3 stages"),
        (dict(parallel="stages+data", devices=2, stage_groups=3), "more than the 2 devices"),
        (dict(parallel="data", devices=3), "batch size 64 is not divisible by the 3"),
        (dict(parallel="stages", devices=3, method="backprop"), "needs a decoupled method"),
        (dict(parallel="diagonal"), "--parallel 'diagonal' is not valid"),
        (dict(devices=9), "--devices 9: expected 1..4"),
    ],
)
def test_bad_layouts_are_one_line(kw, match):
    args = {"parallel": "data", "devices": 1, "stage_groups": None, "executor": "spmd", "method": "dgl", **kw}
    with pytest.raises(ValueError, match=match) as e:
        resolve_layout(args["parallel"], args["devices"], args["stage_groups"], args["executor"], num_stages=3,
                       batch_size=64, method=args["method"])  # fmt: skip
    assert "\n" not in str(e.value)
