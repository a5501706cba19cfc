"""Built-in demo catalog: procedurally drawn plants, a JSONL catalog, a local HTTP server.

The demo must exercise the real pipeline on 2 CPU cores without any download:
images are drawn with Pillow, listed in a catalog of the same document shape as
the Mongo `Plant` collection (DESIGN.md), and served from 127.0.0.1 so export
goes through the real HTTP path.

Species are fictional (synthetic drawings must not pose as real plants). Each
one is a fixed combination of petal count, petal and leaf shape, colours and a
petal pattern; several pairs differ in one trait only, and every image varies
background, position, scale, rotation, colour, blur and noise, so the classes
are learnable but not separable by colour alone. Regions: a third of the
species live only in Spain, a third in Europe, a third elsewhere. Licenses are
mixed, with NC, ND, all-rights-reserved and missing ones the filter must reject,
plus one empty document, one image without URL and one duplicated URL.

Everything flows from `seed`: the same seed gives byte-identical files.
"""

import contextlib
import dataclasses
import functools
import http.server
import io
import json
import math
import os
import threading

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageEnhance
from PIL import ImageFilter

from aplantida_jax import fileio


@dataclasses.dataclass(frozen=True)
class Species:
  name: str
  family: str
  common: tuple  # (es, en)
  regions: tuple
  petals: int
  petal_shape: str  # round | pointed | thin | wide
  petal_rgb: tuple
  centre_rgb: tuple
  leaf_shape: str  # lance | round | needle | lobed
  pattern: str = "plain"  # plain | stripes | spots | ring
  accent_rgb: tuple = (40, 20, 60)


_ES = ("ES",)
# Interleaved Spain / Europe / elsewhere, so the first N species cover all three.
SPECIES = (
  Species(
    "Pictaflora hispanica",
    "Lamiaceae",
    ("pictaflor española", "Spanish paintflower"),
    _ES,
    5,
    "round",
    (150, 70, 190),
    (240, 210, 40),
    "lance",
  ),
  Species(
    "Pictaflora europaea",
    "Lamiaceae",
    ("pictaflor europea", "European paintflower"),
    ("ES", "PT", "FR", "IT"),
    6,
    "pointed",
    (240, 210, 40),
    (230, 120, 20),
    "lance",
  ),
  Species(
    "Artificaster americanus",
    "Asteraceae",
    ("áster artificial", "artificial aster"),
    ("US", "CA", "MX"),
    12,
    "thin",
    (170, 130, 220),
    (240, 200, 40),
    "needle",
  ),
  Species(
    "Pictaflora baetica",
    "Lamiaceae",
    ("pictaflor bética", "Baetic paintflower"),
    _ES,
    5,
    "round",
    (150, 70, 190),
    (250, 250, 245),
    "lance",
    "stripes",
  ),
  Species(
    "Fictiranunculus alpinus",
    "Ranunculaceae",
    ("botón fingido", "alpine mock-buttercup"),
    ("FR", "IT", "CH", "AT", "DE"),
    5,
    "round",
    (245, 220, 30),
    (120, 170, 40),
    "lobed",
  ),
  Species(
    "Artificamellia japonica",
    "Theaceae",
    ("camelia fingida", "mock camellia"),
    ("JP", "CN", "KR"),
    6,
    "round",
    (200, 30, 50),
    (245, 215, 60),
    "round",
  ),
  Species(
    "Fictilavandula iberica",
    "Lamiaceae",
    ("cantueso fingido", "Iberian mock-lavender"),
    _ES,
    8,
    "thin",
    (185, 150, 230),
    (110, 60, 150),
    "needle",
    "spots",
  ),
  Species(
    "Fictiviola tricolor",
    "Violaceae",
    ("violeta fingida", "mock pansy"),
    ("ES", "FR", "GB", "DE", "NL"),
    4,
    "round",
    (70, 80, 200),
    (250, 220, 40),
    "round",
    "ring",
    (250, 240, 120),
  ),
  Species(
    "Fictiprotea capensis",
    "Proteaceae",
    ("protea fingida", "mock protea"),
    ("ZA",),
    8,
    "pointed",
    (230, 120, 160),
    (110, 40, 60),
    "needle",
    "spots",
  ),
  Species(
    "Simulacistus ibericus",
    "Cistaceae",
    ("jara fingida", "Iberian mock-rockrose"),
    _ES,
    5,
    "wide",
    (248, 248, 240),
    (245, 200, 30),
    "round",
  ),
  Species(
    "Simulapapaver rhoeas",
    "Papaveraceae",
    ("amapola fingida", "mock poppy"),
    ("ES", "PT", "FR", "IT", "DE", "PL", "GB"),
    4,
    "wide",
    (215, 30, 30),
    (25, 20, 25),
    "lobed",
  ),
  Species(
    "Demoacacia australis",
    "Fabaceae",
    ("acacia fingida", "mock wattle"),
    ("AU", "NZ"),
    6,
    "pointed",
    (245, 215, 30),
    (245, 215, 30),
    "needle",
    "spots",
    (200, 150, 20),
  ),
  Species(
    "Simulacistus ladanifer",
    "Cistaceae",
    ("jara pringosa fingida", "mock gum rockrose"),
    _ES,
    5,
    "wide",
    (248, 248, 240),
    (245, 200, 30),
    "round",
    "ring",
    (110, 30, 40),
  ),
  Species(
    "Simulapapaver dubium",
    "Papaveraceae",
    ("amapola pálida fingida", "mock long-headed poppy"),
    ("FR", "DE", "GB", "PL", "CZ"),
    4,
    "wide",
    (240, 120, 40),
    (25, 20, 25),
    "lobed",
  ),
  Species(
    "Simulapassiflora brasiliensis",
    "Passifloraceae",
    ("pasionaria fingida", "mock passionflower"),
    ("BR", "AR", "PY"),
    10,
    "thin",
    (245, 245, 250),
    (120, 150, 60),
    "lobed",
    "ring",
    (110, 50, 170),
  ),
  Species(
    "Artificarduus granatensis",
    "Asteraceae",
    ("cardo fingido", "Granada mock-thistle"),
    _ES,
    12,
    "thin",
    (200, 40, 150),
    (90, 30, 70),
    "lobed",
  ),
  Species(
    "Demobellis perennis",
    "Asteraceae",
    ("margarita fingida", "mock daisy"),
    ("ES", "FR", "IT", "DE", "GB", "IE", "NL", "BE"),
    12,
    "thin",
    (250, 250, 250),
    (245, 200, 30),
    "round",
  ),
  Species(
    "Artificalotus indicus",
    "Nelumbonaceae",
    ("loto fingido", "mock lotus"),
    ("IN", "LK"),
    8,
    "pointed",
    (240, 150, 190),
    (235, 210, 70),
    "round",
    "stripes",
    (200, 60, 120),
  ),
  Species(
    "Democentaurea cyanea",
    "Asteraceae",
    ("aciano fingido", "mock cornflower"),
    ("IT", "GR", "HR", "SI", "AT"),
    8,
    "pointed",
    (60, 90, 220),
    (40, 40, 120),
    "lance",
    "stripes",
  ),
  Species(
    "Demomalva sylvestris",
    "Malvaceae",
    ("malva fingida", "mock mallow"),
    ("US", "MX", "GT"),
    5,
    "wide",
    (200, 90, 180),
    (240, 230, 230),
    "round",
    "stripes",
    (90, 20, 80),
  ),
)

