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
    "noai": "opt_out:noai",
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
  got = _download({"x": faults["noai"]}, _http(opt_out_directives=["noml"]))
  assert got["x"].ok


@pytest.mark.parametrize(
  "headers,reason,http",
  [
    ({"X-Robots-Tag": "noml"}, "opt_out:noml", {}),
    ({"X-Robots-Tag": "googlebot: noimageindex"}, "opt_out:noimageindex", {}),
    ({"X-Robots-Tag": "noindex, nofollow"}, "opt_out:noindex", {}),
    ({"X-Robots-Tag": "NoImageAI"}, "opt_out:noimageai", {}),
    ({"tdm-reservation": "1"}, "opt_out:tdm-reservation", {}),
    ({"tdm-reservation": "0"}, "ok", {}),
    ({"X-Robots-Tag": "nofollow"}, "ok", {}),
    # Each opt-out can be turned off on its own.
    ({"X-Robots-Tag": "noindex"}, "ok", {"opt_out_directives": ["noai", "noimageai", "noml"]}),
    ({"tdm-reservation": "1"}, "ok", {"respect_tdm_reservation": False}),
  ],
)
def test_opt_out_headers_are_honoured_and_counted_by_directive(cdn, headers, reason, http):
  url = cdn.route(
    "/img.jpg",
    cdn_server.Response(200, cdn_server.jpeg_bytes(), {"Content-Type": "image/jpeg", **headers}),
  )
  got = _download({"x": url}, _http(**http))["x"]
  assert got.reason == reason and got.ok == (reason == "ok")


def test_an_unknown_opt_out_directive_is_a_config_error():
  with pytest.raises(ValueError, match=r"opt_out_directives names \['noia'\]; known"):
    fetch.check_config(_http(opt_out_directives=["noai", "noia"]))


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


def test_a_body_cut_mid_transfer_is_retried(cdn):
  full = cdn_server.jpeg_bytes()
  cut = cdn_server.Response(
    200,
    full[: len(full) // 2],
    {"Content-Type": "image/jpeg", "Content-Length": str(len(full)), "Connection": "close"},
  )
  url = cdn.route("/cut.jpg", cut, cdn_server.image(full))
  got = _download({"x": url}, _http(retries=1))["x"]
  assert got.ok and got.data == full and cdn.count("/cut.jpg") == 2
  always_cut = cdn.route("/always_cut.jpg", cut)
  got = _download({"x": always_cut}, _http(retries=1))["x"]
  assert got.reason == "connection_error" and cdn.count("/always_cut.jpg") == 2


def test_a_redirect_to_another_host_is_followed(cdn):
  """CDNs redirect to other hosts: followed, and judged by where it lands."""
  with cdn_server.CdnServer() as other:
    target = other.route("/img.jpg", cdn_server.image(cdn_server.jpeg_bytes()))
    url = cdn.route("/moved.jpg", cdn_server.Response(301, b"", {"Location": target}))
    got = _download({"x": url}, _http())["x"]
    assert got.ok and other.count("/img.jpg") == 1
