"""Screenshots of the PWA in Chromium, with what each one shows, read back from the page.

`capture` serves an export with the page (pwa_server), picks each photo through the real
file input and saves a full-page PNG per shot; with `offline=True` it then stops the server,
takes the browser offline, reloads (the service worker's cache) and classifies the first
photo again. Each shot returns the visible verdict, its level, the top-5 rows (species,
common name, percentage), the region in use and the status line, so a test can assert what a
person would see. tools/screenshot_pwa.py makes the README's picture with it.
"""

import os

from aplantida_jax.export import browser_bench
from aplantida_jax.export import pwa_server

VIEWPORT = {"width": 480, "height": 900}


def _visible(page) -> dict:
  rows = []
  for li in page.query_selector_all("#results li"):
    if li.is_visible():
      rows.append(
        {
          "species": li.query_selector(".name").inner_text(),
          "common": li.query_selector(".common").inner_text(),
          "percent": li.query_selector(".p").inner_text(),
          "index": int(li.get_attribute("data-index")),
        }
      )
  region = page.query_selector("#region")
  return {
    "photo": page.is_visible("#preview"),
    "verdict": page.inner_text("#verdict") if page.is_visible("#verdict") else "",
    "level": page.get_attribute("#verdict", "data-level"),
    "unsure": page.get_attribute("#verdict", "data-unsure") == "true",
    "results": rows,
    "region": (
      region.evaluate("(s) => s.selectedOptions[0] ? s.selectedOptions[0].text : ''")
      if page.is_visible("#region")
      else None
    ),
    "status": page.inner_text("#status"),
  }


def classify(page, photo):
  """Picks `photo` through the page's file input and waits for its answer."""
  page.wait_for_selector("body[data-state=ready], body[data-state=classified]", timeout=60_000)
  page.evaluate("document.body.dataset.state = 'ready'")  # a second photo waits for its own answer
  page.set_input_files("#photo", photo)
  page.wait_for_selector("body[data-state=classified]", timeout=60_000)


def capture(tfjs_dir, photos, out_dir, offline=True, locale="es-ES", browser=None):
  """{shot name: what is visible} for `photos` {shot name: image path}, PNGs in `out_dir`.

  With `offline`, one more shot "offline": the first photo again after an offline reload.
  `browser` reuses a Playwright browser (tests); else Chromium is launched and closed here.
  """
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  server = pwa_server.make_server(tfjs_dir, port=0, isolate=True)
  pwa_server.serve_in_thread(server)
  shots = {}
  playwright = None
  try:
    if browser is None:
      playwright = sync_playwright().start()
      browser = playwright.chromium.launch(
        executable_path=browser_bench.CHROMIUM, headless=True, args=browser_bench.CHROMIUM_ARGS
      )
    context = browser.new_context(locale=locale, viewport=VIEWPORT)
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
    for name, photo in photos.items():
      classify(page, photo)
      page.screenshot(path=os.path.join(out_dir, f"{name}.png"), full_page=True)
      shots[name] = _visible(page)
    if offline:
      page.wait_for_function("navigator.serviceWorker.controller !== null", timeout=30_000)
      server.shutdown()  # refused, not merely unanswered: the service worker falls back at once
      server.server_close()
      context.set_offline(True)
      page.reload()
      classify(page, next(iter(photos.values())))
      page.screenshot(path=os.path.join(out_dir, "offline.png"), full_page=True)
      shots["offline"] = _visible(page)
    context.close()
  finally:
    if playwright is not None:
      browser.close()
      playwright.stop()
    if not offline:
      server.shutdown()
    server.server_close()
  return shots
