#!/usr/bin/env python3
"""Check that a model directory written by ``capivara-train merge`` loads in
Python open_clip and embeds exactly as capivara does.

It loads DIR through open_clip's own ``local-dir:`` loader
(``create_model_and_transforms``: ``open_clip_config.json`` +
``open_clip_model.safetensors``, strict state-dict loading), tokenizes with
open_clip's ``HFTokenizer`` on DIR's ``tokenizer.json`` and preprocesses with
the transform open_clip derives from the config; then runs ``capivara embed``
on the same texts and images and prints the largest absolute differences.

Run (the Python environment of scripts/requirements.txt; CI does not run it)::

    cargo build --workspace
    python scripts/check_merged.py --merged /tmp/run/merged \
        --capivara target/debug/capivara

Nothing is downloaded: the ``AutoConfig.from_pretrained("xlm-roberta-base")``
call of open_clip's HFTextEncoder is answered with DIR's ``text_config.json``.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import open_clip  # noqa: E402
from open_clip.tokenizer import HFTokenizer  # noqa: E402
from transformers import XLMRobertaConfig  # noqa: E402

from gen_fixtures import offline_hf_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "um círculo vermelho",
    "uma cruz azul sobre um fundo claro",
    "uma capivara na beira do rio",
    "Um cachorro correndo na praia em Copacabana!",
    "",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--merged", type=Path, required=True, help="a `capivara-train merge --out` directory")
    ap.add_argument("--capivara", type=Path, default=ROOT / "target/debug/capivara")
    ap.add_argument("--images", type=Path, nargs="*",
                    default=sorted((ROOT / "tests/fixtures/images").glob("*.[jp][pn]g")))
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    text_config = XLMRobertaConfig.from_json_file(str(args.merged / "text_config.json"))
    with offline_hf_config(text_config):
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{args.merged}")
    model.eval()
    tok = HFTokenizer(str(args.merged), context_length=77)
    with torch.inference_mode():
        txt = model.encode_text(tok(TEXTS), normalize=True)
        pixels = torch.stack([preprocess(Image.open(p)) for p in args.images])
        img = model.encode_image(pixels, normalize=True)

    cmd = [str(args.capivara), "embed", "--model", str(args.merged)]
    for t in TEXTS:
        cmd += ["--text", t]
    for p in args.images:
        cmd += ["--image", str(p)]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    rust_txt = torch.tensor(out["texts"])
    rust_img = torch.tensor(out["images"])
    dt = (rust_txt - txt).abs().max().item()
    di = (rust_img - img).abs().max().item()
    print(json.dumps({
        "merged": str(args.merged),
        "texts": len(TEXTS),
        "images": len(args.images),
        "max_abs_error_text": dt,
        "max_abs_error_image": di,
        "open_clip": open_clip.__version__,
    }))
    if max(dt, di) > args.tolerance:
        sys.exit(f"capivara and open_clip differ by more than {args.tolerance}")


if __name__ == "__main__":
    main()
