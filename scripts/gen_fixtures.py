#!/usr/bin/env python3
"""Generate the test fixtures of the Rust CAPIVARA re-implementation.

CAPIVARA is an OpenCLIP ``xlm-roberta-base-ViT-B-32`` model (ViT-B/32 image tower
+ XLM-RoBERTa text tower, masked mean pooling, MLP text projection).  This script
builds, fully offline and deterministically (fixed seeds), everything the Rust
tests compare against:

``tests/fixtures/tiny/``
    * ``tokenizer.json`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``):
      a small XLM-R-style Unigram tokenizer trained with the ``tokenizers``
      library on the Portuguese/English text written in this file.
    * ``open_clip_config.json``, ``text_config.json``: a tiny model with the exact
      open_clip ``CustomTextCLIP`` / ``HFTextEncoder`` structure of
      ``xlm-roberta-base-ViT-B-32`` (embed_dim 32, ViT width 64 / 2 layers,
      XLM-R hidden 48 / 2 layers), random weights.
    * ``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``: its state_dict.
    * ``lightning.ckpt``: a PyTorch-Lightning-style checkpoint (keys ``model.model.*``
      incl. ``...embeddings.position_ids``, optimizer/scheduler/loop state,
      hyper-parameters with an ``argparse.Namespace`` and a custom class).
``tests/fixtures/lightning_model_prefix.ckpt``
    the same weights with keys ``model.*`` and no optimizer state.
``tests/fixtures/images/``
    small synthetic images in many formats/modes (PNG RGBA/L/LA/P+tRNS/16-bit,
    JPEG, WebP lossless/lossy, GIF, BMP, 1x1, very wide, odd portrait).
``tests/fixtures/reference.json``
    texts, open_clip ``HFTokenizer`` token ids (trailing ``<pad>`` removed),
    normalised text/image embeddings, image x text logits, raw ``logit_scale``.
``tests/fixtures/reference_pixels.safetensors``
    for each image the uint8 (224, 224, 3) RGB array that open_clip's
    preprocessing feeds to ToTensor (after Resize + CenterCrop + convert RGB).

Run (Python environment of ``scripts/requirements.txt``, CPU only)::

    python scripts/gen_fixtures.py                      # writes tests/fixtures/
    python scripts/gen_fixtures.py --full-size /tmp/capivara-full

``--full-size DIR`` builds the full-size architecture (XLM-R base: vocab 250002,
768 hidden, 12 layers; ViT-B/32; embed_dim 512) with random weights and writes
config, text_config.json, the tiny tokenizer (padded to 250002 entries with pieces no text
uses, so that it matches the embedding matrix), ``open_clip_model.safetensors``
(~1.5 GB), ``reference.json`` and ``reference_pixels.safetensors`` into DIR, using
the images of tests/fixtures/images (run the default mode first).  It never
writes into tests/fixtures.  Its outputs are not meant to be committed.

Nothing is downloaded: HF_HUB_OFFLINE=1 is set, and the ``AutoConfig.from_pretrained
("xlm-roberta-base")`` call that open_clip's HFTextEncoder makes is answered with
the local XLMRobertaConfig (everything else is open_clip's / transformers' own code).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # deterministic Unigram training

import argparse
import contextlib
import copy
import json
import math
import random
import shutil
import struct
import sys
import time
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import open_clip
import open_clip.hf_model
import transformers
from open_clip.tokenizer import HFTokenizer
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import Unigram
from torchvision.transforms import Compose
from transformers import AutoTokenizer, XLMRobertaConfig

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
SEED = 20240521
CONTEXT_LENGTH = 77
HF_NAME = "xlm-roberta-base"

OPENAI_MEAN = list(open_clip.OPENAI_DATASET_MEAN)
OPENAI_STD = list(open_clip.OPENAI_DATASET_STD)

# ----------------------------------------------------------------------------------------------
# Text used to train the tokenizer and the reference texts
# ----------------------------------------------------------------------------------------------

LONG_TEXT = (
    "Era uma vez uma pequena vila à beira de um rio largo e tranquilo, onde as famílias acordavam "
    "cedo para trabalhar nos campos de milho, feijão e mandioca. Todas as manhãs, o padeiro abria a "
    "porta da padaria e o cheiro de pão quente espalhava-se pelas ruas de pedra. As crianças corriam "
    "até a praça central, onde um velho cachorro caramelo dormia à sombra de uma mangueira enorme. "
    "Ninguém sabia ao certo a idade daquele cão, mas todos diziam que ele já estava ali quando a "
    "igreja foi pintada de azul pela primeira vez. Na feira de sábado, os vendedores ofereciam "
    "laranjas, bananas, abacaxis, queijos frescos, doce de leite e goiabada cascão. Havia também uma "
    "senhora que vendia flores amarelas, vermelhas e roxas, arrumadas em baldes de lata coloridos. "
    "À tarde, quando o sol começava a descer atrás das montanhas, os pescadores voltavam com os "
    "barcos cheios de peixes prateados, e as gaivotas gritavam sobre a água dourada. Os jovens "
    "jogavam futebol no campo de terra vermelha, enquanto os avós conversavam nos bancos da praça "
    "sobre chuva, colheita e histórias antigas. À noite, as janelas das casas brilhavam com luzes "
    "amarelas, e o som de um violão chegava de longe, misturado ao canto dos grilos e ao coaxar dos "
    "sapos na lagoa. Quando chovia forte, o rio subia e cobria a estrada de barro, e então a vila "
    "ficava isolada por alguns dias, mas ninguém se preocupava muito, porque havia comida, café e "
    "conversa para todos. Um dia chegou um fotógrafo da cidade grande, com uma câmera antiga e um "
    "chapéu de palha, e passou uma semana inteira registrando rostos, paisagens, animais e festas. "
    "As fotografias dele foram expostas num museu da capital, e muita gente descobriu, pela primeira "
    "vez, a beleza simples daquela vila esquecida no mapa, com seu rio, seu cachorro e seu pão quente."
)

REFERENCE_TEXTS = [
    "Um cachorro correndo na praia ao pôr do sol",
    "ação, coração, pão e maçã",
    "🐶🏖️ cachorro feliz",
    "",
    LONG_TEXT,
    "a photo of a gato preto",
    "UMA FOTO DE UM GATO PRETO EM CIMA DO TELHADO",
    "Preço: R$ 1.234,56 (50% off!) — 3/4 às 10h30?",
    "  muitos   espaços \n\t quebra de linha  ",
    "pão &amp; manteiga",
    "\u201colá\u201d \u2018mundo\u2019",
    "\ufb01m \uff21\uff22\uff23",
    "capivara",
    "Uma capivara tomando banho de sol na beira do lago.",
]

HAND_SENTENCES = """
Um cachorro correndo na praia ao pôr do sol.
Uma capivara descansando na beira do rio.
O gato preto dorme em cima do sofá vermelho.
Dois cavalos brancos pastando no campo verde.
Uma arara azul e amarela voando sobre a floresta.
O papagaio verde fala muitas palavras.
Um peixe dourado nadando no aquário.
A vaca malhada está comendo capim no pasto.
Três patos amarelos atravessam a estrada.
Um tucano de bico laranja pousado num galho.
O macaco-prego come uma banana madura.
Uma onça-pintada escondida entre as folhas.
O jacaré toma sol na margem da lagoa.
Um beija-flor bebendo néctar de uma flor vermelha.
A tartaruga marinha nada devagar no oceano.
Um coelho branco pulando no jardim.
Um cachorro feliz brincando com uma bola azul.
O cachorrinho caramelo late para o carteiro.
Uma galinha e seus pintinhos no quintal.
O porco rosado deitado na lama.
Uma ovelha com lã branca e macia.
O leão ruge na savana africana.
Uma girafa alta comendo folhas de uma árvore.
O elefante cinza toma banho no rio.
Um urso polar caminhando sobre o gelo.
Uma coruja marrom observa a noite.
O lobo-guará anda pelo cerrado.
Uma borboleta azul pousou na minha mão.
As formigas carregam folhas para o formigueiro.
Uma abelha voa de flor em flor.
O céu está azul e sem nuvens.
O pôr do sol deixou o céu laranja e rosa.
Uma parede pintada de amarelo e verde.
Um carro vermelho estacionado na rua.
Uma bicicleta azul encostada no muro branco.
Um vestido roxo pendurado no armário.
Os sapatos marrons estão embaixo da cama.
Uma caneca cinza cheia de café quente.
A bandeira do Brasil é verde, amarela, azul e branca.
Um arco-íris depois da chuva.
A praia de Copacabana no Rio de Janeiro.
Uma rua antiga de Salvador, na Bahia.
A avenida Paulista em São Paulo à noite.
O teatro Amazonas em Manaus.
As cataratas do Iguaçu no Paraná.
Uma fazenda no interior de Minas Gerais.
O mercado público de Porto Alegre.
Uma igreja barroca em Ouro Preto.
As dunas brancas dos Lençóis Maranhenses.
Uma praça cheia de árvores em Curitiba.
O farol na ponta da ilha.
Uma cachoeira no meio da mata atlântica.
A montanha coberta de neve no inverno.
Um barco de pesca no porto ao amanhecer.
Uma estrada de terra no sertão nordestino.
Uma casa de madeira perto do lago.
Um prato de arroz, feijão, farofa e bife.
Uma feijoada completa com couve e laranja.
Pão de queijo quentinho na mesa do café.
Um açaí na tigela com banana e granola.
Uma coxinha de frango e um guaraná gelado.
Brigadeiros de chocolate numa festa de aniversário.
Uma fatia de bolo de cenoura com cobertura.
Moqueca de peixe servida na panela de barro.
Tapioca com coco e leite condensado.
Uma salada de alface, tomate e cebola.
Churrasco de picanha no domingo.
Um copo de suco de maracujá.
Pastel de feira e caldo de cana.
Frutas tropicais: manga, caju, goiaba e abacaxi.
Uma xícara de chá verde e biscoitos.
Sorvete de morango derretendo no calor.
A pizza de calabresa saiu do forno.
Um computador portátil em cima da mesa.
Um telefone celular com a tela quebrada.
Uma cadeira de madeira ao lado da janela.
Um relógio antigo na parede da sala.
Uma lâmpada acesa no teto da cozinha.
Os livros empilhados na estante.
Uma mochila escolar cheia de cadernos.
Um guarda-chuva aberto na chuva.
Uma chave de fenda e um martelo na caixa de ferramentas.
Uma televisão ligada no canal de notícias.
Um violão encostado no sofá.
Uma bola de futebol no gramado.
Uma garrafa de água em cima da mesa.
Um espelho redondo no banheiro.
Óculos de sol na areia da praia.
Uma câmera fotográfica antiga.
Crianças jogando futebol na rua.
Uma mulher lendo um livro no parque.
Um homem andando de bicicleta na ciclovia.
Uma família fazendo piquenique no gramado.
Um menino soltando pipa no céu azul.
Uma menina desenhando com lápis de cor.
Pessoas dançando samba no carnaval.
Um músico tocando sanfona numa festa junina.
Um pescador jogando a rede no mar.
Uma professora escrevendo no quadro negro.
ação, coração, pão e maçã.
Informação, educação, atenção e emoção.
É difícil dizer adeus às férias.
Você já viu uma capivara de perto?
Não há nada como um café da manhã caprichado!
Ele disse: "Vou chegar às três horas."
A criança perguntou: por quê?
Água, óleo, açúcar e sal.
Às vezes o ônibus atrasa muito.
O avô contou histórias do sertão.
Hoje é segunda-feira, dia 15 de março de 2024.
O preço é R$ 12,50 ou 3 por R$ 30,00.
Temperatura de 28 graus às 14h30.
O jogo terminou 2 a 1 para o time da casa.
Ligue para 0800 123 4567.
100% algodão, tamanho M.
UMA FOTO DE UM GATO PRETO.
PROMOÇÃO DE VERÃO NA LOJA.
Cuidado: piso molhado!
Saída de emergência à direita.
a photo of a dog
a photo of a cat
a photo of a black cat on the roof
a red car parked on the street
a bowl of fruit on a wooden table
a bird flying over the sea
a picture of a capybara near the river
an old man reading a newspaper
two children playing in the park
a blue house with a green door
the quick brown fox jumps over the lazy dog
a photo of a gato preto
uma foto de um dog feliz
🐶 cachorro feliz na praia 🏖️
☀️ dia de sol 🌊
""".strip().splitlines()

ANIMALS = ["cachorro", "gato", "cavalo", "pássaro", "peixe", "capivara", "macaco", "coelho",
           "tartaruga", "papagaio", "urso", "leão", "tigre", "pato", "sapo", "cobra", "lobo", "boi"]
COLOURS = ["preto", "branco", "vermelho", "azul", "verde", "amarelo", "marrom", "cinza", "laranja",
           "roxo", "rosa", "dourado"]
PLACES = ["na praia", "no parque", "na floresta", "no jardim", "na cidade", "no campo", "na montanha",
          "perto do rio", "dentro de casa", "na rua", "no deserto", "na neve", "no lago", "na fazenda"]
ACTIONS = ["correndo", "dormindo", "comendo", "brincando", "nadando", "pulando", "descansando",
           "olhando para a câmera", "sentado", "andando", "voando", "bebendo água"]
OBJECTS = ["mesa", "cadeira", "janela", "porta", "cama", "lâmpada", "caneca", "bola", "garrafa",
           "mochila", "chapéu", "sapato", "livro", "relógio", "bicicleta", "carro"]
FOODS = ["pão", "queijo", "arroz", "feijão", "banana", "maçã", "laranja", "bolo", "sorvete", "café",
         "chocolate", "tomate", "batata", "milho", "peixe frito", "suco de uva"]
PEOPLE = ["menino", "menina", "homem", "mulher", "professora", "médico", "pescador", "cozinheiro",
          "jogador", "artista", "bombeiro", "motorista", "vovó", "estudante", "fotógrafo", "agricultor"]
MORE_WORDS = ("abacate amendoim andorinha aeroporto almofada ambulância aquarela armário árvore avião "
              "baleia balão bandeja barraca bengala biblioteca bigode borracha brinquedo cachecol "
              "cadeado caderno caixa calçada caminhão canoa caranguejo carrossel castelo cenoura "
              "chaleira chocalho chuveiro cidade colher computador corrente cortina cozinha "
              "dinossauro elevador envelope escada escova esquilo estrela fábrica faca fogueira "
              "foguete formiga fogão garfo gaveta geladeira golfinho guitarra helicóptero hipopótamo "
              "igreja ilha janela jarra joaninha lagarto lanterna lápis lua luva mala mapa martelo "
              "medalha melancia mesa microfone moinho montanha navio ninho nuvem óculos onda ovo "
              "palhaço panela papel pássaro pente pera pinguim piscina planeta ponte pote prato "
              "quadro rato rede relâmpago rinoceronte roda sabão sapato serpente sino sofá tambor "
              "tapete teclado telhado tesoura tigela toalha tomada torre trem trator túnel uva "
              "vaga-lume vassoura vela ventilador violino vulcão xadrez xícara zebra").split()
ENGLISH = ["a photo of a {en}", "a {en_colour} {en} in the {en_place}", "the {en} is {en_colour}",
           "an image of two {en}s", "a close-up photo of the {en}"]
EN_NOUNS = ["dog", "cat", "horse", "bird", "fish", "capybara", "monkey", "rabbit", "car", "house",
            "tree", "flower", "boat", "chair", "table", "book", "cup", "bicycle", "mountain", "beach"]
EN_COLOURS = ["black", "white", "red", "blue", "green", "yellow", "brown", "grey", "orange", "purple"]
EN_PLACES = ["park", "garden", "city", "forest", "kitchen", "street", "river", "snow", "desert", "sky"]
TEMPLATES = [
    "uma foto de um {animal} {colour} {action} {place}",
    "um {animal} {action} {place}",
    "a {object} {colour} perto do {animal}",
    "uma {object} {colour} {place}",
    "um prato de {food} e {food2}",
    "eu gosto de {food} com {food2}",
    "um desenho de um {animal} {colour}",
    "foto de {food} {place}",
    "o {animal} e a {object} {colour}",
    "o {person} segura um {word} {place}",
    "a {person} encontrou uma {word} e um {word2}",
    "{word} {colour}, {word2} e {food}",
    "um {word} ao lado de um {word2}",
    "Imagem de {word}, {word2} e {animal}",
]


def training_corpus():
    rng = random.Random(SEED)
    lines = list(HAND_SENTENCES) + [LONG_TEXT]
    for i in range(900):
        t = TEMPLATES[i % len(TEMPLATES)]
        lines.append(t.format(
            animal=rng.choice(ANIMALS), colour=rng.choice(COLOURS), action=rng.choice(ACTIONS),
            place=rng.choice(PLACES), object=rng.choice(OBJECTS), food=rng.choice(FOODS),
            food2=rng.choice(FOODS), person=rng.choice(PEOPLE), word=rng.choice(MORE_WORDS),
            word2=rng.choice(MORE_WORDS)))
    for i in range(150):
        lines.append(ENGLISH[i % len(ENGLISH)].format(
            en=rng.choice(EN_NOUNS), en_colour=rng.choice(EN_COLOURS), en_place=rng.choice(EN_PLACES)))
    # Upper-case / capitalised variants, so that both cases have pieces.
    lines += [s.upper() for s in HAND_SENTENCES[::3]]
    lines += [s.capitalize() for s in lines[200:400]]
    lines += [" ".join(MORE_WORDS[i:i + 7]) for i in range(0, len(MORE_WORDS), 7)]
    return lines


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3; "<mask>" is appended as the last id


def canonical_order(entries):
    """Make the trained vocab independent of the trainer's hash-map iteration order.

    UnigramTrainer gives the required characters it had pruned scores spaced by 1e-4 just
    above the lowest score, in arbitrary order, and equal scores come out in arbitrary order.
    Canonical form: the single characters scored within 0.01 of the minimum get those scores
    in code-point order, then everything is sorted by (score desc, piece).
    """
    lowest = min(sc for _, sc in entries)
    tail = [i for i, (p, sc) in enumerate(entries) if len(p) == 1 and sc < lowest + 0.01]
    chars = sorted(entries[i][0] for i in tail)
    scores = sorted((entries[i][1] for i in tail), reverse=True)
    entries = list(entries)
    for i, p, sc in zip(tail, chars, scores):
        entries[i] = (p, sc)
    return sorted(entries, key=lambda e: (-e[1], e[0]))


def build_tokenizer(out_dir: Path, vocab_size: int = 1500) -> Tokenizer:
    """Train an XLM-R-style Unigram tokenizer and save it (loadable by AutoTokenizer)."""
    tok = Tokenizer(Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>", shrinking_factor=0.75,
        max_piece_length=16, n_sub_iterations=2, show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer)

    # Rebuild it the way xlm-roberta-base's tokenizer.json looks: "<mask>" is the last entry of the
    # Unigram vocab, all five specials are added tokens, RobertaProcessing post-processor.
    trained = json.loads(tok.to_str())
    # Scores rounded to 8 decimals: short decimal strings parse to the same f64 in every JSON
    # reader (Python json, serde_json's fast path), so tokenizers, transformers and Rust agree.
    vocab = [(p, round(sc, 8)) for p, sc in trained["model"]["vocab"]]
    assert [v[0] for v in vocab[:4]] == SPECIALS, vocab[:5]
    vocab = vocab[:4] + canonical_order(vocab[4:])
    vocab.append(("<mask>", 0.0))
    final = Tokenizer(Unigram(vocab, unk_id=3, byte_fallback=False))
    final.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    final.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    final.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    final.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    final.add_special_tokens([AddedToken("<mask>", special=True, normalized=False, lstrip=True)])
    final.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=True)
    mask_id = len(vocab) - 1
    assert final.token_to_id("<mask>") == mask_id and final.get_vocab_size() == len(vocab)
    for i, t in enumerate(SPECIALS):
        assert final.token_to_id(t) == i

    out_dir.mkdir(parents=True, exist_ok=True)
    final.save(str(out_dir / "tokenizer.json"), pretty=True)

    mask = {"content": "<mask>", "lstrip": True, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}
    special_map = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": mask,
                   "pad_token": "<pad>", "sep_token": "</s>", "unk_token": "<unk>"}
    added_decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": True} for i, t in enumerate(SPECIALS)}
    added_decoder[str(mask_id)] = mask
    tok_config = {
        "tokenizer_class": "XLMRobertaTokenizerFast",
        "model_max_length": 512,
        "add_prefix_space": True,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added_decoder,
        **special_map,
        "mask_token": "<mask>",  # its AddedToken flags (lstrip) are in added_tokens_decoder
    }
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(out_dir / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # Checks: `tokenizers` loads it back identically, AutoTokenizer gives the XLM-R class.
    back = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    assert back.to_str() == final.to_str()
    assert back.encode("Um cachorro").ids[0] == 0 and back.encode("Um cachorro").ids[-1] == 2
    hf = AutoTokenizer.from_pretrained(str(out_dir))
    assert type(hf).__name__ in ("XLMRobertaTokenizer", "XLMRobertaTokenizerFast"), type(hf)
    assert hf.model_max_length == 512 and hf.pad_token_id == 1 and hf.mask_token_id == mask_id
    print(f"tokenizer: vocab {final.get_vocab_size()} (<mask>={mask_id}), AutoTokenizer -> "
          f"{type(hf).__module__}.{type(hf).__name__}, backend normalizer {hf.backend_tokenizer.normalizer}")
    return final


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

IMAGE_NAMES = ["rgba.png", "gray.png", "gray_alpha.png", "palette.png", "photo.jpg", "one.png",
               "wide.png", "portrait.jpg", "lossless.webp", "lossy.webp", "anim.gif", "image.bmp",
               "deep16.png"]


def _grid(w, h):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    return x / max(w - 1, 1), y / max(h - 1, 1)


def _scene(w, h, phase=0.0):
    """Smooth RGB float image in [0, 1]: gradients, a disc, a rectangle, soft stripes."""
    x, y = _grid(w, h)
    r = 0.15 + 0.7 * x
    g = 0.2 + 0.6 * y
    b = 0.5 + 0.4 * np.sin(2 * np.pi * (1.5 * x + 0.7 * y) + phase)
    img = np.stack([r, g, b], -1)
    aspect = w / h
    disc = ((x - 0.35) * aspect) ** 2 + (y - 0.45) ** 2 < 0.22 ** 2
    img[disc] = [0.95, 0.85, 0.1]
    rect = (x > 0.6) & (x < 0.85) & (y > 0.55) & (y < 0.9)
    img[rect] = [0.1, 0.2, 0.75]
    ring = np.abs(np.hypot((x - 0.7) * aspect, y - 0.25) - 0.12) < 0.02
    img[ring] = [0.9, 0.1, 0.2]
    # mild texture: fine diagonal stripes
    img += 0.06 * np.sign(np.sin(2 * np.pi * (x * w + y * h) / 9.0))[..., None]
    return np.clip(img, 0, 1)


def _u8(a):
    return np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_rgb16(path: Path, arr: np.ndarray):
    """Write a 16-bit-per-channel RGB PNG (PIL cannot write 16-bit RGB)."""
    h, w, c = arr.shape
    assert c == 3 and arr.dtype == np.uint16
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))
    data = (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(raw, 9))
            + _png_chunk(b"IEND", b""))
    path.write_bytes(data)


def deep16_array():
    w, h = 120, 90
    x, y = _grid(w, h)
    r = np.round(x * 65535)
    g = np.round(y * 65535)
    b = np.where(((np.arange(w)[None, :] // 8 + np.arange(h)[:, None] // 8) % 2) == 0, 0x01FF, 0xFE00)
    arr = np.stack([r, g, np.broadcast_to(b, (h, w))], -1).astype(np.uint16)
    # a few exact probe values in the first row: low byte != 0 and != high byte
    probes = [0x0000, 0x00FF, 0x0100, 0x01FF, 0x7F80, 0x80FF, 0xFF00, 0xFFFF]
    for i, v in enumerate(probes):
        arr[0, i] = v
    return arr


def make_images(img_dir: Path):
    img_dir.mkdir(parents=True, exist_ok=True)

    # rgba.png 320x240, alpha: 0 (left band), ramp (middle), 255 (right), plus a half-transparent disc
    w, h = 320, 240
    rgb = _u8(_scene(w, h))
    x, y = _grid(w, h)
    alpha = np.where(x < 0.25, 0.0, np.where(x < 0.6, (x - 0.25) / 0.35, 1.0))
    alpha = np.where(np.hypot(x - 0.8, y - 0.7) < 0.12, 0.5, alpha)
    alpha = np.where((y < 0.15) & (x > 0.6), 0.0, alpha)
    Image.fromarray(np.dstack([rgb, _u8(alpha)]), "RGBA").save(img_dir / "rgba.png", optimize=True)

    # gray.png 200x300 L
    w, h = 200, 300
    x, y = _grid(w, h)
    g = 0.5 + 0.35 * np.cos(2 * np.pi * 3 * np.hypot(x - 0.5, (y - 0.5) * 1.5)) * (1 - y) + 0.1 * (x - 0.5)
    g = np.where((x > 0.1) & (x < 0.3) & (y > 0.7) & (y < 0.9), 0.05, g)
    Image.fromarray(_u8(g), "L").save(img_dir / "gray.png", optimize=True)

    # gray_alpha.png 150x100 LA
    w, h = 150, 100
    x, y = _grid(w, h)
    lum = 0.2 + 0.6 * x + 0.15 * np.sin(2 * np.pi * 4 * y)
    a = np.where(y < 0.3, 0.0, np.where(y < 0.7, 0.5 + 0.5 * x, 1.0))
    Image.fromarray(np.dstack([_u8(lum), _u8(a)]), "LA").save(img_dir / "gray_alpha.png", optimize=True)

    # palette.png 250x250 P, 16 colours, tRNS with partial alphas
    w = h = 250
    yy, xx = np.mgrid[0:h, 0:w]
    idx = ((np.maximum(np.abs(xx - 125), np.abs(yy - 125)) // 12) + (xx // 50)) % 16
    idx = idx.astype(np.uint8)
    pal_rgb = []
    for i in range(16):
        pal_rgb += [(37 * i + 20) % 256, (91 * i + 60) % 256, (173 * i + 100) % 256]
    pim = Image.fromarray(idx, "P")
    pim.putpalette(pal_rgb)
    trns = bytes([0, 64, 128, 200] + [255] * 12)
    pim.save(img_dir / "palette.png", transparency=trns, optimize=False)

    # photo.jpg 400x300, quality 90, default (4:2:0) subsampling
    Image.fromarray(_u8(_scene(400, 300)), "RGB").save(img_dir / "photo.jpg", quality=90)

    # one.png 1x1
    Image.fromarray(np.array([[[200, 100, 50]]], np.uint8), "RGB").save(img_dir / "one.png")

    # wide.png 3000x200
    w, h = 3000, 200
    x, y = _grid(w, h)
    wide = np.stack([x, 0.3 + 0.4 * y, 0.5 + 0.5 * np.sin(2 * np.pi * 12 * x)], -1)
    wide[(np.abs(x - 0.5) < 0.02) & (y > 0.2) & (y < 0.8)] = [1.0, 1.0, 1.0]
    wide[(np.abs(x - 0.52) < 0.05) & (y > 0.4)] = [0.9, 0.1, 0.1]
    Image.fromarray(_u8(wide), "RGB").save(img_dir / "wide.png", optimize=True)

    # portrait.jpg 240x481 (odd height: centre-crop offset needs rounding)
    Image.fromarray(_u8(_scene(240, 481, phase=1.0)), "RGB").save(img_dir / "portrait.jpg", quality=90)

    # WebP 300x300
    webp = _u8(_scene(300, 300, phase=2.0))
    Image.fromarray(webp, "RGB").save(img_dir / "lossless.webp", lossless=True, method=6)
    Image.fromarray(webp, "RGB").save(img_dir / "lossy.webp", quality=90, method=6)

    # anim.gif 200x160, two frames, explicit (non-grey) palette
    w, h = 200, 160
    yy, xx = np.mgrid[0:h, 0:w]
    gif_pal = []
    for i in range(32):
        gif_pal += [(i * 8) % 256, (255 - i * 7) % 256, (60 + i * 53) % 256]
    f1 = (((xx // 10) + (yy // 20) * 3) % 32).astype(np.uint8)
    f1[40:120, 60:140] = 5
    f2 = ((f1.astype(np.int32) + 11) % 32).astype(np.uint8)
    frames = []
    for f in (f1, f2):
        im = Image.fromarray(f, "P")
        im.putpalette(gif_pal)
        frames.append(im)
    frames[0].save(img_dir / "anim.gif", save_all=True, append_images=frames[1:], duration=200, loop=0,
                   optimize=False, disposal=1)

    # image.bmp 257x199 24-bit
    Image.fromarray(_u8(_scene(257, 199, phase=0.5)), "RGB").save(img_dir / "image.bmp")

    # deep16.png 120x90 16-bit RGB
    write_png_rgb16(img_dir / "deep16.png", deep16_array())

    # sanity: sizes and modes
    expect = {"rgba.png": ("RGBA", (320, 240)), "gray.png": ("L", (200, 300)),
              "gray_alpha.png": ("LA", (150, 100)), "palette.png": ("P", (250, 250)),
              "photo.jpg": ("RGB", (400, 300)), "one.png": ("RGB", (1, 1)), "wide.png": ("RGB", (3000, 200)),
              "portrait.jpg": ("RGB", (240, 481)), "lossless.webp": ("RGB", (300, 300)),
              "lossy.webp": ("RGB", (300, 300)), "anim.gif": ("P", (200, 160)), "image.bmp": ("RGB", (257, 199)),
              "deep16.png": (None, (120, 90))}
    for name in IMAGE_NAMES:
        with Image.open(img_dir / name) as im:
            mode, size = expect[name]
            assert im.size == size, (name, im.size)
            assert mode is None or im.mode == mode, (name, im.mode)
            print(f"  {name:15s} format={im.format:5s} mode={im.mode:5s} size={im.size} "
                  f"info={ {k: (v if not isinstance(v, bytes) else v[:16]) for k, v in im.info.items() if k in ('transparency', 'duration', 'loop', 'dpi')} }"
                  + (f" frames={im.n_frames}" if getattr(im, 'n_frames', 1) > 1 else ""))


def report_deep16(img_dir: Path):
    """What PIL does with the 16-bit RGB PNG (printed; the reference pipeline uses the same path)."""
    arr = deep16_array()
    with Image.open(img_dir / "deep16.png") as im:
        mode, rawmode = im.mode, getattr(im, "tile", [None])[0]
        rgb = np.asarray(im.convert("RGB"))
    print(f"deep16.png: Image.open mode={mode!r} tile={rawmode}")
    for i in range(8):
        v = int(arr[0, i, 0])
        print(f"  16-bit {v:#06x} ({v:5d}) -> convert('RGB') {int(rgb[0, i, 0]):3d}  "
              f"[v>>8={v >> 8}, round(v/257)={round(v / 257)}, min(v,255)={min(v, 255)}]")
    shift = np.array_equal(rgb.astype(np.int64), (arr >> 8).astype(np.int64))
    print(f"  convert('RGB') == (v >> 8) for every pixel: {shift}")
    return shift


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

def tiny_text_config(vocab_size: int) -> XLMRobertaConfig:
    return XLMRobertaConfig(
        vocab_size=vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=128, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, hidden_act="gelu",
        architectures=["XLMRobertaForMaskedLM"])


def full_text_config() -> XLMRobertaConfig:
    return XLMRobertaConfig(
        vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, hidden_act="gelu",
        architectures=["XLMRobertaForMaskedLM"])


TEXT_CFG = {"hf_model_name": HF_NAME, "hf_tokenizer_name": HF_NAME, "hf_proj_type": "mlp",
            "hf_pooler_type": "mean_pooler"}
TINY_MODEL_CFG = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 64, "head_width": 32,
                                 "layers": 2, "mlp_ratio": 4.0},
                  "text_cfg": dict(TEXT_CFG)}
FULL_MODEL_CFG = {"embed_dim": 512,
                  "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 768, "head_width": 64,
                                 "layers": 12, "mlp_ratio": 4.0},
                  "text_cfg": dict(TEXT_CFG)}
PREPROCESS_CFG = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}


@contextlib.contextmanager
def offline_hf_config(text_config: XLMRobertaConfig):
    """Answer open_clip's AutoConfig.from_pretrained("xlm-roberta-base") with a local config.

    Only this lookup is replaced; HFTextEncoder then runs its normal code path
    (AutoModel.from_config / from_pretrained(..., add_pooling_layer=False) etc.).
    """
    original = open_clip.hf_model.AutoConfig

    class _LocalAutoConfig:
        @staticmethod
        def from_pretrained(name, *args, **kwargs):
            assert name == HF_NAME, name
            return copy.deepcopy(text_config)

    open_clip.hf_model.AutoConfig = _LocalAutoConfig
    try:
        yield
    finally:
        open_clip.hf_model.AutoConfig = original


def build_model(model_cfg: dict, text_config: XLMRobertaConfig) -> nn.Module:
    """Instantiate the model through open_clip's factory (random init, no weights loaded)."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"capivara-cfg-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        write_open_clip_config(tmp, model_cfg)
        with offline_hf_config(text_config):
            model = open_clip.create_model(f"local-dir:{tmp}", pretrained_text=False, pretrained_image=False)
    finally:
        shutil.rmtree(tmp)
    assert type(model).__name__ == "CustomTextCLIP", type(model)
    assert isinstance(model.text, open_clip.hf_model.HFTextEncoder)
    assert model.text.transformer.pooler is None  # add_pooling_layer=False (mean pooler)
    return model.eval().float()


