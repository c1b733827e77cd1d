"""`edgeexit web`: a bundle on a web page, served on the loopback interface by the standard library.

The page (examples/web: index.html, app.js, preprocess.js) runs cascade.onnx with onnxruntime-web
(wasm) in the browser. It fetches a fixed set of paths, all held in memory from the start:

    /                       the page; /app.js, /preprocess.js its modules
    /ort/FILE               onnxruntime-web's wasm build (examples/web/node_modules, `npm install --ignore-scripts`)
    /bundle/manifest.json   the bundle's manifest (input spec, class names, exits, per-exit vectors)
    /bundle/cascade.onnx    cascade.onnx with its per-exit vectors as graph inputs (cascade_bytes.tunable_cascade_bytes):
                            onnxruntime-web feeds only the inputs a model lists, and the file holds them as constants

Nothing else is served (no directory listing, no path from the request reaches the file system).
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from edgeexit.errors import BundleError, ConfigError
from edgeexit.runtime.cascade_bytes import tunable_cascade_bytes
from edgeexit.runtime.manifest import CASCADE_NAME, MANIFEST_NAME, load_manifest

HOST = "127.0.0.1"
DEFAULT_PORT = 8000
WEB_ROOT = Path(__file__).resolve().parent.parent / "examples" / "web"
PAGE_FILES = {"/": "index.html", "/app.js": "app.js", "/preprocess.js": "preprocess.js"}
ORT_DIST = Path("node_modules") / "onnxruntime-web" / "dist"  # under WEB_ROOT
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
INSTALL = "cd examples/web && npm install --ignore-scripts"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript",
                 ".wasm": "application/wasm", ".json": "application/json", ".onnx": "application/octet-stream"}


@dataclass(frozen=True)
class Resource:
    """One served path: its bytes and content type."""

    content: bytes
    content_type: str


def page_resources(bundle: str | os.PathLike) -> dict[str, Resource]:
    """Everything the page fetches, by URL path; BundleError for a bad bundle, ConfigError when the page or
    onnxruntime-web is missing."""
    manifest = load_manifest(bundle)
    if manifest.cascade is None:
        raise BundleError(f"{manifest.root} has no {CASCADE_NAME} (exported by an older edgeexit), which the page runs: re-export it")
    files = {path: WEB_ROOT / name for path, name in PAGE_FILES.items()}
    files.update({f"/ort/{name}": WEB_ROOT / ORT_DIST / name for name in ORT_FILES})
    missing = [path for path in files.values() if not path.is_file()]
    if any(path.parent == WEB_ROOT for path in missing):
        raise ConfigError(f"the web page is missing ({missing[0]}): `edgeexit web` serves examples/web from a source checkout")
    if missing:
        raise ConfigError(f"onnxruntime-web is not installed ({missing[0].name} missing): {INSTALL}")
    resources = {path: Resource(file.read_bytes(), CONTENT_TYPES[file.suffix]) for path, file in files.items()}
    resources["/index.html"] = resources["/"]
    resources[f"/bundle/{MANIFEST_NAME}"] = Resource(manifest.path(MANIFEST_NAME).read_bytes(), CONTENT_TYPES[".json"])
    resources[f"/bundle/{CASCADE_NAME}"] = Resource(tunable_cascade_bytes(manifest), CONTENT_TYPES[".onnx"])
    return resources


def _handler(resources: dict[str, Resource]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """GET and HEAD of the fixed resources; 404 for any other path."""

        def _send(self, with_body: bool) -> None:
            resource = resources.get(self.path.split("?", 1)[0])
            if resource is None:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", resource.content_type)
            self.send_header("Content-Length", str(len(resource.content)))
            self.send_header("Cache-Control", "no-store")  # another bundle may be served on this port next time
            self.end_headers()
            if with_body:
                self.wfile.write(resource.content)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._send(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._send(False)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the page's requests are not news)
            pass

    return Handler


def open_server(bundle: str | os.PathLike, port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """A server for the page and `bundle` bound to 127.0.0.1:`port` (0: any free port), not yet serving."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0..65535, got {port}")
    handler = _handler(page_resources(bundle))
    try:
        return ThreadingHTTPServer((HOST, port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {HOST} is in use: choose another with --port (0 picks a free one)") from None
        raise ConfigError(f"cannot listen on {HOST}:{port}: {exc.strerror or exc}") from None


def serve(bundle: str | os.PathLike, port: int = DEFAULT_PORT, announce: Callable[[str], None] = print) -> None:
    """Serve the page and `bundle` until Ctrl-C; `announce` gets the page's URL, then a line when it stops."""
    server = open_server(bundle, port)
    announce(f"serving {bundle} at http://{HOST}:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    announce("stopped")
