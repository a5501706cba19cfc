"""Async HTTP client for the catalog CDN: URL checks (audit) and image downloads (export).

One aiohttp session per call, bounded by `http.concurrency` requests in total and
`http.per_host` per host, each request limited to `http.timeout_s`. Connection
errors, timeouts, 429 and 5xx are retried `http.retries` times with exponential
backoff (`http.backoff_s * 2**attempt`), or after the server's Retry-After
(capped at `http.max_retry_after_s`). Every failure is a short reason string
("http_404", "timeout", "opt_out:noai", "too_large", ...) so reports can count them.

The public entry points are synchronous so stages stay plain functions: the
event loop runs inside the call (check_urls) or in a background thread
(download, which yields results as they complete).
"""

import asyncio
import dataclasses
import email.utils
import queue
import threading
import time
from collections.abc import Hashable
from collections.abc import Iterable
from collections.abc import Iterator

import aiohttp

DEFAULT_MAX_BYTES = 32 * 1024 * 1024  # no catalog photo is larger; bigger bodies are not read
_HEAD_FALLBACK_REASONS = ("http_403", "http_405", "http_501", "connection_error")  # and any 5xx
_CHUNK = 256 * 1024


@dataclasses.dataclass(frozen=True)
class UrlCheck:
  url: str
  ok: bool
  status: int | None  # final HTTP status, None when no response came back
  reason: str  # "ok" or why the URL is unusable


@dataclasses.dataclass(frozen=True)
class Download:
  key: Hashable
  url: str
  data: bytes | None  # body when the download succeeded
  status: int | None
  reason: str  # "ok" or why there is no data

  @property
  def ok(self) -> bool:
    return self.data is not None


class _Failure(Exception):
  """A request outcome that ends with a reason instead of a body."""

  def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None):
    super().__init__(reason)
    self.reason = reason
    self.status = status
    self.retry_after = retry_after

  @property
  def retriable(self) -> bool:
    return (
      self.reason in ("timeout", "connection_error", "dns_error")
      or self.status == 429
      or self.status == 408
      or (self.status is not None and self.status >= 500)
    )


# X-Robots-Tag directives that may opt an image out of dataset use (http.opt_out_directives):
# the AI ones, and the indexing ones img2dataset also honours by default.
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noml", "noindex", "noimageindex")
TDM_RESERVATION = "tdm-reservation"


def opt_out_reason(headers, http_cfg) -> str | None:
  """`opt_out:<directive>` when the server opts the image out of data mining, else None.

  An X-Robots-Tag directive listed in http.opt_out_directives (also in `bot: directive`
  form), or, with http.respect_tdm_reservation, the W3C TDM Reservation Protocol header
  `tdm-reservation: 1` (the machine-readable reservation of EU directive 2019/790, art. 4).
  """
  honoured = {d.lower() for d in http_cfg.opt_out_directives}
  for value in headers.getall("X-Robots-Tag", ()):
    for token in value.replace(":", ",").split(","):
      if token.strip().lower() in honoured:
        return f"opt_out:{token.strip().lower()}"
  if http_cfg.respect_tdm_reservation and headers.get(TDM_RESERVATION, "").strip() == "1":
    return f"opt_out:{TDM_RESERVATION}"
  return None


def _retry_after_s(headers, cap: float) -> float | None:
  """Seconds from a Retry-After header (delta-seconds or HTTP date), capped; None if absent."""
  value = headers.get("Retry-After")
  if not value:
    return None
  try:
    seconds = float(value)
  except ValueError:
    try:
      seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError):
      return None
  return min(max(seconds, 0.0), cap)


def check_config(http_cfg) -> None:
  """A one-line ValueError naming the `--config.http.*` field that cannot work."""
  rules = {
    "concurrency": (http_cfg.concurrency >= 1, "an integer >= 1"),
    "per_host": (http_cfg.per_host >= 1, "an integer >= 1"),
    "timeout_s": (http_cfg.timeout_s > 0, "> 0 seconds"),
    "retries": (http_cfg.retries >= 0, ">= 0"),
    "backoff_s": (http_cfg.backoff_s >= 0, ">= 0 seconds"),
    "max_retry_after_s": (http_cfg.max_retry_after_s >= 0, ">= 0 seconds"),
  }
  for field, (ok, must) in rules.items():
    if not ok:
      raise ValueError(f"--config.http.{field}={http_cfg[field]!r} must be {must}.")
  unknown = sorted({d.lower() for d in http_cfg.opt_out_directives} - set(OPT_OUT_DIRECTIVES))
  if unknown:
    raise ValueError(
      f"--config.http.opt_out_directives names {unknown}; known X-Robots-Tag opt-outs: "
      f"{list(OPT_OUT_DIRECTIVES)}."
    )


def _session(http_cfg) -> aiohttp.ClientSession:
  connector = aiohttp.TCPConnector(
    limit=http_cfg.concurrency, limit_per_host=http_cfg.per_host, ttl_dns_cache=300
  )
  return aiohttp.ClientSession(
    connector=connector,
    timeout=aiohttp.ClientTimeout(total=http_cfg.timeout_s),
    headers={"User-Agent": http_cfg.user_agent},
  )


