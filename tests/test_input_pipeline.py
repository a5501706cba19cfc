"""Grain input pipeline on real ArrayRecord shards of a tiny shapes dataset."""

import collections
import io
import itertools

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from aplantida_jax.data import shards
from aplantida_jax.models import preprocess
from aplantida_jax.train import augment
from aplantida_jax.train import input_pipeline
from configs import training
from tests.tiny_dataset import write_tiny_dataset

SIZE = 32
BATCH = 8


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("dataset"))
  write_tiny_dataset(path, num_classes=3, per_class={"train": 16, "val": 6})
  return path


def _config(seed=0, **inputs):
  c = training.training_config(output_dir="x", model_name="mobilenet_v2", image_size=SIZE)
  c.seed = seed
  c.input.worker_count = 0
  c.input.read_threads = 2
  c.input.update(inputs)
  return c


def _batches(dataset_dir, config, n, join_fn=None):
  loader = input_pipeline.train_loader(config, dataset_dir, BATCH, num_samples=400, join_fn=join_fn)
  return list(itertools.islice(iter(loader), n))


def test_train_batches_are_augmented_uint8_crops_with_labels(dataset_dir):
  batch = _batches(dataset_dir, _config(), 1)[0]
  assert batch["image"].shape == (BATCH, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1, 2}
  assert len(set(batch["index"])) == BATCH  # a shuffled epoch has no repeats
  normalized = np.asarray(preprocess.normalize(batch["image"]))
  assert normalized.dtype == np.float32
  assert -2.2 < normalized.min() < 0 < normalized.max() < 2.7
  centre = next(input_pipeline.eval_batches(_config().input, dataset_dir, "train", 48))
  crops = [centre["image"][i] for i in batch["index"]]
  assert any(not np.array_equal(a, b) for a, b in zip(batch["image"], crops))


def test_same_seed_same_batches_other_seed_other_batches(dataset_dir):
  first, again = (_batches(dataset_dir, _config(seed=1), 3) for _ in range(2))
  other = _batches(dataset_dir, _config(seed=2), 3)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["index"], b["index"])
  assert any(not np.array_equal(a["index"], c["index"]) for a, c in zip(first, other))


def test_two_worker_processes_resume_exactly_and_augment_like_one(dataset_dir):
  config = _config(worker_count=2)
  straight = _batches(dataset_dir, config, 12)  # two epochs of 48 records
  iterator = iter(input_pipeline.train_loader(config, dataset_dir, BATCH, num_samples=400))
  head = [next(iterator) for _ in range(4)]
  state = iterator.get_state()
  resumed = iter(input_pipeline.train_loader(config, dataset_dir, BATCH, num_samples=400))
  resumed.set_state(state)
  for want, got in zip(straight, head + [next(resumed) for _ in range(8)]):  # across the epoch
    for key in ("image", "index", "epoch", "position"):
      np.testing.assert_array_equal(want[key], got[key])

  # Workers batch their own records, so batches group differently than in
  # one process, but each record's crop depends only on the seed, its epoch
  # and its position: two epochs hold the same pixels either way.
  def by_crop(batches):
    return {
      (int(e), int(i)): image.tobytes()
      for b in batches
      for e, i, image in zip(b["epoch"], b["index"], b["image"])
    }

  inline = by_crop(_batches(dataset_dir, _config(), 12))
  assert len(inline) == 96 and by_crop(straight) == inline


def _jpegs(dataset_dir, split="train"):
  source = input_pipeline.RecordSource(shards.shard_paths(dataset_dir, split))
  return [shards.decode(source[i]["data"])["jpeg"] for i in range(len(source))]


