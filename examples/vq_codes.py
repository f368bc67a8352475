# A boundary codec: online vector quantization of a stage's output, bit-packed (the README's example).
import jax
from dgl_jax.codecs import vq, wire_bytes

x = jax.random.normal(jax.random.key(0), (32, 8, 8, 64))  # a stage's output [batch, H, W, C]
codec = vq(16, code_dim=4, packed=True)  # 16 groups of 4 channels, 16 codes each: 4 bits per code
state = codec.init(x, jax.random.key(1))  # seeded from the first message it encodes
state, wire = jax.jit(codec.encode)(state, x, jax.random.key(2))  # sender: packed codes + codebook, EMA update
x_hat = jax.jit(codec.decode)(wire)  # receiver: [32, 8, 8, 64] nearest centroids, from the wire alone
print(wire.codes.data.dtype, wire.codes.data.shape, wire.codebook.shape)  # uint8 (32, 512) (16, 16, 4)
print(f"float32 {x.nbytes} bytes, wire {wire_bytes(wire)} bytes: {x.nbytes / wire_bytes(wire):.1f}x less")
