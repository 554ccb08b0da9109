"""The web console's files: its static assets (service/console/, read once at start and kept as bytes with an
ETag) and the training artifacts of a model version (card.json, training_curve.png), read on request.

The console page is a client of the public REST API like any other: nothing here answers a question the API does
not. The only things it serves that the API has no endpoint for are the artifacts a training job left beside a
model, and those are found from what the registry knows: a model name it has (names come from folder names) and an
integer version, joined to a fixed file name. No part of a request path ever becomes a path on disk."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from service.errors import InvalidArgument, NotFound
from service.registry import Registry

FOLDER = Path(__file__).with_name("console")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The page runs only its own script and talks only to its own origin; blob: for the training-curve image, which is
# fetched with the token (an <img src> could not send one).
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: "
                               "data:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
ARTIFACTS = {"card": ("card.json", "application/json"), "curve": ("training_curve.png", "image/png")}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


# The files under /console/ (index.html is served at /). Listed, not globbed: the routes exist before any file is
# read, and a stray file dropped into the package folder is not served.
ASSET_NAMES = ("console.css", "console.js", "favicon.svg")


def _load(name: str) -> Asset:
    body = (FOLDER / name).read_bytes()
    return Asset(body, TYPES[Path(name).suffix], '"' + hashlib.sha256(body).hexdigest()[:16] + '"')


class Console:
    """What the console's routes read: the assets, cached for the server's life (they ship with the package and
    change only with it), and the registry for the artifacts."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.assets = {name: _load(name) for name in ("index.html", *ASSET_NAMES)}

    def asset(self, name: str) -> Asset:
        asset = self.assets.get(name)
        if asset is None:
            raise NotFound(f"the console has no file {name!r}")
        return asset

    def artifact(self, model: str, version: str, kind: str) -> tuple[bytes, str] | None:
        """(bytes, content type) of a version's training artifact, None when the version has none (the console asks
        for every version's card, and most versions loaded from elsewhere have none: not an error, so 204 rather than
        a 404 that browsers log as a failed load). NotFound only for a model the repository does not hold."""
        filename, content_type = ARTIFACTS[kind]
        if model not in self.registry.names_on_disk():  # folder names only: artifacts live nowhere else
            raise NotFound(f"unknown model {model!r}")
        if not version.isdigit() or int(version) <= 0:
            raise InvalidArgument(f"model {model!r}: version {version!r} is not a positive integer")
        path = self.registry.root / model / str(int(version)) / filename
        try:
            return path.read_bytes(), content_type
        except (FileNotFoundError, NotADirectoryError):
            return None
