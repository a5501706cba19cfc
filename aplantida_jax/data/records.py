"""The normalised image record every catalog source yields, and the region rule.

Sources (mongo, jsonl, folder) differ only in where documents come from; from
here on the pipeline sees `ImageRecord`s and nothing source-specific.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  species: str  # scientific name, the class (Unicode NFC, whitespace collapsed)
  url: str | None = None  # CDN URL (mongo/jsonl) ...
  path: str | None = None  # ... or a local file (folder source)
  license: str = "unknown"  # SPDX id after normalisation (see licenses.py)
  license_raw: str = ""  # what the catalog said, for the audit report
  author: str = ""
  source: str = ""  # e.g. "inaturalist"
  country: str | None = None  # ISO 3166-1 alpha-2 of the photo, if known
  species_regions: tuple = ()  # ISO country codes where the species lives
  family: str = ""
  common_names: tuple = ()  # ((lang, name), ...), hashable
  species_raw: str = ""  # the catalog's spelling of `species` when normalising changed it

  @property
  def location(self) -> str:
    """URL or path: what identifies where the bytes come from."""
    return self.url or self.path or ""

  @property
  def regions(self) -> tuple:
    """Region of an image: its own country when present, else the species' regions."""
    return (self.country,) if self.country else tuple(self.species_regions)


def in_region(regions, countries) -> bool:
  """True when any of `regions` (country codes) is in `countries`."""
  wanted = set(countries)
  return any(r in wanted for r in regions)


def region_mask(regions, countries) -> np.ndarray:
  """[N] bool over records' region lists (None = no regions): which are in `countries`."""
  return np.array([in_region(r or (), countries) for r in regions], dtype=bool)
