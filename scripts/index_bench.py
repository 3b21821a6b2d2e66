#!/usr/bin/env python3
"""`capivara index` on a folder of phone-sized photos vs the Python pipeline a user would write.

A folder of ``--n`` generated 4000x3000 JPEGs (baseline, 4:2:0, quality 90:
what phone cameras write; photo-like content: smooth gradients, edges and
sensor-like noise; ~2-4 MB each, made once into ``--dir``) is embedded end to
end, files on disk to vectors:

(50 distinct photos, the rest copies of them under other names.)

* capivara: ``capivara index --model M --data-dir <fresh dir> --no-progress FOLDER``
  (reads, decodes, resizes, embeds, and also writes a thumbnail and the index
  entry of every image); its own ``images_per_second`` (model load excluded).
* Python: open_clip's model and preprocessing (PIL) behind a
  ``torch.utils.data.DataLoader`` with 2 worker processes, batch 32,
  ``torch.set_num_threads(cores)``, ``inference_mode``; images/s from the first
  request of the loader to the last embedding (model load excluded, worker
  start-up included, as a user's script pays it).

With ``--jpeg-draft``, capivara runs with that flag (JPEGs decoded at reduced
scale inside libjpeg) and a third pipeline joins the alternation: the same
Python with ``im.draft("RGB", (2S, 2S))`` before open_clip's transform (the
pixels ``--jpeg-draft`` embeds); both ratios are reported, and the cosine of
capivara's drafted embeddings to open_clip's plain (full-decode) ones.

Runs alternate (Python, capivara, Python, ...); medians are reported. Both
embed the same files; their embeddings are checked to agree (cosine >= 0.9999
per image for f32) on the first batch.

    python scripts/index_bench.py --model ~/.cache/capivara-compare/full-size-random \\
        --capivara target/release/capivara --n 500 --runs 2 [--quantize int8] [--jpeg-draft]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))


def make_photos(folder: Path, n: int, w: int = 4000, h: int = 3000, distinct: int = 50) -> None:
    """`n` files, the first `distinct` generated, the rest copies of them (each
    file is read and decoded on its own all the same; generating 500 photos of
    12 MP takes longer than the benchmark)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(min(n, distinct)):
        if (folder / f"photo{i:04d}.jpg").is_file():
            continue
        a, b, c = rng.uniform(0.2, 2.0, 3)
        base = np.stack([
            127 + 100 * np.sin(xx / (300 * a) + i),
            127 + 100 * np.cos(yy / (250 * b) - i),
            127 + 100 * np.sin((xx + yy) / (400 * c)),
        ], axis=-1)
        edges = ((xx // (97 + i % 50) + yy // (131 + i % 40)) % 2)[..., None] * 40
        noise = rng.normal(0, 6, (h, w, 3)).astype(np.float32)
        img = np.clip(base + edges + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"photo{i:04d}.jpg", quality=90, subsampling="4:2:0")
        if (i + 1) % 10 == 0:
            print(f"  generated {i + 1}/{min(n, distinct)}", file=sys.stderr, flush=True)
    for i in range(distinct, n):
        dst = folder / f"photo{i:04d}.jpg"
        if not dst.is_file():
            shutil.copyfile(folder / f"photo{i % distinct:04d}.jpg", dst)


class Photos:
    def __init__(self, paths, preprocess, draft=None):
        self.paths, self.preprocess, self.draft = paths, preprocess, draft

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            if self.draft:
                # What `capivara --jpeg-draft` does: libjpeg's scaled decode.
                im.draft("RGB", (self.draft, self.draft))
            return self.preprocess(im.convert("RGB"))


def python_run(model, preprocess, paths, batch: int, workers: int, draft=None):
    import torch

    loader = torch.utils.data.DataLoader(Photos(paths, preprocess, draft), batch_size=batch, num_workers=workers)
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            out.append(model.encode_image(x, normalize=True).numpy())
    secs = time.perf_counter() - t0
    return len(paths) / secs, np.concatenate(out)


def capivara_run(binary: Path, model_dir: Path, folder: Path, extra):
    with tempfile.TemporaryDirectory(prefix="capivara-index-bench-") as data:
        p = subprocess.run([str(binary), "index", "--model", str(model_dir), "--data-dir", data, "--no-progress",
                            *extra, str(folder)], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"capivara index failed:\n{p.stderr[-3000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="an open_clip model directory")
    ap.add_argument("--capivara", type=Path, default=Path("target/release/capivara"))
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/capivara-index-bench"))
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quantize", default="none", help="capivara --quantize (none, int8)")
    ap.add_argument("--dtype", default="f32", help="capivara --dtype (f32, bf16)")
    ap.add_argument("--jpeg-draft", action="store_true",
                    help="capivara --jpeg-draft, and a third pipeline: Python with "
                         "im.draft('RGB', (2S, 2S)) before open_clip's transform")
    a = ap.parse_args()

    import torch
    from compare_torch import load_model, load_text_config

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    folder = a.dir / f"photos-{a.n}"
    print(f"== {a.n} JPEGs of 4000x3000 in {folder}", file=sys.stderr, flush=True)
    make_photos(folder, a.n)
    paths = sorted(folder.glob("*.jpg"))[: a.n]
    mb = sum(p.stat().st_size for p in paths) / 1e6
    model, preprocess, _ = load_model(a.model, load_text_config(a.model))

    # Agreement on the first batch (capivara embed vs open_clip).
    first = paths[: min(4, len(paths))]
    size = preprocess.transforms[0].size
    size = size if isinstance(size, int) else size[0]
    draft = 2 * size if a.jpeg_draft else None
    args = [str(a.capivara), "embed", "--model", str(a.model), "--dtype", a.dtype, "--quantize", a.quantize]
    if a.jpeg_draft:
        args.append("--jpeg-draft")
    for p in first:
        args += ["--image", str(p)]
    got = np.asarray(json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)["images"])
    # With --jpeg-draft, against open_clip on the drafted decode (the same pixels).
    _, want = python_run(model, preprocess, first, a.batch, 0, draft)
    cos = (got * want).sum(1)
    floor = 0.9999 if (a.quantize == "none" and a.dtype == "f32") else 0.99
    print(f"== agreement on {len(first)} photos: min cosine {cos.min():.6f} (need >= {floor})", file=sys.stderr)
    if cos.min() < floor:
        sys.exit("capivara and open_clip disagree on these photos")

    if a.jpeg_draft:
        _, plain = python_run(model, preprocess, first, a.batch, 0)
        cos_plain = (got * plain).sum(1)
        print(f"== --jpeg-draft vs open_clip's plain transform on {len(first)} photos: min cosine "
              f"{cos_plain.min():.6f}", file=sys.stderr)

    extra = ["--dtype", a.dtype, "--quantize", a.quantize, "--batch-size", str(a.batch)]
    if a.jpeg_draft:
        extra.append("--jpeg-draft")
    res = {"python": [], "capivara": []}
    if a.jpeg_draft:
        res["python_draft"] = []
    for r in range(a.runs):
        py, _ = python_run(model, preprocess, paths, a.batch, a.workers)
        res["python"].append(py)
        print(f"  [{r + 1}/{a.runs}] python {py:.2f} images/s", file=sys.stderr, flush=True)
        time.sleep(1)
        if a.jpeg_draft:
            py, _ = python_run(model, preprocess, paths, a.batch, a.workers, draft)
            res["python_draft"].append(py)
            print(f"  [{r + 1}/{a.runs}] python with im.draft {py:.2f} images/s", file=sys.stderr, flush=True)
            time.sleep(1)
        cap = capivara_run(a.capivara, a.model, folder, extra)
        res["capivara"].append(cap["images_per_second"])
        print(f"  [{r + 1}/{a.runs}] capivara {cap['images_per_second']:.2f} images/s "
              f"({cap['indexed']} indexed, {cap['skipped']} skipped)", file=sys.stderr, flush=True)
        time.sleep(1)
    med = {k: statistics.median(v) for k, v in res.items()}
    out = {
        "images": len(paths), "megabytes": round(mb, 1), "cores": cores, "batch": a.batch,
        "python_workers": a.workers, "capivara_dtype": a.dtype, "capivara_quantize": a.quantize,
        "capivara_jpeg_draft": a.jpeg_draft,
        "python_images_per_second": med["python"], "capivara_images_per_second": med["capivara"],
        "ratio": med["capivara"] / med["python"], "agreement_min_cosine": float(cos.min()), "runs": res,
    }
    if a.jpeg_draft:
        out["python_draft_images_per_second"] = med["python_draft"]
        out["ratio_to_python_draft"] = med["capivara"] / med["python_draft"]
        out["draft_vs_plain_min_cosine"] = float(cos_plain.min())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
