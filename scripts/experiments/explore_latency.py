"""How fast the explorer starts and answers, measured over HTTP like the page uses it.

Starts ``python -m tokenbudget.explore`` in a subprocess (the model named by --model, default the
embedded DINOv2), times how long until it listens, then plays slider moves: for each of --moves
keep values (spread over the slider) one /api/run per method (two methods, as the page's two
panels), and reports the seconds per answer (median, quartiles, max) and the first answer of a
new image apart (it also computes the image's unreduced feature).

    python scripts/experiments/explore_latency.py [--model dinov2_small] [--moves 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dinov2_small")
    parser.add_argument("--moves", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="tome,pool")
    parser.add_argument("--image", default="skimage:astronaut")
    args = parser.parse_args()

    start = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "tokenbudget.explore", "--model", args.model, "--port", "0"]
        + ["--threads", str(args.threads)],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    try:
        line = server.stdout.readline()
        started = time.perf_counter() - start
        if "http://" not in line:
            print(f"the explorer did not start: {line!r}", file=sys.stderr)
            return 1
        base = line.split("open ", 1)[1].split()[0].rstrip("/")
        print(f"started in {started:.1f} s (process start to listening): {line.strip()}")
        with urllib.request.urlopen(base + "/api/info", timeout=60) as response:
            info = json.loads(response.read())
        lo = info["keep_range"][0]
        methods = args.methods.split(",")
        first = time.perf_counter()
        post(base + "/api/run", {"image": args.image, "method": methods[0], "kind": "keep", "value": 0.5})
        print(
            f"first answer on a new image (includes its unreduced forward): {time.perf_counter() - first:.2f} s"
        )
        seconds = []
        for i in range(args.moves):
            keep = round(1.0 - (1.0 - lo) * (i + 1) / args.moves, 3)
            for method in methods:
                t = time.perf_counter()
                post(
                    base + "/api/run", {"image": args.image, "method": method, "kind": "keep", "value": keep}
                )
                seconds.append(time.perf_counter() - t)
        q1, median, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
        print(
            f"slider answers ({len(seconds)} = {args.moves} moves x {len(methods)} methods, {args.threads} threads): "
            f"median {median:.2f} s, quartiles {q1:.2f}-{q3:.2f} s, max {max(seconds):.2f} s"
        )
        with open("/proc/loadavg") as f:
            print(f"load average (1, 5, 15 min): {' '.join(f.read().split()[:3])}")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
