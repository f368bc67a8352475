"""Boundary codecs: how the message stage ``j`` sends to stage ``j + 1`` crosses a device boundary or sits in a
replay buffer, as optax-style pure functions.

A *message* is any pytree of arrays (usually one float32 ``[batch, H, W, C]`` feature map). A :class:`Codec`
is a NamedTuple of pure functions (like ``optax.GradientTransformation``) plus a name:

* ``init(example_message, key=None) -> state``: the sender's state; ``example_message`` may hold arrays or
  ``jax.ShapeDtypeStruct`` (only shapes and dtypes are read);
* ``encode(state, message, key=None) -> (new_state, wire)``: run by the sender;
* ``decode(wire) -> message``: run by the receiver;
* ``name``: a short string, e.g. ``"identity"``, ``"bfloat16"``, ``"vq:256:16"``, ``"vq-packed:16:4"``.

Every wire is **self-contained**: ``decode`` reads only the wire, never a codec state, so a receiver on
another device or a replay buffer holding wires needs no codec state (for VQ the wire carries the codebook
its codes refer to: a codebook sync on every send). PRNG convention of the library: ``key`` is always the
last parameter and ``None`` means no randomness. All functions are ``jit``-, ``vmap``- and ``scan``-friendly:
static shapes, no host synchronisation. :func:`wire_bytes` counts the bytes of a wire, concrete or abstract
(from ``jax.eval_shape``).

Built-in codecs and their wires:

* :func:`identity`: state ``()``; the wire is the message itself (same arrays, bit-exact).
* :func:`cast`: state ``()``; the wire is the message with every floating leaf cast to ``dtype`` (default
  bfloat16), other leaves unchanged; ``decode`` casts floating leaves to float32.
* :func:`vq`: grouped online vector quantization (the math of :mod:`dgl_jax.vq`); the message is one
  floating array ``[batch, ..., C]`` split into ``G`` groups of ``d = C / G`` channels; the state is the
  sender's :class:`dgl_jax.vq.VQState` (EMA k-means, seeded from the first message sent). The wire is a
  :class:`VQWire` with ``codebook: float32 [G, K, d]`` and ``codes``:

  - unpacked: ``[batch, ..., G]`` in :func:`dgl_jax.vq.code_dtype` of ``K`` (uint8 up to 256 codes, uint16
    up to 65536);
  - packed: a :class:`PackedBits` with ``data: uint8 [batch, ceil(n * bits / 8)]``, ``n`` the number of
    codes per example and ``bits = ceil(log2 K)`` (see :func:`pack_bits`), the batch axis first so that it
    can be sharded over a data axis.

  With ``levels=L > 1`` (residual VQ) the state is a tuple of ``L`` VQ states, the codes are
  ``[batch, ..., L * G]`` and the codebook ``[L * G, K, d]``.

:func:`parse_codec` builds a codec from a command-line spec (:data:`CODEC_SYNTAX`); :func:`check_decoded`
checks, without computing anything, that a codec decodes to what a receiver was initialised on.
"""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dgl_jax import vq as vqmath

PyTree = Any
MAX_LEVELS = 4
"""The most residual VQ levels a :func:`vq` codec takes."""

__all__ = [
    "CODEC_SYNTAX",
    "Codec",
    "PackedBits",
    "VQCodecState",
    "VQWire",
    "cast",
    "check_decoded",
    "identity",
    "pack_bits",
    "parse_codec",
    "unpack_bits",
    "vq",
    "wire_bytes",
]


class Codec(NamedTuple):
    """init / encode / decode of one boundary (pure functions; see the module docstring for the contract).

    ``init(example_message, key=None) -> state``; ``encode(state, message, key=None) -> (new_state, wire)``
    (sender); ``decode(wire) -> message`` (receiver, reads only the wire); ``name``: e.g. ``"vq:256:16"``.
    """

    init: Callable[[PyTree, jax.Array | None], PyTree]
    encode: Callable[[PyTree, PyTree, jax.Array | None], tuple[PyTree, PyTree]]
    decode: Callable[[PyTree], PyTree]
    name: str


