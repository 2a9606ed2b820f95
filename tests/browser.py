"""Open a page in a real headless browser (Debian's chromium) and report what a person would see.

Two runs of the browser, each with a fresh profile and nothing that reaches the network:
- the page with a small probe script appended, dumped with --dump-dom: the probe writes into the DOM,
  once the page has loaded, every <img>'s decoded size and every resource the page fetched; chromium
  logs the page's console messages to stderr (--enable-logging=stderr), where they are collected;
- the page itself, as a screenshot (PNG), to check that it paints something and to look at.
"""
from __future__ import annotations

import json
import re
from html import unescape as html_unescape
import shutil
import subprocess
from pathlib import Path

import numpy as np

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]

PROBE = """
<script>
window.addEventListener("load", () => {  // "load" waits for every image: each has decoded or failed
  const images = [...document.images];
  const result = {
    images: images.map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight, complete: i.complete})),
    resources: performance.getEntriesByType("resource").map(e => e.name),
    title: document.title,
  };
  const out = document.createElement("pre");
  out.id = "ek-probe";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>
"""
CONSOLE = re.compile(r":CONSOLE[:(]\d+\)?\] (.*)")


def _chromium(args: list[str], workdir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    profile = workdir / f"profile-{len(list(workdir.glob('profile-*')))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=timeout)


def load_page(html: Path, workdir: Path, width: int = 1200, height: int = 3000) -> dict:
    """Load ``html``: its console messages, its images as decoded, the resources it fetched, and a
    screenshot (path and pixels)."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = html.read_text(encoding="utf-8")
    assert text.count("</body>") == 1
    probed = workdir / "probed.html"
    probed.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dumped = _chromium(["--virtual-time-budget=10000", "--dump-dom", probed.as_uri()], workdir)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    found = re.search(r'<pre id="ek-probe">(.*?)</pre>', dumped.stdout, re.S)
    assert found, "the probe never ran: the page did not finish loading\n" + dumped.stderr[-2000:]
    probe = json.loads(html_unescape(found.group(1)))
    console = [m.group(1) for m in map(CONSOLE.search, dumped.stderr.splitlines()) if m]

    shot = workdir / "screenshot.png"
    painted = _chromium([f"--window-size={width},{height}", f"--screenshot={shot}", html.resolve().as_uri()], workdir)
    assert painted.returncode == 0 and shot.exists(), painted.stderr[-2000:]
    console += [m.group(1) for m in map(CONSOLE.search, painted.stderr.splitlines()) if m]
    from matplotlib.image import imread
    pixels = imread(shot)[..., :3]
    return {"console": console, "images": probe["images"], "resources": probe["resources"],
            "title": probe["title"], "screenshot": shot, "pixels": np.asarray(pixels)}


def assert_page_is_good(page: dict, images: int) -> None:
    """No console message at all (the page has no script: anything logged is the browser complaining),
    nothing fetched, every image decoded, and a screenshot that is not blank."""
    assert page["console"] == [], page["console"]
    assert page["resources"] == [], f"the page fetched {page['resources']}"
    assert len(page["images"]) == images, page["images"]
    for img in page["images"]:
        assert img["complete"] and img["width"] > 100 and img["height"] > 100, img
    px = page["pixels"]
    not_background = np.any(np.abs(px - px[0, 0]) > 0.1, axis=-1)
    assert not_background.mean() > 0.05, "the screenshot is nearly blank"
    assert len(np.unique(px.reshape(-1, 3).round(2), axis=0)) > 50, "the screenshot has almost no colours"
