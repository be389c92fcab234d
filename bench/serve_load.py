"""Benchmark: `toolkit serve` under load on 127.0.0.1, and its overhead over calling the backend directly.

    python bench/serve_load.py [--backend llama-cpp|transformers|echo] [--model PATH]
                               [--requests 400] [--concurrency 16] [--max-new-tokens 8] [--set serve.KEY=VALUE]

Without --model it builds the tiny gpt-oss (`toolkit tiny`) and, for llama-cpp, its f32 GGUF. The
server is the real `toolkit serve` command in a subprocess (`echo`: the same app around a translator
that returns its input, to see the HTTP/FastAPI cost alone). Then:

1. overhead: each text through the backend called directly in this process, then over HTTP, one at a
   time and alternating (both see the same machine load); overhead = p50 HTTP latency - p50 direct
   latency (goal <= 5 ms). The per-request figure (client latency - the server's own backend_ms) is
   printed too. The client is http.client on a keep-alive connection: the thinnest, so the cost is the
   server's.
2. load: --requests requests from --concurrency threads (server queue sized to hold them all):
   p50/p95 latency, throughput, non-2xx and 5xx counts (goal 0 5xx).

The machine's load average is printed: on a shared 2-core box other work inflates every figure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "corpora" / "zh-nan-moe-sample" / "sample.tsv"


def sentences(n: int) -> list[str]:
    rows = SAMPLE.read_text(encoding="utf-8").splitlines()[1:]
    return [rows[i % len(rows)].split("\t")[0] for i in range(n)]


class Echo:
    """A translator that costs nothing: what remains is the server's own cost."""

    name = "echo"

    def translate(self, texts, spec, *, max_new_tokens=256):
        from toolkit.backends import Translation

        return [Translation(text=t, analysis=None, complete=True, tokens=0, latency_s=0.0, raw=t) for t in texts]

    def health(self) -> bool:
        return True


def serve_echo(queue_size: int) -> None:
    """The server side of `--backend echo` (run in a subprocess by `main`)."""
    import logging

    from toolkit import serve
    from toolkit.config import ServeConfig
    from toolkit.prompt import default_spec

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("toolkit.serve").setLevel(logging.INFO)  # as `toolkit serve` logs: one line per request

    app = serve.create_app(Echo(), default_spec(), ServeConfig(backend="echo", queue_size=queue_size))
    serve.listen(app, serve.bind("127.0.0.1", 0), on_ready=lambda url: print(url, flush=True))


def tiny_model(backend: str, tmp: Path) -> Path:
    from toolkit.tiny import build_tiny

    model = build_tiny(tmp / "tiny", seed=0)
    if backend != "llama-cpp":
        return model
    from toolkit import gguf, llamacpp

    out = tmp / "tiny-f32.gguf"
    gguf.convert(model, out, "f32", llamacpp.fetch(), "gpt-4o")  # the tiny BPE's hash is unknown to llama.cpp
    return out


