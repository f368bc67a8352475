import jax
import pytest

from dgl_jax import models

# Parameter counts of the reference implementations (torchvision for ImageNet models, He et al.'s CIFAR
# ResNets with option-A shortcuts), so a wrong layer anywhere changes the number.
REFERENCE_PARAMS = {
    ("resnet18", 1000): 11_689_512,
    ("resnet34", 1000): 21_797_672,
    ("resnet50", 1000): 25_557_032,
    ("resnet101", 1000): 44_549_160,
    ("resnet152", 1000): 60_192_808,
    ("vgg11", 1000): 132_868_840,
    ("vgg13", 1000): 133_053_736,
    ("vgg16", 1000): 138_365_992,
    ("vgg19", 1000): 143_678_248,
    ("resnet20_cifar", 10): 269_722,
    ("resnet32_cifar", 10): 464_154,
    ("resnet56_cifar", 10): 853_018,
    ("resnet110_cifar", 10): 1_727_962,
}


def trunk_and_classifier_params(stages, input_shape):
    costs = models.stage_costs(stages, input_shape, macs=False)
    return sum(c.block_params for c in costs) + costs[-1].head_params, costs


@pytest.mark.parametrize("name,classes", sorted(REFERENCE_PARAMS))
def test_zoo_parameter_counts_match_reference(name, classes):
    shape = (32, 32, 3) if name.endswith("cifar") else (64, 64, 3)
    stages = models.get_model(name, num_classes=classes, split=2)
    total, costs = trunk_and_classifier_params(stages, shape)
    assert total == REFERENCE_PARAMS[(name, classes)]
    assert len(costs) == 2


@pytest.mark.parametrize(
    "name,shape,k,out",
    [
        ("dni_cnn", (32, 32, 3), 3, [(10, 10, 128), (3, 3, 128), (1, 1, 128)]),
        ("cnn4", (32, 32, 3), 4, [(32, 32, 64), (16, 16, 128), (16, 16, 128), (8, 8, 256)]),
        (
            "cnn6_aux",
            (32, 32, 3),
            6,
            [(32, 32, 128), (16, 16, 256), (16, 16, 256), (8, 8, 512), (8, 8, 512), (8, 8, 512)],
        ),
        (
            "cnn6_buffer",
            (32, 32, 3),
            6,
            [(32, 32, 128), (32, 32, 128), (16, 16, 256), (16, 16, 256), (8, 8, 512), (8, 8, 512)],
        ),
        ("small_cnn", (8, 8, 1), 3, [(8, 8, 32), (4, 4, 64), (2, 2, 128)]),
        ("vgg19", (32, 32, 3), 4, [(8, 8, 128), (4, 4, 256), (2, 2, 512), (1, 1, 512)]),
        ("resnet110_cifar", (32, 32, 3), 2, [(16, 16, 32), (8, 8, 64)]),
        ("resnet152", (64, 64, 3), 2, [(4, 4, 1024), (2, 2, 2048)]),
    ],
)
def test_stage_output_shapes(name, shape, k, out):
    kwargs = {"split": k} if name not in ("dni_cnn", "small_cnn") else {}
    stages = models.get_model(name, **kwargs)
    costs = models.stage_costs(stages, shape, macs=False)
    assert [c.output_shape for c in costs] == out
    assert all(c.head_params > 0 for c in costs)


def test_every_registered_model_builds():
    for name in models.MODELS:
        stages = models.get_model(name)
        assert all(s.layers for s in stages), name


def test_mlp_sr_heads_cost_a_few_percent_cnn_heads_more_than_trunk():
    shape = (32, 32, 3)
    mlp_sr = models.head_cost_ratio(models.get_model("cnn6_aux", head="mlp_sr"), shape)
    cnn = models.head_cost_ratio(models.get_model("cnn6_aux", head="cnn"), shape)
    assert 0.0 < mlp_sr < 0.15
    assert cnn > 1.5


def test_balanced_split_by_layer_count():
    assert models.balanced_split([1] * 6, 3) == [2, 2, 2]
    assert models.balanced_split([1] * 7, 3) == [2, 3, 2]
    assert models.balanced_split([1, 2, 2, 2, 2], 2) == [3, 2]
    sizes = [len(s.layers) for s in models.get_model("resnet110_cifar", split=2)]
    assert sizes == [28, 27] and sum(sizes) == 55


def test_explicit_split_spec():
    stages = models.get_model("cnn6_aux", split=[1, 2, 3])
    assert [s.layers for s in stages] == [("conv1",), ("conv2", "conv3"), ("conv4", "conv5", "conv6")]


def test_split_that_drops_layers_names_them():
    with pytest.raises(ValueError, match=r"drop \['conv5', 'conv6'\]"):
        models.get_model("cnn6_aux", split=[2, 2])


def test_empty_stage_and_too_many_stages_are_errors():
    with pytest.raises(ValueError, match=r"stage\(s\) \[1\] empty"):
        models.get_model("cnn4", split=[2, 0, 2])
    with pytest.raises(ValueError, match="K=5 stages requested but the model has 4 units"):
        models.get_model("cnn4", split=5)
    with pytest.raises(ValueError, match="asks for 5 units but the model has only 4"):
        models.get_model("cnn4", split=[2, 3])


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="unknown model 'nope'.*cnn4"):
        models.get_model("nope")


def test_param_counts_do_not_materialise(monkeypatch):
    # stage_costs must work on VGG-19 ImageNet-size (143M params) without allocating: eval_shape only.
    calls = []
    monkeypatch.setattr(jax, "device_put", lambda *a, **k: calls.append(1))
    models.stage_costs(models.get_model("vgg19", split=4), (32, 32, 3), macs=False)
    assert not calls
