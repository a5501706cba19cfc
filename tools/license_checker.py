"""Checks a pipeline run's licenses; exit code 0 when it may ship, 1 when not.

  python tools/license_checker.py --workdir runs/demo [--policy commercial]

Prints a table (one row per check) and every violation with its fix, and writes
<workdir>/license_report.json. The checks: aplantida_jax/repro/license_check.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aplantida_jax.data import licenses  # pylint: disable=g-import-not-at-top,wrong-import-position
from aplantida_jax.repro import license_check  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--workdir", required=True, help="root folder of one pipeline run")
  parser.add_argument(
    "--policy",
    default=license_check.DEFAULT_POLICY,
    choices=sorted(licenses.POLICIES),
    help="image license policy the shard records must pass (default %(default)s)",
  )
  args = parser.parse_args(argv)
  if not os.path.isdir(args.workdir):
    parser.error(f"--workdir {args.workdir} does not exist")
  report = license_check.check(args.workdir, args.policy)
  path = license_check.write_report(args.workdir, report)
  print(license_check.format_report(report))
  print(f"\nreport: {path}")
  return 0 if report["passed"] else 1


if __name__ == "__main__":
  sys.exit(main())
