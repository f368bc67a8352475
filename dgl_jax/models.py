"""Model zoo: the paper's CIFAR CNNs, VGG-BN and ResNets, each returned as a list of :class:`Stage`.

A model is a list of named trunk *units* (a conv-BN-ReLU layer, or a residual block) plus its own
classifier. :func:`split_units` cuts the units into K contiguous stages, either by an explicit spec (units
per stage) or balanced by conv-layer count; a spec that would drop units or leave a stage empty is an error
that names the units. Stages below the last get an auxiliary head; the last stage keeps the model's
classifier. Stages come back without optimizer: attach one with :func:`dgl_jax.stage.with_optimizer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dgl_jax.layers import (
    BatchNorm,
    Conv,
    ConvBNReLU,
    GAPLinearHead,
    LinearHead,
    MLPHead,
    Sequential,
    adaptive_avg_pool,
    make_head,
)
from dgl_jax.stage import Stage

Dtype = Any
Split = int | Sequence[int] | None


class Unit(NamedTuple):
    """One trunk unit: its ``name``, Flax ``module`` (called as ``module(x, train)``) and conv-layer count."""

    name: str
    module: nn.Module
    num_layers: int


# ----------------------------------------------------------------------------------------------------------
# Splitting
# ----------------------------------------------------------------------------------------------------------
def balanced_split(layer_counts: Sequence[int], num_stages: int) -> list[int]:
    """Units per stage for ``num_stages`` contiguous stages with conv-layer counts as equal as possible.

    Stage boundaries are put where the cumulative layer count is closest to ``j * total / K``; every stage
    gets at least one unit.
    """
    n = len(layer_counts)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} units into {num_stages} stages: need 1 <= K <= {n}")
    total = sum(layer_counts)
    cum = [0]
    for c in layer_counts:
        cum.append(cum[-1] + c)
    cuts = [0]
    for j in range(1, num_stages):
        lo, hi = cuts[-1] + 1, n - (num_stages - j)  # leave >= 1 unit for this and each later stage
        target = j * total / num_stages
        cuts.append(min(range(lo, hi + 1), key=lambda i: (abs(cum[i] - target), i)))
    cuts.append(n)
    return [b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def split_units(units: Sequence[Unit], split: Split) -> list[list[Unit]]:
    """Cuts ``units`` into stages. ``split``: number of stages K (balanced by layer count), an explicit list
    of units per stage (must cover every unit, none empty), or ``None`` for one stage per unit."""
    n = len(units)
    names = [u.name for u in units]
    if split is None:
        sizes = [1] * n
    elif isinstance(split, int):
        if not 1 <= split <= n:
            raise ValueError(
                f"K={split} stages requested but the model has {n} units ({', '.join(names)}): need 1 <= K <= {n}"
            )
        sizes = balanced_split([u.num_layers for u in units], split)
    else:
        sizes = [int(s) for s in split]
        empty = [j for j, s in enumerate(sizes) if s < 1]
        if empty:
            raise ValueError(f"split {list(sizes)} leaves stage(s) {empty} empty; every stage needs >= 1 unit")
        if sum(sizes) < n:
            dropped = names[sum(sizes) :]
            raise ValueError(
                f"split {list(sizes)} covers {sum(sizes)} of {n} units and would drop {dropped}; "
                f"the sizes must add up to {n}"
            )
        if sum(sizes) > n:
            raise ValueError(f"split {list(sizes)} asks for {sum(sizes)} units but the model has only {n}")
    out, i = [], 0
    for s in sizes:
        out.append(list(units[i : i + s]))
        i += s
    return out


def build_stages(
    units: Sequence[Unit],
    split: Split,
    aux_head: Callable[[], nn.Module],
    last_head: nn.Module,
) -> list[Stage]:
    """Groups ``units`` by ``split`` into :class:`Stage` s; ``aux_head()`` makes each non-final head."""
    groups = split_units(units, split)
    stages = []
    for j, group in enumerate(groups):
        head = last_head if j == len(groups) - 1 else aux_head()
        block = Sequential(tuple(u.module for u in group))
        stages.append(Stage(block=block, head=head, layers=tuple(u.name for u in group)))
    return stages


def _aux(head: str, num_classes: int, dtype: Dtype, head_kwargs: dict | None) -> Callable[[], nn.Module]:
    make_head(head, num_classes, dtype, **(head_kwargs or {}))  # validate the name now
    return lambda: make_head(head, num_classes, dtype, **(head_kwargs or {}))


# ----------------------------------------------------------------------------------------------------------
# The paper's CIFAR CNNs
# ----------------------------------------------------------------------------------------------------------
def cifar_cnn(
    widths: Sequence[int] = (64, 128, 128, 256),
    downsample_at: Sequence[int] = (1, 3),
    *,
    num_classes: int = 10,
    split: Split = None,
    head: str = "mlp_sr",
    head_kwargs: dict | None = None,
    downsampler: str = "maxpool",
    last_head_depth: int = 2,
    width_mult: float = 1.0,
    dtype: Dtype = jnp.float32,
) -> list[Stage]:
    """The paper's conv3x3-BN-ReLU CNNs: layer ``i`` has ``widths[i] * width_mult`` channels and is preceded
    by a 2x downsampling (``downsampler``) when ``i in downsample_at`` (0-based). Last head: pool 2x2 ->
    ``last_head_depth`` x [Dense 4C, BN, ReLU] -> Dense. ``width_mult < 1`` gives CPU-sized variants.

    Paper nets: learning curves ``(64,128,128,256)``/``(1,3)``; aux-head study
    ``(128,256,256,512,512,512)``/``(1,3)``; async/buffer ``(128,128,256,256,512,512)``/``(2,4)``.
    """
    bad = [i for i in downsample_at if not 0 <= i < len(widths)]
    if bad:
        raise ValueError(f"downsample_at {bad} out of range for {len(widths)} layers")
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    widths = [max(1, round(w * width_mult)) for w in widths]
    units = [
        Unit(f"conv{i + 1}", ConvBNReLU(w, 3, pre=downsampler if i in downsample_at else None, dtype=dtype), 1)
        for i, w in enumerate(widths)
    ]
    last = MLPHead(num_classes, depth=last_head_depth, dtype=dtype)
    return build_stages(units, split, _aux(head, num_classes, dtype, head_kwargs), last)


def dni_cnn(
    *,
    num_classes: int = 10,
    width: int = 128,
    split: Split = None,
    head: str = "dni",
    head_kwargs: dict | None = None,
    dtype: Dtype = jnp.float32,
) -> list[Stage]:
    """The DNI-comparison CNN: 3 x [conv5x5 ``width``, BN, ReLU] with max-pool 3/3 after the first and
    avg-pool 3/3 after the second and third (32 -> 10 -> 3 -> 1); last head linear. One stage per layer."""
    posts = [("maxpool", 3, 3), ("avgpool", 3, 3), ("avgpool", 3, 3)]
    units = [Unit(f"conv{i + 1}", ConvBNReLU(width, 5, post=p, dtype=dtype), 1) for i, p in enumerate(posts)]
    return build_stages(units, split, _aux(head, num_classes, dtype, head_kwargs), LinearHead(num_classes, dtype))


def small_cnn(
    *,
    num_classes: int = 10,
    split: Split = None,
    head: str = "mlp_sr",
    head_kwargs: dict | None = None,
    width_mult: float = 1.0,
    dtype: Dtype = jnp.float32,
) -> list[Stage]:
    """The quick-start CNN (3 stages, widths 32-64-128, 2x max-pool before layers 2 and 3): small enough to
    train on 8x8 digits or 28x28 Fashion-MNIST on a laptop CPU."""
    return cifar_cnn(
        (32, 64, 128),
        (1, 2),
        num_classes=num_classes,
        split=split,
        head=head,
        head_kwargs=head_kwargs,
        last_head_depth=1,
        width_mult=width_mult,
        dtype=dtype,
    )


# ----------------------------------------------------------------------------------------------------------
# VGG with BatchNorm
# ----------------------------------------------------------------------------------------------------------
VGG_CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class VGGClassifier(nn.Module):
    """VGG's own classifier: adaptive-avg-pool to ``pool`` -> flatten -> 2 x [Dense ``hidden``, ReLU] -> Dense
    (torchvision's layout without dropout)."""

    num_classes: int
    hidden: int = 4096
    pool: int = 7
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = adaptive_avg_pool(x, self.pool).reshape(x.shape[0], -1)
        for _ in range(2):
            x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def vgg(
    depth: int = 16,
    *,
    num_classes: int = 1000,
    split: Split = 4,
    head: str = "mlp_sr",
    head_kwargs: dict | None = None,
    classifier_hidden: int = 4096,
    classifier_pool: int = 7,
    dtype: Dtype = jnp.float32,
) -> list[Stage]:
    """VGG-11/13/16/19 with BatchNorm; each conv is a unit, a max-pool 2/2 follows the convs marked ``M``.

    The ImageNet classifier by default; for 32x32 inputs use ``classifier_hidden=512, classifier_pool=1``.
    """
    if depth not in VGG_CONFIGS:
        raise ValueError(f"unknown VGG depth {depth}; expected one of {sorted(VGG_CONFIGS)}")
    cfg = VGG_CONFIGS[depth]
    units = []
    for i, v in enumerate(cfg):
        if v == "M":
            continue
        post = ("maxpool", 2, 2) if i + 1 < len(cfg) and cfg[i + 1] == "M" else None
        units.append(Unit(f"conv{len(units) + 1}", ConvBNReLU(v, 3, post=post, bias=True, dtype=dtype), 1))
    last = VGGClassifier(num_classes, classifier_hidden, classifier_pool, dtype)
    return build_stages(units, split, _aux(head, num_classes, dtype, head_kwargs), last)


# ----------------------------------------------------------------------------------------------------------
# ResNets
# ----------------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block (two conv3x3). ``shortcut``: ``"A"`` (CIFAR: subsample + zero-pad channels, no
    parameters) or ``"B"`` (conv1x1 + BN projection) when the shape changes."""

    features: int
    stride: int = 1
    shortcut: str = "B"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = lambda f, k, s: Conv(f, (k, k), s, padding=k // 2, use_bias=False, dtype=self.dtype)  # noqa: E731
        bn = lambda: BatchNorm(use_running_average=not train, dtype=self.dtype)  # noqa: E731
        y = nn.relu(bn()(conv(self.features, 3, self.stride)(x)))
        y = bn()(conv(self.features, 3, 1)(y))
        sc = x
        if self.stride != 1 or x.shape[-1] != self.features:
            if self.shortcut == "A":
                sc = x[:, :: self.stride, :: self.stride, :]
                pad = self.features - x.shape[-1]
                sc = jnp.pad(sc, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
            else:
                sc = bn()(conv(self.features, 1, self.stride)(x))
        return nn.relu(y + sc)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (conv1x1, conv3x3 with the stride, conv1x1 x4), projection shortcut."""

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = lambda f, k, s: Conv(f, (k, k), s, padding=k // 2, use_bias=False, dtype=self.dtype)  # noqa: E731
        bn = lambda: BatchNorm(use_running_average=not train, dtype=self.dtype)  # noqa: E731
        y = nn.relu(bn()(conv(self.features, 1, 1)(x)))
        y = nn.relu(bn()(conv(self.features, 3, self.stride)(y)))
        y = bn()(conv(4 * self.features, 1, 1)(y))
        sc = x
        if self.stride != 1 or x.shape[-1] != 4 * self.features:
            sc = bn()(conv(4 * self.features, 1, self.stride)(x))
        return nn.relu(y + sc)


class ImageNetStem(nn.Module):
    """conv7x7/2 (64) -> BN -> ReLU -> max-pool 3x3/2."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(64, (7, 7), 2, padding=3, use_bias=False, dtype=self.dtype)(x)
        x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)
IMAGENET_RESNETS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def cifar_resnet(
    depth: int = 110,
    *,
    num_classes: int = 10,
    split: Split = 2,
    head: str = "mlp_sr",
    head_kwargs: dict | None = None,
    dtype: Dtype = jnp.float32,
) -> list[Stage]:
    """CIFAR ResNet-(6n+2) (He et al. 2016) with option-A shortcuts: stem conv3x3 16, then 3 groups of n
    basic blocks (16, 32, 64 channels); the classifier is global-average-pool + Dense. Units: the stem and
    each block."""
    if depth not in CIFAR_RESNET_DEPTHS:
        raise ValueError(f"unknown CIFAR ResNet depth {depth}; expected one of {CIFAR_RESNET_DEPTHS}")
    n = (depth - 2) // 6
    units = [Unit("stem", ConvBNReLU(16, 3, dtype=dtype), 1)]
    for g, width in enumerate((16, 32, 64)):
        for b in range(n):
            stride = 2 if g > 0 and b == 0 else 1
            units.append(Unit(f"layer{g + 1}.{b}", BasicBlock(width, stride, "A", dtype), 2))
    return build_stages(units, split, _aux(head, num_classes, dtype, head_kwargs), GAPLinearHead(num_classes, dtype))


def resnet(
    depth: int = 50,
    *,
    num_classes: int = 1000,
    split: Split = 2,
    head: str = "mlp_sr",
    head_kwargs: dict | None = None,
    dtype: Dtype = jnp.float32,
) -> list[Stage]:
    """ImageNet ResNet-18/34/50/101/152 (torchvision layout, stride on the 3x3 conv); units: the stem and
    each block."""
    if depth not in IMAGENET_RESNETS:
        raise ValueError(f"unknown ResNet depth {depth}; expected one of {sorted(IMAGENET_RESNETS)}")
    kind, counts = IMAGENET_RESNETS[depth]
    units = [Unit("stem", ImageNetStem(dtype), 1)]
    for g, (width, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
        for b in range(count):
            stride = 2 if g > 0 and b == 0 else 1
            block = BasicBlock(width, stride, "B", dtype) if kind == "basic" else Bottleneck(width, stride, dtype)
            units.append(Unit(f"layer{g + 1}.{b}", block, 2 if kind == "basic" else 3))
    return build_stages(units, split, _aux(head, num_classes, dtype, head_kwargs), GAPLinearHead(num_classes, dtype))


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------
def _named(fn: Callable[..., list[Stage]], **fixed: Any) -> Callable[..., list[Stage]]:
    return lambda **kw: fn(**fixed, **kw)


MODELS: dict[str, Callable[..., list[Stage]]] = {
    "small_cnn": small_cnn,
    "dni_cnn": dni_cnn,
    "cnn4": _named(cifar_cnn, widths=(64, 128, 128, 256), downsample_at=(1, 3)),
    "cnn6_aux": _named(cifar_cnn, widths=(128, 256, 256, 512, 512, 512), downsample_at=(1, 3)),
    "cnn6_buffer": _named(cifar_cnn, widths=(128, 128, 256, 256, 512, 512), downsample_at=(2, 4)),
    **{f"vgg{d}": _named(vgg, depth=d) for d in VGG_CONFIGS},
    **{f"resnet{d}_cifar": _named(cifar_resnet, depth=d) for d in CIFAR_RESNET_DEPTHS},
    **{f"resnet{d}": _named(resnet, depth=d) for d in IMAGENET_RESNETS},
}


def register_model(
    name: str, builder: Callable[..., list[Stage]], *, replace: bool = False
) -> Callable[..., list[Stage]]:
    """Adds ``builder`` to :data:`MODELS` as ``name``; returns ``builder``. Then ``get_model(name)``,
    ``TrainConfig(model=name)`` and ``python -m dgl_jax train --import MODULE --model name`` build it.

    ``builder(**kwargs)`` returns the model's ``list[Stage]`` (without optimizer); the trainer passes
    ``num_classes``, ``dtype`` and, when set, ``split`` and ``head``, plus ``--model-option`` values. A name
    that is already registered is a ``ValueError`` unless ``replace=True``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name {name!r} is not valid; expected a non-empty string")
    if not callable(builder):
        raise TypeError(f"model {name!r}: builder {builder!r} is not callable")
    if name in MODELS and not replace:
        raise ValueError(f"model {name!r} is already registered; pick another name or pass replace=True")
    MODELS[name] = builder
    return builder


def get_model(name: str, **kwargs: Any) -> list[Stage]:
    """Builds a zoo model by name (one of :data:`MODELS`) with keyword overrides (``split``, ``head``,
    ``width_mult``, ...); an option the model does not take is a ``ValueError`` naming it."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    try:
        return MODELS[name](**kwargs)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise ValueError(f"model {name!r} does not take the option {str(e).split('argument ')[-1]}") from None
        raise


# ----------------------------------------------------------------------------------------------------------
# Size and cost
# ----------------------------------------------------------------------------------------------------------
class StageCost(NamedTuple):
    """Per-stage sizes: parameter counts and forward multiply-accumulates per example, for the block and
    the head, and the stage's output shape ``(H, W, C)``."""

    block_params: int
    head_params: int
    block_macs: float
    head_macs: float
    output_shape: tuple[int, ...]


def _count(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def stage_costs(stages: Sequence[Stage], input_shape: Sequence[int], macs: bool = True) -> list[StageCost]:
    """Parameter counts and XLA-counted forward MACs (flops / 2, per example) of every block and head for
    inputs of shape ``input_shape = (H, W, C)``. Nothing is materialised (abstract evaluation only);
    ``macs=False`` skips the compilation that counting MACs needs (MACs are then 0)."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    costs = []
    for stage in stages:
        m = stage.module
        variables = jax.eval_shape(lambda x, m=m: m.init(jax.random.key(0), x, False), x)
        params = variables["params"]

        def block_fn(v, x, m=m):
            return m.apply(v, x, False, method=m.features)

        def full_fn(v, x, m=m):
            return m.apply(v, x, False)

        block_flops = _flops(block_fn, variables, x) if macs else 0.0
        full_flops = _flops(full_fn, variables, x) if macs else 0.0
        out = jax.eval_shape(block_fn, variables, x)
        costs.append(
            StageCost(
                _count(params.get("block", {})),
                _count(params.get("head", {})),
                block_flops / 2,
                max(full_flops - block_flops, 0.0) / 2,
                tuple(out.shape[1:]),
            )
        )
        x = jax.ShapeDtypeStruct(out.shape, out.dtype)
    return costs


def _flops(fn: Callable, *args: Any) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def head_cost_ratio(stages: Sequence[Stage], input_shape: Sequence[int]) -> float:
    """MACs of all auxiliary heads (stages below the last) divided by the MACs of the whole trunk."""
    costs = stage_costs(stages, input_shape)
    return sum(c.head_macs for c in costs[:-1]) / sum(c.block_macs for c in costs)
