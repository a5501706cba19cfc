"""Deduplication and the stratified, seeded train/val/test split.

Pure functions of their inputs: the same items, ratios and seed always give the
same split, whatever order the items arrive in (downloads finish in any order).
Each species is shuffled with its own seed derived from (seed, species), so
adding or removing one species leaves every other species' split unchanged.
Items are deduplicated by content hash first, so a duplicate can never land in
two splits and leak test images into training.
"""

import collections
import dataclasses
import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

SPLITS = ("train", "val", "test")
SMALL_CLASS_POLICIES = ("drop", "train_only")


class Item(NamedTuple):
  sha256: str  # content hash of the normalised image
  species: str
  location: str  # URL or path; breaks ties between duplicates deterministically


@dataclasses.dataclass(frozen=True)
class Dedupe:
  items: tuple  # one item per sha256, sorted by sha256
  duplicates: int  # items dropped because their content was already kept
  conflicting: int  # of those, how many carried a different species than the kept one


@dataclasses.dataclass(frozen=True)
class Split:
  splits: dict  # split name → tuple of Items, sorted by sha256
  species: tuple  # kept species, sorted: index = label
  small_species: dict  # species below min_per_class → its image count
  small_class_policy: str  # what happened to them: "drop" | "train_only"


def dedupe(items: Sequence[Item]) -> Dedupe:
  """Keeps one item per content hash: the smallest (species, location)."""
  by_hash = collections.defaultdict(list)
  for item in items:
    by_hash[item.sha256].append(item)
  kept, duplicates, conflicting = [], 0, 0
  for sha in sorted(by_hash):
    group = sorted(by_hash[sha], key=lambda i: (i.species, i.location))
    kept.append(group[0])
    duplicates += len(group) - 1
    conflicting += sum(1 for i in group[1:] if i.species != group[0].species)
  return Dedupe(tuple(kept), duplicates, conflicting)


def check_options(ratios: dict, small_class_policy: str) -> dict:
  """Validates the split options (before any download); returns the ratios as floats."""
  if small_class_policy not in SMALL_CLASS_POLICIES:
    raise ValueError(
      f"export.small_class_policy={small_class_policy!r}; use one of {SMALL_CLASS_POLICIES}."
    )
  if set(ratios) != set(SPLITS):
    raise ValueError(f"export.splits must have exactly the keys {SPLITS}, got {sorted(ratios)}.")
  values = {k: float(v) for k, v in ratios.items()}
  if min(values.values()) < 0 or abs(sum(values.values()) - 1.0) > 1e-6 or values["train"] <= 0:
    raise ValueError(f"export.splits ratios must be >= 0, train > 0, and sum to 1; got {values}.")
  return values


def _species_rng(seed: int, species: str) -> np.random.Generator:
  digest = hashlib.sha256(f"{seed}/{species}".encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _counts(n: int, ratios: dict) -> dict:
  """Images per split for a class of n >= 3: every split with a ratio > 0 gets at least one."""
  counts = {s: (max(1, round(n * ratios[s])) if ratios[s] > 0 else 0) for s in ("val", "test")}
  while n - counts["val"] - counts["test"] < 1:  # rounding up must not starve train
    counts[max(("val", "test"), key=counts.get)] -= 1
  counts["train"] = n - counts["val"] - counts["test"]
  return counts


def split(
  items: Sequence[Item], *, ratios: dict, min_per_class: int, small_class_policy: str, seed: int
) -> Split:
  """Stratified split of deduplicated `items` (unique sha256) per species.

  Species with fewer than `min_per_class` images are dropped or put wholly in
  train, per `small_class_policy`. Within a split, items are sorted by sha256.
  """
  ratios = check_options(ratios, small_class_policy)
  min_per_class = max(int(min_per_class), 3)  # below 3, val and test cannot both get one
  by_species = collections.defaultdict(list)
  for item in items:
    by_species[item.species].append(item)
  if sum(map(len, by_species.values())) != len({i.sha256 for i in items}):
    raise ValueError("split() needs items with unique sha256; call dedupe() first.")

  parts = {s: [] for s in SPLITS}
  small, kept_species = {}, []
  for species in sorted(by_species):
    group = sorted(by_species[species], key=lambda i: i.sha256)
    if len(group) < min_per_class:
      small[species] = len(group)
      if small_class_policy == "drop":
        continue
      parts["train"].extend(group)
    else:
      order = _species_rng(seed, species).permutation(len(group))
      shuffled = [group[i] for i in order]
      counts = _counts(len(group), ratios)
      start = 0
      for name in SPLITS:
        parts[name].extend(shuffled[start : start + counts[name]])
        start += counts[name]
    kept_species.append(species)
  return Split(
    {s: tuple(sorted(v, key=lambda i: i.sha256)) for s, v in parts.items()},
    tuple(kept_species),
    small,
    small_class_policy,
  )
