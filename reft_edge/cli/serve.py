"""``reft-edge serve`` and ``reft-edge serve-web``: a bundle and patches over HTTP.

Example::

    reft-edge serve bundle/ --patches patches/                    # http://127.0.0.1:8080/v1
    reft-edge serve bundle/ --patches patches/ --port 0 --api-key secret
    reft-edge serve-web out/bundle-int4 --patch alice.reft --port 8000
    # open http://127.0.0.1:8000/ : the page downloads the base once and runs it with onnxruntime-web

``serve`` is the OpenAI-compatible endpoint (runtime/serve.py); ``serve-web`` serves the browser
demo (examples/browser, on runtime/web): after runtime/web_server.py has checked the bundle, the
patches and node, this process becomes ``node runtime/web/serve.js``.

Only click is imported at module level: the runtime and the ``serve`` extra (Starlette,
uvicorn) load when a command runs, and torch never does.
"""

from __future__ import annotations

import os

import click


@click.command("serve")
@click.argument("bundle", type=click.Path())
@click.option(
    "--patches",
    "patches",
    required=True,
    type=click.Path(),
    help="Folder of .reft patches; NAME.reft is served as model base+NAME (reloaded when files change).",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (localhost only by default)."
)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--api-key", default=None, help="Require Authorization: Bearer KEY on /v1 routes.")
@click.option("--max-batch", default=8, show_default=True, type=int, help="Requests decoded together at most.")
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=int,
    help="Requests waiting for a row at most; beyond it the server answers 429.",
)
@click.option("--timeout", default=300.0, show_default=True, type=float, help="Seconds a request may take.")
@click.option(
    "--max-tokens",
    default=256,
    show_default=True,
    type=int,
    help="Tokens generated when a request gives no max_tokens (never past the context).",
)
@click.option("--model-name", default="base", show_default=True, help="The base model's id in /v1/models.")
@click.option("--threads", default=None, type=int, help="CPU threads (default: onnxruntime's choice).")
def serve_command(
    bundle: str,
    patches: str,
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int,
    max_queue: int,
    timeout: float,
    max_tokens: int,
    model_name: str,
    threads: int | None,
) -> None:
    """Serve BUNDLE over an OpenAI-compatible API; each request picks its person's patch."""
    from reft_edge.runtime.serve import Server, configure_logging

    configure_logging()
    server = Server.open(
        bundle,
        patches,
        host=host,
        port=port,
        api_key=api_key,
        threads=threads,
        max_batch=max_batch,
        max_queue=max_queue,
        timeout=timeout,
        max_tokens=max_tokens,
        model_name=model_name,
    )
    store = server.service.store
    click.echo(
        f"serving {bundle} at {server.url}/v1 as {model_name!r} with {len(store.patches)} patch(es)"
        + (f", {len(store.errors)} skipped" if store.errors else "")
        + f"; batch of {server.service.scheduler.batch.capacity}",
        err=True,
    )
    server.run()


@click.command("serve-web")
@click.argument("bundle", type=click.Path())
@click.option(
    "--patch", "patches", multiple=True, type=click.Path(), help="A .reft patch the page offers; repeat for several."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (localhost only by default)."
)
def serve_web_command(bundle: str, patches: tuple[str, ...], port: int, host: str) -> None:
    """Serve the browser demo for BUNDLE: generation runs in the visitor's browser."""
    from reft_edge.runtime.web_server import web_command_line

    args = web_command_line(bundle, patches, port, host)
    os.execv(args[0], args)  # the server replaces this process: Ctrl-C and kill reach it directly
