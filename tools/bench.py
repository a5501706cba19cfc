r"""Speed benchmarks of the pipeline's parts, one subcommand (mode) each; results as JSON.

  python tools/bench.py export [--images 600 --repeats 3 --out bench_results/export.json]
  python tools/bench.py loader [--workers 1,2 --batch 32 --image_size 224 --dataset DIR]
  python tools/bench.py train [--model mobilenet_v2,efficientnet_lite2 --batch 32 --res 128 --dtype float32]
  python tools/bench.py infer [--model mobilenet_v2 --batches 1,64 --res 224]

Each mode is a function `(args) -> dict` registered with `@register`; the JSON
(with machine info) is printed and written to --out (default
bench_results/<mode>.json). Speed targets live here, never in timed tests.
Add a mode: write `@register("name", "what it measures", [("--flag", {...})])`
above a function that returns a dict of numbers.
"""

import argparse
import contextlib
import gc
import importlib.metadata
import io
import json
import os
import pathlib
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

MODES = {}  # name → (function, help, [(flag, argparse kwargs)])


def register(name: str, help_text: str, arguments=()):
  def wrap(fn):
    MODES[name] = (fn, help_text, list(arguments))
    return fn

  return wrap


def machine_info() -> dict:
  def version(package):
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return None

  return dict(
    cpu_count=os.cpu_count(),
    cpus_usable=len(os.sched_getaffinity(0)),
    load_avg_1m=os.getloadavg()[0],
    platform=platform.platform(),
    processor=platform.processor() or platform.machine(),
    python=platform.python_version(),
    jax=version("jax"),
    jaxlib=version("jaxlib"),
    tensorflow=version("tensorflow"),
    pillow=version("pillow"),
    aiohttp=version("aiohttp"),
  )


def summarise(values) -> dict:
  """Median with min/max: the median resists a noisy neighbour on a shared machine."""
  return dict(median=statistics.median(values), min=min(values), max=max(values))


# ---------------------------------------------------------------- export


def _photo_jpeg(seed: int, size=(800, 600)) -> bytes:
  """A photo-like JPEG (smooth colour field + grain), ~100 KB at 800x600, q=90."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  field = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(
    size, Image.BICUBIC
  )
  grain = rng.normal(0, 6, (size[1], size[0], 1))
  pixels = np.clip(np.asarray(field, np.float32) + grain, 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _http_server(directory: str):
  """`python -m http.server` in its own process, so its CPU is not counted as the exporter's."""
  port = _free_port()
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "http.server",
      "--bind",
      "127.0.0.1",
      "--directory",
      directory,
      str(port),
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  base = f"http://127.0.0.1:{port}"
  try:
    for _ in range(100):
      try:
        urllib.request.urlopen(base + "/", timeout=1).close()
        break
      except OSError:
        time.sleep(0.1)
    yield base
  finally:
    proc.terminate()
    proc.wait()


@register(
  "export",
  "download → validate → resize → shard of N 800x600 JPEGs served from 127.0.0.1",
  [
    ("--images", dict(type=int, default=600, help="number of JPEGs")),
    ("--species", dict(type=int, default=10)),
    ("--repeats", dict(type=int, default=3)),
    ("--image_size", dict(type=int, default=320, help="export.image_size")),
    ("--workers", dict(type=int, default=0, help="export.workers (0 = one per core)")),
  ],
)
def bench_export(args) -> dict:
  os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported
  from absl import logging  # pylint: disable=g-import-not-at-top

  from aplantida_jax.data import export  # pylint: disable=g-import-not-at-top
  from configs import export as export_config  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
    served = pathlib.Path(tmp, "served")
    names, total_bytes = [], 0
    for i in range(args.images):
      name = f"img/{i % args.species}/{i:06d}.jpg"
      path = served / name
      path.parent.mkdir(parents=True, exist_ok=True)
      data = _photo_jpeg(i)
      path.write_bytes(data)
      names.append(name)
      total_bytes += len(data)
    runs = []
    with _http_server(str(served)) as base:
      catalog = pathlib.Path(tmp, "catalog.jsonl")
      with open(catalog, "w") as f:
        for s in range(args.species):
          images = [
            {"url": f"{base}/{n}", "license": "CC-BY-4.0", "author": "bench"}
            for n in names
            if n.startswith(f"img/{s}/")
          ]
          f.write(json.dumps({"scientificName": f"Species {s}", "images": images}) + "\n")
      for repeat in range(args.repeats):
        config = export_config.get_config()
        config.catalog.kind, config.catalog.path = "jsonl", str(catalog)
        config.export.image_size, config.export.workers = args.image_size, args.workers
        config.export.min_per_class = 3
        wall, cpu = time.perf_counter(), time.process_time()
        summary = export.run(
          config, str(pathlib.Path(tmp, f"run{repeat}"))
        )  # fresh cache each time
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        kept = sum(summary["counts"].values())
        if kept != args.images:
          raise RuntimeError(f"bench export kept {kept} of {args.images} images: {summary}")
        runs.append(dict(wall_s=wall, cpu_s=cpu))
  images_per_s = [args.images / r["wall_s"] for r in runs]
  return dict(
    images=args.images,
    source_size="800x600",
    mean_source_kb=total_bytes / args.images / 1024,
    image_size=args.image_size,
    repeats=args.repeats,
    runs=runs,
    images_per_s=summarise(images_per_s),
    mb_per_s=summarise([total_bytes / 1e6 / r["wall_s"] for r in runs]),
    # Per core = per CPU-second the exporter process used (all its threads); the
    # HTTP server runs in another process and is not counted.
    images_per_s_per_core=summarise([args.images / r["cpu_s"] for r in runs]),
    cores_used=summarise([r["cpu_s"] / r["wall_s"] for r in runs]),
    images_per_s_per_machine_core=summarise([v / os.cpu_count() for v in images_per_s]),
    target_images_per_s_per_core=100,
  )


