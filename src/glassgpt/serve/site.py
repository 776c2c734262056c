"""The pages: rendered from static/ for the server, or written as a static site (`glassgpt site`).

Each page file in static/ holds only its own part (its <title>, scripts and <main>); layout.html
holds the head and the header with the nav that every page shares, so they are written once.
`render_page` puts the two together; the server answers with it and the static copy is the same.

`glassgpt site DIR --api URL` is for a deployment with the page on a static host and the API
elsewhere (as the project's specification deploys it). The pages read the API's address from
static/config.js (empty: same origin), so the static copy only rewrites that file. The API must
list the site's origin:
`glassgpt serve --cors-origin https://site.example`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlsplit

STATIC_DIR = Path(__file__).parent / "static"
# URL -> page file in static/. Each page is also served as /FILE so that links work the same way on
# the server and on the static copy.
PAGES = {"/": "index.html", "/architecture": "architecture.html", "/inside": "inside.html",
         "/learn": "learn.html", "/runs": "runs.html"}
PAGE_HEAD, PAGE_MAIN = "<!-- the page's head -->", "<!-- the page's main -->"


def render_page(filename: str) -> str:
    """The whole HTML of one page: layout.html with the page file's head part and <main> put in."""
    own = (STATIC_DIR / filename).read_text(encoding="utf-8")
    if own.lstrip().startswith("<!--"):  # the file's note to its reader stays out of the page
        own = own[own.index("-->") + 3:]
    start = own.find("<main")
    if start < 0:
        raise ValueError(f"static/{filename} has no <main> element for the layout to hold")
    layout = (STATIC_DIR / "layout.html").read_text(encoding="utf-8")
    return layout.replace(PAGE_HEAD, own[:start].strip()).replace(PAGE_MAIN, own[start:].strip())


def config_js(api_url: str) -> str:
    return f"// Where the pages send their API requests ('' = the server that serves the pages).\n" \
           f"window.GLASSGPT_API = {json.dumps(api_url)};\n"


def write_site(directory: str | Path, api_url: str) -> list[Path]:
    """Write DIR/*.html and DIR/static/* pointed at the API at `api_url`; return the files written."""
    parts = urlsplit(api_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--api must be an http(s) URL such as http://127.0.0.1:8000, got {api_url!r}")
    directory = Path(directory)
    (directory / "static").mkdir(parents=True, exist_ok=True)
    written = []
    # Pages at the top (index.html opens at /), everything they load under static/, as on the server.
    for filename in PAGES.values():
        target = directory / filename
        target.write_text(render_page(filename), encoding="utf-8")
        written.append(target)
    for source in sorted(STATIC_DIR.iterdir()):
        if source.is_file() and source.suffix != ".html" and source.name != "config.js":
            shutil.copyfile(source, directory / "static" / source.name)
            written.append(directory / "static" / source.name)
    config = directory / "static" / "config.js"
    config.write_text(config_js(api_url.rstrip("/")), encoding="utf-8")
    written.append(config)
    return written
