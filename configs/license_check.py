r"""License check: may this run's dataset, weights and TF.js export ship?

  python -m aplantida_jax.main --config=configs/license_check.py --workdir=runs/demo

Variants (`configs/license_check.py:demo`):
  demo   the same checks (accepted so ./run.sh can pass :demo to every stage)
Reads dataset/, the training stages' config.json, soft_labels/meta.json and tfjs/;
writes <workdir>/license_report.json and exits non-zero listing every violation
with its fix. The same check as a shell tool: python tools/license_checker.py --workdir=runs/demo
"""

import ml_collections

from configs import common


def get_config(arg=None):
  common.demo_only(arg, "configs/license_check.py")  # :demo changes nothing here
  config = ml_collections.ConfigDict()
  config.stage = "license_check"
  config.seed = 0  # nothing random; kept so every stage records one
  config.licenses = common.licenses_config()  # policy the records must pass (must be shippable)
  return config
