r"""Serve the PWA demo with an export on 127.0.0.1 (what `./run.sh serve` runs).

  python tools/serve_pwa.py [--workdir runs/demo] [--model DIR] [--port 8000] [--no-isolate]

Open the printed URL, pick a photo. --no-isolate drops the COOP/COEP headers
(the wasm backend then runs single-threaded).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aplantida_jax.export import pwa_server  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/demo", help="pipeline root; serves <workdir>/tfjs")
  parser.add_argument(
    "--model", default=None, help="export folder to serve (default <workdir>/tfjs)"
  )
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument(
    "--no-isolate",
    dest="isolate",
    action="store_false",
    help="serve without COOP/COEP (no wasm threads)",
  )
  args = parser.parse_args()
  model_dir = args.model or os.path.join(args.workdir, "tfjs")
  try:
    server = pwa_server.make_server(model_dir, host=args.host, port=args.port, isolate=args.isolate)
  except FileNotFoundError as e:
    sys.exit(f"serve_pwa: {e}")
  host, port = server.server_address[:2]
  print(
    f"Serving the PWA on http://{host}:{port}/ (model {os.path.abspath(model_dir)}, "
    f"cross-origin isolation {'on' if args.isolate else 'off'}); Ctrl-C stops.",
    flush=True,
  )
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass


if __name__ == "__main__":
  main()