def test_crops_are_a_pure_function_of_seed_epoch_and_position(dataset_dir):
  """The loader's pixels are Augment(seed).crop(record, epoch, position): what a replay redraws."""
  config = _config(seed=3)
  batches = _batches(dataset_dir, config, 12)
  epoch, index, position = (
    np.concatenate([b[k] for b in batches]) for k in ("epoch", "index", "position")
  )
  np.testing.assert_array_equal(epoch, np.repeat([0, 1], 48))  # keys ≥ len(source) survive Grain
  np.testing.assert_array_equal(position, index)  # no view: position = record
  assert sorted(index[:48]) == sorted(index[48:]) == list(range(48))
  assert list(index[:48]) != list(index[48:])  # reshuffled each epoch
  crop = augment.Augment.of(config.input, config.seed).crop
  jpegs = _jpegs(dataset_dir)
  images = np.concatenate([b["image"] for b in batches])
  np.testing.assert_array_equal(np.concatenate([b["crop_epoch"] for b in batches]), epoch)
  for e, i, image in zip(epoch, index, images):
    np.testing.assert_array_equal(image, crop(jpegs[i], e, i, SIZE))
  crops = {(e, i): image for e, i, image in zip(epoch, index, images)}
  assert sum(not np.array_equal(crops[0, i], crops[1, i]) for i in range(48)) > 40


def test_epoch_index_sampler_keys_carry_this_shards_epoch():
  sampler = input_pipeline.EpochIndexSampler(
    num_records=10, shard_options=grain.sharding.ShardOptions(1, 2), shuffle=True, seed=5
  )
  assert repr(sampler).startswith("EpochIndexSampler(num_records=10, ")
  keys = [sampler[1 + 2 * n].record_key for n in range(15)]  # shard 1's first 3 epochs
  epochs, records = np.divmod(keys, 10)
  np.testing.assert_array_equal(epochs, np.repeat([0, 1, 2], 5))
  for e in range(3):
    assert sorted(records[5 * e : 5 * e + 5]) == [5, 6, 7, 8, 9]  # shard 1 holds records 5..9
  assert sampler[1].rng is None  # randomness comes from (seed, epoch, position) alone


def test_crop_box_is_the_same_view_at_every_output_size():
  """The box is in source pixels: shrunk, kept or enlarged, it shows the same part of the photo."""
  width, height = 256, 192
  x, y = np.meshgrid(np.arange(width), np.arange(height))
  ramp = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), np.full_like(x, 128.0)], -1)
  pixels = np.rint(ramp).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG", quality=95)
  np.testing.assert_allclose(augment.decode_rgb(out.getvalue()), pixels, atol=4)  # RGB order
  box = (40, 30, 120, 96)
  for size in (24, 96, 200):
    crop = augment.resize_box(pixels, box, size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    centres = (np.arange(size) + 0.5) / size  # output pixel centres, as a fraction of the box
    want_r = (box[0] + centres * box[2] - 0.5) * 255 / (width - 1)
    want_g = (box[1] + centres * box[3] - 0.5) * 255 / (height - 1)
    inner = slice(1, size - 1)  # the filter's support is clipped at the box edges
    np.testing.assert_allclose(
      crop[inner, inner, 0], np.broadcast_to(want_r, (size, size))[inner, inner], atol=1.5
    )
    np.testing.assert_allclose(
      crop[inner, inner, 1], np.broadcast_to(want_g[:, None], (size, size))[inner, inner], atol=1.5
    )


def _numpy_flip_jitter(images, flips, factors):
  """The reference: the same maths as Augment.flip_jitter, in numpy, one image at a time."""
  out = []
  for image, flip, (brightness, contrast, saturation) in zip(images, flips, factors):
    x = image.astype(np.float64)
    x = x[:, ::-1] if flip else x
    x = x * brightness
    x = (x - x.mean()) * contrast + x.mean()
    gray = x @ np.array([0.299, 0.587, 0.114])
    out.append(np.clip((x - gray[..., None]) * saturation + gray[..., None], 0, 255))
  return np.stack(out)


def test_device_flip_and_jitter_are_a_pure_function_of_seed_epoch_position_and_match_numpy():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 12, 10, 3), dtype=np.uint8)
  epoch, position = np.repeat([0, 1], 8), np.tile(np.arange(8), 2)
  aug = augment.Augment(color_jitter=0.4, seed=5)
  flips, factors = (np.asarray(a) for a in aug.draws(epoch, position))
  assert flips.shape == (16,) and factors.shape == (16, 3)
  assert 0 < flips.sum() < 16 and ((0.6 <= factors) & (factors <= 1.4)).all()
  assert len({tuple(f) for f in factors}) == 16  # every (epoch, position) draws its own
  jitted = np.asarray(jax.jit(aug.flip_jitter)(images, epoch, position))
  assert jitted.dtype == np.float32
  np.testing.assert_allclose(jitted, _numpy_flip_jitter(images, flips, factors), atol=2e-3)
  # One example's view does not depend on the batch it arrives in, nor on its slot.
  order = rng.permutation(16)
  np.testing.assert_allclose(
    np.asarray(aug.flip_jitter(images[order], epoch[order], position[order])),
    jitted[order],
    atol=1e-3,
  )
  other_seed = np.asarray(augment.Augment(color_jitter=0.4, seed=6).draws(epoch, position)[1])
  assert not np.allclose(other_seed, factors)
  plain = augment.Augment(color_jitter=0.0, seed=5)
  flipped = np.asarray(plain.flip_jitter(images, epoch, position))
  np.testing.assert_array_equal(flipped, _numpy_flip_jitter(images, flips, np.ones((16, 3))))


