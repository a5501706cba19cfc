"""Stage "import_pretrained": ImageNet weights for each arch in config.archs, once.

Writes `<config.out_dir>/<arch>/` through `pretrained.import_weights`; an arch
whose provenance.json already records the installed package's weight sha256
is left as it is, so a rerun costs nothing and never rewrites weights a
finished stage was trained from.
"""

import os

from absl import logging

from aplantida_jax import fileio
from aplantida_jax.models import pretrained


def _up_to_date(out_dir: str, arch: str) -> bool:
  provenance = fileio.read_json(os.path.join(out_dir, pretrained.PROVENANCE_FILE))
  if provenance is None or not os.path.isdir(os.path.join(out_dir, pretrained.CHECKPOINT_SUBDIR)):
    return False
  path, _, _ = pretrained.weight_file(arch)
  return provenance.get("weight_sha256") == fileio.sha256_file(path)


def run(config, workdir: str) -> dict:
  del workdir  # the imports are shared by every workdir (config.out_dir)
  done = []
  for arch in config.archs:
    out_dir = os.path.join(config.out_dir, arch)
    if _up_to_date(out_dir, arch):
      logging.info("import_pretrained: %s is up to date in %s", arch, out_dir)
      done.append(f"{arch} (kept)")
      continue
    provenance = pretrained.import_weights(arch, out_dir)
    logging.info(
      "import_pretrained: %s → %s from %s %s",
      arch,
      out_dir,
      provenance["source_package"],
      provenance["source_version"],
    )
    done.append(arch)
  return {
    "metric": f"ImageNet weights: {', '.join(done)} in {config.out_dir}/",
    "out_dir": os.path.abspath(config.out_dir),
  }
