#!/usr/bin/env python3
"""`capivara-train caption` against PyTorch transformers, side by side, on this CPU.

Random weights of the real sizes (BLIP-large: ViT-L/16 at 384 px + a 12-layer
decoder; OPUS-MT tc-big: 6 + 6 layers, d_model 1024, a 53k vocabulary) are
written once into DIR (about 3 GB, not meant to be committed), with the tiny
fixtures' tokenizers (ids past their vocabularies decode to nothing, which
does not matter for speed). Both sides decode the same number of steps:
greedy, exactly ``--steps`` new tokens for captions (min = max) and at most
``--steps`` for translations (forced EOS at the limit; random weights almost
never stop earlier). Runs alternate (PyTorch, capivara, PyTorch, ...) and the
median is reported; the machine is shared, so single runs are noisy.

    python scripts/caption_bench.py --bin target/release/capivara-train --dir /tmp/caption-bench

Reports images/s of captioning (batch --batch images; model loading and image
decoding excluded on both sides) and sentences/s of translation (batch
--batch sentences).
"""

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BlipConfig, BlipForConditionalGeneration, MarianConfig, MarianMTModel

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "trainer" / "tests" / "fixtures" / "caption"


def build(d: Path) -> None:
    blip, marian = d / "blip", d / "marian"
    if not (blip / "model.safetensors").exists():
        blip.mkdir(parents=True, exist_ok=True)
        cfg = BlipConfig(
            text_config=dict(encoder_hidden_size=1024, num_attention_heads=12),
            vision_config=dict(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=384, patch_size=16,
            ),
        )
        BlipForConditionalGeneration(cfg).save_pretrained(blip)
        shutil.copy(FIX / "blip" / "tokenizer.json", blip)
        shutil.copy(FIX / "blip" / "tokenizer_config.json", blip)
    if not (marian / "model.safetensors").exists():
        marian.mkdir(parents=True, exist_ok=True)
        vocab = json.loads((FIX / "marian" / "vocab.json").read_text())
        # The fixture's pieces, then filler up to the real size, <pad> last.
        pad = 53016
        vocab = {k: v for k, v in vocab.items() if k != "<pad>"}
        for i in range(len(vocab), pad):
            vocab[f"<filler{i}>"] = i
        vocab["<pad>"] = pad
        (marian / "vocab.json").write_text(json.dumps(vocab))
        cfg = MarianConfig(
            vocab_size=pad + 1, d_model=1024, encoder_layers=6, decoder_layers=6, encoder_attention_heads=16,
            decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, activation_function="relu",
            scale_embedding=True, pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=0,
            max_position_embeddings=1024,
        )
        MarianMTModel(cfg).save_pretrained(marian)
        for f in ["source.spm", "target.spm", "tokenizer_config.json"]:
            shutil.copy(FIX / "marian" / f, marian)
        (marian / "generation_config.json").write_text(
            json.dumps({
                "bad_words_ids": [[pad]], "forced_eos_token_id": 0, "num_beams": 1, "eos_token_id": 0,
                "pad_token_id": pad, "decoder_start_token_id": pad,
            })
        )


SENTENCES = [
    "a red circle on a white background", "two dogs playing in the park", "a cat sleeping on a sofa",
    "a man riding a bicycle down the street", "a woman holding an umbrella in the rain",
    "a plate of food with rice and beans", "a group of people standing on a beach", "a small boat on a calm lake",
]


def shard(d: Path, n: int) -> Path:
    path = d / "bench.tar"
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as t:
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
            b = io.BytesIO()
            img.save(b, "JPEG", quality=90)
            for ext, data in [("jpg", b.getvalue()), ("txt", SENTENCES[i % len(SENTENCES)].encode())]:
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return path


def torch_caption(model, pixels, steps: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(pixel_values=pixels, num_beams=1, do_sample=False, max_new_tokens=steps, min_new_tokens=steps)
    return time.perf_counter() - t0


def torch_translate(model, ids, steps: int) -> float:
    pad = model.config.pad_token_id
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=1, do_sample=False, max_new_tokens=steps,
            bad_words_ids=[[pad]], forced_eos_token_id=0,
        )
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--dir", default="/tmp/caption-bench")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    d = Path(a.dir)
    build(d)
    tar = shard(d, a.batch)
    blip = BlipForConditionalGeneration.from_pretrained(d / "blip").eval()
    marian = MarianMTModel.from_pretrained(d / "marian").eval()
    pixels = torch.randn(a.batch, 3, 384, 384)
    # The same source ids capivara's tokenizer makes (">>por<<"-free vocabulary here).
    from transformers import MarianTokenizer

    tok = MarianTokenizer(str(d / "marian/source.spm"), str(d / "marian/target.spm"), str(d / "marian/vocab.json"))
    enc = tok(SENTENCES[: a.batch], return_tensors="pt", padding=True)
    ids = enc.input_ids
    res = {"torch_caption_s": [], "torch_translate_s": [], "capivara_caption_s": [], "capivara_translate_s": []}
    for r in range(a.runs):
        res["torch_caption_s"].append(torch_caption(blip, pixels, a.steps))
        res["torch_translate_s"].append(torch_translate(marian, ids, a.steps))
        out = d / f"out{r}"
        shutil.rmtree(out, ignore_errors=True)
        p = subprocess.run(
            [a.bin, "caption", "--shards", str(tar), "--out", str(out), "--captioner", str(d / "blip"),
             "--translator", str(d / "marian"), "--target-lang", "none", "--per-image", "1", "--max-draws", "1",
             "--num-beams", "1", "--max-new-tokens", str(a.steps), "--min-new-tokens", str(a.steps),
             "--source-captions", "txt", "--translate-beams", "1", "--translate-max-new-tokens", str(a.steps),
             "--batch-size", str(a.batch), "--translate-batch-size", str(a.batch), "--no-progress"],
            capture_output=True, text=True, check=True,
        )
        s = json.loads(p.stdout)
        res["capivara_caption_s"].append(s["caption_seconds"])
        res["capivara_translate_s"].append(s["translate_seconds"])
        print(json.dumps({k: v[-1] for k, v in res.items()}), flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(json.dumps({
        "batch": a.batch, "steps": a.steps, "runs": a.runs, "threads": torch.get_num_threads(),
        "torch_images_per_s": a.batch / med["torch_caption_s"],
        "capivara_images_per_s": a.batch / med["capivara_caption_s"],
        "torch_sentences_per_s": a.batch / med["torch_translate_s"],
        "capivara_sentences_per_s": a.batch / med["capivara_translate_s"],
        "medians_s": med,
    }, indent=1))


if __name__ == "__main__":
    main()
