"""A static server for the PWA demo: web/ at /, TF.js at /vendor/, an export at /model/.

TF.js comes from the project's own node_modules (no CDN, so the page and the
service worker work offline). Cross-origin isolation headers (COOP/COEP) are
on by default: they unlock SharedArrayBuffer, which the wasm backend needs for
threads; `isolate=False` serves without them to compare.
"""

import functools
import http.server
import os
import posixpath
import threading
import urllib.parse

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WEB_DIR = os.path.join(REPO_ROOT, "web")
VENDOR_DIR = os.path.join(REPO_ROOT, "node_modules", "@tensorflow")
ISOLATION_HEADERS = {
  "Cross-Origin-Opener-Policy": "same-origin",
  "Cross-Origin-Embedder-Policy": "require-corp",
  "Cross-Origin-Resource-Policy": "same-origin",
}


class Handler(http.server.SimpleHTTPRequestHandler):
  """Maps URL prefixes to folders; no listing, no path escapes."""

  extensions_map = {
    **http.server.SimpleHTTPRequestHandler.extensions_map,
    ".wasm": "application/wasm",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".webmanifest": "application/manifest+json",
    ".json": "application/json",
    ".bin": "application/octet-stream",
    ".svg": "image/svg+xml",
  }

  def __init__(self, *args, mounts, isolate, **kwargs):
    self.mounts = mounts  # [(url prefix, folder)], longest prefix first
    self.isolate = isolate
    super().__init__(*args, **kwargs)

  def translate_path(self, path):
    path = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(path).path))
    for prefix, folder in self.mounts:
      if path == prefix.rstrip("/") or path.startswith(prefix):
        parts = [p for p in path[len(prefix) :].split("/") if p not in ("", ".", "..")]
        return os.path.join(folder, *parts)
    return os.path.join(os.devnull, "missing")

  def list_directory(self, path):
    self.send_error(404, "No directory listing")
    return None

  def end_headers(self):
    self.send_header("Cache-Control", "no-cache")  # the service worker decides what is kept
    if self.isolate:
      for name, value in ISOLATION_HEADERS.items():
        self.send_header(name, value)
    super().end_headers()

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass


def make_server(
  model_dir: str,
  *,
  host="127.0.0.1",
  port=8000,
  isolate=True,
  web_dir=WEB_DIR,
  vendor_dir=VENDOR_DIR,
) -> http.server.ThreadingHTTPServer:
  """A server (not yet running); port 0 picks a free port (server.server_address[1])."""
  for name, folder in (("web", web_dir), ("TF.js", vendor_dir)):
    if not os.path.isdir(folder):
      raise FileNotFoundError(
        f"{name} folder {folder} does not exist (run ./run.sh once: it runs npm ci)"
      )
  if not os.path.exists(os.path.join(model_dir, "model.json")):
    raise FileNotFoundError(
      f"{model_dir}/model.json does not exist; export a model first "
      "(python tools/export_tfjs.py --workdir runs/demo)"
    )
  mounts = [
    ("/vendor/", os.path.abspath(vendor_dir)),
    ("/model/", os.path.abspath(model_dir)),
    ("/", os.path.abspath(web_dir)),
  ]
  handler = functools.partial(Handler, mounts=mounts, isolate=isolate)
  return http.server.ThreadingHTTPServer((host, port), handler)


def serve_in_thread(server) -> threading.Thread:
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  return thread
