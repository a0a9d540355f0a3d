"""Image classification batches from uint8 arrays: a resumable grain training stream, eval batches, mixup.

Training batches come from a grain `MapDataset` over example indices (shuffled within this process's
shard, a new permutation every epoch, repeated forever by default), so its iterator checkpoints as one
integer and `kdjax.train.loop` resumes it exactly. Every random choice of an augmentation is
`stateless_random.hash64(seed, stream, epoch, index)`, a function of the example and the epoch only: a
resumed run crops and flips exactly as an unbroken one would, with no generator state to save.

Every batch is `{'images': float32 [B, H, W, C], 'labels': int32 [B], 'index': int32 [B]}`, images
normalised per channel as `(x / 255 - mean) / std`; `index` is the example's row in the arrays given
(the training split), which CRD's memory bank keys on. `eval_batches` adds `mask: float32 [B]`.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.data import stateless_random

Batch = dict[str, np.ndarray]

# Streams of `hash64(seed, stream, epoch, index)`, one per random choice.
_CROP_Y, _CROP_X, _FLIP = 1, 2, 3


def _check_arrays(images: np.ndarray, labels: np.ndarray, batch_size: int, mean: Sequence[float],
                  std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [N, H, W, C]; got {images.dtype} of shape {images.shape}")
  if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers of shape {images.shape[:1]} (one per image); "
                     f"got {labels.dtype} of shape {labels.shape}")
  if len(mean) != images.shape[-1] or len(std) != images.shape[-1] or min(std) <= 0:
    raise ValueError(f"mean and std need one value per channel ({images.shape[-1]}), std > 0; got {mean}, {std}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}")
  return images, labels


def _check_shard(shard_index: int, shard_count: int) -> None:
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must lie in [0, {shard_count}); got {shard_index}")


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """`(x / 255 - mean) / std` per channel, as float32."""
  scale = 1.0 / (255.0 * np.asarray(std, np.float32))
  return images.astype(np.float32) * scale - np.asarray(mean, np.float32) / np.asarray(std, np.float32)


def crop_and_flip(images: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray, *, padding: int) -> np.ndarray:
  """Random-crop-with-padding and horizontal flip in one gather.

  `out[n, r, c] = P[n, dy_n + r, dx_n + c']` with `c' = W - 1 - c` where `flip_n`, else `c`, and `P` the images
  zero-padded by `padding` on each side of H and W (zeros are black pixels, as in torchvision's
  `RandomCrop(32, padding=4)`, applied before normalisation). `dy = dx = padding` is the centred crop.

  Args:
    images: uint8 `[B, H, W, C]`.
    dy, dx: Integer crop offsets `[B]` in `[0, 2 * padding]`.
    flip: Booleans `[B]`.
    padding: Zero padding per side (0: no crop, only flips).

  Returns:
    The augmented images, uint8 `[B, H, W, C]`.
  """
  batch, height, width, _ = images.shape
  dy, dx, flip = np.asarray(dy), np.asarray(dx), np.asarray(flip, bool)
  if padding < 0 or dy.shape != (batch,) or dx.shape != (batch,) or flip.shape != (batch,):
    raise ValueError(f"need padding >= 0 and dy, dx, flip of shape ({batch},); got {padding}, {dy.shape}, "
                     f"{dx.shape}, {flip.shape}")
  if batch and (min(dy.min(), dx.min()) < 0 or max(dy.max(), dx.max()) > 2 * padding):
    raise ValueError(f"crop offsets must lie in [0, {2 * padding}]")
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0))) if padding else images
  rows = dy[:, None] + np.arange(height)
  cols = dx[:, None] + np.where(flip[:, None], np.arange(width)[::-1], np.arange(width))
  return padded[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _with_position(position: int, index: int) -> tuple[int, int]:
  return position, index


def train_batch(stream: tuple[np.ndarray, np.ndarray], *, images: np.ndarray, labels: np.ndarray,
                per_epoch: int, seed: int, mean: Sequence[float], std: Sequence[float], crop_padding: int,
                flip: bool) -> Batch:
  """Builds a training batch from `(stream positions, example indices)` (module level so it pickles).

  Position `p` of the stream lies in epoch `p // per_epoch`; the crop offsets and the flip of example
  `i` in epoch `e` are `randint(2 * crop_padding + 1, seed, stream, e, i)` and `uniform(...) < 1/2`.
  """
  positions, indices = (np.asarray(a, np.int64) for a in stream)
  epoch = positions // per_epoch
  batch_images = images[indices]
  if crop_padding or flip:
    span = 2 * crop_padding + 1
    dy = stateless_random.randint(span, seed, _CROP_Y, epoch, indices)
    dx = stateless_random.randint(span, seed, _CROP_X, epoch, indices)
    flips = stateless_random.uniform(seed, _FLIP, epoch, indices) < 0.5 if flip else np.zeros(len(indices), bool)
    batch_images = crop_and_flip(batch_images, dy, dx, flips, padding=crop_padding)
  return {
      "images": normalize(batch_images, mean, std),
      "labels": labels[indices].astype(np.int32),
      "index": indices.astype(np.int32),
  }


def make_image_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int = 0,
    flip: bool = False,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
  """Returns a grain dataset of augmented, normalised training batches.

  Shard `k` of `n` gets examples `k, k + n, k + 2n, ...`, truncated so that every shard holds the
  same number (hosts then run the same number of steps); `index` stays the row in `images`. With
  `shuffle`, each epoch is a fresh permutation of the shard (grain folds the epoch into the seed).
  Batches are formed after repeating, so an epoch boundary may fall inside a batch and with
  `drop_remainder` only the very last partial batch of a finite stream is dropped.

  Iterate with `iter(ds)`; the iterator's `get_state()` / `set_state()` checkpoint and resume it.

  Args:
    images: uint8 `[N, H, W, C]`, e.g. from `image_sources.load_image_split`.
    labels: Integer labels `[N]`.
    batch_size: Examples per batch on this process.
    seed: Shuffle and augmentation seed, in [0, 2**32); the same on every process.
    mean, std: Per-channel constants in `x / 255` units (`image_sources.dataset_info`).
    crop_padding: Random crop after zero padding by this many pixels per side (4 for CIFAR); 0: none.
    flip: Random horizontal flips (natural images; never for digits, whose mirror is another glyph).
    shuffle: Shuffle (train) or keep index order.
    num_epochs: Passes over the shard; None repeats forever.
    drop_remainder: Drop a final batch smaller than `batch_size`.
    shard_index: This process's shard, e.g. `jax.process_index()`.
    shard_count: Number of shards, e.g. `jax.process_count()`.

  Returns:
    A `grain.MapDataset` of batches `{'images', 'labels', 'index'}`.

  Raises:
    ValueError: on bad arguments, or a shard that would hold no example.
  """
  images, labels = _check_arrays(images, labels, batch_size, mean, std)
  _check_shard(shard_index, shard_count)
  if crop_padding < 0:
    raise ValueError(f"crop_padding must be >= 0; got {crop_padding}")
  if not 0 <= seed < 2 ** 32:
    raise ValueError(f"seed must lie in [0, 2**32); got {seed}")
  per_shard = len(images) // shard_count
  if per_shard == 0:
    raise ValueError(f"{len(images)} examples leave none for each of {shard_count} shards")
  ds = grain.MapDataset.range(shard_index, per_shard * shard_count, shard_count)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # The position in the repeated stream tells the epoch, which keys the augmentation.
  ds = ds.repeat(num_epochs).map_with_index(_with_position)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.map(functools.partial(train_batch, images=images, labels=labels, per_epoch=per_shard, seed=seed,
                                  mean=tuple(mean), std=tuple(std), crop_padding=crop_padding, flip=flip))


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    max_batches: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Iterator[Batch]:
  """Yields unaugmented batches in index order that cover every example exactly once.

  Global step `s` covers examples `[s*B*n, (s+1)*B*n)`; shard `k` of `n` yields rows `[k*B, (k+1)*B)` of it,
  so every shard yields the same number of batches. Rows past the end repeat the last example (real
  pixels, so no model sees garbage) with `mask = 0`: `sum(metric * mask) / sum(mask)` is the exact mean.

  Args:
    images, labels: The split, as for `make_image_dataset`.
    batch_size: Examples per batch on this process.
    mean, std: Per-channel normalisation constants.
    max_batches: Stop after this many batches; None for all.
    shard_index, shard_count: This process's shard and the number of shards.

  Yields:
    `{'images': float32 [B, H, W, C], 'labels': int32 [B], 'index': int32 [B], 'mask': float32 [B]}`.
  """
  images, labels = _check_arrays(images, labels, batch_size, mean, std)
  _check_shard(shard_index, shard_count)
  n = len(images)
  per_step = batch_size * shard_count
  steps = -(-n // per_step)
  if max_batches is not None:
    steps = min(steps, max_batches)
  for step in range(steps):
    rows = step * per_step + shard_index * batch_size + np.arange(batch_size)
    real = rows < n
    indices = np.minimum(rows, n - 1)
    yield {
        "images": normalize(images[indices], mean, std),
        "labels": labels[indices].astype(np.int32),
        "index": indices.astype(np.int32),
        "mask": real.astype(np.float32),
    }


def mixup(batch: Batch, alpha: float, rng: jax.Array) -> dict[str, jax.Array]:
  """Mixes each image with its neighbour in the batch: `x' = lam * x + (1 - lam) * roll(x, 1)`.

  mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018) with one
  `lam ~ Beta(alpha, alpha)` per batch, as in the reference implementation; the partner of row `i` is row
  `i - 1` (cyclically), as in big_vision, which on a shuffled batch is a random pairing without a
  permutation to draw. For function matching (Beyer et al., "Knowledge distillation: A good teacher is
  patient and consistent", CVPR 2022) call it once, before both models, so teacher and student see the same
  mixed view. The cross-entropy against the labels is `mix * CE(labels) + (1 - mix) * CE(labels_b)`,
  i.e. CE against `mixup_targets`. Pure JAX: jit-able; for an exact resume derive `rng` from the step,
  e.g. `jax.random.fold_in(key, step)`.

  Args:
    batch: A batch with `images` `[B, H, W, C]` and `labels` `[B]`; other fields pass through.
    alpha: The Beta concentration, > 0 (small alpha: lam near 0 or 1, mild mixing).
    rng: A JAX PRNG key.

  Returns:
    The batch with mixed `images`, the partner labels `labels_b` and the weight `mix` `[B]` (float32) of
    `labels`.

  Raises:
    ValueError: for `alpha <= 0` or a batch without images and labels of matching batch size.
  """
  if not alpha > 0:
    raise ValueError(f"mixup needs alpha > 0; got {alpha}")
  if "images" not in batch or "labels" not in batch:
    raise ValueError(f"mixup needs a batch with 'images' and 'labels'; got keys {sorted(batch)}")
  images, labels = jnp.asarray(batch["images"]), jnp.asarray(batch["labels"])
  if images.ndim < 1 or labels.shape != images.shape[:1]:
    raise ValueError(f"images {images.shape} and labels {labels.shape} need the same batch size")
  lam = jax.random.beta(rng, alpha, alpha, dtype=jnp.float32)
  mixed = lam * images.astype(jnp.float32) + (1.0 - lam) * jnp.roll(images, 1, axis=0).astype(jnp.float32)
  return {**batch, "images": mixed.astype(images.dtype), "labels": labels, "labels_b": jnp.roll(labels, 1),
          "mix": jnp.full(labels.shape, lam, jnp.float32)}


def mixup_targets(batch: Batch, num_classes: int) -> jax.Array:
  """Soft targets `mix * onehot(labels) + (1 - mix) * onehot(labels_b)` `[B, num_classes]`, float32.

  A batch that was not mixed (no `mix`) gives `onehot(labels)`.
  """
  first = jax.nn.one_hot(batch["labels"], num_classes, dtype=jnp.float32)
  if "mix" not in batch:
    return first
  mix = jnp.asarray(batch["mix"], jnp.float32)[:, None]
  return mix * first + (1.0 - mix) * jax.nn.one_hot(batch["labels_b"], num_classes, dtype=jnp.float32)
