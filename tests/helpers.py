"""Small helpers shared by tests: run the CLI the way users do."""

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
FLOWERS = os.path.join(SHARED, "data", "flowers12", "train")
FAST_COMPILE = "--xla_backend_optimization_level=0"  # every test process (tests/conftest.py)


def cli_env(**extra):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  env.update(extra)
  return env


def _main_cmd(config, workdir, overrides):
  return [
    sys.executable,
    "-m",
    "aplantida_jax.main",
    f"--config={config}",
    f"--workdir={workdir}",
    *overrides,
  ]


def run_main(config, workdir, *overrides, timeout=600, **env):
  """`python -m aplantida_jax.main --config=... --workdir=... overrides` → CompletedProcess."""
  return subprocess.run(
    _main_cmd(config, workdir, overrides),
    cwd=ROOT,
    env=cli_env(**env),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def start_main(config, workdir, *overrides, **env) -> subprocess.Popen:
  """The run_main command in the background, its output discarded: a run to be killed."""
  return subprocess.Popen(
    _main_cmd(config, workdir, overrides),
    cwd=ROOT,
    env=cli_env(**env),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )


def kill_when(proc, ready, timeout=600, poll_s=0.02) -> bool:
  """SIGKILLs `proc` as soon as `ready()` holds (or it ends, or `timeout` passes).

  Returns whether it was still running when killed: False means it finished first.
  """
  deadline = time.time() + timeout
  while not ready() and proc.poll() is None and time.time() < deadline:
    time.sleep(poll_s)
  running = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return running


# A slim EfficientNet-Lite0 from scratch: what the tests train instead of the :demo variants'
# ImageNet-initialised full Lite0 (same code path, a fraction of the compile time).
SLIM_LITE0 = {
  "width_coefficient": 0.25,
  "depth_coefficient": 0.1,
  "dropout_rate": 0.1,
  "bn_momentum": 0.9,
}


def model_overrides(name="efficientnet_lite0", kwargs=None):
  """`--config.model...` flags: `name` with exactly `kwargs`, from scratch, nothing frozen."""
  kwargs = SLIM_LITE0 if kwargs is None else kwargs
  return [
    f"--config.model.name={name}",
    f"--config.model.kwargs={json.dumps(kwargs)}",
    "--config.model.init_from=",
    "--config.optimizer.frozen=",
  ]


def use_model(config, name="efficientnet_lite0", kwargs=None):
  """The same as model_overrides, on a config object."""
  config.model.name = name
  config.model.kwargs = dict(SLIM_LITE0 if kwargs is None else kwargs)
  config.model.init_from = ""
  config.optimizer.frozen = ""
  return config