@torch.no_grad()
def randomise(model: nn.Module, seed: int):
    """Random weights that make mistakes visible, with O(1) activations."""
    gen = torch.Generator().manual_seed(seed)

    def normal_(p, std, mean=0.0):
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std + mean)

    def uniform_(p, lo, hi):
        p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo)

    done = set()
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(mod, nn.LayerNorm):
                if pname == "weight":
                    uniform_(p, 0.8, 1.2)
                else:
                    uniform_(p, -0.1, 0.1)
            elif isinstance(mod, nn.Embedding):
                normal_(p, 0.2)
            elif isinstance(mod, (nn.Linear, nn.Conv2d)):
                if pname == "weight":
                    normal_(p, 1.0 / math.sqrt(p[0].numel()))
                else:
                    uniform_(p, -0.1, 0.1)
            elif isinstance(mod, nn.MultiheadAttention):
                if pname == "in_proj_weight":
                    normal_(p, 1.0 / math.sqrt(p.shape[1]))
                elif pname == "in_proj_bias":
                    uniform_(p, -0.1, 0.1)
                else:
                    raise AssertionError(full)
            elif full == "logit_scale":
                p.fill_(math.log(1 / 0.07) + 0.05 * float(torch.randn((), generator=gen)))
            elif full in ("visual.class_embedding", "visual.positional_embedding"):
                normal_(p, 0.3)
            elif full == "visual.proj":  # used as x @ proj: fan_in is shape[0]
                normal_(p, 1.0 / math.sqrt(p.shape[0]))
            else:
                raise AssertionError(f"no randomisation rule for {full} {tuple(p.shape)} ({type(mod).__name__})")
            done.add(full)
    assert done == {n for n, _ in model.named_parameters()}
    model.eval()


