#!/usr/bin/env python3
"""Load test of `capivara serve`: /classify (an image, 10 labels) and /search
(Portuguese queries), at several concurrencies, bounded in requests and time.

For each endpoint and concurrency it prints requests/s, p50/p99 latency, the
statuses seen, and the average batch size per tower from /metrics over that
phase. With --model it starts its own server (and ingests --ingest images for
/search) and also times the raw batched image throughput of the same model
with `capivara bench`, the figure /classify is compared with.

Only the Python standard library is needed::

    cargo build --release
    python3 scripts/load_test.py --capivara target/release/capivara --model /tmp/capivara-full
    python3 scripts/load_test.py --url http://127.0.0.1:8080          # a running server
"""

import argparse
import base64
import http.client
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["gato", "cachorro", "capivara", "pássaro", "carro", "bicicleta", "praia",
          "montanha", "comida", "pessoa"]
QUERIES = ["um cachorro na praia", "uma capivara perto do rio", "um gato dormindo",
           "uma bicicleta vermelha", "o pôr do sol", "pessoas na rua", "um prato de comida",
           "uma montanha com neve"]


class Client:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port or 80
        self.conn = None

    def request(self, method, path, body=None, ctype="application/json"):
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
            try:
                headers = {"Content-Type": ctype} if body is not None else {}
                self.conn.request(method, path, body=body, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                return r.status, data
            except (http.client.HTTPException, ConnectionError, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise


def metrics(url):
    status, data = Client(url).request("GET", "/metrics")
    assert status == 200, status
    out = {}
    for line in data.decode().splitlines():
        m = re.match(r'capivara_batch_size_(sum|count)\{tower="(\w+)"\} (\S+)', line)
        if m:
            out[(m.group(2), m.group(1))] = float(m.group(3))
    return out


def run_phase(url, make_body, path, concurrency, max_requests, max_seconds):
    lock = threading.Lock()
    state = {"left": max_requests}
    lat, statuses = [], {}
    deadline = time.monotonic() + max_seconds

    def worker(seed):
        rng = random.Random(seed)
        c = Client(url)
        while True:
            with lock:
                if state["left"] <= 0 or time.monotonic() > deadline:
                    return
                state["left"] -= 1
            body = make_body(rng)
            t = time.monotonic()
            try:
                status, _ = c.request("POST", path, body)
            except Exception as e:  # a transport failure counts as its own status
                status = type(e).__name__
            dt = time.monotonic() - t
            with lock:
                lat.append(dt)
                statuses[status] = statuses.get(status, 0) + 1

    before = metrics(url)
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t0
    after = metrics(url)
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")
    batch = {}
    for tower in ("image", "text"):
        dn = after.get((tower, "count"), 0) - before.get((tower, "count"), 0)
        ds = after.get((tower, "sum"), 0) - before.get((tower, "sum"), 0)
        batch[tower] = round(ds / dn, 2) if dn else None
    ok = statuses.get(200, 0)
    return {
        "path": path, "concurrency": concurrency, "requests": len(lat), "ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "seconds": round(wall, 2), "req_per_s": round(ok / wall, 2) if wall else 0,
        "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1),
        "avg_batch_image": batch["image"], "avg_batch_text": batch["text"],
    }


def start_server(capivara, model, data_dir, extra):
    port = 18000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([capivara, "serve", "--model", model, "--addr", f"127.0.0.1:{port}",
                             "--data-dir", data_dir, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for _ in range(600):
        try:
            status, _ = Client(url).request("GET", "/readyz")
            if status == 200:
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not get ready in 120 s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (else --model starts one)")
    ap.add_argument("--model", help="start `capivara serve --model MODEL` for the test")
    ap.add_argument("--capivara", default=str(ROOT / "target/release/capivara"))
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra flag for the started server (repeatable), e.g. --max-batch-size=32")
    ap.add_argument("--image", default=str(ROOT / "tests/fixtures/images/photo.jpg"))
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=200, help="most requests per phase")
    ap.add_argument("--seconds", type=float, default=30, help="longest phase")
    ap.add_argument("--ingest", type=int, default=200, help="images ingested before /search")
    ap.add_argument("--endpoints", default="classify,search")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    if not a.url and not a.model:
        ap.error("give --url or --model")

    proc = tmp = None
    url = a.url
    if a.model:
        tmp = tempfile.mkdtemp(prefix="capivara-load-")
        proc, url = start_server(a.capivara, a.model, tmp, a.server_arg)
    try:
        image_b64 = base64.b64encode(Path(a.image).read_bytes()).decode()
        results = {"url": url, "phases": []}
        status, data = Client(url).request("GET", "/metrics")
        m = re.search(r"capivara_index_size (\d+)", data.decode())
        have = int(m.group(1)) if m else 0
        if "search" in a.endpoints and have < a.ingest:
            c = Client(url)
            for i in range(have, a.ingest, 16):
                batch = [{"image": image_b64, "id": f"load-{i + j}", "metadata": {"i": i + j}}
                         for j in range(min(16, a.ingest - i))]
                s, d = c.request("POST", "/images", json.dumps({"images": batch}))
                assert s == 200, (s, d[:200])
        bodies = {
            "classify": lambda rng: json.dumps({"image": image_b64, "labels": LABELS}),
            "search": lambda rng: json.dumps({"query": rng.choice(QUERIES), "k": 10}),
        }
        for ep in a.endpoints.split(","):
            for conc in [int(x) for x in a.concurrency.split(",")]:
                r = run_phase(url, bodies[ep], f"/{ep}", conc, a.requests, a.seconds)
                results["phases"].append(r)
                print(json.dumps(r), flush=True)
        if a.model:
            same = [x for x in a.server_arg if x.startswith(("--quantize", "--dtype", "--device"))]
            out = subprocess.run([a.capivara, "bench", "--model", a.model, "--tower", "image",
                                  "--batch", "32", "--seconds", "5", *same], check=True,
                                 capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            raw = json.loads(out.stdout)["rows"][0]["per_second"]
            results["raw_image_per_s_batch32"] = raw
            print(json.dumps({"raw_image_per_s_batch32": round(raw, 2)}))
            for r in results["phases"]:
                if r["path"] == "/classify":
                    print(f"/classify at concurrency {r['concurrency']}: "
                          f"{r['req_per_s'] / raw:.2f}x the raw batched image throughput")
        if proc:
            # Peak resident memory of the server over the whole test, against
            # the size of the weights it loaded.
            status = Path(f"/proc/{proc.pid}/status").read_text()
            hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
            weights = sum(f.stat().st_size for f in Path(a.model).glob("*.safetensors")
                          if "reference" not in f.name) if Path(a.model).is_dir() else 0
            results["server_peak_rss_bytes"] = hwm
            results["weights_bytes"] = weights
            line = {"server_peak_rss_mb": round(hwm / 2**20, 1)}
            if weights:
                line["weights_mb"] = round(weights / 2**20, 1)
                line["rss_over_weights"] = round(hwm / weights, 2)
            print(json.dumps(line))
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2))
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=60)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