# ---------------------------------------------------------------- timing and devices


def time_windows(run_once, sync, *, warmup=2, windows=5, window_s=2.0, calls=None):
  """Seconds per call in each of `windows` timed windows, after `warmup` calls.

  Warm-up absorbs compilation (its first call is reported as `first_call_s`).
  Unless `calls` is given, the calls per window are sized from the last
  warm-up call so that a window lasts about `window_s`.
  """
  first = None
  for _ in range(max(warmup, 1)):
    start = time.perf_counter()
    run_once()
    sync()
    elapsed = time.perf_counter() - start
    first = elapsed if first is None else first
  calls = calls or max(1, round(window_s / max(elapsed, 1e-6)))
  per_call = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(calls):
      run_once()
    sync()
    per_call.append((time.perf_counter() - start) / calls)
  return dict(
    first_call_s=first, calls_per_window=calls, windows=windows, seconds_per_call=per_call
  )


def rate(timing, items_per_call) -> dict:
  """images/s (median, min, max over windows) of a time_windows result."""
  return summarise([items_per_call / s for s in timing["seconds_per_call"]])


def jax_device_info() -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  return dict(
    backend=jax.default_backend(),
    device_count=jax.device_count(),
    device_kind=device.device_kind,
    jax=jax.__version__,
  )


def torch_device_info() -> dict:
  import torch  # pylint: disable=g-import-not-at-top

  info = dict(
    torch=torch.__version__, threads=torch.get_num_threads(), cuda=torch.cuda.is_available()
  )
  if info["cuda"]:
    info["device_name"] = torch.cuda.get_device_name()
  return info


def _comma_list(text, kind=str):
  return [kind(x) for x in text.split(",") if x]


# ---------------------------------------------------------------- loader