def model_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    sd = OrderedDict((k, v.detach().clone().contiguous().float() if v.is_floating_point() else v.detach().clone())
                     for k, v in model.state_dict().items())
    sd.pop("text.transformer.embeddings.position_ids", None)
    return sd


def write_open_clip_config(out_dir: Path, model_cfg: dict):
    with open(out_dir / "open_clip_config.json", "w", encoding="utf-8") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS_CFG}, f, indent=2)
        f.write("\n")


def write_text_config(out_dir: Path, text_config: XLMRobertaConfig):
    with open(out_dir / "text_config.json", "w", encoding="utf-8") as f:
        f.write(text_config.to_json_string(use_diff=False))


# ----------------------------------------------------------------------------------------------
# Lightning-style checkpoints
# ----------------------------------------------------------------------------------------------

class FakeDictConfig:
    """Stand-in for an OmegaConf DictConfig that ends up pickled in Lightning hyper_parameters."""

    def __init__(self, content, parent=None):
        self._content = content
        self._metadata = FakeMetadata(ref_type=dict, object_type=dict, key=None)
        self._parent = parent
        self._flags_cache = None

    def __repr__(self):
        return f"FakeDictConfig({self._content!r})"


class FakeMetadata:
    def __init__(self, ref_type, object_type, key):
        self.ref_type = ref_type
        self.object_type = object_type
        self.key = key
        self.optional = True
        self.flags = {"readonly": False}


