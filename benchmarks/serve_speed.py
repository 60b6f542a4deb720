"""``reft-edge serve`` under load: 8 people at once, each with their own patch, against the same
requests one after another.

    python -m benchmarks.serve_speed                              # the default model's int4 bundle
    python -m benchmarks.serve_speed --bundle out/bundle --tokens 32 --threads 2

The server runs as ``reft-edge serve`` in its own process (``--max-batch`` = clients + 1);
the clients are threads here, streaming with EOS ignored, greedy. Each person's patch is a
random LoReFT patch for the bundle's base (rank 4 at the middle slot layer; every other one
also edits generated tokens, so decode steps run the slotted graph): speed does not depend
on the values. Measured, in one run:

- one after another: each request alone, its time to first token (TTFT) and the wall time;
- together: all clients released at once; aggregate tokens/s = all generated tokens / wall
  time from the release to the last answer (prefills included), each client's TTFT, and the
  TTFT of one more request sent once all are decoding (a newcomer under load);
- each answer together equals its answer alone (greedy).

Prints one JSON object. The default bundle is the one ``benchmarks.web_speed`` and
``benchmarks.run`` use ($REFT_EDGE_CACHE/bench/int4, exported if missing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

PROMPTS = [
    "How do I learn to swim?",
    "What is your favourite animal?",
    "Describe a rainy day.",
    "What do you think about music?",
    "How can I sleep better?",
    "What is the best way to travel?",
    "Tell me a joke.",
    "How do computers work?",
    "Where should I go on holiday?",
]


def default_bundle() -> Path:
    from reft_edge.files import cache_dir

    bundle = cache_dir() / "bench" / "int4"
    if not (bundle / "manifest.json").is_file():
        from reft_edge.export import ExportConfig, export_bundle

        export_bundle(ExportConfig(out=str(bundle), precision="int4"), progress=False)
    return bundle


def random_patches(bundle: Path, folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` random LoReFT patches for the bundle's base, person0.reft ... (half also edit generated tokens)."""
    from reft_edge.runtime.bundle import Manifest
    from reft_edge.runtime.patch import Intervention, Patch
    from reft_edge.runtime.positions import Positions

    manifest = Manifest.from_dir(bundle)
    layer, hidden, rank = manifest.slot_layers[len(manifest.slot_layers) // 2], manifest.hidden_size, 4
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        R = np.linalg.qr(rng.standard_normal((hidden, rank)))[0].T.astype(np.float32)  # orthonormal rows
        params = {
            "R": R,
            "W": (R + 0.05 * rng.standard_normal((rank, hidden))).astype(np.float32),
            "b": (0.5 * rng.standard_normal(rank)).astype(np.float32),
        }
        positions = Positions.parse("l1+g" if i % 2 else "f2+l2")
        Patch(
            name=f"person{i}",
            kind="loreft",
            positions=positions,
            share_weights=True,
            rank=rank,
            hidden_size=hidden,
            base_fingerprint=manifest.base_fingerprint,
            interventions=(Intervention(layer, "both", params),),
            training={"steps": 0, "note": "random, for benchmarks.serve_speed"},
        ).to_file(folder / f"person{i}.reft")
        names.append(f"person{i}")
    return names


def start_server(bundle: Path, folder: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable,
        "-m",
        "reft_edge.cli",
        "serve",
        str(bundle),
        "--patches",
        str(folder),
        "--port",
        "0",
        "--max-batch",
        str(args.clients + 1),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    line = ""
    while " at http://" not in line:
        line = server.stderr.readline()
        if not line:
            raise SystemExit(f"reft-edge serve did not start: {' '.join(command)}")
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()  # drain its log
    return server, line.split(" at ")[1].split()[0]


def ask(url: str, prompt: str, model: str, tokens: int) -> dict:
    """One streamed chat request: its text, tokens, time to first token and total time."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, pieces, usage = None, [], None
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                content = choice["delta"].get("content")
                if content:
                    first = first or time.perf_counter()
                    pieces.append(content)
    end = time.perf_counter()
    return {
        "text": "".join(pieces),
        "tokens": usage["completion_tokens"],
        "ttft_s": (first or end) - started,
        "seconds": end - started,
        "started": started,
        "first": first or end,
        "end": end,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="Bundle folder (default: the default model's int4 bundle).")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="The server's onnxruntime threads.")
    args = parser.parse_args()
    bundle = Path(args.bundle) if args.bundle else default_bundle()
    with tempfile.TemporaryDirectory() as folder:
        names = random_patches(bundle, Path(folder), args.clients + 1)
        server, url = start_server(bundle, Path(folder), args)
        try:
            ask(url, "Hello!", "base", 8)  # warm-up
            requests = [(PROMPTS[i % len(PROMPTS)], f"base+{names[i]}") for i in range(args.clients)]

            alone, started = [], time.perf_counter()
            for prompt, model in requests:
                alone.append(ask(url, prompt, model, args.tokens))
            serial_s = time.perf_counter() - started

            together: dict[int, dict] = {}
            gate = threading.Barrier(args.clients + 1)
            newcomer: dict[str, dict] = {}

            def client(i: int) -> None:
                gate.wait()
                together[i] = ask(url, *requests[i], args.tokens)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for thread in threads:
                thread.start()
            gate.wait()
            released = time.perf_counter()
            time.sleep(0.1)
            while len(together) == 0 and any(t.is_alive() for t in threads):  # all decoding: send one more
                health = httpx.get(url.removesuffix("/v1") + "/health").json()
                if health["running"] == args.clients and health["queued"] == 0:
                    newcomer["answer"] = ask(url, PROMPTS[-1], f"base+{names[-1]}", 8)
                    break
                time.sleep(0.02)
            for thread in threads:
                thread.join()
            together_s = max(r["end"] for r in together.values()) - released
        finally:
            server.terminate()
            server.wait(timeout=30)

    tokens = sum(r["tokens"] for r in alone)
    result = {
        "bundle": str(bundle),
        "clients": args.clients,
        "tokens_each": args.tokens,
        "threads": args.threads,
        "one_after_another": {
            "seconds": round(serial_s, 3),
            "tokens_per_s": round(tokens / serial_s, 2),
            "ttft_ms_median": round(1000 * statistics.median(r["ttft_s"] for r in alone), 1),
        },
        "together": {
            "seconds": round(together_s, 3),
            "tokens_per_s": round(sum(r["tokens"] for r in together.values()) / together_s, 2),
            "ttft_ms_median": round(1000 * statistics.median(r["ttft_s"] for r in together.values()), 1),
            "ttft_ms_max": round(1000 * max(r["ttft_s"] for r in together.values()), 1),
            "newcomer_ttft_ms": round(1000 * newcomer["answer"]["ttft_s"], 1) if newcomer else None,
        },
        "identical_answers": sum(together[i]["text"] == alone[i]["text"] for i in range(args.clients)),
    }
    result["speedup"] = round(result["together"]["tokens_per_s"] / result["one_after_another"]["tokens_per_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
