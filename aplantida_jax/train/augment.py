"""Train augmentation, split where each half is cheapest: crop on the host, colour on device.

A view is a pure function of (seed, epoch, position):
  host (Grain workers)  `Augment.box` draws the Inception-style crop box (numpy rng); `crop`
                        decodes the JPEG with OpenCV and resizes the box to the train size,
                        uint8 (what crosses process and PCIe boundaries);
  device (the jit step) `Augment.flip_jitter` draws the flip and the brightness, contrast and
                        saturation factors (jax rng) and applies them in float32.
The train loader, the train step and the soft-label replay all call these, so a replayed
view is the student's view at any resolution (the box is in source pixels) and for any
worker count.

`VERSION` names this recipe in the soft labels' fingerprint and replay record: targets
precomputed for another recipe's crops are refused instead of misaligned.
"""

import dataclasses
import math

import cv2
import jax
import jax.numpy as jnp
import numpy as np

VERSION = "opencv-bilinear-crop+device-flip-jitter"
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# Workers are the parallelism; OpenCV's own thread pool per worker would oversubscribe.
cv2.setNumThreads(1)


def decode_rgb(jpeg: bytes) -> np.ndarray:
  """JPEG bytes → uint8 [H, W, 3] RGB as stored (no EXIF rotation: shards are upright)."""
  pixels = cv2.imdecode(
    np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
  )
  if pixels is None:
    raise ValueError(f"cannot decode a {len(jpeg)}-byte record JPEG")
  return pixels


def resize_box(pixels: np.ndarray, box, size: int) -> np.ndarray:
  """uint8 [H, W, 3] → its `box` (left, top, width, height) resized to [size, size, 3]."""
  left, top, w, h = box
  return cv2.resize(
    pixels[top : top + h, left : left + w], (size, size), interpolation=cv2.INTER_LINEAR
  )


@dataclasses.dataclass(frozen=True)
class Augment:
  """Random-resized crop (host) + horizontal flip and colour jitter (device).

  Frozen and hashable: it is a static argument of the jit steps that apply its device half.
  """

  crop_scale: tuple = (0.08, 1.0)
  crop_ratio: tuple = (3 / 4, 4 / 3)
  color_jitter: float = 0.2
  seed: int = 0

  @classmethod
  def of(cls, crops, seed):
    """From a config with crop_scale, crop_ratio and color_jitter (config.input)."""
    return cls(
      tuple(crops.crop_scale), tuple(crops.crop_ratio), float(crops.color_jitter), int(seed)
    )

  def box(self, epoch, position, width, height) -> tuple:
    """(left, top, width, height) in source pixels: area fraction and aspect ratio drawn."""
    rng = np.random.default_rng((self.seed, int(epoch), int(position)))
    log_ratio = np.log(self.crop_ratio)
    for _ in range(10):
      target = width * height * rng.uniform(*self.crop_scale)
      ratio = np.exp(rng.uniform(*log_ratio))
      w = round(math.sqrt(target * ratio))
      h = round(math.sqrt(target / ratio))
      if 0 < w <= width and 0 < h <= height:
        return (int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h)
    side = min(width, height)  # fallback: centre square
    return ((width - side) // 2, (height - side) // 2, side, side)

  def crop(self, jpeg: bytes, epoch, position, size) -> np.ndarray:
    """The host half of the view of (epoch, position): uint8 [size, size, 3], not flipped.

    Bilinear without antialiasing, as big_vision's inception_crop: a train crop shrinks
    by at most source/size (320/224 at the defaults), and OpenCV's resize costs a seventh
    of Pillow's antialiased one (BUILD.md, "Input pipeline").
    """
    pixels = decode_rgb(jpeg)
    height, width = pixels.shape[:2]
    return resize_box(pixels, self.box(epoch, position, width, height), size)

  def draws(self, epoch, position):
    """(flip [B] bool, factors [B, 3] float32: brightness, contrast, saturation) of each
    example's jax rng (seed, epoch, position); factors are 1 without jitter."""

    def one(e, p):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), e), p)
      flip_key, jitter_key = jax.random.split(key)
      factors = jax.random.uniform(
        jitter_key, (3,), minval=1 - self.color_jitter, maxval=1 + self.color_jitter
      )
      return jax.random.bernoulli(flip_key), factors

    return jax.vmap(one)(jnp.asarray(epoch, jnp.int32), jnp.asarray(position, jnp.int32))

  def flip_jitter(self, images, epoch, position):
    """The device half: uint8 [B, H, W, 3] crops → float32 0..255, flipped and jittered.

    Brightness b scales; contrast c scales around the image mean m; saturation s scales
    around the per-pixel grey g (ITU-R 601 luma). The three compose to one affine map,
    b·c·(s·x + (1 − s)·g) + (1 − c)·b·m, computed in one pass. Traceable: call it in jit.
    """
    flip, factors = self.draws(epoch, position)
    x = images.astype(jnp.float32)
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
    if self.color_jitter:
      brightness, contrast, saturation = (factors[:, i, None, None, None] for i in range(3))
      mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
      gray = sum(w * x[..., c : c + 1] for c, w in enumerate(GRAY_WEIGHTS))
      scale = brightness * contrast
      x = scale * (saturation * x + (1 - saturation) * gray) + (1 - contrast) * brightness * mean
    return jnp.clip(x, 0.0, 255.0)