def lightning_checkpoint(sd, prefix: str, with_position_ids: bool, with_optimizer: bool, max_pos: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for k, v in sd.items():
        if with_position_ids and k == "text.transformer.embeddings.word_embeddings.weight":
            state[prefix + "text.transformer.embeddings.position_ids"] = torch.arange(max_pos, dtype=torch.int64)[None]
        state[prefix + k] = v
    if with_position_ids:
        assert state[prefix + "text.transformer.embeddings.position_ids"].shape == (1, max_pos)

    args = argparse.Namespace(
        model_name="xlm-roberta-base-ViT-B-32", pretrained="laion5b_s13b_b90k", batch_size=2816,
        lr=5e-7, wd=0.2, warmup=500, epochs=5, precision="16-mixed", self_distill=False,
        datasets=["pracegover", "cc3m_pt", None], seed=42, gpus=[0, 1])
    model_conf = FakeDictConfig({"name": "capivara", "embed_dim": 512, "dropout": 0.0, "tags": ["pt", "clip"]})
    hyper = {
        "config": model_conf,
        "args": args,
        "model": {"name": "xlm-roberta-base-ViT-B-32", "pretrained": None, "freeze_vision": True},
        "optimizer": {"name": "AdamW", "lr": 5e-7, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.2},
        "scheduler": {"name": "CosineAnnealingLR", "T_max": 10000, "eta_min": 0.0},
        "annotation_type": None,
        "nested": {"a": [1, 2.5, "x", None, (3, 4)], "b": {"c": True}},
    }
    ckpt = {
        "epoch": 4,
        "global_step": 5823,
        "pytorch-lightning_version": "1.9.5",
        "state_dict": state,
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": 5823},
                "epoch_loop.batch_progress": {
                    "total": {"ready": 5824, "completed": 5823, "started": 5824, "processed": 5823},
                    "current": {"ready": 1164, "completed": 1164, "started": 1164, "processed": 1164},
                    "is_last_batch": True},
                "epoch_progress": {"total": {"ready": 5, "completed": 4, "started": 5, "processed": 5},
                                   "current": {"ready": 5, "completed": 4, "started": 5, "processed": 5}},
            },
            "validate_loop": {"state_dict": {}, "dataloader_progress": {"total": {"ready": 5, "completed": 5}}},
            "test_loop": {"state_dict": {}},
            "predict_loop": {"state_dict": {}},
        },
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min', 'every_n_train_steps': 0, "
            "'every_n_epochs': 1, 'train_time_interval': None}": {
                "monitor": "val/loss",
                "best_model_score": torch.tensor(1.2345),
                "best_model_path": "/checkpoints/capivara/epoch=4-step=5823.ckpt",
                "current_score": torch.tensor(1.2345),
                "dirpath": "/checkpoints/capivara",
                "best_k_models": {"/checkpoints/capivara/epoch=4-step=5823.ckpt": torch.tensor(1.2345)},
                "kth_best_model_path": "/checkpoints/capivara/epoch=4-step=5823.ckpt",
                "kth_value": torch.tensor(1.2345),
                "last_model_path": "",
            },
            "LearningRateMonitor": {"lrs": {"lr-AdamW": [5e-7, 4.9e-7]}},
        },
        "lr_schedulers": [{"T_max": 10000, "eta_min": 0.0, "base_lrs": [5e-7], "last_epoch": 5823,
                           "verbose": False, "_step_count": 5824, "_get_lr_called_within_step": False,
                           "_last_lr": [4.1e-7]}],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper,
    }
    if with_optimizer:
        opt_state = {}
        for i in range(3):
            n = 4 + i
            opt_state[i] = {"step": torch.tensor(5823.0),
                            "exp_avg": torch.randn(n, generator=gen) * 1e-3,
                            "exp_avg_sq": torch.rand(n, generator=gen) * 1e-6}
        ckpt["optimizer_states"] = [{
            "state": opt_state,
            "param_groups": [{"lr": 4.1e-7, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.2,
                              "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                              "differentiable": False, "fused": None, "initial_lr": 5e-7,
                              "params": [0, 1, 2]}],
        }]
    return ckpt