def start_server(args: argparse.Namespace, model: Path | None, log_file) -> tuple[subprocess.Popen, str]:
    if args.backend == "echo":
        cmd = [sys.executable, __file__, "--serve-echo", "--concurrency", str(args.concurrency)]
    else:
        cmd = [sys.executable, "-m", "toolkit", "serve", str(model), "--backend", args.backend, "--port", "0",
               "--queue-size", str(args.concurrency), "--max-new-tokens", str(args.max_new_tokens)]
        cmd += [arg for setting in args.set for arg in ("--set", setting)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        sys.exit(f"the server printed no URL ({url!r}); its log: {log_file.name}")
    return proc, url


def load_backend(args: argparse.Namespace, model: Path | None):
    """(translator, spec) in this process: the direct calls the server's overhead is measured against."""
    from toolkit import backends
    from toolkit.prompt import default_spec

    if args.backend == "echo":
        return Echo(), default_spec()
    options = {"n_ctx": 2048} if args.backend == "llama-cpp" else {}
    return backends.load_translator(args.backend, model, **options), backends.spec_for(args.backend, model)


class Client:
    """One keep-alive HTTP/1.1 connection per thread (http.client: the thinnest client, so the numbers are the
    server's)."""

    def __init__(self, url: str) -> None:
        self.address = url.removeprefix("http://")
        self.local = threading.local()

    def post(self, text: str) -> tuple[int, float, dict]:
        conn = getattr(self.local, "conn", None) or http.client.HTTPConnection(self.address, timeout=300)
        self.local.conn = conn
        body = json.dumps({"text": text}, ensure_ascii=False).encode()
        started = time.perf_counter()
        conn.request("POST", "/translate", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        latency = time.perf_counter() - started
        return resp.status, latency, json.loads(data) if resp.status == 200 else {}


def overhead_run(client: Client, translator, spec, texts: list[str], max_new_tokens: int) -> dict[str, list[float]]:
    """Each text through the backend directly, then over HTTP, alternating, so both see the same machine load.

    Returns ms lists: direct, http, and the server's share of each HTTP request: outside the backend call
    (latency - backend_ms), the hand-off to the worker thread (queue_ms), and HTTP + uvicorn + middleware
    (latency - the handler's total_ms).
    """
    out: dict[str, list[float]] = {k: [] for k in ("direct", "http", "outside_backend", "handoff", "outside_handler")}
    for text in texts:
        started = time.perf_counter()
        translator.translate([text], spec, max_new_tokens=max_new_tokens)
        out["direct"].append((time.perf_counter() - started) * 1e3)
        time.sleep(0.05)  # llama.cpp's worker threads spin a while after a call: let them settle first
        status, latency, body = client.post(text)
        if status != 200:
            raise SystemExit(f"sequential request got HTTP {status}: the server is not healthy")
        timings, latency = body["timings"], latency * 1e3
        out["http"].append(latency)
        out["outside_backend"].append(latency - timings["backend_ms"])
        out["handoff"].append(timings["queue_ms"])
        out["outside_handler"].append(latency - timings["total_ms"])
    return out


def load_run(client: Client, texts: list[str], concurrency: int) -> tuple[list[float], list[float], Counter, float]:
    """(latencies s, the server's backend_ms of each 200, status counts, wall s) for `texts` sent by
    `concurrency` threads."""
    statuses: Counter = Counter()
    latencies: list[float] = []
    backend_ms: list[float] = []

    def one(text: str) -> None:
        try:
            status, latency, body = client.post(text)
        except OSError as exc:  # refused or reset: counted as a failure, like a 5xx
            statuses[type(exc).__name__] += 1
            return
        statuses[status] += 1
        latencies.append(latency)
        if status == 200:
            backend_ms.append(body["timings"]["backend_ms"])

    with ThreadPoolExecutor(concurrency) as pool:
        wall = time.perf_counter()
        list(pool.map(one, texts))
        wall = time.perf_counter() - wall
    return latencies, backend_ms, statuses, wall


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["llama-cpp", "transformers", "echo"], default="llama-cpp")
    parser.add_argument("--model", type=Path, help="GGUF (llama-cpp) or model folder (default: the tiny model).")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--overhead-requests", type=int, default=100, help="Sequential requests for the overhead.")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="serve.KEY=VALUE",
                        help="passed to `toolkit serve` (repeatable), e.g. serve.batch_requests=false")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        return serve_echo(args.concurrency)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w") as log_file:
        model = args.model or (None if args.backend == "echo" else tiny_model(args.backend, Path(tmp)))
        translator, spec = load_backend(args, model)
        proc, url = start_server(args, model, log_file)
        try:
            client = Client(url)
            warm = sentences(5)
            overhead_run(client, translator, spec, warm, args.max_new_tokens)  # warm up both sides
            seq = overhead_run(client, translator, spec, sentences(args.overhead_requests), args.max_new_tokens)
            load, load_backend_ms, statuses, wall = load_run(client, sentences(args.requests), args.concurrency)
        finally:
            proc.send_signal(2)
            proc.wait(30)
        logged = sum(" /translate " in line for line in Path(log_file.name).read_text().splitlines())

    non_2xx = sum(n for code, n in statuses.items() if not (isinstance(code, int) and 200 <= code < 300))
    errors_5xx = sum(n for code, n in statuses.items() if not isinstance(code, int) or code >= 500)
    name = args.backend + ("" if args.model or args.backend == "echo" else " (tiny model)") + "".join(
        f", {setting}" for setting in args.set)
    p50 = {k: pct(v, 50) for k, v in seq.items()}
    print(f"server: {url}, {os.cpu_count()} CPUs, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}, "
          f"statuses {dict(statuses)}, {logged} request lines logged")
    print("| backend | requests | concurrency | p50 ms | p95 ms | req/s | non-2xx | 5xx | backend call p50 / p95 / max ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {name} | {len(load)} | {args.concurrency} | {pct(load, 50) * 1e3:.1f} | {pct(load, 95) * 1e3:.1f} | "
          f"{len(load) / wall:.1f} | {non_2xx} | {errors_5xx} | {pct(load_backend_ms, 50):.1f} / "
          f"{pct(load_backend_ms, 95):.1f} / {max(load_backend_ms):.1f} |")
    print()
    print("| sequential | direct p50 ms | HTTP p50 ms | overhead p50 ms (goal <= 5) | outside backend | thread hand-off "
          "| HTTP+uvicorn |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {len(seq['http'])} requests | {p50['direct']:.2f} | {p50['http']:.2f} | "
          f"{p50['http'] - p50['direct']:.2f} | {p50['outside_backend']:.2f} | {p50['handoff']:.2f} | "
          f"{p50['outside_handler']:.2f} |")


if __name__ == "__main__":
    main()
