"""Recipes: a shorter or longer run keeps the recipe's LR decay at the same fractions of the run."""

import pytest

from dgl_jax.config import TrainConfig, scale_decay
from dgl_jax.presets import preset_config


@pytest.mark.parametrize(
    "decay, recipe, epochs, want",
    [
        ((7,), 10, 3, (2,)),  # the quickstart recipe's decay at 7 of 10 epochs, for a 3-epoch run
        ((7,), 10, 10, (7,)),
        ((7,), 10, 20, (14,)),
        ((6, 8), 10, 3, (2,)),  # two decays that round to the same epoch: one
        ((6, 9), 12, 3, (2,)),  # 1.5 rounds to 2 (banker's rounding of 1.5), 2.25 to 2
        ((7,), 10, 1, None),  # no decay falls inside a 1-epoch run: constant LR, said as None
        (15, 50, 10, 3),  # every 15 of 50 epochs -> every 3 of 10
        (1, 10, 3, 1),  # never below 1
        (None, 10, 3, None),
    ],
)
def test_scale_decay_keeps_the_fractions_of_the_run(decay, recipe, epochs, want):
    assert scale_decay(decay, recipe, epochs) == want


def test_overriding_epochs_scales_the_presets_decay_unless_decay_is_given():
    assert TrainConfig().epochs == 10 and TrainConfig().decay_epochs == (7,)
    assert preset_config("quickstart").decay_epochs == (7,)
    assert preset_config("quickstart", epochs=3).decay_epochs == (2,)
    assert preset_config("quickstart", epochs=3, decay_epochs=(1,)).decay_epochs == (1,)
    assert preset_config("quickstart", epochs=3, decay_epochs=None).decay_epochs is None
    assert preset_config("fashion_mnist", epochs=5).decay_epochs == (3, 4)  # 6,8 of 10