# ----------------------------------------------------------------------------------------------
# Reference pipeline
# ----------------------------------------------------------------------------------------------

def make_preprocess():
    return open_clip.image_transform(224, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD,
                                     interpolation="bicubic", resize_mode="shortest")


def reference_pixels(preprocess, img_dir: Path):
    """uint8 (224,224,3) arrays after the transform's own Resize + CenterCrop + convert('RGB')."""
    pre_tensor = Compose(preprocess.transforms[:-2])
    to_tensor, normalize = preprocess.transforms[-2:]
    assert type(to_tensor).__name__ == "MaybeToTensor" and type(normalize).__name__ == "Normalize", preprocess
    pixels, inputs = OrderedDict(), []
    for name in IMAGE_NAMES:
        with Image.open(img_dir / name) as im:
            pil = pre_tensor(im)
        assert pil.mode == "RGB" and pil.size == (224, 224), (name, pil.mode, pil.size)
        arr = np.array(pil, dtype=np.uint8)
        with Image.open(img_dir / name) as im:
            full = preprocess(im)
        rebuilt = normalize(to_tensor(arr))
        assert torch.equal(rebuilt, full), name
        pixels[name] = torch.from_numpy(arr.copy())
        inputs.append(full)
    return pixels, torch.stack(inputs)


