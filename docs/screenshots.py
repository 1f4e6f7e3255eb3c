"""Screenshots of the built documentation site, as a reader's browser shows it.

Serves `site/` (built by `make docs`) on 127.0.0.1 and opens the landing page, one
API page and one tutorial in headless Chromium (Debian: `apt-get install chromium`),
writing PNGs to a folder outside the repository. Look at them before a release:

    make docs && .venv/bin/python docs/screenshots.py [--out /tmp/jaxdeq-docs-shots]
"""

import argparse
import contextlib
import functools
import http.server
import pathlib
import shutil
import subprocess
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = {
    "landing": "",
    "api-models": "api/models/",
    "tutorial-01": "notebooks/01_digits_deq/",
}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def serve(directory: pathlib.Path):
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def screenshot(browser: str, url: str, path: pathlib.Path, size: str) -> None:
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # CI and containers run as root
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={size}",
            "--virtual-time-budget=5000",  # let the theme's scripts settle
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=pathlib.Path, default=ROOT / "site")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("/tmp/jaxdeq-docs-shots")
    )
    parser.add_argument("--size", default="1280,2000", help="window width,height")
    args = parser.parse_args()
    if not (args.site / "index.html").exists():
        sys.exit(f"{args.site}/index.html not found: run `make docs` first")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: `apt-get update && apt-get install chromium`")
    args.out.mkdir(parents=True, exist_ok=True)
    with serve(args.site) as base:
        for name, page in PAGES.items():
            path = args.out / f"{name}.png"
            screenshot(browser, base + page, path, args.size)
            print(f"{base + page} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
