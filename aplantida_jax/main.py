"""Thin entry point: `python -m aplantida_jax.main --config=configs/X.py --workdir=DIR`.

Intentionally short (as Flax's examples/imagenet/main.py): it parses flags,
hides GPUs from TensorFlow (in the stages that import it) so TF never takes memory JAX
needs, prints a StageError as one line, and hands the
config to the stage named by `config.stage`.
"""

import json
import logging as pylogging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from aplantida_jax import errors
from aplantida_jax import stages

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "workdir", None, "Root folder of one pipeline run; each stage writes its own subfolder."
)
config_flags.DEFINE_config_file(
  "config", None, "Stage config file (configs/<stage>.py[:variant]).", lock_config=True
)
flags.mark_flags_as_required(["config", "workdir"])


def _hide_gpus_from_tensorflow():
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  tf.config.experimental.set_visible_devices([], "GPU")


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of orbax/grain (a dozen lines per checkpoint); warnings pass."""

  def filter(self, record):
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
    return record.levelno >= pylogging.WARNING or not noisy


def parse_flags(argv):
  """absl flag parsing, with a one-line error for a mistyped `--config.x.y` override."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    reason = " ".join(str(e).replace("\\'", "'").replace("\\n", " ").split())
    sys.exit(
      f"error: bad config override among {overrides or argv[1:]}: {reason}. "
      "Override only fields that exist in the config file (see its get_config()), "
      "with values of the field's type."
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  pylogging.getLogger("absl").setLevel(pylogging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
  try:
    run = stages.get_stage(config.stage)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if stages.kind(config).tensorflow or config.get("tensorboard"):  # TensorBoard's writer too
    _hide_gpus_from_tensorflow()
  try:
    summary = run(config, FLAGS.workdir)
  except errors.StageError as e:
    sys.exit(f"error: {config.stage}: {e}")
  logging.info("stage %s done: %s", config.stage, json.dumps(summary, default=str))
  print(json.dumps({"stage": config.stage, **(summary or {})}, default=str))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