def tokenize_reference(tok_dir: Path, texts):
    """open_clip's HFTokenizer; cross-checked against tokenizer.json run by `tokenizers` directly."""
    hf_tok = HFTokenizer(str(tok_dir), context_length=CONTEXT_LENGTH)
    ids = hf_tok(texts)
    assert ids.shape == (len(texts), CONTEXT_LENGTH) and ids.dtype == torch.long

    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    raw.enable_truncation(CONTEXT_LENGTH)
    raw.enable_padding(length=CONTEXT_LENGTH, pad_id=1, pad_token="<pad>")
    cleaned = [hf_tok.clean_fn(t) for t in texts]
    direct = torch.tensor([e.ids for e in raw.encode_batch(cleaned)], dtype=torch.long)
    mismatch = [t for t, a, b in zip(texts, ids, direct) if not torch.equal(a, b)]
    assert not mismatch, f"HFTokenizer and tokenizer.json disagree on {mismatch}"

    raw.no_truncation()
    assert len(raw.encode(hf_tok.clean_fn(LONG_TEXT)).ids) > 2 * CONTEXT_LENGTH  # really truncated

    trimmed = []
    for row in ids.tolist():
        while row and row[-1] == 1:
            row.pop()
        trimmed.append(row)
    return ids, trimmed, cleaned


