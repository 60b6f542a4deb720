"""The web demo's server (examples/browser, on runtime/web) for a bundle and some patches: the checks
and the node command line behind ``reft-edge serve-web`` (reft_edge/cli/serve.py), and that command
in the background.

Example::

    from reft_edge.runtime.web_server import serving, web_command_line
    web_command_line("out/bundle-int4", ("alice.reft",), 8000, "127.0.0.1")   # ['/usr/bin/node', ...serve.js, ...]
    with serving("out/bundle-int4", ["alice.reft"]) as url:   # reft-edge serve-web on a free port, in the background
        ...                                                   # (tests and benchmarks/web_speed.py)

``web_command_line`` checks the bundle's manifest and that each patch is a file (the page itself
validates patches, and shows a damaged one's typed error, as the Python runtime would raise it);
the command then becomes ``node runtime/web/serve.js``: a static server with the
cross-origin-isolation headers onnxruntime-web's threads need, on localhost unless ``--host``
says otherwise; each ``--patch`` file is offered at ``/patches/<its file name>``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

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
            raise UsageError(
                f"reft-edge serve-web {bundle} did not start ({line.strip() or 'no output'}); "
                "run that command in a shell to see why"
            )
        yield line.rsplit(" at ", 1)[1].strip()
    finally:
        server.terminate()  # the CLI became the node server (execv): this stops it
        server.wait(timeout=10)
