#!/usr/bin/env python3
"""Throughput of capivara vs PyTorch open_clip (and ONNX Runtime) on the same weights.

What it measures
    Embeddings per second of the two CAPIVARA towers -- image tower (ViT-B/32) at
    batch 1, 8, 32 and text tower (XLM-RoBERTa base, masked mean pooling, MLP
    projection) at batch 1, 8, 32, 128 -- for

    * PyTorch open_clip, fp32, ``torch.inference_mode()``, ``torch.set_num_threads(cores)``;
    * capivara (``capivara bench``: one process per row, model load excluded);
    * ONNX Runtime (CPU): both towers exported from the same PyTorch model
      (``torch.onnx.export(dynamo=True)``, dynamic batch / sequence axes), fp32 and
      dynamic int8 (``onnxruntime.quantization.quantize_dynamic``, QInt8 weights, no
      ``quant_pre_process``: its shape inference fails on these dynamo exports),
      ``intra_op_num_threads=cores``, all graph optimisations.

    * bf16 on CPU (``--bf16``, on by default where ``capivara bench --ceiling``
      reports a bf16 kernel, i.e. AVX-512 BF16): capivara ``--dtype bf16`` (the
      encoders' linear layers on ``vdpbf16ps``, f32 accumulation) vs PyTorch
      ``torch.autocast("cpu", dtype=torch.bfloat16)`` on the fp32 model.

    All engines embed the same inputs: images = one deterministic synthetic
    224x224 picture (the one ``capivara bench`` makes, ``src/bench.rs``),
    preprocessed once and repeated ``batch`` times; texts = the 16 Portuguese
    prompts of ``benches/prompts.txt`` (``PROMPTS`` below, handed to capivara with
    ``--texts``) cycled to ``batch``, tokenized once with open_clip's
    ``HFTokenizer`` on the model directory's ``tokenizer.json`` and padded to the
    longest text of the batch, as capivara does (the token count is reported: the
    prompts are 8-16 tokens with XLM-R's real tokenizer, but the random-weight
    full-size model of gen_fixtures.py reuses the small fixture tokenizer, with which
    they are 10-18). Only the forward pass (+ L2 normalisation) is timed.

    Each row is also expressed as a fraction of the machine's fp32 ceiling: the
    best GFLOP/s of a 2048^3 fp32 matmul -- ``torch.matmul``, measured at start-up
    and again at the end, and, when onnxruntime is installed, ONNX Runtime's own
    MatMul (MLAS), because torch's MKL GEMM is not the fastest on every CPU (on an
    AMD EPYC it ran at half MLAS's rate) -- divided by the FLOPs of one item counted
    from the config (2 x multiply-adds of every linear layer and of attention;
    ViT-B/32 about 8.8 GFLOP per image, XLM-R base about 2.4 GFLOP for a 14-token
    text; padding tokens are counted: they are computed). A start/end difference
    of the matmul rate above 15% is reported as a busy machine: the figures are then
    unreliable (PyTorch's OpenMP threads slow down by up to ~20x when another
    process takes the cores).

    capivara's own kernel ceilings come from ``capivara bench --ceiling 2048``
    (one 2048^3 product through each of its f32, bf16 and int8 kernels): the
    int8 rows are also given as a share of the int8 ceiling (integer
    operations), the bf16 rows as a ratio to capivara fp32.

    Before timing, it checks that the numbers are right: ``capivara embed`` on a
    few texts and two images vs open_clip (max abs diff of the normalised
    embeddings must be <= 1e-4), and each exported ONNX tower vs PyTorch (fp32:
    max abs diff; int8: cosine similarity to fp32).

Protocol (identical for every engine)
    ``--warmup`` untimed passes, then passes until at least ``--seconds`` and at
    least ``--iters`` passes; seconds per batch = elapsed / passes. For each row
    (tower, batch): PyTorch, then capivara (``capivara bench --tower T --batch N``,
    its own ``per_second``), then ORT fp32, then ORT int8; the whole sweep is
    repeated ``--repeats`` times (alternating) and the median is reported.

Model
    ``--model DIR``: an open_clip model directory (``open_clip_config.json``,
    ``open_clip_model.safetensors``, ``tokenizer.json``, ``text_config.json``). Without
    it, the full-size architecture with random weights is built once, offline, with
    ``scripts/gen_fixtures.py``'s ``generate_full`` into the cache directory
    (``--cache-dir``, default ``$XDG_CACHE_HOME/capivara-compare`` or
    ``~/.cache/capivara-compare``) and reused. The ONNX exports are cached there too.

CUDA
    ``--device cuda``: PyTorch models converted to fp16 and bf16 (``--dtypes``)
    vs ``capivara bench --device cuda --dtype f16|bf16``; ONNX Runtime is skipped;
    ceilings are the GPU's 4096^3 matmul rate in that dtype. The agreement check
    (capivara f32 on the GPU vs open_clip fp32 on the CPU, <= 1e-4) then also
    reports capivara f16/bf16 vs PyTorch fp32 (and PyTorch f16/bf16 vs fp32).
    ``--dtypes`` works on CPU too (e.g. ``f32,bf16``; ORT only on the f32 rows).

Run (Python environment of ``scripts/requirements.txt`` plus
``scripts/requirements-bench.txt``, i.e. ``pip install -r scripts/requirements.txt
-r scripts/requirements-bench.txt``; build capivara first with
``cargo build --release``)::

    python scripts/compare_torch.py --model /tmp/capivara-full       # final figures
    python scripts/compare_torch.py --model tests/fixtures/tiny \\
        --capivara target/debug/capivara --seconds 0.5                # quick check
    python scripts/compare_torch.py --device cuda --capivara target-cuda/release/capivara
    python scripts/compare_torch.py --repeats 3 --json bench.json

Run it on an otherwise idle machine: every engine uses all the cores.
Nothing is downloaded (HF_HUB_OFFLINE=1, as in gen_fixtures.py).
"""

