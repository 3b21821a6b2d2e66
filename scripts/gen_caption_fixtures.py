#!/usr/bin/env python3
"""Generate the fixtures of `capivara-train caption` (BLIP captioner + Marian translator).

Writes, deterministically and offline, into ``trainer/tests/fixtures/caption/``:

``blip/``
    a tiny random ``BlipForConditionalGeneration`` (vision: 32 px, patch 8,
    hidden 48, 2 layers; text decoder: hidden 32, 2 layers) in the layout of
    ``Salesforce/blip-image-captioning-large``: ``config.json``,
    ``model.safetensors``, a WordPiece ``tokenizer.json`` (trained here, with
    ``[DEC]`` as the decoder's start token) and ``preprocessor_config.json``
    (at the model's 32 px).
``marian/``
    a tiny random ``MarianMTModel`` (d_model 32, 2+2 layers, swish, scaled
    embeddings) in the layout of the OPUS-MT repos: ``config.json``,
    ``generation_config.json`` (``bad_words_ids`` = pad, ``forced_eos_token_id``),
    ``model.safetensors``, ``source.spm`` / ``target.spm`` (Unigram
    SentencePiece models trained here on the English / Portuguese text below),
    ``vocab.json`` (the joint vocabulary, in an order unrelated to the .spm ids,
    with target-language tokens ``>>por<<`` / ``>>spa<<``).
``reference.json`` and ``reference.safetensors``
    what Python ``transformers`` produces on them: MarianTokenizer ids of test
    sentences; BLIP and Marian greedy / beam / min-length generations (token
    ids and decoded text) and the first generation step's logits; for the test
    images, BLIP's image processor output (384 px) stored as the uint8 RGB it
    rescales (``preprocess_<name>.png``, exact: the processor resizes in 8 bits;
    every third row and column from 1, to keep the files small).

Weights are re-drawn with a larger spread than transformers' init so that the
next-token distributions are peaked (no near-ties for float noise to flip), and
the end-of-sequence logit is raised so that beams do finish before the limit.

Run from the repository root (needs torch, transformers >= 5, sentencepiece,
tokenizers, pillow)::

    python scripts/gen_caption_fixtures.py
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BertTokenizerFast,
    MarianConfig,
    MarianMTModel,
    MarianTokenizer,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "trainer" / "tests" / "fixtures" / "caption"
IMAGES = ROOT / "tests" / "fixtures" / "images"
PREPROCESS_IMAGES = ["photo.jpg", "rgba.png", "gray.png", "palette.png", "wide.png"]

ENGLISH = """a red circle on a white background
a blue square next to a green triangle
two dogs playing in the park
a cat sleeping on a sofa
a man riding a bicycle down the street
a woman holding an umbrella in the rain
a plate of food with rice and beans
a group of people standing on a beach
a small boat on a calm lake
an old building with a clock tower
a child flying a kite in a field
a red car parked near a tree
the sun setting over the mountains
a bowl of fruit on a wooden table
a train crossing a bridge over a river
a yellow flower in a garden
a bird sitting on a branch
a city skyline at night
three horses running in a meadow
a laptop and a cup of coffee on a desk""".splitlines()

PORTUGUESE = """um círculo vermelho sobre um fundo branco
um quadrado azul ao lado de um triângulo verde
dois cachorros brincando no parque
um gato dormindo em um sofá
um homem andando de bicicleta pela rua
uma mulher segurando um guarda-chuva na chuva
um prato de comida com arroz e feijão
um grupo de pessoas em pé na praia
um pequeno barco em um lago calmo
um prédio antigo com uma torre de relógio
uma criança soltando pipa em um campo
um carro vermelho estacionado perto de uma árvore
o sol se pondo sobre as montanhas
uma tigela de frutas sobre uma mesa de madeira
um trem atravessando uma ponte sobre um rio
uma flor amarela em um jardim
um pássaro pousado em um galho
o horizonte de uma cidade à noite
três cavalos correndo em um prado
um notebook e uma xícara de café sobre uma mesa""".splitlines()

# Tokenizer test sentences: known words, unseen words, characters outside the
# .spm (fused into one unknown piece), extra spaces, NFKC-normalised forms.
TOKENIZER_TESTS = [
    "a red circle on a white background",
    "  two   dogs playing  in the park ",
    "A Naïve café — über 😀😀 ok",
    "ﬁne ＡＢＣ ①",
    "the cat, the dog; and... the bird!",
    "",
    "zebra xylophone quixotic",
]

# Sentences translated in one padded batch.
TRANSLATE = [
    "a red circle on a white background",
    "two dogs",
    "a man riding a bicycle down the street near a tree",
]


def peaked_(model: torch.nn.Module, seed: int, embed_std: float = 1.0) -> None:
    """Re-draws every parameter with a larger spread (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "embed_positions" in name:  # Marian's sinusoids: fixed, not saved
                continue
            if p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                std = embed_std if "embed" in name or "shared" in name else 1.5 / fan_in**0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("weight"):  # LayerNorm
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def train_wordpiece(path: Path) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=160, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    tok.train_from_iterator(ENGLISH, trainer)
    tok.add_special_tokens(["[DEC]"])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def blip(ref: dict, tensors: dict) -> None:
    d = OUT / "blip"
    d.mkdir(parents=True, exist_ok=True)
    tok = train_wordpiece(d)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(f"{tmp}/tokenizer.json")
        fast = BertTokenizerFast(tokenizer_file=f"{tmp}/tokenizer.json", bos_token="[DEC]", do_lower_case=True)
        fast.save_pretrained(d)
    for extra in ["vocab.txt"]:
        (d / extra).unlink(missing_ok=True)
    vocab = tok.get_vocab_size()
    cfg = BlipConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            encoder_hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=tok.token_to_id("[DEC]"),
            sep_token_id=tok.token_to_id("[SEP]"),
            pad_token_id=tok.token_to_id("[PAD]"),
            eos_token_id=tok.token_to_id("[SEP]"),
            projection_dim=32,
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg).eval()
    peaked_(model, 1)
    sep = cfg.text_config.sep_token_id
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[sep] += 11.0
    model.save_pretrained(d, safe_serialization=True)
    reloaded = BlipForConditionalGeneration.from_pretrained(d).eval()
    # The model directory's processor at the model's size (the CLI tests caption
    # with it); the reference below is the real 384 px processor.
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)

    g = torch.Generator().manual_seed(2)
    pixels = torch.randn((3, 3, 32, 32), generator=g)
    tensors["blip.pixel_values"] = pixels.contiguous()
    out = {"bos": cfg.text_config.bos_token_id, "sep": sep, "pad": cfg.text_config.pad_token_id}
    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=pixels)[0]
        tensors["blip.image_embeds"] = image_embeds.contiguous()
        start = torch.full((3, 1), cfg.text_config.bos_token_id, dtype=torch.long)
        logits = model.text_decoder(input_ids=start, encoder_hidden_states=image_embeds).logits[:, -1, :]
        tensors["blip.first_logits"] = logits.contiguous()
        again = reloaded.text_decoder(
            input_ids=start, encoder_hidden_states=reloaded.vision_model(pixel_values=pixels)[0]
        ).logits[:, -1, :]
        assert torch.allclose(logits, again, atol=1e-5), "the saved BLIP differs from the one in memory"
        runs = {
            "greedy": dict(num_beams=1, do_sample=False, max_new_tokens=12),
            "beam": dict(num_beams=3, do_sample=False, max_new_tokens=12),
            "greedy_min": dict(num_beams=1, do_sample=False, max_new_tokens=12, min_new_tokens=8),
        }
        for name, kw in runs.items():
            ids = model.generate(pixel_values=pixels, **kw)
            out[name] = {"args": kw, "ids": ids.tolist(), "text": fast.batch_decode(ids, skip_special_tokens=True)}
        # With a prompt: the processor's ids, [CLS] replaced by [DEC], [SEP] dropped.
        prompt = "a picture of"
        enc = fast([prompt] * 3, return_tensors="pt")
        ids = model.generate(pixel_values=pixels, input_ids=enc.input_ids, num_beams=1, do_sample=False, max_new_tokens=8)
        out["prompt"] = {
            "prompt": prompt,
            "args": {"num_beams": 1, "max_new_tokens": 8},
            "ids": ids.tolist(),
            "text": fast.batch_decode(ids, skip_special_tokens=True),
        }
    ref["blip"] = out

    # The image processor at its real size on the test images.
    proc = BlipImageProcessor()
    pre = {}
    mean, std = np.array(proc.image_mean), np.array(proc.image_std)
    for name in PREPROCESS_IMAGES:
        img = Image.open(IMAGES / name)
        pv = proc(images=img, return_tensors="np")["pixel_values"][0]  # 3 x 384 x 384
        rgb = (pv.transpose(1, 2, 0) * std + mean) * 255.0
        u8 = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        assert np.abs(rgb - u8).max() < 1e-3, "the processor did not resize in 8 bits"
        stem = f"preprocess_{Path(name).stem}.png"
        # Every third row and column (from 1): a uniform sample, a ninth of the bytes.
        Image.fromarray(np.ascontiguousarray(u8[1::3, 1::3])).save(OUT / stem, optimize=True)
        pre[name] = {"png": stem, "first_values": pv[:, 0, :4].tolist()}
    ref["blip_preprocess"] = {
        "size": [proc.size["height"], proc.size["width"]],
        "mean": list(proc.image_mean),
        "std": list(proc.image_std),
        "rescale_factor": proc.rescale_factor,
        "images": pre,
    }