VQCodecState = vqmath.VQState
"""State of a :func:`vq` codec: the sender's :class:`dgl_jax.vq.VQState` (``codebook [G, K, d]``, EMA counts
and sums, ``step`` = number of messages sent)."""


@flax.struct.dataclass
class PackedBits:
    """Unsigned integer codes stored with exactly ``bits`` bits each (little-endian bit order), per example.

    ``data``: uint8 ``[batch, ceil(n * bits / 8)]`` with ``n = prod(shape)``; static fields: ``bits`` (1..16),
    ``shape`` (the per-example code shape) and ``dtype`` (the unpacked dtype name, e.g. ``"uint8"``).
    """

    data: jax.Array
    bits: int = flax.struct.field(pytree_node=False)
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class VQWire:
    """What a :func:`vq` codec sends: ``codes`` (``[batch, ..., G]`` unsigned ints, or their
    :class:`PackedBits`) and the ``codebook: float32 [G, K, d]`` they index (the sender's codebook before its
    update on this message)."""

    codes: jax.Array | PackedBits
    codebook: jax.Array


# ----------------------------------------------------------------------------------------------------------
# Bit packing
# ----------------------------------------------------------------------------------------------------------
def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")


def pack_bits(codes: jax.Array, bits: int) -> PackedBits:
    """Packs ``codes: [batch, ...]`` (unsigned integers ``< 2**bits``; higher bits are dropped) into
    ``uint8 [batch, ceil(n * bits / 8)]`` per example (``n = prod(codes.shape[1:])``): the codes of an example
    are flattened, each is written as ``bits`` bits, least significant first, and the bit stream is packed
    8 bits per byte in little-endian bit order (4-bit codes: two per byte, the first in the low nibble;
    5-bit codes: 8 codes in 5 bytes). ``1 <= bits <= 16``. Jit/vmap friendly."""
    _check_bits(bits)
    codes = jnp.asarray(codes)
    if codes.ndim < 1:
        raise ValueError(f"pack_bits needs codes with a batch axis [batch, ...], got shape {codes.shape}")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"pack_bits needs integer codes, got dtype {codes.dtype}")
    batch, shape = codes.shape[0], tuple(int(s) for s in codes.shape[1:])
    n = math.prod(shape)
    flat = codes.reshape(batch, n).astype(jnp.uint32)
    planes = (flat[:, :, None] >> jnp.arange(bits, dtype=jnp.uint32)) & jnp.uint32(1)  # [batch, n, bits]
    data = jnp.packbits(planes.astype(jnp.uint8).reshape(batch, n * bits), axis=-1, bitorder="little")
    return PackedBits(data=data, bits=int(bits), shape=shape, dtype=jnp.dtype(codes.dtype).name)


