"""The model input contract: uint8 RGB → float32 normalised with ImageNet mean/std.

Every model takes `(x/255 − mean)/std`. The train and eval steps apply it on device,
the exported graph bakes it in, the bundle records it and the weight importers fold
their sources' own scaling into it: all read the constants here.
"""

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The same on the 0-255 scale of the uint8 images the loaders hand out.
MEAN_255 = np.asarray(IMAGENET_MEAN, np.float32) * 255
STD_255 = np.asarray(IMAGENET_STD, np.float32) * 255


def normalize(images):
  """uint8 (or float 0-255) RGB [..., 3] → float32 model input; numpy or jax arrays."""
  return (images.astype(np.float32) - MEAN_255) / STD_255