def train_spm(lines: list, prefix: Path, vocab_size: int, rule: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines * 3))
        corpus = f.name
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        num_threads=1,
        seed_sentencepiece_size=1000,
        shuffle_input_sentence=False,
        minloglevel=2,
        normalization_rule_name=rule,
    )
    os.unlink(corpus)


def marian(ref: dict, tensors: dict) -> None:
    d = OUT / "marian"
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_spm(ENGLISH, Path(tmp) / "src", 90, "nmt_nfkc")
        # The target side is only decoded (through vocab.json): no charsmap, a smaller file.
        train_spm(PORTUGUESE, Path(tmp) / "tgt", 100, "identity")
        shutil.copy(f"{tmp}/src.model", d / "source.spm")
        shutil.copy(f"{tmp}/tgt.model", d / "target.spm")
    pieces = []
    for f in ["source.spm", "target.spm"]:
        sp = spm.SentencePieceProcessor(model_file=str(d / f))
        for i in range(sp.get_piece_size()):
            if not (sp.is_control(i) or sp.is_unknown(i)):
                pieces.append(sp.id_to_piece(i))
    # Joint vocabulary as OPUS-MT has it: </s> 0, <unk> 1, pieces, <pad> last;
    # the pieces in an order of their own (reversed, deduplicated).
    seen, ordered = set(), []
    for p in reversed(pieces):
        if p not in seen:
            seen.add(p)
            ordered.append(p)
    vocab = {"</s>": 0, "<unk>": 1, ">>por<<": 2, ">>spa<<": 3}
    for p in ordered:
        vocab[p] = len(vocab)
    vocab["<pad>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1))
    tok = MarianTokenizer(
        source_spm=str(d / "source.spm"), target_spm=str(d / "target.spm"), vocab=str(d / "vocab.json")
    )
    tok.save_pretrained(d)
    for extra in ["special_tokens_map.json"]:
        (d / extra).unlink(missing_ok=True)
    ref["marian_tokenizer"] = [
        {"text": t, "ids": tok(t).input_ids, "ids_por": tok(">>por<< " + t).input_ids} for t in TOKENIZER_TESTS
    ]
    pad = vocab["<pad>"]
    cfg = MarianConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        activation_function="swish",
        scale_embedding=True,
        pad_token_id=pad,
        decoder_start_token_id=pad,
        eos_token_id=0,
        forced_eos_token_id=0,
        dropout=0.0,
    )
    torch.manual_seed(3)
    model = MarianMTModel(cfg).eval()
    peaked_(model, 4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.final_logits_bias.copy_(0.3 * torch.randn(model.final_logits_bias.shape, generator=g))
        model.final_logits_bias[0, 0] += 1.5
    model.save_pretrained(d, safe_serialization=True)
    gen = {
        "bad_words_ids": [[pad]],
        "forced_eos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": pad,
        "decoder_start_token_id": pad,
        "num_beams": 3,
        "max_length": 16,
    }
    (d / "generation_config.json").write_text(json.dumps(gen, indent=1))
    reloaded = MarianMTModel.from_pretrained(d).eval()

    enc = tok([">>por<< " + t for t in TRANSLATE], return_tensors="pt", padding=True)
    out = {"sentences": TRANSLATE, "input_ids": enc.input_ids.tolist(), "pad": pad}
    with torch.no_grad():
        start = torch.full((len(TRANSLATE), 1), pad, dtype=torch.long)
        logits = model(**enc, decoder_input_ids=start).logits[:, -1, :]
        tensors["marian.first_logits"] = logits.contiguous()
        again = reloaded(**enc, decoder_input_ids=start).logits[:, -1, :]
        assert torch.allclose(logits, again, atol=1e-5), "the saved Marian differs from the one in memory"
        common = dict(bad_words_ids=[[pad]], forced_eos_token_id=0, do_sample=False)
        runs = {
            "greedy": dict(num_beams=1, max_new_tokens=12),
            "beam": dict(num_beams=3, max_new_tokens=12),
            "greedy_min": dict(num_beams=1, max_new_tokens=12, min_new_tokens=6),
        }
        for name, kw in runs.items():
            ids = model.generate(**enc, **common, **kw)
            out[name] = {"args": kw, "ids": ids.tolist(), "text": tok.batch_decode(ids, skip_special_tokens=True)}
    ref["marian"] = out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    ref, tensors = {}, {}
    blip(ref, tensors)
    marian(ref, tensors)
    save_file(tensors, str(OUT / "reference.safetensors"))
    (OUT / "reference.json").write_text(json.dumps(ref, ensure_ascii=False, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
