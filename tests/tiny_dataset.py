"""A tiny learnable dataset in the export stage's format, written directly.

Classes are coloured shapes on noisy backgrounds, so a narrow model learns
them in a few dozen steps; regions cycle through ES/FR/DE so region filters
and region-weighted sampling have something to select.
"""

import hashlib
import io
import os

import numpy as np
from PIL import Image
from PIL import ImageDraw

from aplantida_jax import fileio
from aplantida_jax.data import shards

SHAPES = (
  ("Rosa rubra", (220, 40, 40), "ellipse"),
  ("Mentha viridis", (40, 200, 60), "rectangle"),
  ("Viola caerulea", (50, 70, 230), "triangle"),
  ("Helianthus aureus", (230, 210, 40), "cross"),
)
REGIONS = ("ES", "FR", "DE")


def _jpeg(rng, colour, shape, size):
  background = rng.integers(60, 190, size=(size, size, 3), dtype=np.uint8)
  image = Image.fromarray(background)
  draw = ImageDraw.Draw(image)
  r = int(size * rng.uniform(0.25, 0.4))
  cx, cy = rng.integers(r, size - r, size=2)
  box = (cx - r, cy - r, cx + r, cy + r)
  if shape == "ellipse":
    draw.ellipse(box, fill=colour)
  elif shape == "rectangle":
    draw.rectangle(box, fill=colour)
  elif shape == "triangle":
    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
  else:
    draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=colour)
    draw.rectangle((cx - r // 3, cy - r, cx + r // 3, cy + r), fill=colour)
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=90)
  return out.getvalue()


def write_tiny_dataset(
  dataset_dir, num_classes=3, per_class=None, size=32, seed=0, shards_per_split=2
):
  """Writes <dataset_dir>/{classes,manifest}.json and splits/{train,val}; returns counts."""
  per_class = per_class or {"train": 16, "val": 6}
  rng = np.random.default_rng(seed)
  classes = [
    {"index": i, "species": s, "common_names": {}, "regions": list(REGIONS), "family": "Testaceae"}
    for i, (s, _, _) in enumerate(SHAPES[:num_classes])
  ]
  counts = {}
  for split, n in per_class.items():
    records = []
    for k in range(n * num_classes):
      label = k % num_classes
      species, colour, shape = SHAPES[label]
      jpeg = _jpeg(rng, colour, shape, size)
      country = REGIONS[(k // num_classes) % len(REGIONS)]
      records.append(
        {
          "jpeg": jpeg,
          "label": label,
          "species": species,
          "regions": [country],
          "country": country,
          "license": "CC0-1.0",
          "author": "test",
          "url": f"https://example.invalid/{split}/{k}.jpg",
          "sha256": hashlib.sha256(jpeg).hexdigest(),
        }
      )
    shards.write_split(dataset_dir, split, records, shards_per_split)
    counts[split] = len(records)
  fileio.write_json(os.path.join(dataset_dir, "classes.json"), classes)
  fileio.write_json(
    os.path.join(dataset_dir, "manifest.json"), {"counts": counts, "num_classes": num_classes}
  )
  return counts