async def _read_capped(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
  if resp.content_length is not None and resp.content_length > max_bytes:
    raise _Failure("too_large", resp.status)
  chunks, size = [], 0
  async for chunk in resp.content.iter_chunked(_CHUNK):
    size += len(chunk)
    if size > max_bytes:
      raise _Failure("too_large", resp.status)
    chunks.append(chunk)
  return b"".join(chunks)


async def _request_once(session, method: str, url: str, http_cfg, max_bytes: int | None):
  """One request following redirects → (status, body or None); raises _Failure."""
  try:
    async with session.request(method, url, allow_redirects=True, max_redirects=10) as resp:
      if resp.status >= 400:
        raise _Failure(
          f"http_{resp.status}",
          resp.status,
          _retry_after_s(resp.headers, http_cfg.max_retry_after_s),
        )
      opted_out = opt_out_reason(resp.headers, http_cfg)
      if opted_out:
        raise _Failure(opted_out, resp.status)
      content_type = resp.headers.get("Content-Type", "")
      if content_type.startswith("text/html"):  # soft 404 pages; images are never HTML
        raise _Failure("not_image", resp.status)
      body = await _read_capped(resp, max_bytes) if max_bytes is not None else None
      return resp.status, body
  except aiohttp.TooManyRedirects as e:
    raise _Failure("too_many_redirects", e.status) from None
  except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError):
    raise _Failure("invalid_url") from None
  except TimeoutError:
    raise _Failure("timeout") from None
  except aiohttp.ClientConnectorDNSError:
    raise _Failure("dns_error") from None
  except aiohttp.ClientPayloadError:
    raise _Failure("connection_error") from None  # body cut short: worth a retry
  except aiohttp.ClientError:
    raise _Failure("connection_error") from None


async def _request(session, method: str, url: str, http_cfg, max_bytes: int | None):
  """_request_once with retries and backoff; returns (status, body), raises the last _Failure."""
  attempt = 0
  while True:
    try:
      return await _request_once(session, method, url, http_cfg, max_bytes)
    except _Failure as failure:
      if not failure.retriable or attempt >= http_cfg.retries:
        raise
      backoff = http_cfg.backoff_s * 2**attempt
      await asyncio.sleep(backoff if failure.retry_after is None else failure.retry_after)
      attempt += 1


async def _check_one(session, url: str, http_cfg) -> UrlCheck:
  try:
    try:
      status, _ = await _request(session, "HEAD", url, http_cfg, None)
    except _Failure as failure:
      if failure.reason not in _HEAD_FALLBACK_REASONS and not (failure.status or 0) >= 500:
        raise
      status, _ = await _request(session, "GET", url, http_cfg, None)  # servers that refuse HEAD
    return UrlCheck(url, True, status, "ok")
  except _Failure as failure:
    return UrlCheck(url, False, failure.status, failure.reason)


async def _check_all(urls, http_cfg):
  checks = [None] * len(urls)
  pending = iter(enumerate(urls))

  async def worker(session):  # a fixed pool, not one task per URL: catalogs have 10^6 URLs
    for i, url in pending:
      checks[i] = await _check_one(session, url, http_cfg)

  async with _session(http_cfg) as session:
    await asyncio.gather(*(worker(session) for _ in range(http_cfg.concurrency)))
  return checks


def check_urls(urls: Iterable[str], http_cfg) -> list:
  """Concurrent HEAD (GET when HEAD is refused) of `urls` → list[UrlCheck], in input order.

  A URL is ok when it answers 2xx after redirects, is not HTML, and does not opt
  out (opt_out_reason), i.e. when the export could use it. HEAD answered 403/405/501/5xx or a dropped connection is
  retried as GET; timeouts are not (a GET would time out the same way).
  """
  return asyncio.run(_check_all(list(urls), http_cfg))


async def _download_worker(session, pending: Iterator, http_cfg, max_bytes, slots, deliver):
  while True:
    await slots.acquire()  # released by the consumer: bounds undelivered bodies in memory
    try:
      key, url = next(pending)
    except StopIteration:
      slots.release()
      return
    try:
      status, body = await _request(session, "GET", url, http_cfg, max_bytes)
      deliver(Download(key, url, body, status, "ok"))
    except _Failure as failure:
      deliver(Download(key, url, None, failure.status, failure.reason))


async def _download_all(pending, http_cfg, max_bytes, slots, deliver):
  async with _session(http_cfg) as session:
    await asyncio.gather(
      *(
        _download_worker(session, pending, http_cfg, max_bytes, slots, deliver)
        for _ in range(http_cfg.concurrency)
      )
    )


def download(items: Iterable, http_cfg, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[Download]:
  """GETs `(key, url)` pairs concurrently; yields a Download per pair as each completes.

  The event loop runs in a background thread so the caller can decode and
  write results while downloads continue; at most 2 x http.concurrency bodies
  wait undelivered. Closing the generator early cancels what is in flight.
  """
  results = queue.Queue()
  finished = object()
  loop = asyncio.new_event_loop()
  slots = asyncio.Semaphore(2 * http_cfg.concurrency)
  pending = iter(items)
  main = loop.create_task(_download_all(pending, http_cfg, max_bytes, slots, results.put))

  def run_loop():
    try:
      loop.run_until_complete(main)
    except asyncio.CancelledError:
      pass
    except BaseException as e:  # pylint: disable=broad-except
      results.put(e)  # re-raised in the consumer's thread
    finally:
      loop.run_until_complete(loop.shutdown_asyncgens())
      loop.close()
      results.put(finished)

  def call_in_loop(fn):
    try:
      loop.call_soon_threadsafe(fn)
    except RuntimeError:
      pass  # the loop has already finished: nothing is waiting

  thread = threading.Thread(target=run_loop, name="fetch-download", daemon=True)
  thread.start()
  try:
    while (item := results.get()) is not finished:
      if isinstance(item, BaseException):
        raise item
      call_in_loop(slots.release)
      yield item
  finally:
    call_in_loop(main.cancel)
    thread.join()