@torch.inference_mode()
def embeddings(model, ids, images):
    txt = model.encode_text(ids, normalize=True)
    img = model.encode_image(images, normalize=True)
    logits = model.logit_scale.exp() * img @ txt.T
    return txt, img, logits


def compute_reference(model, out_dir: Path, tok_dir: Path, img_dir: Path):
    preprocess = make_preprocess()
    pixels, images = reference_pixels(preprocess, img_dir)
    ids, trimmed, cleaned = tokenize_reference(tok_dir, REFERENCE_TEXTS)
    txt, img, logits = embeddings(model, ids, images)
    for t, c, row in zip(REFERENCE_TEXTS, cleaned, trimmed):
        print(f"  {len(row):3d} ids  {t[:40]!r:44s} -> cleaned {c[:40]!r}")
    assert len(trimmed[REFERENCE_TEXTS.index(LONG_TEXT)]) == CONTEXT_LENGTH
    ref = {
        "logit_scale": float(model.logit_scale.item()),
        "texts": REFERENCE_TEXTS,
        "token_ids": trimmed,
        "text_embeddings": txt.tolist(),
        "images": IMAGE_NAMES,
        "image_embeddings": img.tolist(),
        "logits": logits.tolist(),
        "preprocess": {"mean": OPENAI_MEAN, "std": OPENAI_STD, "image_size": 224},
    }
    with open(out_dir / "reference.json", "w", encoding="utf-8") as f:
        json.dump(ref, f, ensure_ascii=False)
        f.write("\n")
    save_file(pixels, str(out_dir / "reference_pixels.safetensors"))
    back = load_file(str(out_dir / "reference_pixels.safetensors"))
    assert all(torch.equal(back[k], v) and v.dtype == torch.uint8 for k, v in pixels.items())
    print(f"  text emb {tuple(txt.shape)}, image emb {tuple(img.shape)}, logits {tuple(logits.shape)}, "
          f"logit_scale {ref['logit_scale']:.6f}; logits range [{logits.min():.3f}, {logits.max():.3f}]")
    return ids, images, (txt, img, logits), preprocess


