"""A real HTTP server on 127.0.0.1 that plays a misbehaving image CDN.

Each path has a script: a list of responses given in order, the last one
repeating, so "500 then 200" or "429 with Retry-After, then 200" are one route.
Requests are logged (method, path, time) so tests can check retries and waits.
"""

import dataclasses
import functools
import http.server
import io
import struct
import sys
import threading
import time
import zlib

from PIL import Image


@dataclasses.dataclass
class Response:
  status: int = 200
  body: bytes = b""
  headers: dict = dataclasses.field(default_factory=dict)
  delay_s: float = 0.0  # sleep before answering (slower than the client's timeout)


class _QuietServer(http.server.ThreadingHTTPServer):
  """Clients that hang up (timeouts, cut bodies) are part of the script, not server errors."""

  def handle_error(self, request, client_address):
    if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
      super().handle_error(request, client_address)


class CdnServer:
  """ThreadingHTTPServer with scripted routes; use as a context manager."""

  def __init__(self):
    self._routes = {}
    self._lock = threading.Lock()
    self.requests = []  # (method, path, monotonic time)
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def _answer(self, send_body):
        response = server._next_response(self.command, self.path)
        if response.delay_s:
          time.sleep(response.delay_s)
        self.send_response(response.status)
        headers = {"Content-Length": str(len(response.body)), **response.headers}
        for name, value in headers.items():
          self.send_header(name, value)
        self.end_headers()
        if send_body:
          try:
            self.wfile.write(response.body)
          except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

      def do_GET(self):  # pylint: disable=invalid-name
        self._answer(send_body=True)

      def do_HEAD(self):  # pylint: disable=invalid-name
        self._answer(send_body=False)

      def log_message(self, *args):
        pass

    self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
    self._httpd.daemon_threads = True
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._httpd.shutdown()
    self._httpd.server_close()

  def url(self, path: str) -> str:
    return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

  def route(self, path: str, *responses: Response, head: Response = None) -> str:
    """Scripts `path`; `head` (optional) answers HEAD requests instead. Returns the URL."""
    with self._lock:
      self._routes[("GET", path)] = list(responses)
      self._routes[("HEAD", path)] = [head] if head else list(responses)
    return self.url(path)

  def count(self, path: str, method: str = "GET") -> int:
    with self._lock:
      return sum(1 for m, p, _ in self.requests if p == path and m == method)

  def times(self, path: str, method: str = "GET") -> list:
    with self._lock:
      return [t for m, p, t in self.requests if p == path and m == method]

  def _next_response(self, method, path) -> Response:
    with self._lock:
      self.requests.append((method, path, time.monotonic()))
      script = self._routes.get((method, path))
      if not script:
        return Response(404, b"not found", {"Content-Type": "text/plain"})
      return script.pop(0) if len(script) > 1 else script[0]


def jpeg_bytes(width=120, height=90, color=(30, 140, 60), quality=90) -> bytes:
  """A small real JPEG with a gradient so resizing has something to do."""
  img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
  img = Image.blend(img, Image.new("RGB", (width, height), color), 0.5)
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=quality)
  return buf.getvalue()


@functools.cache
def huge_png(width=20000, height=20000) -> bytes:
  """A valid 1-bit PNG with huge dimensions in ~60 KB (rows of zeros compress to nothing)."""

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
  compressor = zlib.compressobj(9)
  idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
  ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image(body: bytes, content_type="image/jpeg", **headers) -> Response:
  return Response(200, body, {"Content-Type": content_type, **headers})


def install_faults(server: CdnServer, slow_s: float) -> dict:
  """The standard fault routes → {name: url}. `slow_s` must exceed the client timeout."""
  good = jpeg_bytes()
  return {
    "ok": server.route("/ok.jpg", image(good)),
    "not_found": server.route("/missing.jpg", Response(404, b"gone")),
    "flaky": server.route("/flaky.jpg", Response(500, b"oops"), image(good)),
    "rate_limited": server.route(
      "/limited.jpg", Response(429, b"slow down", {"Retry-After": "1"}), image(good)
    ),
    "slow": server.route(
      "/slow.jpg", Response(200, good, {"Content-Type": "image/jpeg"}, delay_s=slow_s)
    ),
    "truncated": server.route("/truncated.jpg", image(good[: len(good) // 2])),
    "html": server.route("/html.jpg", image(b"<html><body>Not found</body></html>")),
    "huge": server.route("/huge.png", image(huge_png(), "image/png")),
    "redirect": server.route("/old/ok.jpg", Response(302, b"", {"Location": "/ok.jpg"})),
    "noai": server.route("/noai.jpg", image(good, **{"X-Robots-Tag": "noai"})),
    "no_head": server.route("/nohead.jpg", image(good), head=Response(405, b"")),
  }