import os
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from gen_fixtures import (  # noqa: E402  (sets HF_HUB_OFFLINE=1 before transformers is imported)
    CONTEXT_LENGTH,
    FIXTURES,
    REPO,
    HFTokenizer,
    full_text_config,
    offline_hf_config,
)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import XLMRobertaConfig  # noqa: E402

# The benchmark prompts: benches/prompts.txt, the file `capivara bench` embeds by
# default (src/bench.rs includes it). They are given to `capivara bench --texts`
# as well, so both sides embed exactly these.
PROMPTS_FILE = Path(__file__).resolve().parent.parent / "benches" / "prompts.txt"
PROMPTS = [line.strip() for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]

# Texts of the agreement check: a few prompts and harder cases (accents, symbols,
# entities, ligatures, extra whitespace, a long text).
AGREEMENT_TEXTS = PROMPTS[:3] + [
    "Uma capivara tomando banho de sol na beira do lago.",
    "Preço: R$ 1.234,56 (50% off!) — 3/4 às 10h30?",
    "pão &amp; manteiga  \n\t com   café",
    "a photo of a gato preto",
]

AGREEMENT_TOL = 1e-4
ONNX_EXPORT_VERSION = 1  # bump to invalidate cached exports
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
PAUSE = 0.25  # seconds between engines: lets spinning worker threads of the previous one go idle


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Machine facts and the fp32 ceiling
# ----------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def sync_fn(device: str):
    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def matmul_gflops(device: str, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Peak (best pass) GFLOP/s of an n^3 matmul."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    sync = sync_fn(device)
    with torch.inference_mode():
        for _ in range(2):
            a @ b
        sync()
        best, t_end, k = float("inf"), time.perf_counter() + seconds, 0
        while k < 5 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
            k += 1
    return 2 * n ** 3 / best / 1e9


def ort_matmul_gflops(threads: int, n: int = 2048, seconds: float = 1.0) -> float:
    """Peak GFLOP/s of an n^3 fp32 MatMul in ONNX Runtime (MLAS), same threads as the benchmark."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = min(proto.ir_version, 10)
    onnx.checker.check_model(proto)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    for _ in range(2):
        sess.run(None, feed)
    best, t_end, k = float("inf"), time.perf_counter() + seconds, 0
    while k < 5 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        sess.run(None, feed)
        best = min(best, time.perf_counter() - t0)
        k += 1
    return 2 * n ** 3 / best / 1e9


def loadavg():
    try:
        with open("/proc/loadavg", encoding="utf-8") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# FLOPs per item (from the configs)
# ----------------------------------------------------------------------------------------------

def encoder_flops(tokens: int, width: int, layers: int, mlp: int) -> float:
    """Pre-/post-LN transformer encoder: QKV + out projections, MLP, QK^T and AV."""
    linear = 4 * width * width + 2 * width * mlp  # multiply-adds per token per layer
    attention = 2 * tokens * tokens * width  # QK^T and AV: T^2 * width each
    return layers * 2 * (tokens * linear + attention)


def image_flops(model_cfg: dict) -> float:
    v = model_cfg["vision_cfg"]
    size, patch, width = v.get("image_size", 224), v.get("patch_size", 32), v["width"]
    grid = (size // patch) ** 2
    tokens = grid + 1  # + class token
    mlp = int(width * v.get("mlp_ratio", 4.0))
    patch_embed = 2 * grid * width * 3 * patch * patch
    proj = 2 * width * model_cfg["embed_dim"]
    return patch_embed + encoder_flops(tokens, width, v["layers"], mlp) + proj


def text_flops(model_cfg: dict, text_config: XLMRobertaConfig, tokens: int) -> float:
    h = text_config.hidden_size
    e = model_cfg["embed_dim"]
    proj_type = model_cfg["text_cfg"].get("hf_proj_type", "mlp")
    if proj_type == "mlp":
        hidden = (h + e) // 2
        proj = 2 * (h * hidden + hidden * e)
    else:
        proj = 2 * h * e
    return encoder_flops(tokens, h, text_config.num_hidden_layers, text_config.intermediate_size) + proj


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "capivara-compare"


def ensure_default_model(cache: Path) -> Path:
    """The full-size architecture with random weights, built once with gen_fixtures.generate_full."""
    out = cache / "full-size-random"
    if (out / "open_clip_model.safetensors").is_file() and (out / "open_clip_config.json").is_file():
        return out
    import gen_fixtures

    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".full-size-random.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"== building the full-size random-weight model into {out} (once; ~1.5 GB)")
    with contextlib.redirect_stdout(sys.stderr):  # its state-dict listing is not part of the report
        gen_fixtures.generate_full(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_text_config(model_dir: Path) -> XLMRobertaConfig:
    p = model_dir / "text_config.json"
    if p.is_file():
        return XLMRobertaConfig.from_json_file(str(p))
    log(f"  {p} missing: assuming the xlm-roberta-base config")
    return full_text_config()


def load_model(model_dir: Path, text_config: XLMRobertaConfig):
    with offline_hf_config(text_config):
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    model = model.eval().float()
    with open(model_dir / "open_clip_config.json", encoding="utf-8") as f:
        model_cfg = json.load(f)["model_cfg"]
    return model, preprocess, model_cfg


class ImageTower(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, pixels):
        return self.m.encode_image(pixels, normalize=True)


class TextTower(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids):
        return self.m.encode_text(ids, normalize=True)


# ----------------------------------------------------------------------------------------------
# Inputs (the same as `capivara bench`)
# ----------------------------------------------------------------------------------------------

def sample_rgb(size: int) -> np.ndarray:
    """src/bench.rs sample_pixels: (size, size, 3) uint8."""
    y, x = np.mgrid[0:size, 0:size].astype(np.int64)
    v = (x * 7 + y * 3) % 256
    g = (255 - v) // 2 + (y % 64)
    b = (x ^ y) % 256
    return np.stack([v, g, b], axis=-1).astype(np.uint8)


def normalise_rgb(rgb: np.ndarray, mean, std) -> torch.Tensor:
    """ToTensor + Normalize, in f32 as capivara's Preprocessor::normalize: (3, S, S)."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class Tokens:
    """open_clip HFTokenizer, padded to the longest text of a batch (capivara's TokenBatch)."""

    def __init__(self, model_dir: Path, context_length: int, pad_id: int):
        self.tok = HFTokenizer(str(model_dir), context_length=context_length)
        self.pad_id = pad_id

    def lengths(self, texts):
        ids = self.tok(texts)
        return [int((row != self.pad_id).sum()) for row in ids]

    def batch(self, texts) -> torch.Tensor:
        ids = self.tok(texts)
        lens = (ids != self.pad_id).sum(1)
        longest = int(lens.max())
        for row, n in zip(ids, lens.tolist()):  # right padding only
            assert bool((row[:n] != self.pad_id).all()) and bool((row[n:] == self.pad_id).all())
        return ids[:, :longest].contiguous()


def cycled(texts, n):
    return [texts[i % len(texts)] for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def time_loop(fn, sync, warmup: int, seconds: float, min_iters: int):
    """The protocol of src/bench.rs `measure`: warm-up, then >= seconds and >= min_iters passes."""
    for _ in range(warmup):
        fn()
        sync()
    iters, start = 0, time.perf_counter()
    while iters < max(1, min_iters) or time.perf_counter() - start < seconds:
        fn()
        sync()
        iters += 1
    return (time.perf_counter() - start) / iters, iters


def run_capivara(binary: Path, *extra) -> dict:
    cmd = [str(binary), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        sys.exit(f"`{' '.join(cmd)}` printed no JSON:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def capivara_bench(a, texts_file: Path, tower: str, batch: int, *settings):
    """One `capivara bench` row under the script's protocol: (whole report, the row)."""
    got = run_capivara(a.capivara, "bench", "--model", str(a.model), "--device", a.device, *settings,
                       "--tower", tower, "--batch", str(batch), "--warmup", str(a.warmup),
                       "--seconds", str(a.seconds), "--iters", str(a.iters), "--texts", str(texts_file))
    (row,) = got["rows"]
    return got, row


# ----------------------------------------------------------------------------------------------
# Agreement: capivara embed vs open_clip
# ----------------------------------------------------------------------------------------------

def compare(a: np.ndarray, b: np.ndarray):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.abs(a - b).max()), float(cos.min())


def agreement(a, model, preprocess, tokens: Tokens, workdir: Path, image_size: int, mean, std):
    """capivara embed (each dtype benchmarked, and f32) vs open_clip fp32 on CPU."""
    synthetic = workdir / "synthetic.png"
    Image.fromarray(sample_rgb(image_size)).save(synthetic)
    images = [synthetic]
    photo = FIXTURES / "images" / "photo.jpg"
    if photo.is_file():
        images.append(photo)
    pixels = []
    for p in images:
        with Image.open(p) as im:
            pixels.append(preprocess(im))
    with torch.inference_mode():
        ref_txt = model.encode_text(tokens.batch(AGREEMENT_TEXTS), normalize=True).numpy()
        ref_img = model.encode_image(torch.stack(pixels), normalize=True).numpy()

    out = {"texts": AGREEMENT_TEXTS, "images": [str(p) for p in images], "tolerance": AGREEMENT_TOL,
           "capivara": {}, "torch_half": {}}
    args = ["embed", "--model", str(a.model), "--device", a.device]
    for t in AGREEMENT_TEXTS:
        args += ["--text", t]
    for p in images:
        args += ["--image", str(p)]
    dtypes = ["f32"] + [d for d in a.dtypes if d != "f32"]
    for d in dtypes:
        got = run_capivara(a.capivara, *args, "--dtype", d)
        t_diff, t_cos = compare(got["texts"], ref_txt)
        i_diff, i_cos = compare(got["images"], ref_img)
        per_image = [compare([g], [r])[0] for g, r in zip(got["images"], ref_img)]
        out["capivara"][d] = {"text_max_abs_diff": t_diff, "text_min_cos": t_cos,
                              "image_max_abs_diff": i_diff, "image_min_cos": i_cos,
                              "per_image_max_abs_diff": dict(zip([p.name for p in images], per_image)),
                              "max_abs_diff": max(t_diff, i_diff)}
        if d == "f32":
            out["max_abs_diff"] = max(t_diff, i_diff)
            out["ok"] = out["max_abs_diff"] <= AGREEMENT_TOL
    if getattr(a, "int8", False):
        got = run_capivara(a.capivara, *args, "--dtype", "f32", "--quantize", "int8")
        t_diff, t_cos = compare(got["texts"], ref_txt)
        i_diff, i_cos = compare(got["images"], ref_img)
        out["capivara_int8"] = {"text_max_abs_diff": t_diff, "text_min_cos": t_cos,
                                "image_max_abs_diff": i_diff, "image_min_cos": i_cos}
    if getattr(a, "bf16", False):
        got = run_capivara(a.capivara, *args, "--dtype", "bf16")
        t_diff, t_cos = compare(got["texts"], ref_txt)
        i_diff, i_cos = compare(got["images"], ref_img)
        out["capivara_bf16"] = {"text_max_abs_diff": t_diff, "text_min_cos": t_cos,
                                "image_max_abs_diff": i_diff, "image_min_cos": i_cos}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            txt = model.encode_text(tokens.batch(AGREEMENT_TEXTS), normalize=True).float().numpy()
            img = model.encode_image(torch.stack(pixels), normalize=True).float().numpy()
        out["torch_bf16_autocast"] = {"text_min_cos": compare(txt, ref_txt)[1],
                                      "image_min_cos": compare(img, ref_img)[1]}
    # for context: what PyTorch's own half-precision models give vs fp32
    for d in dtypes:
        if d != "f32":
            m = TORCH_MODELS[d]
            with torch.inference_mode():
                txt = m.encode_text(tokens.batch(AGREEMENT_TEXTS).to(a.device), normalize=True).float().cpu().numpy()
                img = m.encode_image(torch.stack(pixels).to(a.device, DTYPES[d]), normalize=True).float().cpu().numpy()
            t_diff, t_cos = compare(txt, ref_txt)
            i_diff, i_cos = compare(img, ref_img)
            out["torch_half"][d] = {"text_max_abs_diff": t_diff, "text_min_cos": t_cos,
                                    "image_max_abs_diff": i_diff, "image_min_cos": i_cos}
    return out


TORCH_MODELS = {}  # dtype name -> model on the benchmark device (cuda mode)


# ----------------------------------------------------------------------------------------------
# ONNX Runtime
# ----------------------------------------------------------------------------------------------

def onnx_cache_key(model_dir: Path) -> str:
    import onnxruntime as ort

    h = hashlib.sha256()
    h.update(str(model_dir.resolve()).encode())
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_config.json",
                 "text_config.json"):
        p = model_dir / name
        if p.is_file():
            st = p.stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"{torch.__version__}|{ort.__version__}|{ONNX_EXPORT_VERSION}".encode())
    return h.hexdigest()[:16]


def export_towers(model, out: Path, example_pixels, example_ids, context_length: int):
    """fp32 exports with dynamic batch (and sequence) axes, then dynamic int8 quantisation.

    ``out/complete`` marks a finished set; an unfinished directory is redone."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    if (out / "complete").is_file():
        log("  cached")
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=context_length)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # nn.MultiheadAttention's inference fast path does not export faithfully
        torch.backends.mha.set_fastpath_enabled(False)
        for name, tower, example, dyn, in_name in (
            ("image", ImageTower(model).eval(), example_pixels, {"pixels": {0: batch}}, "pixels"),
            ("text", TextTower(model).eval(), example_ids, {"ids": {0: batch, 1: seq}}, "ids"),
        ):
            fp32 = out / f"{name}.fp32.onnx"
            t0 = time.time()
            log(f"  exporting the {name} tower to {fp32}")
            torch.onnx.export(tower, (example,), str(fp32), input_names=[in_name], output_names=["normalized_output"],
                              dynamic_shapes=dyn, dynamo=True, external_data=True, verbose=False)
            log(f"  ... {time.time() - t0:.1f}s")
            t0 = time.time()
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process (not done: see README)
            try:
                quantize_dynamic(str(fp32), str(out / f"{name}.int8.onnx"), weight_type=QuantType.QInt8)
            finally:
                root.setLevel(level)
            log(f"  quantised the {name} tower (dynamic int8, QInt8 weights) in {time.time() - t0:.1f}s")
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    (out / "complete").write_text("ok\n")


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {in_name: x})[0]


def setup_onnx(a, model, tokens: Tokens, image_size: int, mean, std, context_length: int):
    key = onnx_cache_key(a.model)
    out = a.cache_dir / "onnx" / key
    gen = torch.Generator().manual_seed(1)
    example_pixels = torch.randn(2, 3, image_size, image_size, generator=gen)
    example_ids = tokens.batch(PROMPTS[:2])
    log(f"== ONNX exports ({out})")
    export_towers(model, out, example_pixels, example_ids, context_length)
    sessions = {(tower, q): ort_session(out / f"{tower}.{q}.onnx", a.threads)
                for tower in ("image", "text") for q in ("fp32", "int8")}

    # Checks on inputs of other shapes than the export examples (batch 1 and 5, another length).
    one = normalise_rgb(sample_rgb(image_size), mean, std)[None]
    pix = torch.cat([one, torch.randn(4, 3, image_size, image_size, generator=gen)])
    check_texts = AGREEMENT_TEXTS[:5]
    ids = tokens.batch(check_texts)
    ids1 = tokens.batch(check_texts[4:5])
    checks = {"dir": str(out), "inputs": {"image": list(pix.shape), "text": list(ids.shape),
                                          "text_batch1": list(ids1.shape)}}
    with torch.inference_mode():
        ref = {"image": model.encode_image(pix, normalize=True).numpy(),
               "text": model.encode_text(ids, normalize=True).numpy(),
               "text_batch1": model.encode_text(ids1, normalize=True).numpy(),
               "image_batch1": model.encode_image(one, normalize=True).numpy()}
    x = {"image": pix.numpy(), "text": ids.numpy(), "text_batch1": ids1.numpy(), "image_batch1": one.numpy()}
    for name in ("image", "image_batch1", "text", "text_batch1"):
        tower = name.split("_")[0]
        fp32 = sessions[(tower, "fp32")](x[name])
        int8 = sessions[(tower, "int8")](x[name])
        d32, c32 = compare(fp32, ref[name])
        d8, c8 = compare(int8, fp32)
        d8t, c8t = compare(int8, ref[name])
        checks[name] = {"fp32_vs_torch_max_abs_diff": d32, "fp32_vs_torch_min_cos": c32,
                        "int8_vs_fp32_min_cos": c8, "int8_vs_fp32_max_abs_diff": d8,
                        "int8_vs_torch_min_cos": c8t}
    checks["fp32_ok"] = all(checks[n]["fp32_vs_torch_max_abs_diff"] <= AGREEMENT_TOL
                            for n in ("image", "image_batch1", "text", "text_batch1"))
    return sessions, checks


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def fmt_rate(x):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_pct(x):
    if x is None:
        return "-"
    return f"{x:.1f}%" if x >= 1 else f"{x:.2f}%"


def markdown_table(rows, show_dtype: bool, with_onnx: bool, with_int8: bool = False, with_bf16: bool = False):
    """rows: tower, batch; columns as in the module docstring. `dtype` only when several / not f32."""
    one = "" if show_dtype else " fp32"
    head = ["tower", "batch", "tokens", "GFLOP/item"] + (["dtype"] if show_dtype else [])
    head += [f"PyTorch{one}/s", f"capivara{one}/s", "capivara/PyTorch"]
    if with_onnx:
        head += ["ORT fp32/s", "ORT int8/s"]
    if with_int8:
        head += ["capivara int8/s", "capivara int8/PyTorch", "int8 % of int8 ceiling"]
    if with_bf16:
        head += ["PyTorch bf16/s", "capivara bf16/s", "bf16/capivara fp32"]
    head += ["capivara % of ceiling", "PyTorch % of ceiling"]
    if with_onnx:
        head += ["ORT fp32 % of ceiling"]
    left = {"tower", "dtype"}
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if h in left else "---:" for h in head) + "|"]
    for r in rows:
        cells = [r["tower"], str(r["batch"]), "-" if r["tokens"] is None else str(r["tokens"]),
                 f"{r['gflop_per_item']:.3g}"] + ([r["dtype"]] if show_dtype else [])
        cells += [fmt_rate(r["torch"]), fmt_rate(r["capivara"]), f"{r['ratio']:.2f}x"]
        if with_onnx:
            cells += [fmt_rate(r.get("ort_fp32")), fmt_rate(r.get("ort_int8"))]
        if with_int8:
            ratio = r.get("int8_ratio")
            cells += [fmt_rate(r.get("capivara_int8")), "-" if ratio is None else f"{ratio:.2f}x",
                      fmt_pct(r.get("capivara_int8_pct_of_int8_ceiling"))]
        if with_bf16:
            br = r.get("bf16_vs_capivara_fp32")
            cells += [fmt_rate(r.get("torch_bf16")), fmt_rate(r.get("capivara_bf16")),
                      "-" if br is None else f"{br:.2f}x"]
        cells += [fmt_pct(r["capivara_pct"]), fmt_pct(r["torch_pct"])]
        if with_onnx:
            cells.append(fmt_pct(r.get("ort_fp32_pct")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def int_list(s: str):
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help="open_clip model directory (default: the full-size random-weight model, built once "
                         "into the cache directory)")
    ap.add_argument("--capivara", type=Path, default=Path("target/release/capivara"),
                    help="capivara binary (default: target/release/capivara)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    ap.add_argument("--dtypes", default=None,
                    help="comma-separated f32,f16,bf16 (default: f32 on cpu, f16,bf16 on cuda)")
    ap.add_argument("--image-batches", type=int_list, default=[1, 8, 32], help="default: 1,8,32")
    ap.add_argument("--text-batches", type=int_list, default=[1, 8, 32, 128], help="default: 1,8,32,128")
    ap.add_argument("--seconds", type=float, default=3.0, help="time each row for at least this long (default 3)")
    ap.add_argument("--iters", type=int, default=3, help="... and at least this many passes (default 3)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed passes before each row (default 3)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the sweep R times, report the median")
    ap.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    ap.add_argument("--no-int8", dest="int8", action="store_false",
                    help="skip capivara --quantize int8 (CPU f32 rows only; needs AVX-512 VNNI)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false",
                    help="skip the bf16 columns (capivara --dtype bf16 vs PyTorch bf16 autocast; CPU f32 rows only)")
    ap.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                    help=f"where the default model and the ONNX exports are kept (default {default_cache_dir()})")
    a = ap.parse_args()
    a.cuda = a.device.startswith("cuda")
    if a.device != "cpu" and not a.cuda:
        ap.error("--device must be cpu, cuda or cuda:N")
    a.dtypes = (a.dtypes or ("f16,bf16" if a.cuda else "f32")).split(",")
    bad = [d for d in a.dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown dtype(s) {bad} (f32, f16, bf16)")
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    a.onnx = not a.no_onnx and not a.cuda and "f32" in a.dtypes
    a.int8 = a.int8 and not a.cuda and "f32" in a.dtypes
    a.bf16 = a.bf16 and not a.cuda and "f32" in a.dtypes
    cap = a.capivara
    if not cap.is_absolute() and not cap.exists() and (REPO / cap).exists():
        cap = REPO / cap
    if not cap.is_file() or not os.access(cap, os.X_OK):
        ap.error(f"capivara binary {a.capivara} not found (cargo build --release, or pass --capivara)")
    a.capivara = cap.resolve()
    return a


def main():
    a = parse_args()
    a.threads = cpu_cores()
    torch.set_num_threads(a.threads)
    if a.cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: this PyTorch has no CUDA device")
    ort_version = None
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError as e:
        if a.onnx:
            sys.exit(f"{e}: pip install -r scripts/requirements-bench.txt (or pass --no-onnx)")
    if a.onnx:
        try:
            import onnx  # noqa: F401  (the exporter needs it)
            import onnxscript  # noqa: F401
        except ImportError as e:
            sys.exit(f"{e}: pip install -r scripts/requirements-bench.txt (or pass --no-onnx)")
    # ONNX Runtime's fp32 GEMM enters the CPU ceiling whenever it is installed (even with --no-onnx),
    # so that the "% of ceiling" columns do not depend on the flags
    ort_ceiling = ort_version is not None and not a.cuda and "f32" in a.dtypes

    a.model = (a.model if a.model is not None else ensure_default_model(a.cache_dir)).resolve()
    machine = {
        "cpu": cpu_model(), "cores": a.threads, "torch": torch.__version__, "open_clip": open_clip.__version__,
        "transformers": transformers.__version__, "onnxruntime": ort_version, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "loadavg_start": loadavg(),
    }
    if a.cuda:
        machine["gpu"] = torch.cuda.get_device_name(a.device)
    log(f"== {machine}")

    log(f"== loading {a.model}")
    text_config = load_text_config(a.model)
    model, preprocess, model_cfg = load_model(a.model, text_config)
    context_length = int(model_cfg["text_cfg"].get("context_length", CONTEXT_LENGTH))
    vis = model_cfg["vision_cfg"]
    image_size = int(vis.get("image_size", 224))
    norm = preprocess.transforms[-1]
    mean, std = list(norm.mean), list(norm.std)
    tokens = Tokens(a.model, context_length, text_config.pad_token_id)

    lengths = tokens.lengths(PROMPTS)
    log(f"== prompt lengths (tokens incl. <s> </s>): {lengths} (min {min(lengths)}, max {max(lengths)})")
    if min(lengths) < 8 or max(lengths) > 16:
        log("  note: outside 8-16 tokens with this tokenizer")

    # The matmul ceiling (fp32 on CPU; the benchmarked dtype on CUDA): a torch matmul measured now and
    # again at the end; the higher of the two is used (a busy machine lowers one of them). On CPU with
    # ONNX Runtime, its MLAS fp32 MatMul is measured too and the ceiling is the faster GEMM: torch's
    # (MKL) one is not the fastest on every CPU (on AMD it can be well below MLAS's).
    mm_n = 4096 if a.cuda else 2048
    mm_dev = a.device if a.cuda else "cpu"
    matmul = {d: [matmul_gflops(mm_dev, DTYPES[d], n=mm_n)] for d in a.dtypes}
    for d, g in matmul.items():
        log(f"== {mm_n}^3 torch matmul {d} on {mm_dev}: {g[0]:.1f} GFLOP/s")
    ort_matmul = []
    if ort_ceiling:
        ort_matmul.append(ort_matmul_gflops(a.threads, n=mm_n))
        log(f"== {mm_n}^3 ONNX Runtime MatMul f32: {ort_matmul[0]:.1f} GFLOP/s")

    # capivara's own kernels on one 2048^3 product (f32, bf16, int8 as this CPU has them)
    kernel_ceilings = {}
    if not a.cuda:
        got = run_capivara(a.capivara, "bench", "--ceiling", str(mm_n), "--seconds", "2")
        kernel_ceilings = {c["kernel"]: c["gflops"] for c in got.get("ceilings", [])}
        log(f"== capivara kernels on {mm_n}^3: "
            + ", ".join(f"{k} {v:.1f} G(FL)OP/s" for k, v in kernel_ceilings.items()))
    if a.bf16 and "bf16" not in kernel_ceilings:
        log("== no bf16 kernel on this CPU (AVX-512 BF16): the bf16 columns are skipped")
        a.bf16 = False

    for d in a.dtypes:
        if d == "f32" and not a.cuda:
            TORCH_MODELS[d] = model
        else:
            TORCH_MODELS[d] = copy.deepcopy(model).to(device=a.device, dtype=DTYPES[d]).eval()

    with tempfile.TemporaryDirectory(prefix="capivara-compare-") as work:
        work = Path(work)
        log("== agreement: capivara embed vs open_clip (fp32, CPU)")
        agree = agreement(a, model, preprocess, tokens, work, image_size, mean, std)
        for d, r in agree["capivara"].items():
            log(f"  capivara {d}: text max|diff| {r['text_max_abs_diff']:.2e} (min cos {r['text_min_cos']:.6f}), "
                f"image max|diff| {r['image_max_abs_diff']:.2e} (min cos {r['image_min_cos']:.6f})")

        sessions, onnx_checks = None, None
        if a.onnx:
            sessions, onnx_checks = setup_onnx(a, model, tokens, image_size, mean, std, context_length)
            for n in ("image", "image_batch1", "text", "text_batch1"):
                c = onnx_checks[n]
                log(f"  ORT {n:12s} fp32 vs torch max|diff| {c['fp32_vs_torch_max_abs_diff']:.2e}; "
                    f"int8 vs fp32 min cos {c['int8_vs_fp32_min_cos']:.5f}")

        texts_file = work / "prompts.txt"
        texts_file.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")

        # the rows and their inputs, prepared once
        one_image = normalise_rgb(sample_rgb(image_size), mean, std)
        plan = []
        for d in a.dtypes:
            for tower, batches in (("image", a.image_batches), ("text", a.text_batches)):
                for b in batches:
                    if tower == "image":
                        x = one_image[None].expand(b, -1, -1, -1).contiguous()
                        tok, flops = None, image_flops(model_cfg)
                    else:
                        x = tokens.batch(cycled(PROMPTS, b))
                        tok, flops = int(x.shape[1]), text_flops(model_cfg, text_config, int(x.shape[1]))
                    plan.append({"tower": tower, "batch": b, "dtype": d, "tokens": tok, "flops": flops,
                                 "x_cpu": x, "runs": {"torch": [], "capivara": [], "capivara_int8": [], "ort_fp32": [],
                                          "ort_int8": [], "torch_bf16": [], "capivara_bf16": []},
                                 "capivara_tokens": None, "capivara_threads": None, "iters": {}})

        for rep in range(a.repeats):
            for row in plan:
                tower, b, d = row["tower"], row["batch"], row["dtype"]
                label = f"[{rep + 1}/{a.repeats}] {tower:5s} batch {b:4d} {d}"
                # PyTorch
                m = TORCH_MODELS[d]
                x = row["x_cpu"]
                x = x.to(a.device, DTYPES[d]) if tower == "image" else x.to(a.device)  # no-op on cpu f32
                fn_t = (lambda m=m, x=x: m.encode_image(x, normalize=True)) if tower == "image" else \
                    (lambda m=m, x=x: m.encode_text(x, normalize=True))
                with torch.inference_mode():
                    spb, it = time_loop(fn_t, sync_fn(a.device), a.warmup, a.seconds, a.iters)
                row["runs"]["torch"].append(b / spb)
                row["iters"].setdefault("torch", []).append(it)
                del x
                time.sleep(PAUSE)
                # capivara
                got, cr = capivara_bench(a, texts_file, tower, b, "--dtype", d)
                row["runs"]["capivara"].append(cr["per_second"])
                row["iters"].setdefault("capivara", []).append(cr["iters"])
                row["capivara_tokens"] = cr.get("tokens")
                row["capivara_threads"] = got.get("threads")
                if tower == "text" and cr.get("tokens") != row["tokens"]:
                    log(f"  WARNING: capivara padded to {cr.get('tokens')} tokens, Python to {row['tokens']}")
                time.sleep(PAUSE)
                if a.int8 and d == "f32":
                    _, cr = capivara_bench(a, texts_file, tower, b, "--dtype", "f32", "--quantize", "int8")
                    row["runs"]["capivara_int8"].append(cr["per_second"])
                    time.sleep(PAUSE)
                # bf16: PyTorch autocast on the fp32 model vs capivara --dtype bf16
                if a.bf16 and d == "f32":
                    x = row["x_cpu"]
                    fn_b = (lambda x=x: model.encode_image(x, normalize=True)) if tower == "image" else \
                        (lambda x=x: model.encode_text(x, normalize=True))
                    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                        spb, it = time_loop(fn_b, lambda: None, a.warmup, a.seconds, a.iters)
                    row["runs"]["torch_bf16"].append(b / spb)
                    time.sleep(PAUSE)
                    _, cr = capivara_bench(a, texts_file, tower, b, "--dtype", "bf16")
                    row["runs"]["capivara_bf16"].append(cr["per_second"])
                    time.sleep(PAUSE)
                # ONNX Runtime
                if sessions is not None and d == "f32":
                    xn = row["x_cpu"].numpy()
                    for q in ("fp32", "int8"):
                        s = sessions[(tower, q)]
                        spb, it = time_loop(lambda s=s: s(xn), lambda: None, a.warmup, a.seconds, a.iters)
                        row["runs"][f"ort_{q}"].append(b / spb)
                        row["iters"].setdefault(f"ort_{q}", []).append(it)
                        time.sleep(PAUSE)
                r = row["runs"]
                log(f"  {label}: torch {r['torch'][-1]:.2f}/s, capivara {r['capivara'][-1]:.2f}/s"
                    + (f", capivara int8 {r['capivara_int8'][-1]:.2f}/s" if r["capivara_int8"] else "")
                    + (f", torch bf16 {r['torch_bf16'][-1]:.2f}/s, capivara bf16 {r['capivara_bf16'][-1]:.2f}/s"
                       if r["capivara_bf16"] else "")
                    + (f", ORT fp32 {r['ort_fp32'][-1]:.2f}/s, int8 {r['ort_int8'][-1]:.2f}/s"
                       if sessions is not None and d == "f32" else ""))

    for d in a.dtypes:
        matmul[d].append(matmul_gflops(mm_dev, DTYPES[d], n=mm_n))
        log(f"== {mm_n}^3 matmul {d} on {mm_dev} (end): {matmul[d][-1]:.1f} GFLOP/s")
    if ort_ceiling:
        ort_matmul.append(ort_matmul_gflops(a.threads, n=mm_n))
        log(f"== {mm_n}^3 ONNX Runtime MatMul f32 (end): {ort_matmul[-1]:.1f} GFLOP/s")
    ceilings = {d: max(g + (ort_matmul if d == "f32" else [])) for d, g in matmul.items()}
    machine["loadavg_end"] = loadavg()
    busy = [d for d, g in matmul.items() if min(g) < 0.85 * max(g)]
    if ort_matmul and min(ort_matmul) < 0.85 * max(ort_matmul):
        busy.append("ort")

    rows = []
    for row in plan:
        med = {k: (statistics.median(v) if v else None) for k, v in row["runs"].items()}
        ceiling = ceilings[row["dtype"]] * 1e9 / row["flops"]  # items/s at the matmul rate
        pct = (lambda v: None if v is None else 100 * v / ceiling)
        rows.append({
            "tower": row["tower"], "batch": row["batch"], "dtype": row["dtype"], "tokens": row["tokens"],
            "capivara_tokens": row["capivara_tokens"], "gflop_per_item": row["flops"] / 1e9,
            "ceiling_per_second": ceiling,
            "torch": med["torch"], "capivara": med["capivara"], "ratio": med["capivara"] / med["torch"],
            "ort_fp32": med["ort_fp32"], "ort_int8": med["ort_int8"],
            "capivara_int8": med["capivara_int8"],
            "torch_bf16": med["torch_bf16"], "capivara_bf16": med["capivara_bf16"],
            "bf16_vs_capivara_fp32": (med["capivara_bf16"] / med["capivara"]) if med["capivara_bf16"] else None,
            "capivara_int8_pct_of_int8_ceiling": (100 * med["capivara_int8"] * row["flops"] / 1e9 / kernel_ceilings["int8"])
            if med["capivara_int8"] and kernel_ceilings.get("int8") else None,
            "int8_ratio": (med["capivara_int8"] / med["torch"]) if med["capivara_int8"] else None,
            "capivara_pct": pct(med["capivara"]), "torch_pct": pct(med["torch"]),
            "ort_fp32_pct": pct(med["ort_fp32"]), "ort_int8_pct": pct(med["ort_int8"]),
            "runs": row["runs"], "iters": row["iters"], "capivara_threads": row["capivara_threads"],
        })

    # ------------------------------------------------------------------ report
    print(f"\n## capivara vs PyTorch open_clip{' vs ONNX Runtime' if a.onnx else ''} "
          f"({'CUDA ' + machine.get('gpu', '') if a.cuda else 'CPU'})\n")
    print(f"- model: `{a.model}` (embed_dim {model_cfg['embed_dim']}, ViT width {vis['width']} x {vis['layers']} "
          f"layers, text hidden {text_config.hidden_size} x {text_config.num_hidden_layers} layers, "
          f"vocab {text_config.vocab_size})")
    print(f"- machine: {machine['cpu']}, {machine['cores']} cores"
          + (f", GPU {machine['gpu']}" if a.cuda else "")
          + f"; torch {machine['torch']} ({machine['torch_threads']} threads), open_clip {machine['open_clip']}, "
          f"transformers {machine['transformers']}"
          + (f", onnxruntime {ort_version}" if ort_version else "")
          + f"; capivara `{a.capivara}` ({rows[0]['capivara_threads']} threads)")
    for d, g in ceilings.items():
        t14 = text_flops(model_cfg, text_config, 14) / 1e9
        ort_part = (f", ONNX Runtime MatMul {ort_matmul[0]:.1f} / {ort_matmul[1]:.1f}"
                    if d == "f32" and ort_matmul else "")
        print(f"- ceiling {d}: {g:.1f} GFLOP/s, the best {mm_n}^3 matmul on {mm_dev} (torch start / end "
              f"{matmul[d][0]:.1f} / {matmul[d][1]:.1f}{ort_part}) -> image "
              f"{g / (image_flops(model_cfg) / 1e9):.1f}/s at {image_flops(model_cfg) / 1e9:.3g} GFLOP/image; "
              f"text {g / t14:.1f}/s at {t14:.3g} GFLOP for 14 tokens")
    if busy:
        print(f"- WARNING: the matmul rate changed by more than 15% between start and end ({', '.join(busy)}; "
              f"load average {machine['loadavg_start']} -> {machine['loadavg_end']}): the machine was busy, "
              f"the figures are unreliable (PyTorch's OpenMP threads suffer most when cores are shared)")
    print(f"- protocol: {a.warmup} warm-up passes, then >= {a.seconds:g} s and >= {a.iters} passes per row; "
          f"PyTorch, capivara{', ORT fp32, ORT int8' if a.onnx else ''} alternating per row; "
          f"{a.repeats} repeat(s), median")
    print(f"- texts: the {len(PROMPTS)} prompts of benches/prompts.txt cycled to the batch, "
          f"{min(lengths)}-{max(lengths)} tokens each (incl. <s> </s>), padded to the longest of the batch "
          f"(`tokens` column)\n")
    print(markdown_table(rows, a.cuda or a.dtypes != ["f32"], a.onnx, a.int8, a.bf16))
    print()
    c32 = agree["capivara"]["f32"]
    print(f"- agreement (capivara embed {a.device} f32 vs open_clip fp32, {len(AGREEMENT_TEXTS)} texts, "
          f"{len(agree['images'])} images): max |diff| of normalised embeddings text {c32['text_max_abs_diff']:.2e}, "
          f"image {c32['image_max_abs_diff']:.2e} -> "
          f"{'OK' if agree['ok'] else 'FAILED'} (tolerance {AGREEMENT_TOL:g})")
    for d, r in agree["capivara"].items():
        if d != "f32":
            th = agree["torch_half"].get(d, {})
            print(f"- capivara {d} vs open_clip fp32: min cos text {r['text_min_cos']:.5f}, image "
                  f"{r['image_min_cos']:.5f} (PyTorch {d} vs fp32: text {th.get('text_min_cos', float('nan')):.5f}, "
                  f"image {th.get('image_min_cos', float('nan')):.5f})")
    if "capivara_int8" in agree:
        r = agree["capivara_int8"]
        print(f"- capivara int8 (--quantize int8) vs open_clip fp32: min cos text {r['text_min_cos']:.5f}, "
              f"image {r['image_min_cos']:.5f}")
    if kernel_ceilings:
        print(f"- capivara's kernels on one {mm_n}^3 product (`capivara bench --ceiling {mm_n}`): "
              + ", ".join(f"{k} {v:.1f} G{'OP' if k == 'int8' else 'FLOP'}/s" for k, v in kernel_ceilings.items()))
    if "capivara_bf16" in agree:
        r, t = agree["capivara_bf16"], agree["torch_bf16_autocast"]
        print(f"- capivara bf16 (--dtype bf16) vs open_clip fp32: min cos text {r['text_min_cos']:.5f}, "
              f"image {r['image_min_cos']:.5f} (PyTorch bf16 autocast vs fp32: text {t['text_min_cos']:.5f}, "
              f"image {t['image_min_cos']:.5f})")
    if onnx_checks:
        c = onnx_checks
        print(f"- ONNX export check (vs PyTorch, batch {c['inputs']['image'][0]} and 1, "
              f"text {c['inputs']['text']} and {c['inputs']['text_batch1']}): fp32 max |diff| image "
              f"{max(c['image']['fp32_vs_torch_max_abs_diff'], c['image_batch1']['fp32_vs_torch_max_abs_diff']):.2e}, "
              f"text {max(c['text']['fp32_vs_torch_max_abs_diff'], c['text_batch1']['fp32_vs_torch_max_abs_diff']):.2e}"
              f" ({'OK' if c['fp32_ok'] else 'DIFFERS'}); int8 min cosine vs fp32 image "
              f"{min(c['image']['int8_vs_fp32_min_cos'], c['image_batch1']['int8_vs_fp32_min_cos']):.5f}, text "
              f"{min(c['text']['int8_vs_fp32_min_cos'], c['text_batch1']['int8_vs_fp32_min_cos']):.5f}")

    if a.json:
        result = {"machine": machine, "model": str(a.model), "capivara": str(a.capivara), "device": a.device,
                  "dtypes": a.dtypes, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                  "prompts": PROMPTS, "prompt_tokens": lengths, "matmul_gflops": matmul, "ort_matmul_gflops": ort_matmul,
                  "ceiling_gflops": ceilings, "kernel_ceilings": kernel_ceilings, "busy": busy,
                  "image_gflop": image_flops(model_cfg) / 1e9, "agreement": agree, "onnx_checks": onnx_checks,
                  "rows": rows}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
            f.write("\n")
        log(f"== wrote {a.json}")
    if not agree["ok"]:
        sys.exit("capivara and open_clip disagree: the figures above are not comparable")
    q = agree.get("capivara_bf16")
    if q and min(q["text_min_cos"], q["image_min_cos"]) < 0.999:
        sys.exit("capivara --dtype bf16 is below cosine 0.999 to open_clip fp32: its figures do not count")
    low = [d for d, r in agree["capivara"].items()
           if d != "f32" and min(r["text_min_cos"], r["image_min_cos"]) < 0.999]
    if low:
        sys.exit(f"capivara {', '.join(low)} below cosine 0.999 to open_clip fp32: those figures do not count")
    q = agree.get("capivara_int8")
    if q and min(q["text_min_cos"], q["image_min_cos"]) < 0.99:
        sys.exit("capivara --quantize int8 is below cosine 0.99 to open_clip fp32: its figures do not count")


if __name__ == "__main__":
    main()