# (raw license string as catalogs write it, weight): ~78% commercial-safe.
LICENSES = (
  ("CC-BY-4.0", 18),
  ("CC BY 4.0", 6),
  ("https://creativecommons.org/licenses/by/4.0/", 5),
  ("CC-BY-SA-4.0", 12),
  ("CC BY-SA 3.0", 4),
  ("cc0", 6),
  ("CC0-1.0", 5),
  ("Public Domain", 3),
  ("cc-by-nc", 5),
  ("CC BY-NC-SA 4.0", 2),
  ("cc-by-nd", 3),
  ("All rights reserved", 3),
  ("", 3),
  ("unknown", 1),
)
AUTHORS = (
  "Ana García",
  "Jordi Puig",
  "Marta López",
  "Lucas Martin",
  "Sofia Rossi",
  "Jan de Vries",
  "Emma Wilson",
  "Kenji Sato",
  "Thandi Nkosi",
  "Lucía Fernández",
)
SOURCES = ("inaturalist", "wikimedia", "flickr", "aplantida")
_BACKGROUNDS = (
  (95, 140, 60),
  (120, 95, 60),
  (150, 190, 230),
  (130, 130, 125),
  (60, 80, 45),
  (190, 175, 140),
  (40, 45, 40),
)


def slug(name: str) -> str:
  return name.lower().replace(" ", "_")


def _jitter(rgb, rng, amount):
  return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _outline(shape: str, length: float, t: np.ndarray) -> np.ndarray:
  """Half-width along a petal or leaf (t = 0 at the base, 1 at the tip)."""
  s = np.sin(np.pi * t)
  return (
    length
    * {
      "round": 0.34 * s**0.8,
      "wide": 0.5 * s**0.6,
      "pointed": 0.32 * t**0.5 * (1 - t) * 2,
      "thin": 0.09 * s**0.5,
      "lance": 0.17 * s,
      "needle": 0.05 * s**0.3,
      "lobed": 0.3 * s * (0.7 + 0.3 * np.cos(6 * np.pi * t)),
    }[shape]
  )


