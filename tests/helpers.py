"""Small helpers shared by tests: run the CLI the way users do."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
FLOWERS = os.path.join(SHARED, "data", "flowers12", "train")
FAST_COMPILE = "--xla_backend_optimization_level=0"  # every test process (tests/conftest.py)


def cli_env(**extra):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  env.update(extra)
  return env


def run_main(config, workdir, *overrides, timeout=600, **env):
  """`python -m aplantida_jax.main --config=... --workdir=... overrides` → CompletedProcess."""
  cmd = [sys.executable, "-m", "aplantida_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)
