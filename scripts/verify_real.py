#!/usr/bin/env python3
"""Check capivara against open_clip on the real CAPIVARA weights (needs network).

One command for anyone with network access and the Python environment of
``scripts/requirements.txt``::

    python scripts/verify_real.py

It

1. loads ``hf-hub:hiaac-nlp/CAPIVARA`` with open_clip (downloaded into the
   Hugging Face cache, which capivara shares: the weights come down once);
2. runs the capivara binary (``capivara embed``, which prints one JSON object)
   on the same 20 Portuguese texts and 10 images (``tests/fixtures/images``);
3. prints, per tower, the largest absolute difference between the two sets of
   normalised embeddings and the smallest cosine between matching rows, and
   fails if an error exceeds ``--tolerance`` (1e-4);
4. zero-shot sanity check: six drawn images (a red circle, a blue square...)
   against Portuguese labels with one prompt ("uma foto de {}."); capivara's
   top-1 label must be open_clip's for every image.

Exit status 0 when everything agrees, 1 otherwise (2 for bad usage). CI does
not run it: it needs the network and about 1.5 GB of weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# 20 Portuguese texts: short and long, accents, punctuation, an emoji, a
# number, an HTML entity (cleaned by open_clip's tokenizer, and by capivara's).
TEXTS = [
    "uma capivara",
    "uma capivara tomando sol à beira do rio",
    "um cachorro correndo na praia",
    "dois gatos dormindo no sofá da sala",
    "uma criança andando de bicicleta no parque",
    "um prato de feijoada com arroz e farofa",
    "o pôr do sol visto do alto do morro",
    "uma mulher segurando um guarda-chuva vermelho na chuva",
    "um ônibus amarelo parado no ponto",
    "jogadores de futebol disputando a bola",
    "uma estrada de terra cercada por árvores",
    "um homem tocando violão na rua",
    "frutas tropicais numa feira: manga, caju e açaí",
    "a vista aérea de uma cidade à noite",
    "um barco de pesca ancorado no cais",
    "um pássaro colorido pousado num galho 🐦",
    "3 crianças brincando &amp; rindo no quintal",
    "Uma foto em preto e branco de uma igreja antiga.",
    "um computador portátil sobre uma mesa de madeira, ao lado de uma xícara de café",
    "neve cobrindo as montanhas",
]

# The first 10 fixture images (PNG in several modes, JPEG, WebP, GIF, BMP).
IMAGES_DIR = ROOT / "tests" / "fixtures" / "images"

# Zero-shot: (label, shape, colour) drawn on white.
ZERO_SHOT = [
    ("um círculo vermelho", "circle", (220, 30, 30)),
    ("um quadrado azul", "square", (30, 60, 220)),
    ("um triângulo verde", "triangle", (30, 170, 60)),
    ("uma estrela amarela", "star", (240, 200, 20)),
    ("uma linha preta", "line", (0, 0, 0)),
    ("um círculo laranja", "circle", (250, 140, 20)),
]
TEMPLATE = "uma foto de {}."


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Compare capivara's embeddings with open_clip's on the real "
        "CAPIVARA weights (20 Portuguese texts, 10 images) and check zero-shot top-1.",
    )
    p.add_argument(
        "--model",
        default="hf-hub:hiaac-nlp/CAPIVARA",
        help="open_clip model name (default: %(default)s); capivara gets the "
        "same repo id without the `hf-hub:` prefix",
    )
    p.add_argument(
        "--capivara",
        type=Path,
        default=None,
        help="the capivara binary (default: target/release/capivara, built "
        "with `cargo build --release -p capivara` if missing)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed absolute difference per embedding value (default: %(default)g)",
    )
    p.add_argument(
        "--images",
        type=Path,
        default=IMAGES_DIR,
        help="folder whose first 10 images (sorted by name) are embedded "
        "(default: tests/fixtures/images)",
    )
    args = p.parse_args(argv)
    if not args.model.startswith("hf-hub:"):
        p.error("--model must be an open_clip hub name, `hf-hub:ORG/NAME`")
    if not (args.tolerance > 0):
        p.error("--tolerance must be positive")
    return args


def capivara_binary(given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            sys.exit(f"error: --capivara {given}: no such file")
        return given
    exe = ROOT / "target" / "release" / "capivara"
    if not exe.is_file():
        if shutil.which("cargo") is None:
            sys.exit("error: no target/release/capivara and no cargo to build it (or pass --capivara)")
        print("building capivara (cargo build --release -p capivara) ...", file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "-p", "capivara"], cwd=ROOT, check=True)
    return exe


def capivara_embed(exe: Path, repo: str, texts: list[str], images: list[Path]) -> dict:
    cmd = [str(exe), "embed", "--model", repo]
    for t in texts:
        cmd += ["--text", t]
    for i in images:
        cmd += ["--image", str(i)]
    # capivara's download progress goes to stderr (shown); stdout is one JSON object.
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:4])} ... failed with exit status {out.returncode}")
    return json.loads(out.stdout)


def draw(shape: str, colour: tuple[int, int, int], path: Path) -> None:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (256, 256), "white")
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse((48, 48, 208, 208), fill=colour)
    elif shape == "square":
        d.rectangle((56, 56, 200, 200), fill=colour)
    elif shape == "triangle":
        d.polygon([(128, 36), (220, 210), (36, 210)], fill=colour)
    elif shape == "star":
        import math

        pts = []
        for k in range(10):
            r = 100 if k % 2 == 0 else 40
            a = math.pi / 2 + k * math.pi / 5
            pts.append((128 + r * math.cos(a), 128 - r * math.sin(a)))
        d.polygon(pts, fill=colour)
    elif shape == "line":
        d.line((30, 128, 226, 128), fill=colour, width=14)
    else:
        raise ValueError(shape)
    img.save(path)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Heavy imports after the arguments: `--help` works without them.
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    images = sorted(p for p in args.images.iterdir() if p.is_file())[:10]
    if len(images) < 10:
        sys.exit(f"error: {args.images} holds {len(images)} images, 10 are needed")
    exe = capivara_binary(args.capivara)
    repo = args.model.removeprefix("hf-hub:")

    torch.set_grad_enabled(False)
    print(f"open_clip {open_clip.__version__}: loading {args.model} ...", file=sys.stderr)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model)
    tokenizer = open_clip.get_tokenizer(args.model)
    model.eval()

    def oc_text(texts: list[str]) -> np.ndarray:
        e = model.encode_text(tokenizer(texts)).float()
        return torch.nn.functional.normalize(e, dim=-1).numpy()

    def oc_images(paths: list[Path]) -> np.ndarray:
        x = torch.stack([preprocess(Image.open(p)) for p in paths])
        e = model.encode_image(x).float()
        return torch.nn.functional.normalize(e, dim=-1).numpy()

    ok = True
    print(f"capivara ({exe}): embedding {len(TEXTS)} texts and {len(images)} images ...", file=sys.stderr)
    cap = capivara_embed(exe, repo, TEXTS, images)
    print(f"{'tower':6}  {'rows':>4}  {'max abs error':>13}  {'min cosine':>10}  verdict")
    for tower, ref, got in [
        ("text", oc_text(TEXTS), np.asarray(cap["texts"], dtype=np.float32)),
        ("image", oc_images(images), np.asarray(cap["images"], dtype=np.float32)),
    ]:
        if ref.shape != got.shape:
            print(f"{tower:6}  shapes differ: open_clip {ref.shape}, capivara {got.shape}")
            ok = False
            continue
        err = float(np.abs(ref - got).max())
        cos = float(
            (np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))).min()
        )
        good = err <= args.tolerance
        ok &= good
        print(f"{tower:6}  {len(ref):4}  {err:13.3e}  {cos:10.7f}  {'ok' if good else 'FAIL'}")

    # Zero-shot: top-1 of each drawn image among the labels, both ways.
    labels = [label for label, _, _ in ZERO_SHOT]
    prompts = [TEMPLATE.format(label) for label in labels]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (_, shape, colour) in enumerate(ZERO_SHOT):
            p = Path(tmp) / f"{i}-{shape}.png"
            draw(shape, colour, p)
            paths.append(p)
        cap_zs = capivara_embed(exe, repo, prompts, paths)
        oc_top = (oc_images(paths) @ oc_text(prompts).T).argmax(axis=1)
        cap_top = (
            np.asarray(cap_zs["images"], dtype=np.float32) @ np.asarray(cap_zs["texts"], dtype=np.float32).T
        ).argmax(axis=1)
    print()
    print(f"{'image (drawn as)':22}  {'open_clip top-1':22}  {'capivara top-1':22}  verdict")
    correct = 0
    for i, (label, _, _) in enumerate(ZERO_SHOT):
        same = oc_top[i] == cap_top[i]
        ok &= bool(same)
        correct += int(cap_top[i] == i)
        print(f"{label:22}  {labels[oc_top[i]]:22}  {labels[cap_top[i]]:22}  {'ok' if same else 'FAIL'}")
    print(f"(capivara names {correct} of {len(ZERO_SHOT)} drawings as drawn; only agreement with open_clip is checked)")
    print()
    print("PASS: capivara matches open_clip" if ok else "FAIL: capivara differs from open_clip")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
