"""The HTTP client against a real misbehaving server on 127.0.0.1."""

import datetime
import email.utils
import signal

import pytest

from aplantida_jax.data import fetch
from configs import common
from tests import cdn_server

SLOW_S = 1.5


def _http(**overrides):
  cfg = common.http_config()
  cfg.update(dict(timeout_s=0.5, retries=2, backoff_s=0.05, concurrency=8, per_host=4))
  cfg.update(overrides)
  return cfg


@pytest.fixture
def faults(cdn):
  return cdn_server.install_faults(cdn, slow_s=SLOW_S)


def _download(urls, http_cfg, **kw):
  return {d.key: d for d in fetch.download(list(urls.items()), http_cfg, **kw)}


def test_download_outcomes_and_reasons(cdn, faults):
  got = _download(faults, _http())
  reasons = {name: d.reason for name, d in got.items()}
  assert reasons == {
    "ok": "ok",
    "not_found": "http_404",
    "flaky": "ok",
    "rate_limited": "ok",
    "slow": "timeout",
    "truncated": "ok",
    "html": "ok",
    "huge": "ok",
    "redirect": "ok",
    "noai": "noai",
    "no_head": "ok",
  }
  # Bytes checks (truncated, HTML, huge) are imaging's job; fetch delivers what was served.
  assert got["redirect"].data == got["ok"].data and got["redirect"].status == 200
  assert got["not_found"].data is None and got["not_found"].status == 404
  assert cdn.count("/missing.jpg") == 1, "a 404 is final, not retried"
  assert cdn.count("/flaky.jpg") == 2
  assert cdn.count("/slow.jpg") == 3, "timeouts are retried http.retries times"


def test_retry_after_is_honoured(cdn, faults):
  got = _download({"x": faults["rate_limited"]}, _http(backoff_s=0.0))
  assert got["x"].ok
  first, second = cdn.times("/limited.jpg")
  assert second - first >= 0.95, "the server asked for 1 s"


@pytest.mark.parametrize(
  "retry_after",
  [
    "3600",
    email.utils.format_datetime(
      datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1), usegmt=True
    ),
  ],
  ids=["seconds", "http_date"],
)
def test_retry_after_is_capped(cdn, retry_after):
  cdn.route(
    "/limited2.jpg",
    cdn_server.Response(429, b"", {"Retry-After": retry_after}),
    cdn_server.image(cdn_server.jpeg_bytes()),
  )

  def too_slow(*_):
    raise TimeoutError("the download waited as the server asked, past the cap")

  previous = signal.signal(signal.SIGALRM, too_slow)
  signal.alarm(10)  # fails in seconds, not after the hour, if the cap is not applied
  try:
    got = _download({"x": cdn.url("/limited2.jpg")}, _http(max_retry_after_s=0.3, backoff_s=0.0))
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
  assert got["x"].ok
  first, second = cdn.times("/limited2.jpg")
  # It waited the cap (0.3 s), not the hour the server asked for.
  assert 0.25 <= second - first < 5.0


def test_retries_exhausted_reports_last_status(cdn):
  url = cdn.route("/down.jpg", cdn_server.Response(503, b""))
  got = _download({"x": url}, _http(retries=1))
  assert (got["x"].reason, got["x"].status) == ("http_503", 503)
  assert cdn.count("/down.jpg") == 2


def test_noai_is_fetched_when_not_respected(faults):
  got = _download({"x": faults["noai"]}, _http(respect_noai=False))
  assert got["x"].ok


@pytest.mark.parametrize(
  "headers,opted_out",
  [
    ({"X-Robots-Tag": "noml"}, True),
    ({"X-Robots-Tag": "googlebot: noimageindex"}, True),
    ({"X-Robots-Tag": "noindex, nofollow"}, True),
    ({"tdm-reservation": "1"}, True),
    ({"tdm-reservation": "0"}, False),
    ({"X-Robots-Tag": "nofollow"}, False),
  ],
)
def test_opt_out_headers_are_honoured(cdn, headers, opted_out):
  url = cdn.route(
    "/img.jpg",
    cdn_server.Response(200, cdn_server.jpeg_bytes(), {"Content-Type": "image/jpeg", **headers}),
  )
  got = _download({"x": url}, _http())["x"]
  assert (got.reason == "noai") == opted_out and got.ok != opted_out


def test_too_large(faults):
  got = _download({"x": faults["huge"], "y": faults["ok"]}, _http(), max_bytes=10_000)
  assert got["x"].reason == "too_large" and got["y"].ok


def test_connection_refused_and_invalid_url():
  got = _download(
    {"refused": "http://127.0.0.1:1/a.jpg", "ftp": "ftp://example.com/a.jpg"}, _http(retries=0)
  )
  assert got["refused"].reason == "connection_error"
  assert got["ftp"].reason == "invalid_url"


def test_download_respects_concurrency(cdn):
  body = cdn_server.jpeg_bytes()
  urls = {i: cdn.route(f"/c{i}.jpg", cdn_server.Response(200, body, delay_s=0.2)) for i in range(8)}
  got = _download(urls, _http(concurrency=4, per_host=4, timeout_s=5))
  assert all(d.ok for d in got.values())
  starts = sorted(t for i in range(8) for t in cdn.times(f"/c{i}.jpg"))
  assert starts[4] - starts[0] >= 0.15, "the 5th request must wait for a free slot"


def test_download_early_close_stops_cleanly(cdn):
  body = cdn_server.jpeg_bytes()
  urls = [(i, cdn.route(f"/e{i}.jpg", cdn_server.image(body))) for i in range(50)]
  gen = fetch.download(urls, _http(concurrency=2, per_host=2))
  first = next(gen)
  gen.close()
  assert first.ok and len(cdn.requests) < 50


def test_check_urls(cdn, faults):
  checks = fetch.check_urls(list(faults.values()), _http())
  assert [c.url for c in checks] == list(faults.values())
  by_name = dict(zip(faults, checks))
  assert {n for n, c in by_name.items() if not c.ok} == {"not_found", "slow", "noai"}
  assert by_name["not_found"].status == 404 and by_name["slow"].reason == "timeout"
  assert by_name["no_head"].ok and cdn.count("/nohead.jpg", "GET") == 1
  assert by_name["redirect"].status == 200
  assert cdn.count("/ok.jpg", "GET") == 0, "HEAD suffices when the server supports it"


def test_check_urls_html_is_not_an_image(cdn):
  url = cdn.route("/page", cdn_server.Response(200, b"<html/>", {"Content-Type": "text/html"}))
  (check,) = fetch.check_urls([url], _http())
  assert (check.ok, check.reason) == (False, "not_image")