def _synthetic_dataset(dataset_dir: str, images: int, short_side: int, num_shards=4) -> None:
  """<dataset_dir>/{classes.json, splits/train.array_record-*} of photo-like JPEGs.

  Same format and size as the export stage writes (shorter side 320, q=90).
  """
  import hashlib  # pylint: disable=g-import-not-at-top

  from aplantida_jax import fileio  # pylint: disable=g-import-not-at-top
  from aplantida_jax.data import shards  # pylint: disable=g-import-not-at-top

  num_classes = 10
  records = []
  for i in range(images):
    jpeg = _photo_jpeg(i, size=(short_side * 4 // 3, short_side))
    records.append(
      dict(
        jpeg=jpeg,
        label=i % num_classes,
        species=f"Species {i % num_classes}",
        regions=["ES"],
        country="ES",
        license="CC0-1.0",
        author="bench",
        url=f"https://bench.invalid/{i}.jpg",
        sha256=hashlib.sha256(jpeg).hexdigest(),
      )
    )
  shards.write_split(dataset_dir, "train", records, num_shards)
  fileio.write_json(
    os.path.join(dataset_dir, "classes.json"),
    [
      {"index": i, "species": f"Species {i}", "common_names": {}, "regions": ["ES"], "family": ""}
      for i in range(num_classes)
    ],
  )


def _loader_config(image_size: int, workers: int, seed: int):
  from configs import training  # pylint: disable=g-import-not-at-top

  config = training.training_config(
    output_dir="bench", model_name="mobilenet_v2", image_size=image_size
  )
  config.input.worker_count = workers
  config.seed = seed
  return config


def grain_batches(dataset_dir, config, batch):
  """The trainer's own train loader (input_pipeline.train_loader), as an iterator."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  from aplantida_jax.train import input_pipeline  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    # With jaxlib >= 0.11 Grain's workers read an absl flag; argparse leaves absl unparsed.
    flags.FLAGS.mark_as_parsed()
  return iter(input_pipeline.train_loader(config, dataset_dir, batch, num_samples=10**9))


def tfdata_batches(dataset_dir, config, batch):
  """tf.data doing the trainer's host work: same shards, same global shuffle, same crops.

  Records come from the same ArrayRecord reader (a generator: reading and
  msgpack are cheap); decoding and cropping run in `worker_count` tf.data
  threads with the standard TF recipe: sample_distorted_bounding_box +
  decode_and_crop_jpeg (decodes only the crop), bilinear resize without
  antialiasing (as augment.resize_box), uint8 out. Flip and jitter run on
  device in both pipelines, so neither does them here.
  """
  import grain  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from aplantida_jax.data import shards  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")
  inp, size = config.input, config.input.image_size
  source = grain.sources.ArrayRecordDataSource(shards.shard_paths(dataset_dir, config.train_split))
  tf.random.set_seed(config.seed)

  def records():
    rng = np.random.default_rng(config.seed)
    while True:  # a fresh global shuffle per epoch, like grain's IndexSampler
      for index in rng.permutation(len(source)):
        record = shards.decode(source[int(index)])
        yield record["jpeg"], record["label"]

  def augment(jpeg, label):
    begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
      tf.io.extract_jpeg_shape(jpeg),
      tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      min_object_covered=0.0,
      aspect_ratio_range=tuple(inp.crop_ratio),
      area_range=tuple(inp.crop_scale),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
    image = tf.io.decode_and_crop_jpeg(jpeg, window, channels=3)
    pixels = tf.image.resize(image, (size, size), method="bilinear", antialias=False)
    image = tf.cast(tf.clip_by_value(tf.round(pixels), 0, 255), tf.uint8)
    return {"image": image, "label": tf.cast(label, tf.int32)}

  workers = max(inp.worker_count, 1)
  options = tf.data.Options()
  options.threading.private_threadpool_size = workers
  options.threading.max_intra_op_parallelism = 1
  dataset = (
    tf.data.Dataset.from_generator(
      records, output_signature=(tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64))
    )
    .map(augment, num_parallel_calls=workers)
    .batch(batch, drop_remainder=True)
    .prefetch(inp.worker_buffer_size)
    .with_options(options)
  )
  return dataset.as_numpy_iterator()


def _measure_loader(make_batches, dataset_dir, config, batch, args, *, in_process) -> dict:
  batches = make_batches(dataset_dir, config, batch)
  shapes = {}

  def run_once():
    out = next(batches)
    shapes.update({k: (list(v.shape), str(v.dtype)) for k, v in out.items() if k == "image"})

  try:
    cpu = time.process_time()
    timing = time_windows(
      run_once,
      lambda: None,
      warmup=args.warmup_batches,
      windows=args.windows,
      calls=args.batches_per_window,
    )
    cpu = time.process_time() - cpu
  finally:
    batches = None  # drops the iterator (run_once shares this cell) ...
    gc.collect()  # ... so grain's worker processes stop before the next measurement
  images_per_s = rate(timing, batch)
  workers = max(config.input.worker_count, 1)
  result = dict(
    images_per_s=images_per_s,
    images_per_s_per_worker={k: v / workers for k, v in images_per_s.items()},
    image=shapes.get("image"),
    timing=timing,
  )
  if in_process:
    # CPU-seconds of this process per image (warm-up included): a per-core cost that a
    # busy machine does not distort the way wall-clock rates are distorted.
    images = batch * (max(args.warmup_batches, 1) + args.windows * timing["calls_per_window"])
    result["cpu_ms_per_image"] = 1e3 * cpu / images
  return result


@register(
  "loader",
  "Grain train pipeline vs the same work in tf.data, side by side (images/s)",
  [
    (
      "--dataset",
      dict(
        default="",
        help="dataset folder with splits/train.array_record-* "
        "(default: synthetic shards in a temp dir)",
      ),
    ),
    ("--images", dict(type=int, default=512, help="synthetic JPEGs")),
    ("--source_px", dict(type=int, default=320, help="synthetic JPEG shorter side")),
    ("--image_size", dict(type=int, default=224, help="train crop size")),
    ("--batch", dict(type=int, default=32)),
    (
      "--workers",
      dict(
        default="0,1,2",
        help="comma list: grain worker processes (0 = in this process) / tf.data threads (0 = 1)",
      ),
    ),
    ("--pipelines", dict(default="grain,tfdata")),
    ("--windows", dict(type=int, default=5)),
    ("--batches_per_window", dict(type=int, default=4)),
    ("--warmup_batches", dict(type=int, default=4)),
    ("--seed", dict(type=int, default=0)),
  ],
)
def bench_loader(args) -> dict:
  os.environ.setdefault("TQDM_DISABLE", "1")
  makers = {"grain": grain_batches, "tfdata": tfdata_batches}
  pipelines = _comma_list(args.pipelines)
  with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
    dataset_dir = args.dataset or tmp
    if not args.dataset:
      _synthetic_dataset(tmp, args.images, args.source_px)
    results, skipped = {}, {}
    for workers in _comma_list(args.workers, int):
      for name in pipelines:
        try:
          # workers=0: grain decodes in this process; tf.data always runs in-process threads.
          results.setdefault(name, {})[str(workers)] = _measure_loader(
            makers[name],
            dataset_dir,
            _loader_config(args.image_size, workers, args.seed),
            args.batch,
            args,
            in_process=name == "tfdata" or workers == 0,
          )
        except ImportError as e:  # e.g. no tensorflow on the GPU machine
          skipped[name] = f"{type(e).__name__}: {e}"
          results.pop(name, None)
    host_crop = host_crop_costs(dataset_dir, args)
  ratios = {}
  if "grain" in results and "tfdata" in results:
    ratios = {
      w: results["grain"][w]["images_per_s"]["median"]
      / results["tfdata"][w]["images_per_s"]["median"]
      for w in results["grain"]
    }
  return dict(
    dataset=args.dataset or f"synthetic: {args.images} JPEGs, shorter side {args.source_px}, q=90",
    image_size=args.image_size,
    batch=args.batch,
    workers_meaning="grain: worker processes (0 = main process); tfdata: map threads "
    "(private pool; 0 = 1)",
    results=results,
    skipped=skipped,
    grain_over_tfdata=ratios,
    host_crop_cpu_ms_per_image=host_crop,
    target_images_per_s_per_core=800,
  )


def host_crop_costs(dataset_dir, args) -> dict:
  """CPU ms per image (median of windows) of the host crop by library, the same boxes.

  opencv: augment.Augment.crop, what the workers run. pillow: Pillow's JPEG draft decode +
  antialiased bilinear resize of the same box (input_pipeline.resized_crop, the eval crop's
  resize). pillow+numpy_jitter adds the former host flip and colour jitter in numpy,
  which the train step now does on device.
  """
  import io  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from aplantida_jax.data import shards  # pylint: disable=g-import-not-at-top
  from aplantida_jax.train import augment  # pylint: disable=g-import-not-at-top
  from aplantida_jax.train import input_pipeline  # pylint: disable=g-import-not-at-top

  source = input_pipeline.RecordSource(shards.shard_paths(dataset_dir, "train"))
  jpegs = [shards.decode(source[i]["data"])["jpeg"] for i in range(min(128, len(source)))]
  aug = augment.Augment.of(_loader_config(args.image_size, 0, args.seed).input, args.seed)

  def pillow(jpeg, e, i, size):
    image = Image.open(io.BytesIO(jpeg))
    box = aug.box(e, i, *image.size)
    return np.asarray(input_pipeline.resized_crop(image, box, size))

  def pillow_numpy_jitter(jpeg, e, i, size):
    pixels = pillow(jpeg, e, i, size).astype(np.float32)[:, ::-1]
    brightness, contrast, saturation = 1.1, 0.9, 1.05
    pixels = pixels * brightness
    pixels = (pixels - pixels.mean()) * contrast + pixels.mean()
    gray = pixels @ np.array(augment.GRAY_WEIGHTS, np.float32)
    pixels = (pixels - gray[..., None]) * saturation + gray[..., None]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

  costs = {}
  for name, crop in (
    ("opencv", aug.crop),
    ("pillow", pillow),
    ("pillow+numpy_jitter", pillow_numpy_jitter),
  ):
    windows = []
    for window in range(args.windows):
      start = time.process_time()
      for i, jpeg in enumerate(jpegs):
        crop(jpeg, window, i, args.image_size)
      windows.append(1e3 * (time.process_time() - start) / len(jpegs))
    costs[name] = summarise(windows)
  return costs


# ---------------------------------------------------------------- train (JAX vs PyTorch)


def jax_train_step_fn(name, *, batch, res, dtype="float32", num_classes=1000, seed=0):
  """(run_once, sync, info): one `steps.train_step` as train/loop.py runs it, synthetic batch."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from aplantida_jax import models  # pylint: disable=g-import-not-at-top
  from aplantida_jax.train import steps  # pylint: disable=g-import-not-at-top

  np_rng = np.random.default_rng(seed)
  data = {
    "image": np_rng.integers(0, 256, (batch, res, res, 3), dtype=np.uint8),
    "label": np_rng.integers(0, num_classes, batch).astype(np.int32),
    "crop_epoch": np.zeros(batch, np.int32),
    "position": np.arange(batch, dtype=np.int32),
  }
  run_once, sync = _step_fn(
    steps.classification_task(0.1),
    models.get_model(name, num_classes, dtype=dtype),
    data,
    batch=batch,
    res=res,
    seed=seed,
  )
  return run_once, sync, dict(precision=f"{dtype} compute, float32 params")


def _torch_side(name, args):
  """PyTorch images/s for `name`, or {"skipped": why} when torch is unavailable."""
  if args.torch == "off":
    return {"skipped": "--torch=off"}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torch_reference  # pylint: disable=g-import-not-at-top  # tools/torch_reference.py
  except ImportError as e:
    return {"skipped": f"{type(e).__name__}: {e}"}
  compile_model = {"auto": None, "on": True, "off": False}[args.torch_compile]
  run_once, sync, info = torch_reference.train_step_fn(
    name,
    batch=args.batch,
    res=args.res,
    num_classes=args.num_classes,
    bf16=args.dtype == "bfloat16",
    compile_model=compile_model,
  )
  timing = time_windows(
    run_once, sync, warmup=args.warmup, windows=args.windows, window_s=args.window_s
  )
  del run_once
  if torch.cuda.is_available():
    torch.cuda.empty_cache()  # leave the GPU memory to the next JAX model
  return dict(images_per_s=rate(timing, args.batch), **info, timing=timing)


@register(
  "train",
  "train-step images/s of the JAX step vs PyTorch (same model, batch, resolution)",
  [
    ("--model", dict(default="mobilenet_v2,efficientnet_lite2", help="comma list")),
    ("--batch", dict(type=int, default=32)),
    ("--res", dict(type=int, default=128)),
    (
      "--dtype",
      dict(
        default="float32",
        choices=("float32", "bfloat16"),
        help="JAX compute dtype; bfloat16 = torch bf16 autocast",
      ),
    ),
    ("--num_classes", dict(type=int, default=1000)),
    ("--torch", dict(default="auto", choices=("auto", "off"))),
    (
      "--torch_compile",
      dict(default="auto", choices=("auto", "on", "off"), help="auto: on GPU only"),
    ),
    ("--warmup", dict(type=int, default=2)),
    ("--windows", dict(type=int, default=5)),
    ("--window_s", dict(type=float, default=3.0)),
  ],
)
def bench_train(args) -> dict:
  # Both frameworks share the GPU: JAX must not grab 75% of its memory up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax  # pylint: disable=g-import-not-at-top

  results = {}
  augment_timing = augmentation_timing(args)
  for name in _comma_list(args.model):
    run_once, sync, info = jax_train_step_fn(
      name, batch=args.batch, res=args.res, dtype=args.dtype, num_classes=args.num_classes
    )
    timing = time_windows(
      run_once, sync, warmup=args.warmup, windows=args.windows, window_s=args.window_s
    )
    del run_once, sync
    gc.collect()
    jax_result = dict(images_per_s=rate(timing, args.batch), **info, timing=timing)
    # Share of the step (which includes it) that the on-device flip + jitter take: target < 5 %.
    step_s = statistics.median(timing["seconds_per_call"])
    jax_result["augmentation_cost"] = statistics.median(augment_timing["seconds_per_call"]) / step_s
    jax.clear_caches()
    torch_result = _torch_side(name, args)
    ratio = None
    if "images_per_s" in torch_result:
      ratio = jax_result["images_per_s"]["median"] / torch_result["images_per_s"]["median"]
    results[name] = dict(jax=jax_result, torch=torch_result, jax_over_torch=ratio)
    jax.clear_caches()
  info = dict(jax=jax_device_info())
  if any("torch" in r["torch"] for r in results.values()):
    info["torch"] = torch_device_info()
  return dict(
    batch=args.batch,
    res=args.res,
    dtype=args.dtype,
    num_classes=args.num_classes,
    device=info,
    augmentation_alone=dict(images_per_s=rate(augment_timing, args.batch), timing=augment_timing),
    results=results,
  )


def augmentation_timing(args) -> dict:
  """time_windows of the train step's device half alone (Augment.flip_jitter, jit) on a batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from aplantida_jax.train import augment  # pylint: disable=g-import-not-at-top
  from configs import training  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  images, epoch, position = jax.device_put(
    (
      rng.integers(0, 256, (args.batch, args.res, args.res, 3), dtype=np.uint8),
      np.zeros(args.batch, np.int32),
      np.arange(args.batch, dtype=np.int32),
    )
  )
  flip_jitter = jax.jit(augment.Augment.of(training.input_config(args.res), 0).flip_jitter)
  held = {}

  def run_once():
    held["out"] = flip_jitter(images, epoch, position)

  return time_windows(
    run_once,
    lambda: jax.block_until_ready(held["out"]),
    warmup=args.warmup,
    windows=args.windows,
    window_s=args.window_s,
  )


# ---------------------------------------------------------------- infer


@register(
  "infer",
  "JAX inference images/s of the student (eval mode), batch 1 and 64",
  [
    ("--model", dict(default="mobilenet_v2")),
    ("--batches", dict(default="1,64", help="comma list of batch sizes")),
    ("--res", dict(type=int, default=224)),
    ("--dtype", dict(default="float32", choices=("float32", "bfloat16"))),
    ("--num_classes", dict(type=int, default=1000)),
    ("--warmup", dict(type=int, default=2)),
    ("--windows", dict(type=int, default=5)),
    ("--window_s", dict(type=float, default=2.0)),
  ],
)
def bench_infer(args) -> dict:
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from aplantida_jax import models  # pylint: disable=g-import-not-at-top

  model = models.get_model(args.model, args.num_classes, dtype=args.dtype)
  rng = jax.random.PRNGKey(0)
  variables = models.init_variables(model, rng, args.res)
  predict = jax.jit(functools.partial(model.apply, train=False))
  results = {}
  for batch in _comma_list(args.batches, int):
    images = jax.random.normal(rng, (batch, args.res, args.res, 3), jnp.float32)
    held = {}

    def run_once(images=images, held=held):
      held["logits"] = predict(variables, images)

    timing = time_windows(
      run_once,
      lambda held=held: jax.block_until_ready(held["logits"]),
      warmup=args.warmup,
      windows=args.windows,
      window_s=args.window_s,
    )
    results[str(batch)] = dict(
      images_per_s=rate(timing, batch),
      latency_ms=summarise([1e3 * s for s in timing["seconds_per_call"]]),
      timing=timing,
    )
  return dict(
    model=args.model,
    res=args.res,
    dtype=args.dtype,
    num_classes=args.num_classes,
    device=dict(jax=jax_device_info()),
    results=results,
  )


# ---------------------------------------------------------------- distill


def _step_fn(task, model, batch_data, *, batch, res, seed=0):
  """(run_once, sync) of one loop-identical train step for `task` on a fixed device batch.

  The step includes the loop's on-device flip and jitter (config.input's defaults), so
  batch_data holds `crop_epoch` and `position`.
  """
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from aplantida_jax import models  # pylint: disable=g-import-not-at-top
  from aplantida_jax.train import augment as augment_lib  # pylint: disable=g-import-not-at-top
  from aplantida_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from aplantida_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from aplantida_jax.train import steps  # pylint: disable=g-import-not-at-top
  from configs import training  # pylint: disable=g-import-not-at-top

  rng = jax.random.PRNGKey(seed)
  variables = models.init_variables(model, {"params": rng, "dropout": rng}, res)
  mesh = sharding.create_mesh()
  replicated = sharding.replicated(mesh)
  state = jax.device_put(
    state_lib.create_train_state(model, variables, training.optimizer_config(), batch, 10_000),
    replicated,
  )
  step = jax.jit(
    functools.partial(
      steps.train_step,
      loss_fn=task.loss_fn,
      augment=augment_lib.Augment.of(training.input_config(res), seed),
    ),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )
  data = sharding.global_batch(mesh, batch_data)
  step_rng, aux = jax.device_put((rng, task.aux), replicated)
  held = {"state": state}

  def run_once():
    held["state"], held["metrics"] = step(held["state"], data, step_rng, aux)

  return run_once, lambda: jax.block_until_ready(held["state"])


@register(
  "distill",
  "train-step images/s: precomputed vs online distillation vs plain CE",
  [
    ("--student", dict(default="mobilenet_v2")),
    ("--width", dict(type=float, default=1.0, help="student width multiplier")),
    ("--teacher", dict(default="efficientnet_lite0", help="teacher model (online mode)")),
    ("--teachers", dict(type=int, default=2, help="teachers run in the online step")),
    ("--teacher_res", dict(type=int, default=0, help="teacher input size (0 = --res)")),
    ("--batch", dict(type=int, default=32)),
    ("--res", dict(type=int, default=224)),
    ("--num_classes", dict(type=int, default=1000)),
    ("--top_k", dict(type=int, default=10)),
    (
      "--dtype",
      dict(
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype of student and teachers",
      ),
    ),
    ("--warmup", dict(type=int, default=2)),
    ("--windows", dict(type=int, default=5)),
    ("--window_s", dict(type=float, default=3.0)),
  ],
)
def bench_distill(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from aplantida_jax import models  # pylint: disable=g-import-not-at-top
  from aplantida_jax.distill import loop as distill_loop  # pylint: disable=g-import-not-at-top
  from aplantida_jax.distill import soft_labels  # pylint: disable=g-import-not-at-top
  from aplantida_jax.train import steps  # pylint: disable=g-import-not-at-top
  from configs import student_distill  # pylint: disable=g-import-not-at-top

  config = student_distill.get_config()
  config.distill.top_k = args.top_k
  teacher_res = args.teacher_res or args.res
  np_rng = np.random.default_rng(0)
  k = min(args.top_k, args.num_classes)
  probs = np_rng.dirichlet(np.ones(k + 1), args.batch).astype(np.float32)
  base = {
    "image": np_rng.integers(0, 256, (args.batch, args.res, args.res, 3), dtype=np.uint8),
    "label": np_rng.integers(0, args.num_classes, args.batch).astype(np.int32),
    "crop_epoch": np.zeros(args.batch, np.int32),
    "position": np.arange(args.batch, dtype=np.int32),
  }
  precomputed = {
    **base,
    "teacher_probs": probs[:, :k].astype(np.float16),
    "teacher_classes": np.stack(
      [np_rng.choice(args.num_classes, k, replace=False) for _ in range(args.batch)]
    ).astype(np.int32),
    "teacher_rest": probs[:, k],
  }
  teachers = []
  for t in range(args.teachers):
    model = models.get_model(args.teacher, args.num_classes, dtype=args.dtype)
    variables = models.init_variables(model, jax.random.PRNGKey(100 + t), teacher_res)
    teachers.append(
      soft_labels.Teacher(
        name=f"t{t}",
        dir=f"bench_teacher_{t}",
        model=model,
        variables=variables,
        image_size=teacher_res,
        eval_crop_fraction=0.875,
        weight=1.0,
        countries=(),
        region_weight=1.0,
        checkpoint_sha256="",
      )
    )
  online = {**base, "teacher_weights": np.ones((args.batch, args.teachers), np.float32)}
  student = models.get_model(args.student, args.num_classes, width=args.width, dtype=args.dtype)
  cases = {
    "ce": (steps.classification_task(0.1), base),
    "precomputed": (distill_loop.precomputed_task(config, None), precomputed),
    "online": (distill_loop.online_task(config, teachers), online),
  }
  results = {}
  for name, (task, data) in cases.items():
    run_once, sync = _step_fn(task, student, data, batch=args.batch, res=args.res)
    timing = time_windows(
      run_once, sync, warmup=args.warmup, windows=args.windows, window_s=args.window_s
    )
    results[name] = dict(images_per_s=rate(timing, args.batch), timing=timing)
    del run_once, sync
    jax.clear_caches()
  ratio = (
    results["precomputed"]["images_per_s"]["median"] / results["online"]["images_per_s"]["median"]
  )
  return dict(
    student=args.student,
    width=args.width,
    teacher=args.teacher,
    teachers=args.teachers,
    teacher_res=teacher_res,
    batch=args.batch,
    res=args.res,
    dtype=args.dtype,
    num_classes=args.num_classes,
    top_k=args.top_k,
    device=dict(jax=jax_device_info()),
    results=results,
    precomputed_over_online=ratio,
    note="steps only, on a fixed device batch (the input pipeline is not timed); "
    "the plan claims precomputed is ~10x faster than online",
  )


# ---------------------------------------------------------------- browser


@register(
  "browser",
  "TF.js wasm latency in Chromium: exported student vs Keras MobileNetV2 (same size), ratio",
  [
    ("--width", dict(type=float, default=1.0, help="MobileNetV2 width multiplier")),
    ("--num_classes", dict(type=int, default=1000)),
    ("--res", dict(type=int, default=224)),
    ("--runs", dict(type=int, default=20, help="predictions per model (median)")),
    (
      "--student",
      dict(default=None, help="an existing TF.js export to time instead of a fresh one"),
    ),
  ],
)
def bench_browser(args) -> dict:
  from aplantida_jax.export import browser_bench  # pylint: disable=g-import-not-at-top

  result = browser_bench.compare_with_keras(
    width=args.width,
    num_classes=args.num_classes,
    image_size=args.res,
    runs=args.runs,
    student_dir=args.student,
  )
  result["target"] = (
    "ratio_ours_over_keras <= 1 (no slower than Keras MobileNetV2); user limit 5 s CPU"
  )
  return result


@register(
  "browser_resize",
  "Chromium: ways to shrink 3-12 MP photos to the model input vs the eval transform (pixels, Δp)",
  [
    ("--model", dict(default="runs/demo/tfjs", help="a TF.js export folder (./run.sh makes one)")),
    ("--flowers", dict(default="../shared/data/flowers12/train", help="photos to upscale")),
    (
      "--imagenet",
      dict(default="", help="instead of --model: this ImageNet import (runs/pretrained/<arch>)"),
    ),
    ("--size", dict(type=int, default=160, help="input size of the --imagenet export")),
  ],
)
def bench_browser_resize(args) -> dict:
  from aplantida_jax.export import resize_bench  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory(prefix="browser_resize_") as folder:
    model, jax_fn = args.model, None
    if args.imagenet:
      model = resize_bench.imagenet_export(args.imagenet, os.path.join(folder, "tfjs"), args.size)
      jax_fn = resize_bench.imagenet_jax_fn(args.imagenet)
    result = resize_bench.compare(model, resize_bench.phone_photos(folder, args.flowers), jax_fn)
  result["target"] = (
    "max_abs_prob_diff <= 0.02 and top1_agreement >= 0.99 (shipped; against JAX with --imagenet)"
  )
  return result


@register(
  "browser_prior",
  "Chromium: the region prior in app.js vs as TF.js ops on the output (latency, bytes shipped)",
  [
    ("--model", dict(default="runs/demo/tfjs", help="a TF.js export folder (./run.sh makes one)")),
    ("--classes", dict(type=int, default=9000, help="classes of the synthetic output and prior")),
  ],
)
def bench_browser_prior(args) -> dict:
  from aplantida_jax.export import prior_bench  # pylint: disable=g-import-not-at-top

  return prior_bench.compare(args.model, args.classes)


# ---------------------------------------------------------------- scale

# Runs one stage as `python -m aplantida_jax.main` and writes its own and its children's
# (Grain workers, Node) peak RSS and CPU seconds to the JSON file named first.
_STAGE_RUNNER = """
import json, resource, runpy, sys, time
out = sys.argv.pop(1)
sys.argv[0] = "aplantida_jax.main"
start = time.perf_counter()
code = 0
try:
  runpy.run_module("aplantida_jax.main", run_name="__main__", alter_sys=True)
except SystemExit as e:
  code = e.code or 0
finally:
  me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  with open(out, "w") as f:
    json.dump({"code": code, "wall_s": time.perf_counter() - start,
               "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
               "peak_rss_mb": max(me.ru_maxrss, kids.ru_maxrss) / 1024}, f)
sys.exit(code)
"""

# Per stage: its config module, then lines that set it to the synthetic catalog and a small
# factorised-head network (the :demo variants otherwise).
_SCALE_STAGES = {
  "audit": ("audit", ["c.catalog.path = CATALOG", "c.audit.url_check = 'none'"]),
  "export": (
    "export",
    [
      "c.catalog.path = CATALOG",
      "c.export.image_size = 40",
      "c.export.min_size = 16",
      "c.export.min_per_class = 3",
      "c.export.records_per_shard = 4000",
    ],
  ),
  "teacher_global": (
    "teacher_global",
    [
      "c.model.name = 'mobilenet_v2'",
      "c.model.kwargs = {'width': 0.35, 'head_dim': 128, 'dropout_rate': 0.1}",
      "c.model.init_from = ''",
      "c.optimizer.frozen = ''",
      "c.input.image_size = 32",
      "c.batch_size = 64",
      "c.eval_batch_size = 256",
      "c.num_train_steps = STEPS",
      "c.eval_every_steps = STEPS",
      "c.checkpoint.every_steps = STEPS",
    ],
  ),
  "soft_labels": (
    "soft_labels",
    [
      "c.teachers.regional.dir = ''",
      "c.replay_epochs = 1",
      "c.batch_size = 256",
      "c.chunk_size = 4096",
    ],
  ),
  "evaluate": (
    "evaluate",
    [
      "c.eval.checkpoint_dir = 'teacher_global'",
      "c.eval.teacher_dir = ''",
      "c.eval.batch_size = 256",
    ],
  ),
  "export_tfjs": ("export_tfjs", ["c.export.checkpoint_dir = 'teacher_global'"]),
}


def _tiny_jpeg(index: int) -> bytes:
  """A distinct 64x48 JPEG (its own colours), so that no two images dedupe."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(index)
  pixels = Image.fromarray(rng.integers(0, 255, (3, 4, 3), dtype=np.uint8)).resize(
    (64, 48), Image.BILINEAR
  )
  buf = io.BytesIO()
  pixels.save(buf, "JPEG", quality=85)
  return buf.getvalue()


def _folder_mb(path) -> float:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total / 1e6


@register(
  "scale",
  "every stage at the user's class count: audit → export → train → soft labels → evaluate → TF.js",
  [
    ("--classes", dict(type=int, default=9000)),
    ("--per_class", dict(type=int, default=4, help="images per species (at least 3: val, test)")),
    ("--steps", dict(type=int, default=4, help="teacher train steps")),
    ("--stages", dict(default=",".join(_SCALE_STAGES), help="comma list, in pipeline order")),
    ("--keep", dict(default="", help="keep the workdir here (default: a temp dir)")),
  ],
)
def bench_scale(args) -> dict:
  if args.per_class < 3:
    raise SystemExit(
      f"--per_class={args.per_class}: the export needs 3 images per species (one each for "
      "train, val and test); smaller species are dropped."
    )
  tmp = args.keep or tempfile.mkdtemp(prefix="bench_scale_")
  served, workdir, configs = (pathlib.Path(tmp, d) for d in ("served", "workdir", "configs"))
  for folder in (served, workdir, configs):
    folder.mkdir(parents=True, exist_ok=True)
  images = args.classes * args.per_class
  catalog = pathlib.Path(tmp, "catalog.jsonl")
  countries = ("ES", "FR", "US")  # a third each: Spain, Europe, elsewhere
  stages = {}
  with _http_server(str(served)) as base:
    with open(catalog, "w") as f:
      for s in range(args.classes):
        urls = []
        for i in range(args.per_class):
          name = f"{s}/{i}.jpg"
          (served / str(s)).mkdir(exist_ok=True)
          (served / name).write_bytes(_tiny_jpeg(s * args.per_class + i))
          urls.append({"url": f"{base}/{name}", "license": "CC-BY-4.0", "author": "bench"})
        doc = {
          "scientificName": f"Plantus speciosus{s}",
          "family": f"Family{s % 50}",
          "regions": [countries[s % 3]],
          "images": urls,
        }
        f.write(json.dumps(doc) + "\n")
    for stage in _comma_list(args.stages):
      module, lines = _SCALE_STAGES[stage]
      body = "\n".join(f"  {line}" for line in lines)
      config = configs / f"{stage}.py"
      config.write_text(
        f"from configs import {module} as base\nCATALOG = {str(catalog)!r}\n"
        f"STEPS = {args.steps}\n\n\ndef get_config(arg=None):\n"
        f"  c = base.get_config('demo')\n{body}\n  return c\n"
      )
      before = _folder_mb(workdir)
      usage = pathlib.Path(tmp, f"{stage}.usage.json")
      with open(pathlib.Path(tmp, f"{stage}.log"), "w") as log:
        proc = subprocess.run(
          [
            sys.executable,
            "-c",
            _STAGE_RUNNER,
            str(usage),
            f"--config={config}",
            f"--workdir={workdir}",
          ],
          cwd=pathlib.Path(__file__).resolve().parents[1],
          env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(configs.parent)},
          stdout=log,
          stderr=subprocess.STDOUT,
          check=False,
        )
      result = json.loads(usage.read_text())
      result["output_mb"] = _folder_mb(workdir) - before
      stages[stage] = {k: result[k] for k in ("wall_s", "cpu_s", "peak_rss_mb", "output_mb")}
      if proc.returncode:
        log_tail = pathlib.Path(tmp, f"{stage}.log").read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"bench scale: stage {stage} failed:\n" + "\n".join(log_tail))
  manifest = json.loads((workdir / "dataset" / "manifest.json").read_text())
  tfjs = workdir / "tfjs"
  result = dict(
    classes=args.classes,
    per_class=args.per_class,
    images=images,
    exported=manifest.get("counts"),
    stages=stages,
    # The graph model the browser downloads: model.json + its weight shards.
    tfjs_fp16_mb=(
      sum(p.stat().st_size for p in [tfjs / "model.json", *tfjs.glob("group*.bin")]) / 1e6
      if (tfjs / "model.json").exists()
      else None
    ),
    workdir=str(workdir) if args.keep else None,
  )
  if not args.keep:
    shutil.rmtree(tmp, ignore_errors=True)
  return result


def main(argv=None) -> dict:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument(
    "--out", default=None, help="JSON output file (default bench_results/<mode>.json)"
  )
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="mode", required=True)
  for name, (_, help_text, arguments) in MODES.items():
    p = sub.add_parser(name, help=help_text, parents=[common])
    for flag, kwargs in arguments:
      p.add_argument(flag, **kwargs)
  args = parser.parse_args(argv)
  fn = MODES[args.mode][0]
  result = dict(mode=args.mode, machine=machine_info(), **fn(args))
  out = pathlib.Path(args.out or pathlib.Path("bench_results") / f"{args.mode}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