def unpack_bits(p: PackedBits) -> jax.Array:
    """Inverse of :func:`pack_bits`: codes ``[batch, *p.shape]`` in dtype ``p.dtype`` from
    ``p.data: uint8 [batch, ceil(n * bits / 8)]``. Jit/vmap friendly."""
    _check_bits(p.bits)
    batch = p.data.shape[0]
    n = math.prod(p.shape)
    planes = jnp.unpackbits(p.data, axis=-1, count=n * p.bits, bitorder="little")  # [batch, n * bits]
    planes = planes.reshape(batch, n, p.bits).astype(jnp.uint32)
    values = jnp.sum(planes << jnp.arange(p.bits, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    return values.astype(jnp.dtype(p.dtype)).reshape(batch, *p.shape)


# ----------------------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------------------
def wire_bytes(wire: PyTree) -> int:
    """Bytes of a wire: the sum of ``size * itemsize`` over its array leaves (static fields such as those of
    :class:`PackedBits` are free). Works on concrete arrays and on ``jax.ShapeDtypeStruct`` trees (e.g. the
    output of ``jax.eval_shape``); no computation, a plain ``int``."""
    total = 0
    for leaf in jax.tree.leaves(wire):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        else:
            total += np.asarray(leaf).nbytes
    return int(total)


# ----------------------------------------------------------------------------------------------------------
# Built-in codecs
# ----------------------------------------------------------------------------------------------------------
def identity() -> Codec:
    """The message crosses as is: state ``()``, wire = the message (same arrays, no copy), ``decode``
    returns the wire. Bit-exact."""

    def init(example: PyTree, key: jax.Array | None = None) -> tuple[()]:
        del example, key
        return ()

    def encode(state: tuple[()], message: PyTree, key: jax.Array | None = None) -> tuple[tuple[()], PyTree]:
        del key
        return state, message

    def decode(wire: PyTree) -> PyTree:
        return wire

    return Codec(init, encode, decode, "identity")


def _is_floating(a: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.floating)


def cast(dtype: Any = jnp.bfloat16) -> Codec:
    """Floating leaves cross in ``dtype``: state ``()``, wire = the message with every floating leaf cast to
    ``dtype`` (same shapes; non-floating leaves unchanged); ``decode`` casts floating leaves to float32.
    Name: ``"bfloat16"`` for bfloat16, else the dtype name (e.g. ``"float16"``)."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"cast codec needs a floating dtype, got {dtype}")

    def init(example: PyTree, key: jax.Array | None = None) -> tuple[()]:
        del example, key
        return ()

    def encode(state: tuple[()], message: PyTree, key: jax.Array | None = None) -> tuple[tuple[()], PyTree]:
        del key
        return state, jax.tree.map(lambda a: jnp.asarray(a).astype(dtype) if _is_floating(a) else a, message)

    def decode(wire: PyTree) -> PyTree:
        return jax.tree.map(lambda a: jnp.asarray(a).astype(jnp.float32) if _is_floating(a) else a, wire)

    return Codec(init, encode, decode, dtype.name)


def _single_leaf(message: PyTree) -> Any:
    leaves = jax.tree.leaves(message)
    if len(leaves) != 1:
        raise ValueError(f"VQ codec needs a single-array message, got {len(leaves)} leaves")
    x = leaves[0]
    if not hasattr(x, "shape") or len(x.shape) < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"VQ codec needs a floating message [batch, ..., C], got {getattr(x, 'dtype', type(x).__name__)}"
            f"{list(getattr(x, 'shape', ()))}"
        )
    return x


def vq(
    num_codes: int,
    code_dim: int | None = None,
    groups: int | None = None,
    *,
    packed: bool = False,
    decay: float = 0.99,
    eps: float = 1e-5,
    restart_threshold: float = 1e-2,
    init: str = "sample",
    levels: int = 1,
) -> Codec:
    """Grouped online vector quantization of a single floating array message ``x: [batch, ..., C]``.

    Exactly one of ``code_dim`` (``d``) or ``groups`` (``G``) is given, ``G * d = C``; ``K = num_codes >= 2``.
    The state (:data:`VQCodecState`) is the sender's :class:`dgl_jax.vq.VQState`:

    * ``init(example, key=None)`` checks the channel split (and, for ``init="sample"``, that a batch has at
      least ``K`` vectors) and returns a random codebook from ``key`` (``jax.random.key(0)`` when ``None``),
      with ``step = 0``;
    * ``encode(state, x, key=None)``: when ``state.step == 0`` the codebook is first re-seeded from the
      vectors of ``x`` (:func:`dgl_jax.vq.init_from_data` with method ``init``, inside a ``lax.cond``); the
      codes ``[batch, ..., G]`` are the nearest centroids of the current codebook, the wire is
      ``VQWire(codes, codebook)`` (that codebook, before the update), then the state takes one EMA k-means
      step on ``x`` (:func:`dgl_jax.vq.update`), restarting dead codes only when ``key`` is given. ``key`` is
      split into the seeding and restart keys; with ``key=None`` the seeding uses ``jax.random.key(0)``.
    * ``decode(wire)``: the centroids ``float32 [batch, ..., C]`` of the (unpacked) codes.

    ``levels = L > 1`` is residual VQ: level ``l`` is such a quantizer of the residual ``x - (q_0 + ... +
    q_{l-1})`` left by the levels before it (``q_l``: level ``l``'s centroids), with its own codebook and EMA
    state; the state is a tuple of ``L`` :class:`dgl_jax.vq.VQState` (level ``l`` is initialised and keyed
    with ``fold_in(key, l)``); the wire's codes are ``[batch, ..., L * G]`` (level-major) and its codebook
    ``[L * G, K, d]``; ``decode`` returns ``q_0 + ... + q_{L-1}``.

    ``packed=True`` sends the codes as :class:`PackedBits` of ``ceil(log2 K)`` bits each. Name:
    ``"vq:K:d"`` / ``"vq-packed:K:d"`` with ``code_dim``, ``"vq:K:gG"`` / ``"vq-packed:K:gG"`` with ``groups``,
    followed by ``:init=...``, ``:decay=...``, ``:restart=...``, ``:levels=...`` where they differ from
    :data:`VQ_DEFAULTS` (the name is a spec :func:`parse_codec` reads back).
    """
    if (code_dim is None) == (groups is None):
        raise ValueError(f"vq codec: give exactly one of code_dim or groups, got code_dim={code_dim}, groups={groups}")
    if not isinstance(num_codes, (int, np.integer)) or isinstance(num_codes, bool) or num_codes < 2:
        raise ValueError(f"vq codec: num_codes must be an integer >= 2, got {num_codes!r}")
    if num_codes > 65536:
        raise ValueError(f"vq codec: num_codes must be <= 65536, got {num_codes}")
    if init not in ("sample", "kmeans++"):
        raise ValueError(f"vq codec: unknown init method {init!r}; expected one of ('sample', 'kmeans++')")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"vq codec: decay must be in [0, 1), got {decay}")
    if not eps >= 0.0:
        raise ValueError(f"vq codec: eps must be >= 0, got {eps}")
    if not restart_threshold >= 0.0:
        raise ValueError(f"vq codec: restart threshold must be >= 0, got {restart_threshold}")
    if not isinstance(levels, (int, np.integer)) or isinstance(levels, bool) or not 1 <= levels <= MAX_LEVELS:
        raise ValueError(f"vq codec: levels must be an integer in 1..{MAX_LEVELS}, got {levels!r}")
    num_codes, levels = int(num_codes), int(levels)
    bits = vqmath.index_bits(num_codes)
    tag = f"{code_dim}" if code_dim is not None else f"g{groups}"
    options = {"init": init, "decay": float(decay), "restart": float(restart_threshold), "levels": levels}
    suffix = "".join(f":{k}={v:g}" if isinstance(v, float) else f":{k}={v}" for k, v in options.items()
                     if v != VQ_DEFAULTS[k])  # fmt: skip
    name = f"{'vq-packed' if packed else 'vq'}:{num_codes}:{tag}{suffix}"
    method = init

    def init_level(x: Any, key: jax.Array | None) -> VQCodecState:
        g, d = vqmath.resolve_groups(int(x.shape[-1]), code_dim, groups)
        n = math.prod(x.shape[:-1])
        if method == "sample" and n < num_codes:
            raise ValueError(
                f"vq codec {name}: init='sample' seeds {num_codes} codes from the vectors of one message, but a "
                f"message {list(x.shape)} has only {n}"
            )
        key = jax.random.key(0) if key is None else key
        return vqmath.init(num_codes, d, g, key=key)

    def encode_level(
        state: VQCodecState, x: jax.Array, key: jax.Array | None
    ) -> tuple[VQCodecState, jax.Array, jax.Array]:
        """``(new_state, codes, codebook)``: the codes of ``x`` and the (seeded, pre-update) codebook they index."""
        if key is None:
            k_seed, k_restart = jax.random.key(0), None
        else:
            k_seed, k_restart = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
        state = jax.lax.cond(
            state.step == 0, lambda s: vqmath.init_from_data(s, x, method, key=k_seed), lambda s: s, state
        )
        codes = vqmath.encode(state, x)
        new_state = vqmath.update(
            state, x, codes, decay=decay, eps=eps, key=k_restart, restart_threshold=restart_threshold
        )
        return new_state, codes, state.codebook

    def level_key(key: jax.Array | None, level: int) -> jax.Array | None:
        return None if key is None else jax.random.fold_in(key, level)

    def init_fn(example: PyTree, key: jax.Array | None = None) -> VQCodecState | tuple[VQCodecState, ...]:
        x = _single_leaf(example)
        if levels == 1:
            return init_level(x, key)
        key = jax.random.key(0) if key is None else key
        return tuple(init_level(x, level_key(key, level)) for level in range(levels))

    def encode(state: PyTree, message: PyTree, key: jax.Array | None = None) -> tuple[PyTree, VQWire]:
        x = _single_leaf(message)
        if levels == 1:
            new_state, codes, codebook = encode_level(state, x, key)
        else:
            residual, new_levels, all_codes, books = x.astype(jnp.float32), [], [], []
            for level, s in enumerate(state):
                s, codes, book = encode_level(s, residual, level_key(key, level))
                residual = residual - vqmath.decode(book, codes)
                new_levels.append(s)
                all_codes.append(codes)
                books.append(book)
            new_state = tuple(new_levels)
            codes, codebook = jnp.concatenate(all_codes, -1), jnp.concatenate(books, 0)
        wire = VQWire(codes=pack_bits(codes, bits) if packed else codes, codebook=codebook)
        return new_state, wire

    def decode(wire: VQWire) -> jax.Array:
        codes = unpack_bits(wire.codes) if isinstance(wire.codes, PackedBits) else wire.codes
        x = vqmath.decode(wire.codebook, codes)
        if levels == 1:
            return x
        per_level = x.reshape(*x.shape[:-1], levels, x.shape[-1] // levels)
        return functools.reduce(operator.add, [per_level[..., level, :] for level in range(levels)])

    return Codec(init_fn, encode, decode, name)


# ----------------------------------------------------------------------------------------------------------
# Specs and checks
# ----------------------------------------------------------------------------------------------------------
CODEC_SYNTAX: str = (
    "identity (also float32, none) | bfloat16 | vq:K:d | vq-packed:K:d | vq:K:gG | vq-packed:K:gG, then optional "
    ":init=sample|kmeans++ :decay=D :restart=T :levels=L "
    "(K codes >= 2, d = code dim dividing the channels, G = groups; vq-packed sends ceil(log2 K) bits per code; "
    "init: codebook seeding from the first message, decay: EMA decay in [0, 1), restart: dead-code threshold, 0 off, "
    f"levels: residual VQ levels in 1..{MAX_LEVELS}, each sending its own codes)"
)
"""Syntax of the codec specs :func:`parse_codec` accepts."""

_VQ_SPEC = re.compile(r"(vq|vq-packed):(-?\d+):(g?)(\d+)((?::[a-z]+=[^:]*)*)")
VQ_DEFAULTS = {"init": "sample", "decay": 0.99, "restart": 1e-2, "levels": 1}
"""The VQ codec options of a spec and their defaults (a name shows only the options that differ)."""


def parse_codec(spec: str) -> Codec:
    """The codec of ``spec`` (see :data:`CODEC_SYNTAX`): ``"identity"``/``"float32"``/``"none"`` ->
    :func:`identity`, ``"bfloat16"`` -> :func:`cast`, ``"vq:K:d"`` / ``"vq-packed:K:d"`` -> :func:`vq` with
    code dim ``d`` (``"...:gG"``: ``G`` groups). Raises a one-line ``ValueError`` on a bad spec."""
    s = spec.strip().lower() if isinstance(spec, str) else None
    if s in ("identity", "float32", "none"):
        return identity()
    if s == "bfloat16":
        return cast(jnp.bfloat16)
    m = _VQ_SPEC.fullmatch(s) if s is not None else None
    if m is None:
        raise ValueError(f"bad codec spec {spec!r}; expected {CODEC_SYNTAX}")
    kind, k, is_groups, v = m.group(1), int(m.group(2)), m.group(3) == "g", int(m.group(4))
    if k < 2:
        raise ValueError(
            f"bad codec spec {spec!r}: the number of codes K must be >= 2, got {k}; expected {CODEC_SYNTAX}"
        )
    if v < 1:
        what = "number of groups G" if is_groups else "code dim d"
        raise ValueError(f"bad codec spec {spec!r}: the {what} must be >= 1; expected {CODEC_SYNTAX}")
    kw = {"groups": v} if is_groups else {"code_dim": v}
    for item in filter(None, m.group(5).split(":")):
        key, value = item.split("=", 1)
        if key not in VQ_DEFAULTS:
            raise ValueError(f"bad codec spec {spec!r}: unknown option {key!r}; expected {CODEC_SYNTAX}")
        if key == "init":
            kw["init"] = value
            continue
        if key == "levels":
            if not re.fullmatch(r"\d+", value):
                raise ValueError(
                    f"bad codec spec {spec!r}: levels={value!r} is not an integer; expected {CODEC_SYNTAX}"
                )
            kw["levels"] = int(value)
            continue
        try:
            kw["decay" if key == "decay" else "restart_threshold"] = float(value)
        except ValueError:
            raise ValueError(
                f"bad codec spec {spec!r}: {key}={value!r} is not a number; expected {CODEC_SYNTAX}"
            ) from None
    try:
        return vq(k, packed=kind == "vq-packed", **kw)
    except ValueError as e:
        raise ValueError(f"bad codec spec {spec!r}: {e}; expected {CODEC_SYNTAX}") from None


def _describe(tree: PyTree) -> str:
    """One-line ``dtype[shape]`` summary of a tree of arrays or ShapeDtypeStructs."""
    desc = jax.tree.map(lambda a: f"{jnp.dtype(a.dtype).name}{list(a.shape)}", tree)
    text = desc if isinstance(desc, str) else repr(desc).replace("'", "")
    return " ".join(text.split())


def check_decoded(codec: Codec, example_message: PyTree, expected: PyTree, where: str) -> None:
    """Checks, abstractly (``jax.eval_shape`` of ``decode(encode(init(example), example))``, nothing
    computed), that ``codec`` decodes ``example_message`` (arrays or ShapeDtypeStructs) to the tree of shapes
    and dtypes ``expected`` (arrays or ShapeDtypeStructs). Raises a one-line ``ValueError`` starting with
    ``where`` otherwise (or when the codec rejects the message)."""

    def round_trip(message: PyTree) -> PyTree:
        state = codec.init(message)
        _, wire = codec.encode(state, message)
        return codec.decode(wire)

    try:
        got = jax.eval_shape(round_trip, example_message)
    except ValueError as e:
        raise ValueError(f"{where}: codec {codec.name}: {' '.join(str(e).split())}") from None

    def sig(tree: PyTree) -> tuple[Any, list[tuple[tuple[int, ...], str]]]:
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, [(tuple(int(d) for d in a.shape), jnp.dtype(a.dtype).name) for a in leaves]

    if sig(got) != sig(expected):
        raise ValueError(
            f"{where}: codec {codec.name} decodes to {_describe(got)} but the receiver was initialised on "
            f"{_describe(expected)}"
        )
