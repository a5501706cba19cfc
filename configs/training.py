"""Training config pieces shared by the teacher, distillation and fine-tune stages.

`training_config()` returns every field the train loop reads, with defaults
that suit a GPU run; stage configs change what differs and their `:demo`
variants shrink it to a 2-core CPU. Step counts are optimizer updates.
"""

import ml_collections

from configs import common

# Where configs/pretrained.py (tools/import_pretrained.py --out) puts each arch's ImageNet weights.
PRETRAINED_ROOT = "runs/pretrained"
PRETRAINED_DIR = PRETRAINED_ROOT + "/{model}"
# Fine-tuning on 2 CPU cores: EfficientNet-Lite0's stem and first 8 blocks stay as imported
# (XLA then skips their backward pass); the later blocks adapt to plants.
DEMO_FROZEN = "^(stem|block[0-7])/"
# Optimizer updates of the demo's global teacher and student (batch 16, ~3.6 epochs of 440).
DEMO_STEPS = 100


def model_config(name="efficientnet_lite2") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = name  # aplantida_jax.models.MODELS
  c.dtype = "float32"  # compute dtype: "bfloat16" on GPU/TPU; params stay float32
  c.init_from = ""  # folder of tools/import_pretrained.py (ImageNet weights); head replaced
  c.num_classes = 0  # 0 = len(dataset/classes.json); resolved into <stage>/config.json
  c.kwargs = ml_collections.ConfigDict()  # module fields: width, dropout_rate, head_dim, ...
  return c


def input_config(image_size=224) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.image_size = image_size
  c.crop_scale = (0.08, 1.0)  # random-resized crop: area fraction range
  c.crop_ratio = (3 / 4, 4 / 3)  # ... and aspect-ratio range
  c.color_jitter = 0.2  # brightness/contrast/saturation factor in [1-j, 1+j]; 0 = off
  c.eval_crop_fraction = 0.875  # eval: centre crop of this fraction of the short side
  c.sampling = "uniform"  # "uniform" | "class_balanced" | "region_weighted"
  c.class_balance_power = 1.0  # class_balanced: weight = count^-power (0.5 = square root)
  c.region_countries = common.regions_config().spain  # region_weighted: these countries ...
  c.region_weight = 4.0  # ... are drawn this many times more often
  c.region_filter = []  # train only on records of these countries (empty = all)
  c.worker_count = 2  # Grain worker processes (0 = decode in the main process)
  c.worker_buffer_size = 2  # batches each worker prepares ahead
  c.read_threads = 8  # ArrayRecord read threads per worker
  c.prefetch_buffer_size = 64  # records read ahead per worker
  c.device_prefetch = 2  # train batches put on device ahead of the running step
  return c


def optimizer_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "sgd"  # "sgd" (momentum, nesterov) | "adamw"
  c.learning_rate = 0.1  # peak, for batch_size 256 (scaled linearly with batch_size)
  c.scale_learning_rate = True  # peak = learning_rate * batch_size / 256
  c.momentum = 0.9  # sgd
  c.nesterov = True  # sgd
  c.b1 = 0.9  # adamw
  c.b2 = 0.999  # adamw
  c.weight_decay = 5e-5  # on kernels only (not biases, not batch norm)
  c.warmup_steps = 500
  c.end_learning_rate_factor = 0.0  # cosine ends at peak * this
  c.grad_clip_norm = 0.0  # 0 = off
  c.frozen = ""  # regex over param paths ("stem|block[0-9]/"): not trained
  c.grad_accum_steps = 1  # optax.MultiSteps: batch_size is split into this many micro-batches
  c.label_smoothing = 0.1
  c.ema_decay = 0.0  # > 0 keeps EMA params, used for eval and inference
  return c