def test_eval_pass_sees_every_record_exactly_once(dataset_dir):
  batches = list(input_pipeline.eval_batches(_config().input, dataset_dir, "val", 7))
  assert len(batches) == 3  # 18 records: 7 + 7 + 4 real, 3 padding
  assert all(b["image"].shape == (7, SIZE, SIZE, 3) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert mask.sum() == 18 and (mask[18:] == 0).all()
  np.testing.assert_array_equal(np.sort(index[mask > 0]), np.arange(18))
  metadata = input_pipeline.read_metadata(dataset_dir, "val")
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels[mask > 0], metadata["labels"][index[mask > 0]])
  again = list(input_pipeline.eval_batches(_config().input, dataset_dir, "val", 7))
  np.testing.assert_array_equal(batches[0]["image"], again[0]["image"])


class TwiceIndex:
  """A join: extra per-record fields computed in the loader from the record and its crop."""

  def __call__(self, index, epoch, position, record):
    return {
      "twice": np.int64(2 * index),
      "label_copy": np.int32(record["label"]),
      "epoch_copy": np.int32(epoch),
      "position_copy": np.int32(position),
    }


def test_join_fn_adds_fields_aligned_with_each_record(dataset_dir):
  config = _config(region_filter=["ES"])  # a view: positions are not record indices
  batches = _batches(dataset_dir, config, 4, join_fn=TwiceIndex())  # 16 records, two epochs
  view = input_pipeline.train_view(config.input, dataset_dir, "train", 400, config.seed)
  for batch in batches:
    np.testing.assert_array_equal(batch["twice"], 2 * batch["index"])
    np.testing.assert_array_equal(batch["label_copy"], batch["label"])
    np.testing.assert_array_equal(batch["epoch_copy"], batch["epoch"])
    np.testing.assert_array_equal(batch["position_copy"], batch["position"])
    np.testing.assert_array_equal(view[batch["position"]], batch["index"])
  assert {int(e) for b in batches for e in b["epoch"]} == {0, 1}


def _drawn(dataset_dir, config, n=10):
  return np.concatenate([b["index"] for b in _batches(dataset_dir, config, n)])


def test_class_balanced_weights_flatten_a_long_tail(dataset_dir):
  config = _config(sampling="class_balanced")
  skewed = {"labels": np.array([0] * 30 + [1] * 3 + [2] * 3), "regions": [["ES"]] * 36}
  w = input_pipeline.sampling_weights(config.input, skewed)
  per_class = [w[skewed["labels"] == c].sum() for c in range(3)]
  np.testing.assert_allclose(per_class, per_class[0])  # each class drawn equally often
  config.input.class_balance_power = 0.5
  w = input_pipeline.sampling_weights(config.input, skewed)
  assert w[skewed["labels"] == 0].sum() > w[skewed["labels"] == 1].sum()
  drawn = _drawn(dataset_dir, _config(sampling="class_balanced"))
  assert len(drawn) == 80 and set(drawn) <= set(range(48))


