"""``python -m dgl_jax train|eval ...``: see :mod:`dgl_jax.cli`."""

import sys

from dgl_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
