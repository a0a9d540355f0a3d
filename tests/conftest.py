"""Test set-up: 8 simulated CPU devices, created before JAX initialises its backend."""

import gc
import os

# Test programs are small and compiled once each, so compiling dominates the suite: LLVM's -O0 halves
# it (measured: 203 s -> 101 s on the vision and step tests) and changes no HLO, only how exp and log
# round (tests/test_kernels.py's tolerances say by how much). The one test that
# trains long enough for execution speed to matter runs in a child process with XLA's defaults.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Never let a test reach a TFDS download server: a download hangs rather than fails.
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "workdir", "tfds"))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


import pytest  # noqa: E402

from kdjax.data import shakespeare  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after each test module. XLA:CPU maps a few memory regions per
  executable and jit caches keep them all alive: without this the process's mappings grew by about
  2,000 a minute toward the kernel's limit of 65,530 (vm.max_map_count) and the suite aborted
  (SIGABRT) halfway; with it they stay under about 10,000 and the suite completes. (JAX's persistent
  compilation cache is not used: with it the suite aborted even with few mappings.)"""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def child_env():
  """`child_env(**variables)`: the environment for a test's child process: one CPU device (what a
  user's run sees), the tests' fast compilation unless `XLA_FLAGS` is given, and `variables`."""
  return lambda **variables: dict(os.environ, **{"XLA_FLAGS": FAST_COMPILE_FLAGS, "JAX_PLATFORMS": "cpu", **variables})


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data dir with the local Shakespeare corpus built once for the whole session (offline)."""
  path = str(tmp_path_factory.mktemp("tfds"))
  shakespeare.prepare(path)
  return path
