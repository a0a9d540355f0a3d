"""Test set-up: 8 simulated CPU devices, created before JAX initialises its backend."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Never let a test reach a TFDS download server: a download hangs rather than fails.
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "workdir", "tfds"))

# One XLA compilation cache for the session (empty at its start): many tests build the same step
# or model programs through separate jit objects, and a program compiled once is then loaded
# instead of compiled again. Executables are keyed by everything that affects compilation, so a
# hit runs the same code; CI starts each run with an empty cache, as here.
_CACHE = tempfile.mkdtemp(prefix="kdjax_test_xla_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


import pytest  # noqa: E402

from kdjax.data import shakespeare  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data dir with the local Shakespeare corpus built once for the whole session (offline)."""
  path = str(tmp_path_factory.mktemp("tfds"))
  shakespeare.prepare(path)
  return path
