"""TensorBoard event files of a run: scalars per logging window, the hyperparameters once.

Written with tensorboardX (pure Python, no TensorFlow). Only process 0 writes: on the other
hosts `create_writer` returns a writer that does nothing, so a multi-host run keeps one set of
curves (its metrics are already global (sum, count) means).

A resumed run opens its writer with `purge_step` = the first step it will log (one past the step
it resumed from): TensorBoard then hides the events an earlier, killed invocation wrote at or
after that step (the resumed run redoes those steps and writes them again), so every curve has
one point per step.

Look at a run with `tensorboard --logdir=WORKDIR` (each run writes `WORKDIR/<run>/tensorboard`).
`read_scalars` reads the files back without TensorBoard (tests, notebooks).
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import os
import struct
from typing import Any, Mapping, Optional

import jax

EVENT_GLOB = "events.out.tfevents.*"
CONFIG_TAG = "hparams"
# Event file names carry the second they were opened in, and the file is opened with 'wb': two
# writers into one logdir within a second (a quick resume) need another distinction.
_WRITERS = itertools.count()


class NullWriter:
  """The writer of processes other than 0, and of runs that log nothing."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    del step, scalars

  def write_hparams(self, hparams: Mapping[str, Any], step: int = 0) -> None:
    del hparams, step

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class TensorBoardWriter:
  """Scalars and hyperparameters into `logdir`'s event files (tensorboardX)."""

  def __init__(self, logdir: str, *, purge_step: Optional[int] = None):
    from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

    self.logdir = os.path.abspath(logdir)
    # flush_secs: a run killed with -9 loses at most this much of its curves.
    self._writer = SummaryWriter(self.logdir, purge_step=purge_step or None, flush_secs=10,
                                 filename_suffix=f".{os.getpid()}.{next(_WRITERS)}")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes the finite values of `scalars` at `step` (a NaN rate of a one-step window is skipped)."""
    for tag, value in scalars.items():
      value = float(value)
      if math.isfinite(value):
        self._writer.add_scalar(tag, value, int(step))

  def write_hparams(self, hparams: Mapping[str, Any], step: int = 0) -> None:
    """The run's hyperparameters, nested mappings flattened to dotted keys: as the HParams
    plugin's session (numbers, strings, booleans; anything else as its string) and as one JSON
    text summary (the Text tab shows it whole)."""
    from tensorboardX import summary

    flat = flatten(hparams)
    values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str) for k, v in flat.items()}
    file_writer = self._writer.file_writer
    for proto in summary.hparams(values, {}):
      file_writer.add_summary(proto, int(step))
    text = json.dumps(flat, indent=1, sort_keys=True, default=str)
    # Markdown: four leading spaces make a code block, so the JSON keeps its layout.
    self._writer.add_text(CONFIG_TAG, "\n".join("    " + line for line in text.splitlines()), int(step))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def create_writer(logdir: Optional[str], *, purge_step: Optional[int] = None):
  """A `TensorBoardWriter` on process 0 when `logdir` is set, else a `NullWriter`."""
  if not logdir or jax.process_index() != 0:
    return NullWriter()
  return TensorBoardWriter(logdir, purge_step=purge_step)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'train': {'steps': 3}} -> {'train.steps': 3} (ConfigDicts too); lists, None and other
  leaves are kept as they are."""
  out = {}
  for key, value in (tree.to_dict() if hasattr(tree, "to_dict") else tree).items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _records(path: str):
  """The payloads of a TFRecord file, each checked against its masked CRC-32C; a torn last
  record (a killed writer) ends the file."""
  from tensorboardX.record_writer import masked_crc32c

  with open(path, "rb") as f:
    data = f.read()
  offset = 0
  while offset + 12 <= len(data):
    header = data[offset:offset + 8]
    (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[offset + 8:offset + 12])
    end = offset + 12 + length + 4
    if header_crc != masked_crc32c(header) or end > len(data):
      return
    payload = data[offset + 12:offset + 12 + length]
    if struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(payload):
      raise ValueError(f"{path}: a record at byte {offset} fails its CRC")
    yield payload
    offset = end


def read_events(logdir: str) -> list:
  """Every event of `logdir`'s event files (oldest file first), as TensorBoard would keep
  them: a session restart at step s (a resumed run's `purge_step`) drops the earlier events
  at steps >= s."""
  from tensorboardX.proto.event_pb2 import Event, SessionLog

  files = [[Event.FromString(payload) for payload in _records(path)]
           for path in glob.glob(os.path.join(logdir, EVENT_GLOB))]
  # A file's first event (its version record) carries the time the writer opened it.
  files.sort(key=lambda file: file[0].wall_time if file else 0.0)
  events = []
  for event in itertools.chain.from_iterable(files):
    if event.HasField("session_log") and event.session_log.status == SessionLog.START:
      events = [e for e in events if e.step < event.step]
    events.append(event)
  return events


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of the scalar summaries in `logdir`, in the order written."""
  out: dict[str, list[tuple[int, float]]] = {}
  for event in read_events(logdir):
    for value in event.summary.value:
      if value.WhichOneof("value") == "simple_value":
        out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
  return out


def read_texts(logdir: str) -> dict[str, list[str]]:
  """{tag: [text, ...]} of the text summaries in `logdir` (the hyperparameters' JSON)."""
  out: dict[str, list[str]] = {}
  for event in read_events(logdir):
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name == "text":
        out.setdefault(value.tag, []).extend(s.decode() for s in value.tensor.string_val)
  return out
