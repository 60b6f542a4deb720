"""``reft-edge serve-web``: serve the browser demo (examples/browser, on runtime/web) for a bundle and some patches.

Example::

    reft-edge serve-web out/bundle-int4 --patch alice.reft --port 8000
    # open http://127.0.0.1:8000/ : the page downloads the base once and runs it with onnxruntime-web

    with serving("out/bundle-int4", ["alice.reft"]) as url:   # the same server in the background
        ...                                                   # (tests and benchmarks/web_speed.py)

Checks the bundle's manifest and that each patch is a file (the page itself validates patches,
and shows a damaged one's typed error, as the Python runtime would raise it), then becomes
``node runtime/web/serve.js``: a static server with the
cross-origin-isolation headers onnxruntime-web's threads need, on localhost unless ``--host``
says otherwise; each ``--patch`` file is offered at ``/patches/<its file name>``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import click

from reft_edge.errors import UsageError

WEB = Path(__file__).resolve().parent / "web"


def web_command_line(bundle: str, patches: tuple[str, ...], port: int, host: str) -> list[str]:
    """The node command line, after checking that the bundle, patches, node and the packages are there."""
    from reft_edge.runtime.bundle import Manifest

    Manifest.from_dir(bundle)
    missing = [p for p in patches if not Path(p).is_file()]
    if missing:
        raise UsageError(f"--patch {missing[0]} is not a file; pass the path of a .reft patch")
    names = [Path(p).name for p in patches]
    if len(set(names)) != len(names):
        raise UsageError(f"--patch files {names} share a file name; each is served as /patches/<its name>, rename one")
    node = shutil.which("node")
    if node is None:
        raise UsageError("node is not installed; install Node 20 or newer to serve the web demo")
    if not (WEB / "node_modules" / "onnxruntime-web").is_dir():
        raise UsageError(f"{WEB / 'node_modules'} is missing; run `make web` (npm ci in runtime/web) first")
    args = [node, str(WEB / "serve.js"), str(Path(bundle).resolve()), "--port", str(port), "--host", host]
    for patch in patches:
        args += ["--patch", str(Path(patch).resolve())]
    return args


@contextmanager
def serving(bundle: str | Path, patches: Sequence[str | Path] = ()) -> Iterator[str]:
    """``reft-edge serve-web`` on a free port in a background process; yields its URL, stops it on exit."""
    args = [sys.executable, "-m", "reft_edge.cli", "serve-web", str(bundle), "--port", "0"]
    for patch in patches:
        args += ["--patch", str(patch)]
    server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()  # serve.js prints "serving BUNDLE at URL" once it listens
        if " at http://" not in line:
            raise UsageError(f"reft-edge serve-web {bundle} did not start ({line.strip() or 'no output'}); "
                             "run that command in a shell to see why")
        yield line.rsplit(" at ", 1)[1].strip()
    finally:
        server.terminate()  # the CLI became the node server (execv): this stops it
        server.wait(timeout=10)


@click.command("serve-web")
@click.argument("bundle", type=click.Path())
@click.option("--patch", "patches", multiple=True, type=click.Path(),
              help="A .reft patch the page offers; repeat for several.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (localhost only by default).")
def serve_web_command(bundle: str, patches: tuple[str, ...], port: int, host: str) -> None:
    """Serve the browser demo for BUNDLE: generation runs in the visitor's browser."""
    args = web_command_line(bundle, patches, port, host)
    os.execv(args[0], args)  # the server replaces this process: Ctrl-C and kill reach it directly
