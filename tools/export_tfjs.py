r"""Export a trained student to a TF.js folder a PWA can ship.

  python tools/export_tfjs.py --workdir runs/demo
  python tools/export_tfjs.py --workdir runs/demo --checkpoint runs/demo/teacher_global --out /tmp/tfjs

The same as the export_tfjs stage (configs/export_tfjs.py), whose fields can be
overridden here too (--config.export.max_mb=50). Prints the stage summary as JSON.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Pipeline root: reads student/, eval/, dataset/ from it.")
flags.DEFINE_string("checkpoint", None, "Stage folder to export instead of <workdir>/student.")
flags.DEFINE_string("out", None, "Output folder (default <workdir>/tfjs).")
config_flags.DEFINE_config_file(
  "config",
  os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "export_tfjs.py"
  ),
  "Export config.",
  lock_config=True,
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.experimental.set_visible_devices([], "GPU")  # leave accelerators to JAX
  from aplantida_jax.export import stage  # pylint: disable=g-import-not-at-top

  summary = stage.export_workdir(
    FLAGS.config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, out_dir=FLAGS.out
  )
  print(json.dumps(summary, default=str))


if __name__ == "__main__":
  app.run(main)