def check_reload(model_dir: Path, text_config, ids, images, expected, preprocess):
    """Reload through open_clip's local-dir loader (prefers open_clip_model.safetensors)."""
    with offline_hf_config(text_config):
        model2, _, preprocess2 = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    model2.eval()
    got = embeddings(model2, ids, images)
    for a, b in zip(got, expected):
        assert torch.equal(a, b), (a - b).abs().max()
    # the preprocess open_clip derives from open_clip_config.json is the same pipeline
    with Image.open(FIXTURES / "images" / "photo.jpg") as im:
        assert torch.equal(preprocess(im), preprocess2(im))
    print("  reloaded model (open_clip local-dir loader) gives identical embeddings/logits")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def seed_everything(seed=SEED):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def print_state_dict(sd):
    print(f"state_dict: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} elements")
    for k, v in sd.items():
        print(f"  {k:75s} {str(v.dtype).replace('torch.', ''):8s} {list(v.shape)}")


def generate_tiny():
    tiny = FIXTURES / "tiny"
    img_dir = FIXTURES / "images"
    tiny.mkdir(parents=True, exist_ok=True)

    print("== tokenizer")
    tok = build_tokenizer(tiny)

    print("== images")
    make_images(img_dir)
    report_deep16(img_dir)

    print("== model")
    text_config = tiny_text_config(tok.get_vocab_size())
    model = build_model(copy.deepcopy(TINY_MODEL_CFG), text_config)
    randomise(model, SEED)
    sd = model_state_dict(model)
    print_state_dict(sd)

    write_open_clip_config(tiny, TINY_MODEL_CFG)
    write_text_config(tiny, text_config)
    save_file(sd, str(tiny / "open_clip_model.safetensors"), metadata={"format": "pt"})
    torch.save(sd, tiny / "open_clip_pytorch_model.bin")
    torch.save(lightning_checkpoint(sd, "model.model.", True, True, text_config.max_position_embeddings, SEED + 1),
               tiny / "lightning.ckpt")
    torch.save(lightning_checkpoint(sd, "model.", False, False, text_config.max_position_embeddings, SEED + 2),
               FIXTURES / "lightning_model_prefix.ckpt")

    # the weight files load back to identical tensors
    st = load_file(str(tiny / "open_clip_model.safetensors"))
    bn = torch.load(tiny / "open_clip_pytorch_model.bin", map_location="cpu", weights_only=True)
    lc = torch.load(tiny / "lightning.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    lp = torch.load(FIXTURES / "lightning_model_prefix.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert list(st) == list(sd) or set(st) == set(sd)
    assert list(bn) == list(sd)
    pos = lc.pop("model.model.text.transformer.embeddings.position_ids")
    assert pos.dtype == torch.int64 and pos.shape == (1, text_config.max_position_embeddings)
    assert list(lc) == ["model.model." + k for k in sd] and list(lp) == ["model." + k for k in sd]
    for k, v in sd.items():
        for other in (st[k], bn[k], lc["model.model." + k], lp["model." + k]):
            assert other.dtype == v.dtype and torch.equal(other, v), k
    print("  weight files load back to identical tensors")

    print("== reference")
    ids, images, expected, preprocess = compute_reference(model, FIXTURES, tiny, img_dir)
    check_reload(tiny, text_config, ids, images, expected, preprocess)


def pad_vocab(tokenizer_file: Path, size: int):
    """Pad a Unigram ``tokenizer.json`` to ``size`` entries, as XLM-R's 250002, so that the
    vocabulary matches the embedding matrix (``prune-vocab`` checks it).  The padding pieces are
    private-use characters with a very low score: no real text ever uses them, so every text is
    tokenized exactly as before."""
    tok = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    n = len(vocab)
    if n >= size:
        return
    # Two private-use characters per piece: 6400 * 6400 combinations, far more than needed.
    vocab.extend([chr(0xE000 + i // 6400) + chr(0xE000 + i % 6400), -100.0] for i in range(size - n))
    tokenizer_file.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    back = Tokenizer.from_file(str(tokenizer_file))
    assert back.get_vocab_size() == size, back.get_vocab_size()
    print(f"  tokenizer padded from {n} to {size} entries")


def generate_full(out_dir: Path):
    out_dir = out_dir.resolve()
    if out_dir == FIXTURES.resolve() or FIXTURES.resolve() in out_dir.parents or out_dir in FIXTURES.resolve().parents:
        sys.exit(f"--full-size must not write into {FIXTURES}")
    tiny = FIXTURES / "tiny"
    img_dir = FIXTURES / "images"
    if not (tiny / "tokenizer.json").is_file() or not all((img_dir / n).is_file() for n in IMAGE_NAMES):
        sys.exit("run `python scripts/gen_fixtures.py` first (needs tests/fixtures/tiny/tokenizer.json and images)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tiny / name, out_dir / name)

    t0 = time.time()
    text_config = full_text_config()
    pad_vocab(out_dir / "tokenizer.json", text_config.vocab_size)
    model = build_model(copy.deepcopy(FULL_MODEL_CFG), text_config)
    randomise(model, SEED + 100)
    sd = model_state_dict(model)
    print_state_dict(sd)
    write_open_clip_config(out_dir, FULL_MODEL_CFG)
    write_text_config(out_dir, text_config)
    save_file(sd, str(out_dir / "open_clip_model.safetensors"), metadata={"format": "pt"})
    del sd
    print(f"  model built and saved in {time.time() - t0:.1f}s")

    ids, images, expected, preprocess = compute_reference(model, out_dir, out_dir, img_dir)
    del model
    check_reload(out_dir, text_config, ids, images, expected, preprocess)
    print(f"  total {time.time() - t0:.1f}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full-size", metavar="DIR", type=Path, default=None,
                    help="build the full-size architecture into DIR instead of tests/fixtures")
    a = ap.parse_args()
    seed_everything()
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, transformers {transformers.__version__}, "
          f"PIL {Image.__version__}, numpy {np.__version__}")
    if a.full_size is not None:
        generate_full(a.full_size)
    else:
        generate_tiny()


if __name__ == "__main__":
    main()
