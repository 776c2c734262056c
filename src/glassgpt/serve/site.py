"""`glassgpt site DIR --api URL`: the pages as a static site that calls an API on another origin.

Our reference deploys the page on a static host and the API elsewhere. The pages read the API's
address from static/config.js (empty: same origin), so the static copy only rewrites that file.
The API must list the site's origin: `glassgpt serve --cors-origin https://site.example`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import urlsplit

STATIC_DIR = Path(__file__).parent / "static"


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
    for source in sorted(STATIC_DIR.iterdir()):
        if not source.is_file() or source.name == "config.js":
            continue
        # Pages at the top (index.html opens at /), everything they load under static/, as on the server.
        target = directory / source.name if source.suffix == ".html" else directory / "static" / source.name
        shutil.copyfile(source, target)
        written.append(target)
    config = directory / "static" / "config.js"
    config.write_text(config_js(api_url.rstrip("/")), encoding="utf-8")
    written.append(config)
    return written
