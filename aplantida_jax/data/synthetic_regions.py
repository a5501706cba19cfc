"""Made-up regions for a folder catalog that records none (flowers12): a credits sidecar CSV.

Each species gets a range drawn with `seed` (Spain only, Europe, or outside Europe, in turn
after a shuffle) and each image a country drawn from its species' range. The regions are
synthetic: they exist to measure what a location prior does, not where these plants grow.
The CSV (path,country) is `catalog.sidecar_csv` for `catalog.kind=folder`.
"""

import csv
import io
import os

import numpy as np

from aplantida_jax import fileio
from aplantida_jax.data.sources import IMAGE_EXTENSIONS

RANGES = {
  "spain_only": ("ES",),
  "europe": ("ES", "PT", "FR", "IT", "DE"),
  "elsewhere": ("US", "MX", "JP", "AU"),
}


def write_sidecar(folder: str, path: str, seed: int) -> dict:
  """Writes `path` (atomically) for the species subfolders of `folder`; {species: range name}."""
  rng = np.random.default_rng(seed)
  species = (
    sorted(e.name for e in os.scandir(folder) if e.is_dir()) if os.path.isdir(folder) else []
  )
  if not species:
    raise FileNotFoundError(f"{folder!r} holds no species subfolders (one folder of images each).")
  kinds = [list(RANGES)[i % len(RANGES)] for i in range(len(species))]
  rng.shuffle(kinds)
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["path", "country"])
  for name, kind in zip(species, kinds):
    countries = RANGES[kind]
    for image in sorted(os.listdir(os.path.join(folder, name))):
      if image.lower().endswith(IMAGE_EXTENSIONS):
        writer.writerow([f"{name}/{image}", countries[rng.integers(len(countries))]])
  fileio.write_text(path, out.getvalue())
  return dict(zip(species, kinds))