def checkpoint_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every_steps = 1000  # also at the last step
  c.best_metric = "val_top1"  # best/ keeps the highest of this config.evals metric
  c.keep = 3  # latest checkpoints kept (for resuming); the best is kept apart
  c.async_save = True  # write in the background while training continues
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """Data parallelism over every device; jax.distributed when coordinator_address is set."""
  c = ml_collections.ConfigDict()
  c.coordinator_address = ""  # "host:port" of process 0 for multi-host runs
  c.num_processes = 1
  c.process_id = 0
  return c


def eval_config(kind, split="val", every_steps=0, **fields) -> ml_collections.ConfigDict:
  """One `config.evals` entry; every_steps 0 = config.eval_every_steps (and the last step)."""
  return ml_collections.ConfigDict(
    {"kind": kind, "split": split, "every_steps": every_steps, **fields}
  )


def training_config(*, output_dir, model_name, image_size) -> ml_collections.ConfigDict:
  """Every field the train loop reads (aplantida_jax/train/loop.py)."""
  c = ml_collections.ConfigDict()
  c.stage = "train"
  c.seed = 0
  c.output_dir = output_dir  # stage folder under the workdir
  c.dataset_dir = "dataset"  # under the workdir (export stage output)
  c.train_split = "train"
  c.init_from_stage = ""  # start from this stage folder's best checkpoint (e.g. teacher_global)
  c.regions = common.regions_config()
  # In-loop evaluators (aplantida_jax/evaluation/evaluators.py), logged as <name>_<metric>.
  c.evals = ml_collections.ConfigDict()
  c.evals.val = eval_config("classification", split="val", regions=("spain", "europe"))
  c.model = model_config(model_name)
  c.input = input_config(image_size)
  c.optimizer = optimizer_config()
  c.checkpoint = checkpoint_config()
  c.mesh = mesh_config()
  c.batch_size = 256  # global, per optimizer update (all devices, all micro-batches)
  c.eval_batch_size = 256  # global
  c.num_train_steps = 30_000
  c.log_every_steps = 50
  c.eval_every_steps = (
    2000  # every evaluator's default (evals.<name>.every_steps 0); and the last step
  )
  c.tensorboard = True  # TensorBoard events beside metrics.jsonl (imports TF)
  return c


def from_imagenet(c: ml_collections.ConfigDict, model_name: str) -> None:
  """Starts `model_name` from its imported ImageNet weights (the head is replaced)."""
  c.model.name = model_name
  c.model.init_from = PRETRAINED_DIR.format(model=model_name)


def demo_imagenet_overrides(c: ml_collections.ConfigDict, *, steps) -> None:
  """The demo's networks: EfficientNet-Lite0 from ImageNet, lower blocks frozen, 2 CPU cores."""
  demo_overrides(c, steps=steps)
  from_imagenet(c, "efficientnet_lite0")
  # bn_momentum 0.9: batch-norm statistics must move from ImageNet to the drawings in ~100 steps.
  c.model.kwargs = ml_collections.ConfigDict({"dropout_rate": 0.2, "bn_momentum": 0.9})
  c.optimizer.frozen = DEMO_FROZEN
  c.input.image_size = 96


def demo_overrides(c: ml_collections.ConfigDict, *, steps=40) -> None:
  """Shrinks a training config to ~1-2 minutes on 2 CPU cores (./run.sh)."""
  c.input.image_size = 64
  c.input.crop_scale = (0.35, 1.0)
  c.input.worker_count = 0
  c.input.read_threads = 2
  c.input.prefetch_buffer_size = 16
  c.batch_size = 16
  c.eval_batch_size = 32
  c.num_train_steps = steps
  c.log_every_steps = 5
  c.eval_every_steps = steps // 2
  c.checkpoint.every_steps = 20
  c.tensorboard = False  # metrics.jsonl only: TensorBoard's writer imports TensorFlow
  c.optimizer.learning_rate = 0.05
  c.optimizer.warmup_steps = 5
  c.optimizer.scale_learning_rate = False
