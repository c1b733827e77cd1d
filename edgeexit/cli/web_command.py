"""`edgeexit web`: serve a bundle and the examples/web page on localhost (torch-free)."""
from __future__ import annotations

import click

from edgeexit.runtime.web import DEFAULT_PORT, serve


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True, help="Port on 127.0.0.1 (0: any free port).")
def web(bundle: str, port: int) -> None:
    """Serve a bundle on a web page: cascade.onnx runs in the browser with onnxruntime-web (wasm).

    Loopback only (127.0.0.1); prints the URL, Ctrl-C stops. The page needs onnxruntime-web:
    cd examples/web && npm install --ignore-scripts

    Example: edgeexit web bundle/ --port 8000
    """
    serve(bundle, port, announce=click.echo)


COMMANDS = [web]
