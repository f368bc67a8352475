"""Presets: the paper's experiment recipes as :class:`~dgl_jax.trainer.TrainConfig` overrides (configs as
code). ``python -m dgl_jax train --preset NAME`` starts from one; options given on the command line override
it. Recipes follow ARCHITECTURE.md section 1 (Belilovsky et al. 2020/2021 and their official code)."""

from __future__ import annotations

from typing import NamedTuple

from dgl_jax.config import scale_decay
from dgl_jax.trainer import TrainConfig, config_to_dict


class Preset(NamedTuple):
    """A named recipe: ``description`` (shown by ``--help``) and the ``TrainConfig`` fields it sets."""

    description: str
    overrides: dict


_CIFAR_SGD = dict(
    dataset="cifar10",
    optimizer="sgd",
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    decay_epochs=15,
    decay_factor=0.2,
    epochs=50,
    batch_size=128,
    augment=True,
)
_IMAGENET = {  # the ImageNet recipe: the CIFAR one with its own data, decay, batch and loader
    **_CIFAR_SGD,
    "dataset": "imagenet2012",
    "weight_decay": 1e-4,
    "decay_epochs": 10,
    "decay_factor": 0.1,
    "batch_size": 256,
    "loader": "grain",  # imagenet2012 is streamed (images resized on the host); the in-memory loader refuses it
}

PRESETS: dict[str, Preset] = {
    "quickstart": Preset("the default: small_cnn, 3 stages, digits, 10 epochs (well under a minute on a CPU)", {}),
    "fashion_mnist": Preset(
        "small_cnn (3 stages) on Fashion-MNIST, SGD 0.05, LR x0.2 at epochs 6 and 8, 10 epochs, batch 128",
        dict(dataset="fashion_mnist", epochs=10, batch_size=128, lr=0.05, decay_epochs=(6, 8)),
    ),
    "dni_comparison": Preset(
        "DNI comparison: dni_cnn (3 x conv5x5 128), dni heads, CIFAR-10, Adam 3e-5, batch 256, 1500 epochs",
        dict(
            model="dni_cnn",
            head="dni",
            dataset="cifar10",
            optimizer="adam",
            lr=3e-5,
            weight_decay=0.0,
            decay_epochs=None,
            epochs=1500,
            batch_size=256,
            augment=True,
        ),
    ),
    "aux_head_study": Preset(
        "aux-head study: cnn6_aux (6 stages), mlp_sr heads (try --head mlp / cnn), CIFAR-10, SGD 0.1, LR x0.2 "
        "every 15 epochs, 50 epochs",
        dict(model="cnn6_aux", head="mlp_sr", **_CIFAR_SGD),
    ),
    "learning_curves": Preset(
        "learning curves: cnn4 (4 stages), mlp_sr heads, CIFAR-10, SGD 0.1, LR x0.2 every 15 epochs, 50 epochs "
        "(also --method sequential / backprop)",
        dict(model="cnn4", head="mlp_sr", **_CIFAR_SGD),
    ),
    "buffer_net": Preset(
        "async/buffer network: cnn6_buffer (6 stages), mlp heads, CIFAR-10, SGD 0.1, LR /5 every 15 epochs, "
        "50 epochs (synchronous DGL; asynchronous methods plug in with --method)",
        dict(model="cnn6_buffer", head="mlp", **_CIFAR_SGD),
    ),
    "resnet110_k2": Preset(
        "DDG comparison: CIFAR ResNet-110 cut in K=2, mlp_sr head, SGD 0.01, LR /10 at 150 and 225, 300 epochs",
        dict(
            model="resnet110_cifar",
            split=2,
            head="mlp_sr",
            **{**_CIFAR_SGD, "lr": 0.01, "decay_epochs": (150, 225), "decay_factor": 0.1, "epochs": 300},
        ),
    ),
    "imagenet_vgg13_k10": Preset(
        "ImageNet VGG-13 layer-wise (K=10), mlp_sr heads, SGD 0.1, LR /10 every 10 epochs, 50 epochs, wd 1e-4",
        dict(model="vgg13", split=10, head="mlp_sr", **_IMAGENET),
    ),
    "imagenet_vgg19_k4": Preset(
        "ImageNet VGG-19 K=4, mlp_sr heads, SGD 0.1, LR /10 every 10 epochs, 50 epochs, batch 256, wd 1e-4",
        dict(model="vgg19", split=4, head="mlp_sr", **_IMAGENET),
    ),
    "imagenet_resnet152_k2": Preset(
        "ImageNet ResNet-152 K=2, mlp_sr head, SGD 0.1, LR /10 every 10 epochs, 50 epochs, batch 256, wd 1e-4",
        dict(model="resnet152", split=2, head="mlp_sr", **_IMAGENET),
    ),
}


def preset_config(name: str, **overrides) -> TrainConfig:
    """The :class:`TrainConfig` of preset ``name`` with ``overrides`` applied on top. Overriding ``epochs``
    without ``decay_epochs`` moves the recipe's LR decay to the same fractions of the new run
    (:func:`~dgl_jax.config.scale_decay`): ``--epochs 3`` on a recipe decaying at 7 of 10 epochs decays at 2."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    base = config_to_dict(TrainConfig())
    base.update(PRESETS[name].overrides)
    if "epochs" in overrides and "decay_epochs" not in overrides:
        base["decay_epochs"] = scale_decay(base["decay_epochs"], base["epochs"], overrides["epochs"])
    base.update(overrides)
    for k in ("split", "decay_epochs"):
        if isinstance(base.get(k), list):
            base[k] = tuple(base[k])
    return TrainConfig(**base)
