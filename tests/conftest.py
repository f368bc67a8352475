"""Test configuration: CPU only, 4 fake devices (set before JAX starts its backend), and XLA:CPU's backend
(LLVM) optimisation off unless ``XLA_FLAGS`` names a level: the tests' arrays are tiny, so their time goes to
compiling, not running. Subprocesses started by the tests inherit that flag (:func:`_processes.xla_flags`)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.devices()  # the backend starts here with 4 fake devices; subprocesses (the CLI tests) start with the machine's
os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=4", "").strip()

from dgl_jax.data import Dataset, load_digits  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    return load_digits()


@pytest.fixture(scope="session")
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def small(digits):
    """600 digits for training, the 359 test digits for evaluation (fast epochs)."""
    return Dataset("digits", digits.train_images[:600], digits.train_labels[:600], digits.test_images,
                   digits.test_labels, 10)  # fmt: skip


def run_until(trainer, state, stop_after_chunks=None):
    """``state`` trained by ``trainer.fit`` to the end, or stopped after ``stop_after_chunks`` events."""
    for i, ev in enumerate(trainer.fit(state)):
        state = ev.state
        if stop_after_chunks is not None and i + 1 == stop_after_chunks:
            break
    return state


def _share_compiled_programs() -> None:
    """One persistent XLA compilation cache for the whole session (a fresh temporary folder, shared by the
    pytest-xdist workers): tests that build the same program (same model, shapes and recipe) compile it once.
    The command line's default cache (``DGL_JAX_CACHE_DIR``) points there too, so no test writes to
    ``~/.cache``."""
    import atexit
    import shutil
    import tempfile

    from dgl_jax.cli import setup_compilation_cache

    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("DGL_JAX_TEST_CACHE_DIR"):
        path = os.environ["DGL_JAX_TEST_CACHE_DIR"]  # a pytest-xdist worker: the controller's folder, which it removes
    else:
        path = tempfile.mkdtemp(prefix="dgl_jax_test_cache_")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        os.environ["DGL_JAX_TEST_CACHE_DIR"] = path  # inherited by the pytest-xdist workers, started after this
    os.environ["DGL_JAX_CACHE_DIR"] = path
    setup_compilation_cache(path)


_share_compiled_programs()
