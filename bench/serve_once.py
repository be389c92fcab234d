"""Start `toolkit serve MODEL` on a free loopback port, send it one translation request, print the answer, stop it.

    python bench/serve_once.py EXPORT_DIR [--text 你好] [--timeout 600] [toolkit serve options]

One JSON line on stdout: the URL, the seconds until the server answered /health, the request's status, latency and
body. Exits non-zero when the server does not come up or the request fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--text", default="我今天下晡欲去市場買菜。")
    parser.add_argument("--timeout", type=float, default=600.0)
    args, serve_args = parser.parse_known_args(argv)  # anything else is a `toolkit serve` option
    started = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "toolkit", "serve", args.model, "--port", "0", *serve_args],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()  # the server prints its URL first
        if not url.startswith("http"):
            print(json.dumps({"error": f"no URL from toolkit serve (got {url!r})"}))
            return 1
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - started > args.timeout or server.poll() is not None:
                print(json.dumps({"error": "server did not answer /health", "url": url}))
                return 1
            time.sleep(1)
        ready = time.monotonic() - started
        request = urllib.request.Request(f"{url}/translate", data=json.dumps({"text": args.text}).encode(),
                                         headers={"Content-Type": "application/json"})
        sent = time.monotonic()
        with urllib.request.urlopen(request, timeout=args.timeout) as resp:
            body, status = json.loads(resp.read()), resp.status
        print(json.dumps({"url": url, "ready_s": round(ready, 1), "status": status,
                          "latency_s": round(time.monotonic() - sent, 2), "response": body}, ensure_ascii=False))
        return 0 if status == 200 else 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