def _blade(shape, cx, cy, angle, length, start=0.0):
  """Polygon of a petal/leaf from (cx, cy) along `angle`; `start` skips its base fraction."""
  t = np.linspace(start, 1.0, 24)
  w = _outline(shape, length, t)
  x = np.concatenate([t, t[::-1]]) * length
  y = np.concatenate([w, -w[::-1]])
  ca, sa = math.cos(angle), math.sin(angle)
  return list(zip((cx + x * ca - y * sa).tolist(), (cy + x * sa + y * ca).tolist()))


def _background(rng, size: int) -> Image.Image:
  """A blurred two-colour gradient with blobs and grass strokes: clutter, no class signal."""
  top, bottom = (
    np.array(_jitter(_BACKGROUNDS[i], rng, 25), np.float32)
    for i in rng.integers(0, len(_BACKGROUNDS), 2)
  )
  ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
  img = Image.fromarray(
    np.broadcast_to(top * (1 - ramp) + bottom * ramp, (size, size, 3)).astype(np.uint8)
  )
  draw = ImageDraw.Draw(img)
  for _ in range(rng.integers(5, 14)):
    x, y = rng.uniform(0, size, 2)
    r = rng.uniform(0.05, 0.25) * size
    draw.ellipse(
      [x - r, y - r, x + r, y + r],
      fill=_jitter(_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))], rng, 30),
    )
  img = img.filter(ImageFilter.GaussianBlur(size / 25))
  draw = ImageDraw.Draw(img)
  for _ in range(rng.integers(0, 12)):
    x = rng.uniform(0, size)
    h = rng.uniform(0.1, 0.4) * size
    draw.line(
      [x, size, x + rng.uniform(-0.1, 0.1) * size, size - h],
      fill=_jitter((70, 120, 50), rng, 30),
      width=max(1, size // 90),
    )
  return img


def draw_plant(sp: Species, rng: np.random.Generator, size: int) -> Image.Image:
  """One image of species `sp`: random background, pose, scale, colours and noise."""
  big = 2 * size  # draw at 2x and downsample: cheap anti-aliasing
  img = _background(rng, big)
  draw = ImageDraw.Draw(img)
  cx, cy = big / 2 + rng.uniform(-0.17, 0.17, 2) * big
  radius = rng.uniform(0.17, 0.3) * big
  spin = rng.uniform(0, 2 * math.pi)
  leaf_rgb = _jitter((60, 130, 50), rng, 25)
  # Stem and two leaves, roughly downwards.
  stem_angle = math.pi / 2 + rng.uniform(-0.5, 0.5)
  stem_len = radius * rng.uniform(1.6, 2.6)
  ex, ey = cx + stem_len * math.cos(stem_angle), cy + stem_len * math.sin(stem_angle)
  draw.line([cx, cy, ex, ey], fill=leaf_rgb, width=max(2, int(radius * 0.08)))
  for at, side in ((rng.uniform(0.35, 0.55), 1), (rng.uniform(0.6, 0.85), -1)):
    lx, ly = cx + (ex - cx) * at, cy + (ey - cy) * at
    angle = stem_angle + side * rng.uniform(0.6, 1.2) + math.pi
    draw.polygon(
      _blade(sp.leaf_shape, lx, ly, angle, radius * rng.uniform(0.8, 1.3)),
      fill=_jitter(leaf_rgb, rng, 12),
    )
  # Petals, their pattern, then the centre.
  petal_rgb = _jitter(sp.petal_rgb, rng, 18)
  accent_rgb = _jitter(sp.accent_rgb, rng, 15)
  for k in range(sp.petals):
    angle = spin + 2 * math.pi * k / sp.petals + rng.uniform(-0.08, 0.08)
    length = radius * rng.uniform(0.9, 1.05)
    draw.polygon(_blade(sp.petal_shape, cx, cy, angle, length), fill=_jitter(petal_rgb, rng, 8))
    if sp.pattern == "ring":
      draw.polygon(_blade(sp.petal_shape, cx, cy, angle, length * 0.45), fill=accent_rgb)
    elif sp.pattern == "stripes":
      for offset in (-0.08, 0.0, 0.08):
        a = angle + offset
        draw.line(
          [
            cx + 0.3 * length * math.cos(a),
            cy + 0.3 * length * math.sin(a),
            cx + 0.8 * length * math.cos(a),
            cy + 0.8 * length * math.sin(a),
          ],
          fill=accent_rgb,
          width=max(1, int(radius * 0.025)),
        )
    elif sp.pattern == "spots":
      for _ in range(3):
        d = rng.uniform(0.35, 0.85) * length
        px, py = cx + d * math.cos(angle), cy + d * math.sin(angle)
        s = radius * 0.04
        draw.ellipse([px - s, py - s, px + s, py + s], fill=accent_rgb)
  c = radius * rng.uniform(0.17, 0.26)
  draw.ellipse([cx - c, cy - c, cx + c, cy + c], fill=_jitter(sp.centre_rgb, rng, 15))
  # Camera: downsample, blur, exposure, sensor noise.
  img = img.resize((size, size), Image.LANCZOS)
  if rng.uniform() < 0.3:
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
  img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.2))
  img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
  pixels = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(1, 7), (size, size, 3))
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _image_entry(sp: Species, rng, url: str) -> dict:
  raw_licenses, weights = zip(*LICENSES)
  entry = {
    "url": url,
    "license": raw_licenses[rng.choice(len(raw_licenses), p=np.array(weights) / sum(weights))],
    "author": AUTHORS[rng.integers(len(AUTHORS))],
    "source": SOURCES[rng.integers(len(SOURCES))],
  }
  if rng.uniform() < 0.4:  # some photos record where they were taken
    entry["country"] = sp.regions[rng.integers(len(sp.regions))]
  return entry


