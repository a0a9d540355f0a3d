"""Multi-process training: two jax.distributed processes started by `launch.run --target=processes`
against one process on the same global batches; per-process batch placement."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from kdjax.train import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--module=launch.smoke", "--config=launch/smoke_config.py"]


def _launch(*args, log):
  return subprocess.Popen([sys.executable, "-m", "launch.run", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          text=True)


def test_two_processes_agree_with_each_other_and_with_one_process(tmp_path):
  multi_dir, single_dir = tmp_path / "two", tmp_path / "one"
  logs = {name: open(tmp_path / f"{name}.out", "w+") for name in ("two", "one")}
  # Two processes of 4 simulated devices, each loading half of every global batch; and one process
  # of 8 devices loading both halves (data_shards=2): the same 8-device mesh and global batches.
  runs = {"two": _launch(*SMOKE, f"--workdir={multi_dir}", "--target=processes", "--num_processes=2",
                         "--cpu_devices=4", log=logs["two"]),
          "one": _launch(*SMOKE[:1], "--config=launch/smoke_config.py:data_shards=2", f"--workdir={single_dir}",
                         "--target=local", "--cpu_devices=8", log=logs["one"])}
  out = {}
  for name, proc in runs.items():
    try:
      code = proc.wait(timeout=240)
    finally:
      if proc.poll() is None:
        proc.kill()
    logs[name].seek(0)
    out[name] = logs[name].read()
    assert code == 0, out[name]
  worker_log = (multi_dir / "process_1.log").read_text()
  assert "8 devices over 2 processes" in out["two"] and "8 devices over 2 processes" in worker_log
  assert "8 devices over 1 processes" in out["one"]

  two = [dict(np.load(multi_dir / f"smoke_process{k}.npz")) for k in (0, 1)]
  one = dict(np.load(single_dir / "smoke_process0.npz"))
  # Each process loaded its own half (process k: shard k of 2); the single process all of it.
  assert [list(r.pop("shard")) for r in two] == [[0, 2], [1, 2]] and list(one.pop("shard")) == [0, 1]
  assert set(two[0]) == set(two[1]) == set(one) and any(k.startswith("param/") for k in one)
  for key in one:
    np.testing.assert_array_equal(two[0][key], two[1][key], err_msg=key)  # one replicated computation
    # Cross-process all-reduces may sum in another order than one process's.
    np.testing.assert_allclose(two[0][key], one[key], rtol=2e-5, atol=1e-6, err_msg=key)
  assert len(one["loss"]) == 4 and one["loss"][-1] < one["loss"][0] - 0.1  # it trained


@pytest.mark.parametrize("axes", [{"data": -1}, {"data": 2, "model": 4}, {"model": 8}, {"data": 4, "fsdp": 2}])
def test_one_process_loads_the_whole_batch(axes):
  mesh = sharding.make_mesh(axes)
  assert sharding.process_batch_shard(mesh) == (0, 1)
  rows = int(np.prod([mesh.shape[a] for a in sharding.data_axes(mesh)]))
  assert sharding.process_batch_size(4 * rows, mesh) == 4 * rows
  batch = {"inputs": np.arange(4 * rows * 3, dtype=np.int32).reshape(4 * rows, 3),
           "mask": np.ones((4 * rows, 3), np.float32)}
  placed = sharding.shard_batch(batch, mesh)
  for key, value in batch.items():
    assert placed[key].sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(placed[key]), value)
  # A device array goes through too (batch hooks hand over samples they made on the devices).
  np.testing.assert_array_equal(np.asarray(sharding.shard_rows(jax.numpy.asarray(batch["inputs"]), mesh)),
                                batch["inputs"])


def test_process_batch_size_checks_divisibility():
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    sharding.process_batch_size(12, sharding.make_mesh({"data": -1}))
