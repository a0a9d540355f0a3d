"""Opens a TFDS catalogue dataset for random access, refusing fast anything that would download.

A TFDS download without network hangs rather than fails, so every catalogue read in kdjax goes
through `open_source`: it only looks at the installed catalogue and at `data_dir`, and without
`allow_download` a dataset that is not prepared there is a `FileNotFoundError` that says how to
prepare it.
"""

from __future__ import annotations

import importlib.util

import tensorflow_datasets as tfds

# Formats that `tfds.data_source` can index; TFRECORD (the TFDS default with TensorFlow) cannot.
RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


def open_source(name: str, split: str, *, data_dir: str, allow_download: bool, offline_alternative: str):
  """Returns `tfds.data_source(name, split)` once it is safe to open.

  Args:
    name: A TFDS catalogue name (`mnist`, `cifar100`, `tiny_shakespeare`, ...).
    split: A TFDS split, slicing allowed (`train[:10%]`).
    data_dir: The TFDS data directory to look in.
    allow_download: Let TFDS download and prepare a dataset that is missing from `data_dir`.
    offline_alternative: What the caller can use instead without network (named in errors).

  Returns:
    A random-access data source of decoded records.

  Raises:
    ValueError: if the dataset is prepared in a format without random access.
    FileNotFoundError: if it is not prepared and `allow_download` is False.
    ImportError: if `allow_download` is set but TensorFlow, which TFDS's catalogue builders need
      to prepare (read the downloads, encode images), is not installed.
  """
  # Constructing the builder only reads the installed catalogue and `data_dir`: no network.
  builder = tfds.builder(name, data_dir=data_dir)
  prepare = f"tfds build {name} --file_format=array_record --data_dir={data_dir}"
  if builder.is_prepared():
    file_format = builder.info.file_format.value
    if file_format not in RANDOM_ACCESS_FORMATS:
      raise ValueError(
          f"{name} in {builder.data_path} is stored as {file_format}, which tfds.data_source cannot index. "
          f"Re-prepare it into another data_dir with: tfds build {name} --file_format=array_record --data_dir=<dir>."
      )
  elif not allow_download:
    raise FileNotFoundError(
        f"{name} is not prepared in {data_dir} (looked for {builder.data_path}). Either prepare it once on a "
        f"machine with internet and TensorFlow ({prepare}; datasets with manual downloads such as imagenet2012 "
        f"also need --manual_dir), pass allow_download=True, or use {offline_alternative}."
    )
  elif importlib.util.find_spec("tensorflow") is None:
    # The catalogue builders read their downloads with tf.io.gfile and encode images with tf.image;
    # without TensorFlow they would fail only after the download, so fail before it.
    raise ImportError(
        f"preparing {name} needs TensorFlow (its TFDS builder reads and encodes with it). Install tensorflow, "
        f"prepare it elsewhere ({prepare}) and copy {builder.data_path}, or use {offline_alternative}."
    )
  return tfds.data_source(name, split=split, data_dir=data_dir, download=allow_download)