def _encode_jpeg(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def make_demo_data(
  out_dir: str,
  base_url: str,
  seed: int = 0,
  num_species: int = len(SPECIES),
  images_per_species=(30, 40),
  image_size: int = 160,
  progress: bool = False,
) -> dict:
  """Writes <out_dir>/catalog.jsonl and <out_dir>/images/<species>/NNN.jpg; returns a summary.

  Image URLs are `<base_url>/images/...`: serve `out_dir` at `base_url`
  (`serve_directory`) to use the catalog.
  """
  if not 1 <= num_species <= len(SPECIES):
    raise ValueError(f"num_species must be in 1..{len(SPECIES)}, got {num_species}")
  base_url = base_url.rstrip("/")
  documents, num_images = [], 0
  species_list = SPECIES[:num_species]
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    species_list = tqdm(species_list, desc="demo species", unit="species")
  for index, sp in enumerate(species_list):
    folder = os.path.join(out_dir, "images", slug(sp.name))
    os.makedirs(folder, exist_ok=True)
    count_rng = np.random.default_rng([seed, index])
    count = int(count_rng.integers(images_per_species[0], images_per_species[1] + 1))
    images = []
    for k in range(count):
      rng = np.random.default_rng([seed, index, k])  # one stream per image: order-independent
      name = f"{k:03d}.jpg"
      buf = _encode_jpeg(draw_plant(sp, rng, image_size))
      fileio.write_bytes(os.path.join(folder, name), buf)
      images.append(_image_entry(sp, rng, f"{base_url}/images/{slug(sp.name)}/{name}"))
    num_images += count
    documents.append(
      {
        "_id": f"demo-{index:03d}",
        "scientificName": sp.name,
        "family": sp.family,
        "commonNames": {"es": sp.common[0], "en": sp.common[1]},
        "regions": list(sp.regions),
        "images": images,
      }
    )
  # Catalog warts the audit and the filters must report (not crash on).
  documents[0]["images"].append(
    {"license": "CC-BY-4.0", "author": AUTHORS[0], "source": "aplantida"}
  )
  documents[-1]["images"].append(dict(documents[-1]["images"][0]))  # duplicated URL
  documents.append(
    {"_id": "demo-empty", "scientificName": "Incertae sedis", "regions": ["ES"], "images": []}
  )
  lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents)
  fileio.write_text(os.path.join(out_dir, "catalog.jsonl"), lines)
  return {
    "catalog": os.path.join(out_dir, "catalog.jsonl"),
    "species": num_species,
    "images": num_images,
    "seed": seed,
    "base_url": base_url,
  }


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"


@contextlib.contextmanager
def serve_directory(path: str, port: int = 0, host: str = "127.0.0.1"):
  """Serves `path` over HTTP on host:port in a background thread; yields the server.

  Use port 0 for a free port and read it back as `server.server_port` (or the
  base URL as `server.url`). The server stops when the block exits.
  """
  handler = functools.partial(_QuietHandler, directory=os.fspath(path))
  try:
    server = _Server((host, port), handler)
  except OSError as e:
    raise OSError(
      f"Cannot serve {path} on {host}:{port} ({e}); is another server using the port? "
      "Set APLANTIDA_DEMO_PORT to another port."
    ) from None
  thread = threading.Thread(target=server.serve_forever, name=f"serve:{port}", daemon=True)
  thread.start()
  try:
    yield server
  finally:
    server.shutdown()
    server.server_close()
    thread.join()
