"""PyTorch counterparts of the project's models and train step, for tools/bench.py.

The baseline is what a PyTorch user would pick: torchvision's `mobilenet_v2`
and timm's `efficientnet_lite*` when importable (the GPU machine), else the
pure-torch networks below, built from the same stage plans as the Flax models
(`aplantida_jax.models`), so both sides compute the same architecture:
MobileNetV2 as torchvision builds it, EfficientNet-Lite as timm builds it.
The step mirrors `steps.train_step`: uint8 NHWC in, ImageNet normalisation on
the device, label-smoothed cross-entropy, SGD with Nesterov momentum and
weight decay on kernels only; on GPU with bf16 autocast, channels_last and
`torch.compile` when it works.
"""

import torch
from torch import nn

from aplantida_jax.models import blocks
from aplantida_jax.models import efficientnet_lite
from aplantida_jax.models import mobilenet_v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv_bn(in_ch, out_ch, kernel=1, stride=1, groups=1, activation=True):
  layers = [
    nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
    nn.BatchNorm2d(out_ch),
  ]
  return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if activation else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
  """expand 1x1 → depthwise kxk → linear project 1x1, skip when shapes match."""

  def __init__(self, in_ch, out_ch, expand, kernel, stride, drop_path=0.0):
    super().__init__()
    hidden = in_ch * expand
    layers = [conv_bn(in_ch, hidden)] if expand != 1 else []
    layers += [
      conv_bn(hidden, hidden, kernel, stride, groups=hidden),
      conv_bn(hidden, out_ch, activation=False),
    ]
    self.conv = nn.Sequential(*layers)
    self.skip = stride == 1 and in_ch == out_ch
    self.drop_path = drop_path

  def forward(self, x):
    y = self.conv(x)
    if not self.skip:
      return y
    if self.training and self.drop_path:  # stochastic depth, per example
      keep = torch.rand(y.shape[0], 1, 1, 1, device=y.device, dtype=y.dtype) >= self.drop_path
      y = y * keep / (1 - self.drop_path)
    return x + y


class MBConvNet(nn.Module):
  """stem 3x3/2 → inverted residual blocks (`plan`) → 1x1 top → mean pool → dropout → dense."""

  def __init__(self, stem, plan, top, num_classes, dropout, drop_path=0.0):
    super().__init__()
    layers, in_ch = [conv_bn(3, stem, 3, 2)], stem
    for index, (features, expand, kernel, stride) in enumerate(plan):
      layers.append(
        InvertedResidual(in_ch, features, expand, kernel, stride, drop_path * index / len(plan))
      )
      in_ch = features
    self.features = nn.Sequential(*layers, conv_bn(in_ch, top))
    self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(top, num_classes))

  def forward(self, x):
    return self.classifier(self.features(x).mean((2, 3)))


def pure_torch_model(name, num_classes):
  """The Flax model's architecture in plain torch (same plan, widths and rounding)."""
  if name == "mobilenet_v2":
    plan = [
      (blocks.round_filters(c, 1.0), t, 3, s if i == 0 else 1)
      for t, c, n, s in mobilenet_v2.STAGES
      for i in range(n)
    ]
    return MBConvNet(32, plan, 1280, num_classes, dropout=0.2)
  width, depth, _, dropout = efficientnet_lite.VARIANTS[name]
  return MBConvNet(
    32, efficientnet_lite.stage_plan(width, depth), 1280, num_classes, dropout, drop_path=0.2
  )


def reference_model(name, num_classes):
  """(module, source): torchvision/timm when importable, else the pure-torch twin."""
  try:
    if name == "mobilenet_v2":
      import torchvision  # pylint: disable=g-import-not-at-top

      return torchvision.models.mobilenet_v2(num_classes=num_classes), "torchvision"
    import timm  # pylint: disable=g-import-not-at-top

    return timm.create_model(name, num_classes=num_classes, drop_path_rate=0.2), "timm"
  except Exception:  # pylint: disable=broad-except  # torchvision/timm absent or broken
    return pure_torch_model(name, num_classes), "tools/torch_reference.py"


def _optimizer(model, device, batch):
  """SGD, Nesterov momentum 0.9, weight decay on kernels only (as state.create_optimizer).

  Peak learning rate 0.1 scaled by batch / 256, as configs/training.py.
  """
  params = list(model.parameters())
  groups = [
    {"params": [p for p in params if p.ndim > 1], "weight_decay": 5e-5},
    {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
  ]
  fused = device.type == "cuda"  # the fastest PyTorch SGD on GPU
  return torch.optim.SGD(groups, lr=0.1 * batch / 256, momentum=0.9, nesterov=True, fused=fused)


def train_step_fn(
  name,
  *,
  batch,
  res,
  num_classes=1000,
  bf16=False,
  compile_model=None,
  channels_last=None,
  device=None,
  seed=0,
):
  """(step, sync, info): step() runs one optimizer update on a fixed synthetic batch.

  compile_model / channels_last default to True on GPU, False on CPU. When
  torch.compile fails (at its first call), the step falls back to eager and
  info["compile"] says why.
  """
  device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
  on_gpu = device.type == "cuda"
  compile_model = on_gpu if compile_model is None else compile_model
  channels_last = on_gpu if channels_last is None else channels_last
  torch.manual_seed(seed)
  model, source = reference_model(name, num_classes)
  model = model.to(device).train()
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=memory_format)
  optimizer = _optimizer(model, device, batch)
  loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
  mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
  std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
  generator = torch.Generator().manual_seed(seed)
  images = torch.randint(0, 256, (batch, res, res, 3), dtype=torch.uint8, generator=generator).to(
    device
  )
  labels = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
  info = {
    "source": source,
    "device": str(device),
    "torch": torch.__version__,
    "precision": "bf16 autocast" if bf16 else "float32",
    "channels_last": channels_last,
    "compile": "off",
    "threads": torch.get_num_threads(),
  }
  forward = {"model": model}
  if compile_model:
    forward["model"] = torch.compile(model)
    info["compile"] = "torch.compile"

  def step():
    # NHWC uint8 seen as NCHW is already channels_last in memory.
    x = (images.permute(0, 3, 1, 2).float() - mean) / std
    x = x.contiguous(memory_format=memory_format)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      logits = forward["model"](x)
    loss = loss_fn(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  def guarded_step():
    try:
      return step()
    except Exception as e:  # pylint: disable=broad-except  # compile errors surface at call time
      if forward["model"] is model:
        raise
      info["compile"] = f"failed, eager instead: {type(e).__name__}: {str(e)[:300]}"
      forward["model"] = model
      return step()

  sync = torch.cuda.synchronize if on_gpu else (lambda: None)
  return guarded_step, sync, info


def parameter_count(module) -> int:
  return sum(p.numel() for p in module.parameters())
