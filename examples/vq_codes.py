# Online vector quantization of a stage's output (the README's example, run by the tests).
import jax
from dgl_jax import vq

x = jax.random.normal(jax.random.key(0), (32, 8, 8, 64))  # a stage's output [batch, H, W, C]
q = vq.init(jax.random.key(1), num_codes=256, code_dim=16, groups=4)  # 4 codebooks of 256 x 16
q = vq.init_from_data(q, jax.random.key(2), x)  # centroids seeded from the features
codes = vq.encode(q, x)  # [32, 8, 8, 4] uint8: one code per 16 channels per pixel
x_hat = vq.decode(q, codes)  # [32, 8, 8, 64]: the nearest centroids
q = vq.update(q, x, codes)  # one online k-means (EMA) step; all of this runs inside jit
print(codes.dtype, codes.shape, vq.compression_ratio(code_dim=16, num_codes=256))  # uint8 (32, 8, 8, 4) 64.0
