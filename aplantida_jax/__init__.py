"""aplantida_jax: catalog → shards → teachers → distilled student → TF.js, in JAX/Flax."""

import importlib.metadata
import os
import re

_CLASSIC_CPU_RUNTIME = "--xla_cpu_use_thunk_runtime=false"


def cpu_runtime_flag_supported() -> bool:
  """jaxlib ≤ 0.6: XLA:CPU has both runtimes and the flag that picks one."""
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return False
  return tuple(int(p) for p in version.split(".")[:2]) <= (0, 6)


def _prefer_classic_cpu_runtime():
  """Selects XLA:CPU's classic runtime on jaxlib ≤ 0.6 for single-device CPU runs.

  jaxlib 0.6's default "thunk" runtime runs these convnets several times slower on
  CPU (EfficientNet-Lite0 inference 10x, a train step 1.35x; BUILD.md). Newer jaxlib
  dropped the flag, and XLA aborts on unknown flags, so it is set only for the
  versions that have it, never over a choice already in XLA_FLAGS, and not with
  several forced host devices: the classic runtime cannot run collectives. It must
  be set before jax starts its CPU backend, hence here, at the package's first import.
  """
  if not cpu_runtime_flag_supported():
    return
  flags = os.environ.get("XLA_FLAGS", "")
  devices = re.search(r"xla_force_host_platform_device_count=(\d+)", flags)
  if "xla_cpu_use_thunk_runtime" in flags or (devices and int(devices.group(1)) > 1):
    return
  os.environ["XLA_FLAGS"] = f"{flags} {_CLASSIC_CPU_RUNTIME}".strip()


def allow_cpu_collectives():
  """Drops the classic-runtime flag before a multi-process run starts its backend.

  XLA aborts with "Legacy XLA:CPU runtime does not support collective execution"
  otherwise (jax.distributed on CPU, gloo collectives).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _CLASSIC_CPU_RUNTIME in flags:
    os.environ["XLA_FLAGS"] = flags.replace(_CLASSIC_CPU_RUNTIME, "").strip()


_prefer_classic_cpu_runtime()