def test_region_filter_and_region_weighting(dataset_dir):
  metadata = input_pipeline.read_metadata(dataset_dir, "train")
  in_spain = np.array([r == ["ES"] for r in metadata["regions"]])
  only = _drawn(dataset_dir, _config(region_filter=["ES"]))
  assert in_spain[only].all() and len(set(only)) == in_spain.sum()
  weighted = _drawn(
    dataset_dir, _config(sampling="region_weighted", region_countries=["ES"], region_weight=8.0)
  )
  share = in_spain[weighted].mean()  # expected 8/(8+2) = 0.8 against 1/3 uniform
  assert 0.65 < share < 0.95, share
  counts = collections.Counter(
    _drawn(
      dataset_dir, _config(sampling="region_weighted", region_countries=["ES"], region_weight=8.0)
    )
  )
  assert counts == collections.Counter(weighted)  # seeded


def test_bad_sampling_and_empty_region_are_clear_errors(dataset_dir):
  with pytest.raises(ValueError, match="config.input.sampling"):
    _batches(dataset_dir, _config(sampling="zipf"), 1)
  with pytest.raises(ValueError, match="region_filter"):
    _batches(dataset_dir, _config(region_filter=["JP"]), 1)


@pytest.mark.parametrize("damage", ["truncated", "bytes_changed"])
def test_a_corrupt_shard_is_refused_naming_the_file(tmp_path, damage):
  dataset = str(tmp_path / "dataset")
  write_tiny_dataset(dataset, num_classes=2, per_class={"train": 4, "val": 4}, size=32)
  path = shards.shard_paths(dataset, "val")[-1]
  data = bytearray(open(path, "rb").read())
  if damage == "truncated":
    data = data[: len(data) // 2]
  else:
    data[200:1200] = bytes(b ^ 0x5A for b in data[200:1200])  # inside the first records
  open(path, "wb").write(bytes(data))
  config = training.training_config(output_dir="x", model_name="", image_size=32)
  config.input.worker_count = 0
  with pytest.raises(shards.CorruptShardError) as error:
    input_pipeline.read_metadata(dataset, "val")
  assert f"dataset shard {path} is corrupt" in str(error.value)
  assert "Re-run the export stage" in str(error.value)
  with pytest.raises(shards.CorruptShardError, match=f"dataset shard {path} is corrupt"):
    list(input_pipeline.eval_batches(config.input, dataset, "val", 4))


def test_a_temp_file_left_by_a_killed_shard_write_is_not_a_shard(tmp_path):
  dataset = str(tmp_path / "dataset")
  write_tiny_dataset(dataset, num_classes=2, per_class={"train": 4, "val": 4}, size=32)
  real = shards.shard_paths(dataset, "val")
  with open(real[0] + ".tmp4242", "wb") as f:  # fileio.atomic_path's name, cut by a SIGKILL
    f.write(b"half a shard")
  assert shards.shard_paths(dataset, "val") == real
  assert shards.split_names(dataset) == ["train", "val"]
  assert len(input_pipeline.read_metadata(dataset, "val")["labels"]) == 8


def test_device_prefetch_checkpoints_the_batches_handed_out_not_those_ahead(dataset_dir):
  config = _config(seed=4)
  straight = _batches(dataset_dir, config, 10)

  def prefetched(depth):
    loader = input_pipeline.train_loader(config, dataset_dir, BATCH, num_samples=400)
    return input_pipeline.DevicePrefetch(iter(loader), jax.device_put, depth)

  first = prefetched(depth=3)
  head = [next(first) for _ in range(4)]  # 7 batches drawn, 3 waiting on device
  assert isinstance(head[0]["image"], jax.Array)
  resumed = prefetched(depth=3)
  resumed.set_state(first.get_state())
  for want, got in zip(straight, head + [next(resumed) for _ in range(6)]):
    for key in ("image", "index", "crop_epoch", "position"):
      np.testing.assert_array_equal(want[key], np.asarray(got[key]))
