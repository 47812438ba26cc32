"""FLASH test suite: every component against an independent reference (diffusers / transformers on identical
random weights, exact parameter counts, formulas, properties that must hold). CPU, tiny configs; the real CLIP
vocabulary is used when ../shared/data/bpe_simple_vocab_16e6.txt.gz is present. One class per component.
Run: python -m pytest -q test_flash.py   (or: python test_flash.py)
"""
import colorsys
import copy
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import bench as B
import data
import demo
import eval as E
import export as X
import memory as MEM
import model as M
import sample as S
import train as T
from clip_text import (CLIPTextConfig, CLIPTextModel, Tokenizer, bpe_from_gz, byte_vocab, load_text_encoder,
                       load_tokenizer, save_text_encoder, save_tokenizer)
from model import UNet, UNetConfig
from vae import VAE, DetailBlock, VAEConfig, load_vae, save_vae, warp

HERE = Path(__file__).resolve().parent
BPE_GZ = HERE.parent / "shared/data/bpe_simple_vocab_16e6.txt.gz"

# ----------------------------------------------------------------------------- shared tiny configs
# SD-1.5's and AnimateDiff's structure (4 levels, 2 resnets per level, cross-attention in the first 3, a v2 mid-block
# motion module, 8 motion heads as AnimateDiff files assume) at toy width. The sampling and training pipelines use
# one resnet per level, for speed.
UNET_TINY = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, attention_heads=2, cross_attention_dim=32,
                 norm_num_groups=8, motion_heads=8, motion_max_len=24)
VAE_TINY = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=8)
CLIP_TINY = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
PIPE_UNET, PIPE_VAE = {**UNET_TINY, "layers_per_block": 1}, {**VAE_TINY, "layers_per_block": 1}
H, W = 64, 96  # sampling tests: a non-square size


def randomize_(module, seed=0):
    """The one random-weight helper (bench.py's): every parameter random, norm scales around 1, small biases,
    matrices ~ 1/sqrt(fan_in). Default inits (zeros, ones) would hide swapped or misnamed tensors."""
    return B.randomize_(module, torch.Generator().manual_seed(seed)).eval()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tiny_pipeline(seed=0, trainable_init=False):
    """The tiny SD-1.5 + motion-module pipeline of the sampling and training tests (CPU, fp32). trainable_init keeps
    PyTorch's default init (a net that learns quickly) and only nudges the zero-ish projections."""
    torch.manual_seed(seed)
    models = (UNet(UNetConfig(**PIPE_UNET)), VAE(VAEConfig(**PIPE_VAE)), CLIPTextModel(CLIPTextConfig(**CLIP_TINY)))
    for i, m in enumerate(models):
        if not trainable_init:
            randomize_(m, seed + i)
            continue
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith(("proj_out.weight", "proj_out.bias")):
                    p.normal_(0, 0.02)
    return S.Pipeline(*models, Tokenizer(*byte_vocab()), torch.device("cpu"), torch.float32)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny CPU models: one intra-op thread is several times faster than OpenMP spin-waiting on 2 shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- model.py helpers

def diffusers_unet(mid=True, max_len=24):
    diffusers = pytest.importorskip("diffusers")
    c = UNET_TINY
    unet2d = diffusers.UNet2DConditionModel(
        block_out_channels=c["block_out_channels"], layers_per_block=c["layers_per_block"],
        attention_head_dim=c["attention_heads"], cross_attention_dim=c["cross_attention_dim"],
        norm_num_groups=c["norm_num_groups"], down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=8)
    adapter = diffusers.MotionAdapter(block_out_channels=c["block_out_channels"],
                                      motion_layers_per_block=c["layers_per_block"],
                                      motion_num_attention_heads=c["motion_heads"],
                                      motion_norm_num_groups=c["norm_num_groups"], motion_max_seq_length=max_len,
                                      use_motion_mid_block=mid)
    randomize_(unet2d, 1), randomize_(adapter, 2)
    return unet2d, adapter


class PerFrameGN(nn.Module):
    """AnimateDiff normalises motion-module inputs per frame; diffusers pools over frames. Oracle fix."""

    def __init__(self, gn):
        super().__init__()
        self.gn = gn

    def forward(self, x):  # B C F H W
        b, c, f, h, w = x.shape
        y = self.gn(x.transpose(1, 2).reshape(b * f, c, h, w))
        return y.view(b, f, c, h, w).transpose(1, 2)


def motion_oracle(unet2d, adapter):
    from diffusers import UNetMotionModel
    ref = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    for name, m in ref.named_modules():
        if type(m).__name__ == "AnimateDiffTransformer3D":
            m.norm = PerFrameGN(m.norm)
    return ref


def ad_keys_from_diffusers(sd):
    """Adapter state dict (diffusers names) -> original AnimateDiff names (test-side writer)."""
    out = {}
    for k, v in sd.items():
        head, tail = k.split("motion_modules.", 1)
        j, rest = tail.split(".", 1)
        rest = (rest.replace("transformer_blocks.0.norm1.", "transformer_blocks.0.norms.0.")
                .replace("transformer_blocks.0.norm2.", "transformer_blocks.0.norms.1.")
                .replace("transformer_blocks.0.norm3.", "transformer_blocks.0.ff_norm.")
                .replace("transformer_blocks.0.attn1.", "transformer_blocks.0.attention_blocks.0.")
                .replace("transformer_blocks.0.attn2.", "transformer_blocks.0.attention_blocks.1."))
        if rest.endswith("pos_embed.pe"):
            for a in (0, 1):
                out[f"{head}motion_modules.{j}.temporal_transformer.transformer_blocks.0.attention_blocks.{a}"
                    f".pos_encoder.pe"] = v.clone()
            continue
        out[f"{head}motion_modules.{j}.temporal_transformer.{rest}"] = v
    return out


def ldm_keys_from_diffusers(sd, n=3):
    """diffusers U-Net state dict -> CompVis LDM names (test-side writer, checked against diffusers' converter)."""
    inv = {v: k for k, v in M.RESNET_LDM.items()}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "down_blocks":
            i, kind = int(p[1]), p[2]
            if kind == "downsamplers":
                k2 = f"input_blocks.{i * n + n}.0.op.{'.'.join(p[5:])}"
            else:
                j = int(p[3])
                k2 = f"input_blocks.{i * n + j + 1}.{0 if kind == 'resnets' else 1}.{'.'.join(p[4:])}"
        elif p[0] == "up_blocks":
            i, kind = int(p[1]), p[2]
            if kind == "upsamplers":
                has_attn = any(x.startswith(f"up_blocks.{i}.attentions.") for x in sd)
                k2 = f"output_blocks.{i * n + n - 1}.{2 if has_attn else 1}.{'.'.join(p[4:])}"
            else:
                j = int(p[3])
                k2 = f"output_blocks.{i * n + j}.{0 if kind == 'resnets' else 1}.{'.'.join(p[4:])}"
        elif p[0] == "mid_block":
            idx = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
            k2 = f"middle_block.{idx}.{'.'.join(p[3:])}"
        else:
            k2 = {"conv_in": "input_blocks.0.0", "time_embedding": "time_embed", "conv_norm_out": "out.0",
                  "conv_out": "out.2"}[p[0]]
            if p[0] == "time_embedding":
                k2 += ".0" if p[1] == "linear_1" else ".2"
                p = p[1:]
            k2 += "." + ".".join(p[1:])
        if (".0." in k2 and "_blocks." in k2 and k2.split(".")[2] == "0") or k2.startswith("middle_block.0") \
                or k2.startswith("middle_block.2"):
            for a, b in inv.items():
                k2 = k2.replace(f".{a}.", f".{b}.")
        out["model.diffusion_model." + k2] = v
    return out


class NotATensor:  # stands for e.g. the omegaconf config pickled inside AnimateDiff v3's .ckpt
    pass


def inputs(frames=4, b=1, seed=0, hw=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, frames, *hw, generator=g)
    ctx = torch.randn(b, 7, UNET_TINY["cross_attention_dim"], generator=g)
    return x, torch.tensor([500] * b), ctx


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The same random weights written in every layout."""
    d = tmp_path_factory.mktemp("unet")
    unet2d, adapter = diffusers_unet(mid=True, max_len=24)
    unet2d.save_pretrained(d / "sd" / "unet")
    adapter.save_pretrained(d / "adapter")
    ad = ad_keys_from_diffusers(adapter.state_dict())
    save_file({k: v.contiguous() for k, v in ad.items()}, d / "mm_ad.safetensors")
    torch.save({"state_dict": ad}, d / "mm_ad.ckpt")
    ldm = ldm_keys_from_diffusers(unet2d.state_dict())
    ldm["model_ema.decay"] = torch.tensor(0.999)
    ldm["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in ldm.items()}, d / "sd15.safetensors")
    return d, unet2d, adapter


# ----------------------------------------------------------------------------- vae.py helpers

DF_TINY = dict(VAE_TINY, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               sample_size=64)


def t2v_pair(diffusers, written):
    """Our pipeline and diffusers' AnimateDiffPipeline (its DDIM scheduler as AnimateDiff's configs set it) on the same
    U-Net + motion-module files, and the prompt embeddings both take -> (pipe, dp, ctx, our U-Net)"""
    d, unet2d, adapter = written
    unet = M.load_unet(d / "sd", d / "adapter").eval()
    te = randomize_(CLIPTextModel(CLIPTextConfig(**CLIP_TINY)), 3)
    pipe = S.Pipeline(unet, randomize_(VAE(VAEConfig(**VAE_TINY)), 4), te, Tokenizer(*byte_vocab()),
                      torch.device("cpu"), torch.float32)
    dp = diffusers.AnimateDiffPipeline(
        vae=df_vae(), text_encoder=None, tokenizer=None, unet=motion_oracle(unet2d, adapter),
        motion_adapter=adapter, scheduler=diffusers.DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1, clip_sample=False))
    dp.set_progress_bar_config(disable=True)
    return pipe, dp, S.encode_prompt(pipe, ["blurry", "a person waving"]), unet


def df_vae(seed=0):
    from diffusers import AutoencoderKL
    return randomize_(AutoencoderKL(**DF_TINY), seed)


def images(n, h=64, w=64, seed=1):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def close(a, b, tol=1e-4):
    err = (a - b).abs().max().item() / b.abs().max().item()
    assert err <= tol, f"relative max err {err:.2e}"


def to_ldm(sd, n=4):
    """inverse of load_vae's LDM rule: diffusers keys -> first_stage_model.* (4-D attention weights)"""
    out = {"model.diffusion_model.conv_in.weight": torch.zeros(1), "cond_stage_model.x": torch.zeros(1)}
    for k, v in sd.items():
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.", lambda m: f"up.{n - 1 - int(m.group(1))}.", k)
        k = k.replace(".resnets.", ".block.").replace("upsamplers.0.", "upsample.")
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm", "norm")
            k = k.replace("to_q", "q").replace("to_k", "k").replace("to_v", "v").replace("to_out.0", "proj_out")
            v = v[:, :, None, None] if v.ndim == 2 else v
        out["first_stage_model." + k] = v
    return out


# ----------------------------------------------------------------------------- clip_text.py helpers

PROMPTS = [
    "a photo of a cat", "", "   ", "A PHOTO Of A Cat!!!", "it's a dog's life, isn't it? they're we've I'm you'll he'd",
    "1234 apples and 3.14159 pies, 2nd place", "café naïve 😀 résumé", "cafe\u0301 (decomposed accent)",
    "  leading and trailing   \n\n  whitespace\tand\ttabs \r\n ",
    "hyphen-ated; semi:colons (parens) [x] {y} <z> @#$%^&*~`|\\/", "emoji 🐱🐶 sequence 👍🏽 ...",
    "straße Ελληνικά кириллица ÀÉÎÕÜ", "it''s ''quoted'' \"double\" 'single'",
    "a cinematic shot of a horse running on the beach at sunset, golden hour, highly detailed, 4k, trending on art",
    "a photo<|endoftext|>of a cat", "<|startoftext|>a cat", "a cat <|endoftext|> dog", "x<|startoftext|><|endoftext|>y",
    "<|endoftext|>", "  <|endoftext|>  a  ", "a <|ENDOFTEXT|> b",  # special strings: one id each (not upper case)
    " ".join(f"word{i} and more" for i in range(40)),  # > 77 tokens
]


@pytest.fixture(scope="session")
def real_vocab():
    if not BPE_GZ.is_file():
        pytest.skip(f"{BPE_GZ} not found")
    return bpe_from_gz(BPE_GZ)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(hidden_act="quick_gelu", bos_token_id=0, pad_token_id=1, eos_token_id=2,
                                      max_position_embeddings=77, **CLIP_TINY)
    hf = randomize_(transformers.CLIPTextModel(cfg))
    folder = tmp_path_factory.mktemp("hf_clip")
    hf.save_pretrained(folder)
    return hf, folder


def rand_ids(B=2, L=77, vocab=514, seed=1):
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


def ref_tokenize(text, vocab, merges, max_length=77):
    """Independent reference: OpenAI CLIP's BPE algorithm in plain Python (NFC + whitespace clean + lower, as HF)."""
    import regex
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    byte2char = {b: chr(b) for b in bs} | {b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in bs)}
    ranks = {tuple(m.split()): r for r, m in enumerate(merges)}
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()
    # The two special strings are one id each. They are matched case-sensitively before lower-casing, as transformers'
    # added-token split does (OpenAI's simple_tokenizer lower-cases first, so it would also map "<|ENDOFTEXT|>")
    pieces = []
    for part in regex.split(r"(<\|startoftext\|>|<\|endoftext\|>)", text):
        if part in ("<|startoftext|>", "<|endoftext|>"):
            pieces.append(part)
        else:
            pieces += regex.findall(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", part.lower())
    ids = []
    for piece in pieces:
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(vocab[piece])
            continue
        word = [byte2char[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            rank, first, second = min((ranks.get(p, math.inf), *p) for p in zip(word, word[1:]))
            if rank == math.inf:
                break
            new, i = [], 0
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = new
        ids += [vocab[w] for w in word]
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    ids = [bos] + ids[:max_length - 2] + [eos]
    return ids + [eos] * (max_length - len(ids))


# ----------------------------------------------------------------------------- data.py helpers

def ramp_frames(T, H=48, W=64):  # frame i is grey level 10*i, with a coloured corner
    f = np.zeros((T, H, W, 3), np.uint8)
    for i in range(T):
        f[i] = (10 * i) % 250
        f[i, :8, :8] = (200, 30, 90)
    return f


@pytest.fixture
def video_dir(tmp_path):
    data.write_video(ramp_frames(20), tmp_path / "a.mp4", fps=12)
    data.write_video(ramp_frames(20), tmp_path / "b.gif", fps=10)
    (tmp_path / "b.txt").write_text("a person waving\n")
    d = tmp_path / "c"
    d.mkdir()
    for i, f in enumerate(ramp_frames(20)):  # 1.png ... 20.png: numeric, not lexicographic, order
        im = Image.fromarray(f)
        im = im.convert("L") if i == 3 else im.convert("RGBA") if i == 4 else im
        im.save(d / f"{i + 1}.png")
    (tmp_path / "notes.json").write_text("{}")  # ignored
    return tmp_path


# ----------------------------------------------------------------------------- sample.py helpers

@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny pipeline with random weights written as an SD-1.5 folder + AnimateDiff motion module, and an image."""
    root = tmp_path_factory.mktemp("sd15")
    S.save_pipeline(tiny_pipeline(seed=1), root)
    yy, xx = np.mgrid[0:90, 0:130]
    img = np.stack([xx * 255 // 130, yy * 255 // 90, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(img).save(root / "ref.png")
    return root


def load(sd, **kw):
    return S.load_pipeline(sd, sd / "motion_module.safetensors", device="cpu", verbose=False, **kw)


def write_checkpoint(folder, tensors, **settings):
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "flash.safetensors"))
    with open(os.path.join(folder, "settings.json"), "w") as f:
        json.dump({"stage": "unet", "step": 10, **settings}, f)
    return folder


def unet_tensors(pipe, seed=5):
    """Random 'trained' tensors: one motion module and one attn1.to_k, named as train.py saves them."""
    g = torch.Generator().manual_seed(seed)
    sd = pipe.unet.state_dict()
    keys = [k for k in sd if k.startswith("down_blocks.0.motion_modules.0.")] + \
           [k for k in sd if k.endswith("attn1.to_k.weight")][:1]
    return {f"unet.{k}": torch.randn(sd[k].shape, generator=g) * 0.2 for k in keys}


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # several run in parallel on 2 cores
    return subprocess.Popen([sys.executable, "sample.py", *map(str, args)], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


# Every sampler mode on the tiny random pipeline (fp32, CPU, one thread), 6-frame U-Net calls, 3 DDIM steps: four
# numbers per mode (the final latents' mean, mean square and projection on a fixed random direction, the uint8
# frames' mean) of what the code before sample.animate was split into one function per mode gave (issue 22). A
# change beyond float rounding is a change of behaviour; the last bits move with the CPU's kernels (SHA-256s of the
# same outputs, recorded at first, matched on one machine and not on another); the tolerance, 1e-3 relative + 1e-5,
# takes that (measured: two threads against one move them by at most 7 % of it) and every two modes differ by 9x it
# or more.
SAMPLER_CASES = {
    "plain": dict(frames=6), "adain post": dict(frames=6, adain="post"), "adain off": dict(frames=6, adain="off"),
    "shared noise": dict(frames=6, shared_noise=0.2), "mixed noise": dict(frames=6, mixed_noise=0.3),
    "hist match": dict(frames=6, hist_match=True), "no cfg": dict(frames=6, guidance=1.0),
    "loop x0": dict(frames=6, loop=True), "loop unet": dict(frames=6, loop=True, loop_grad="unet"),
    "windows": dict(frames=12, long="windows", overlap=2),
    "windows loop mixed": dict(frames=12, long="windows", overlap=2, loop=True, mixed_noise=0.3, shared_noise=0.2),
    "naive": dict(frames=12, long="naive"), "naive loop unet": dict(frames=12, long="naive", loop=True,
                                                                    loop_grad="unet", adain="post"),
    "naive mixed": dict(frames=12, long="naive", mixed_noise=0.3),
    "phased": dict(frames=12), "phased mixed post": dict(frames=12, long="phased", mixed_noise=0.3, adain="post",
                                                         shared_noise=0.2),
}


def sampler_fingerprints(cases=SAMPLER_CASES):
    pipe = tiny_pipeline(seed=1)
    pipe.info["settings"] = {"frames": 6}
    image = torch.rand(3, 32, 32, generator=gen(0)) * 2 - 1
    out = {}
    for name, kw in cases.items():
        video = S.animate(pipe, image, "wave", steps=3, height=32, width=32, seed=5, progress=False, **kw)
        lat = pipe.info["last_run"]["latents"].double().flatten()
        assert pipe.info["last_run"]["long"] == (kw.get("long", "phased") if kw["frames"] > 6 else "plain"), name
        direction = torch.randn(len(lat), generator=gen(7), dtype=torch.float64)
        out[name] = [lat.mean().item(), lat.square().mean().item(), (lat @ direction).item() / len(lat) ** 0.5,
                     float(np.mean(video))]
    return out


# ----------------------------------------------------------------------------- train.py helpers

def feats(b=1, frames=6, c=20, h=3, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    # per-channel temporal scale so the motion channels are well defined
    scale = torch.linspace(0.1, 3.0, c)[torch.randperm(c, generator=g)]
    x = torch.randn(b, frames, c, h, w, generator=g) * scale[None, None, :, None, None] + 0.5
    return x.reshape(b * frames, c, h, w), scale


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    S.save_pipeline(tiny_pipeline(trainable_init=True), root / "pipe")
    clips, _ = demo.make_demo_clips(3, frames=10, size=64, seed=0)
    (root / "videos").mkdir()
    for i, c in enumerate(clips):
        data.write_video(data.to_uint8(c), str(root / "videos" / f"clip{i}.mp4"), fps=8)
    (root / "videos" / "clip0.txt").write_text("a disc jumps to the right")
    return root


def train_argv(tiny, out, *extra):
    return ["--videos", str(tiny / "videos"), "--prompt", "a disc jumps", "--base", str(tiny / "pipe"),
            "--motion-module", str(tiny / "pipe" / "motion_module.safetensors"), "--frames", "8", "--height", "64",
            "--width", "64", "--out", str(out), "--log-every", "5", "--lr", "1e-3", *extra]


# ----------------------------------------------------------------------------- demo.py helpers

@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    return demo.main(["--fast", "--ablation", "--seeds", "0", "--device", "cpu", "--threads", "1", "--out", str(out),
                      "--flash-steps", "3"])


# ====================================================================================================
class TestUNet:
    """model.py: U-Net, motion modules, cross-frame attention, checkpoint layouts"""

    def test_unet_parity_with_diffusers(self, written):
        d, unet2d, adapter = written
        ours = M.load_unet(d / "sd", d / "adapter", cross_frame=False).eval()
        ref = motion_oracle(unet2d, adapter)
        x, t, ctx = inputs(frames=5, b=2, hw=(8, 12))
        with torch.no_grad():
            want = ref(x, t, encoder_hidden_states=ctx.repeat_interleave(5, 0)).sample
            got = ours(x, t, ctx)
        assert got.shape == want.shape == x.shape
        assert rel_err(got, want) < 1e-4, rel_err(got, want)

    def test_cross_frame_parity_with_diffusers_processor(self, written):
        """Oracle: diffusers' attention with a processor that concatenates the first frame's keys/values."""
        d, unet2d, adapter = written
        frames = 4

        class FirstFrameProcessor:
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
                q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
                bf, n, c = k.shape
                kk = k.view(-1, frames, n, c)
                vv = v.view(-1, frames, n, c)
                k = torch.cat([kk[:, [0] * frames], kk], 2).view(bf, 2 * n, c)
                v = torch.cat([vv[:, [0] * frames], vv], 2).view(bf, 2 * n, c)
                h = attn.heads
                q, k, v = (a.view(bf, -1, h, c // h).transpose(1, 2) for a in (q, k, v))
                o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(bf, -1, c)
                return attn.to_out[1](attn.to_out[0](o))

        ref = motion_oracle(unet2d, adapter)
        for name, m in ref.named_modules():
            if name.endswith("attn1") and "motion_modules" not in name:
                m.set_processor(FirstFrameProcessor())
        ours = M.load_unet(d / "sd", d / "adapter").eval()
        assert ours.config.cross_frame
        x, t, ctx = inputs(frames=frames)
        with torch.no_grad():
            want = ref(x, t, encoder_hidden_states=ctx.repeat_interleave(frames, 0)).sample
            assert rel_err(ours(x, t, ctx), want) < 1e-4

    def test_every_layout_loads_identically(self, written):
        from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers, \
            convert_ldm_unet_checkpoint
        d, unet2d, adapter = written
        # test-side writers are faithful: diffusers' own converters map them back exactly
        ldm = M.load_state_dict_file(d / "sd15.safetensors")
        conv = convert_ldm_unet_checkpoint(ldm, {"layers_per_block": 2})
        assert set(conv) == set(unet2d.state_dict()) and all(torch.equal(conv[k], v) for k, v in
                                                              unet2d.state_dict().items())
        back = convert_animatediff_checkpoint_to_diffusers(M.load_state_dict_file(d / "mm_ad.safetensors"))
        want = {k: v for k, v in adapter.state_dict().items() if not k.endswith("pe")}
        assert set(want) <= set(back) and all(torch.equal(back[k], v) for k, v in want.items())

        x, t, ctx = inputs()
        outs = []
        combos = [(d / "sd", mm) for mm in (d / "adapter", d / "adapter" / "diffusion_pytorch_model.safetensors",
                                             d / "mm_ad.safetensors", d / "mm_ad.ckpt")]
        for base, mm in combos + [(d / "sd" / "unet", d / "mm_ad.ckpt"), (d / "sd15.safetensors", d / "mm_ad.ckpt")]:
            if True:
                ldm_cfg = {} if base.is_dir() else {k: UNET_TINY[k] for k in ("block_out_channels", "attention_heads",
                                                                           "cross_attention_dim", "norm_num_groups")}
                u = M.load_unet(base, mm, **ldm_cfg).eval()
                assert u.info["motion_version"] == "v2" and u.config.motion_max_len == 24
                with torch.no_grad():
                    outs.append(u(x, t, ctx))
        assert all(torch.equal(o, outs[0]) for o in outs)
        # our own writers round-trip too
        M.save_unet(u, d / "ours" / "unet")
        M.save_motion_module(u, d / "ours_mm.safetensors")
        u2 = M.load_unet(d / "ours", d / "ours_mm.safetensors").eval()
        with torch.no_grad():
            assert torch.equal(u2(x, t, ctx), outs[0])

    def test_motion_versions_detected(self, tmp_path):
        for mid, length, version in ((False, 24, "v1"), (True, 32, "v2"), (False, 32, "v3")):
            u = M.UNet(M.UNetConfig(**{**UNET_TINY, "motion_mid_block": mid, "motion_max_len": length}))
            M.save_motion_module(u, tmp_path / f"{version}.safetensors")
            sd = M.load_state_dict_file(tmp_path / f"{version}.safetensors")
            assert sd["down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0"
                      ".pos_encoder.pe"].shape == (1, length, 32)
            _, cfg, info = M.read_motion_module(tmp_path / f"{version}.safetensors")
            assert info["motion_version"] == version and cfg["motion_max_len"] == length
            assert cfg["frame_pooled_norm"] == (version == "v1")

    def test_motion_window_gathers_each_neighbourhood(self):
        """model.neighbourhood against plain indexing: position (y, x)'s keys are the frames of (y + dy, x + dx),
        dy, dx in -1..1 row-major, clamped at the frame's edge"""
        b, h, w, f, c = 2, 4, 5, 3, 6
        x = torch.randn(b * h * w, f, c)
        got = M.neighbourhood(x, h, w, 3).view(b, h, w, 9, f, c)
        xv = x.view(b, h, w, f, c)
        offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        for y in range(h):
            for z in range(w):
                for n, (dy, dx) in enumerate(offsets):
                    assert torch.equal(got[:, y, z, n], xv[:, min(max(y + dy, 0), h - 1), min(max(z + dx, 0), w - 1)])

    def test_motion_window_on_a_uniform_field_is_animatediff(self):
        """softmax over 9 copies of the same keys equals the softmax over one: without the offset marks a spatially
        uniform input gives the window-1 (AnimateDiff) output; with them it does not (they tell neighbours apart)"""
        torch.manual_seed(0)
        win, one = M.TemporalAttention(32, 8, 24, window=3), M.TemporalAttention(32, 8, 24)
        one.load_state_dict(win.state_dict())  # strict: the window adds no weights
        x = torch.randn(2, 1, 1, 5, 32).expand(2, 4, 3, 5, 32).reshape(24, 5, 32)  # (B H W) F C, uniform in H W
        with torch.no_grad():
            assert not torch.allclose(win(x, (4, 3)), one(x), atol=1e-3)
            win.offset_pe.zero_()
            torch.testing.assert_close(win(x, (4, 3)), one(x), atol=1e-5, rtol=1e-5)

    def test_motion_window_round_trips_and_stays_off_for_animatediff(self, written, tmp_path):
        d, _, _ = written
        u = M.load_unet(d / "sd", d / "adapter").eval()
        windows = lambda m: [a.window for n, a in m.named_modules() if n.endswith("attention_blocks.0")]
        assert u.config.motion_window == () and set(windows(u)) == {1}
        u3 = M.UNet(replace(u.config, motion_window=(1, 3, 3, 5))).eval()
        u3.load_state_dict(u.state_dict())  # strict: the same keys
        assert windows(u3) == [1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 5, 5, 3, 3, 3, 3, 3, 3, 1, 1, 1]  # down, mid, up (mirrored)
        M.save_unet(u3, tmp_path / "unet")
        M.save_motion_module(u3, tmp_path / "mm.safetensors")
        back = M.load_unet(tmp_path, tmp_path / "mm.safetensors").eval()
        assert back.config.motion_window == (1, 3, 3, 5)
        x, t, ctx = inputs(hw=(8, 16))
        with torch.no_grad():
            assert torch.equal(back(x, t, ctx), u3(x, t, ctx)) and not torch.allclose(u3(x, t, ctx), u(x, t, ctx))
        M.save_unet(u, tmp_path / "plain")
        assert "motion_window" not in json.loads((tmp_path / "plain" / "config.json").read_text())

    def test_v1_pooled_groupnorm_matches_5d_groupnorm(self):
        """v1 resnets normalise with statistics over all frames: equal to nn.GroupNorm on the (B, C, F, H, W) tensor."""
        gn = randomize_(nn.GroupNorm(8, 32))
        x = torch.randn(2, 32, 5, 6, 6)
        flat = x.transpose(1, 2).reshape(10, 32, 6, 6)
        got = M.group_norm(gn, flat, 5, pooled=True).view(2, 5, 32, 6, 6).transpose(1, 2)
        assert torch.allclose(got, gn(x), atol=1e-6)
        per_frame = M.group_norm(gn, flat, 5, pooled=False)
        assert not torch.allclose(per_frame, got.transpose(1, 2).reshape(10, 32, 6, 6), atol=1e-3)

    def test_full_size_counts_and_keys(self):
        diffusers = pytest.importorskip("diffusers")
        from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
        with torch.device("meta"):
            ref = diffusers.UNet2DConditionModel()  # SD-1.5 defaults
            ref_mm = diffusers.MotionAdapter(use_motion_mid_block=True)
            ours = {}
            for v, (mid, L) in {"v1": (False, 24), "v2": (True, 32)}.items():
                ours[v] = M.UNet(M.UNetConfig(motion_mid_block=mid, motion_max_len=L))
        sd = ours["v2"].state_dict()
        spatial = {k for k in sd if "motion_modules." not in k}
        assert spatial == set(ref.state_dict())
        count = lambda u, mm: sum(p.numel() for n, p in u.named_parameters() if ("motion_modules." in n) == mm)
        assert count(ours["v2"], False) == 859_520_964
        assert count(ours["v1"], True) == 417_137_600
        assert count(ours["v2"], True) == 453_209_280
        ad_keys = {k: sd[k] for k in sd if "motion_modules." in k}
        conv = convert_animatediff_checkpoint_to_diffusers(ad_keys)
        assert set(conv) == {k for k in ref_mm.state_dict() if not k.endswith("pos_embed.pe")}

    def test_cross_frame_attention_properties(self):
        torch.manual_seed(0)
        cfg = M.UNetConfig(**{**UNET_TINY, "motion_modules": False})
        cross = randomize_(M.UNet(cfg)).eval()
        plain = M.UNet(M.UNetConfig(**{**UNET_TINY, "motion_modules": False, "cross_frame": False})).eval()
        plain.load_state_dict(cross.state_dict())
        x, t, ctx = inputs(frames=4)
        with torch.no_grad():
            y = cross(x, t, ctx)
            # frame 1 sees only itself: same as per-frame self-attention
            assert torch.allclose(y[:, :, 0], plain(x, t, ctx)[:, :, 0], atol=1e-5)
            x3 = x.clone()
            x3[:, :, 2] += torch.randn_like(x3[:, :, 2])
            y3 = cross(x3, t, ctx)
            assert torch.equal(y3[:, :, 1], y[:, :, 1]) and torch.equal(y3[:, :, 3], y[:, :, 3])
            assert not torch.allclose(y3[:, :, 2], y[:, :, 2])
            x1 = x.clone()
            x1[:, :, 0] += torch.randn_like(x1[:, :, 0])
            y1 = cross(x1, t, ctx)
            assert all(not torch.allclose(y1[:, :, i], y[:, :, i], atol=1e-4) for i in range(4))

    def test_gradient_checkpointing_same_grads(self):
        cfg = M.UNetConfig(**UNET_TINY)
        a = randomize_(M.UNet(cfg)).train()
        b = M.UNet(M.UNetConfig(**UNET_TINY)).train()
        b.gradient_checkpointing = True
        b.load_state_dict(a.state_dict())
        x, t, ctx = inputs()
        a(x, t, ctx).square().mean().backward()
        b(x, t, ctx).square().mean().backward()
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6), n

    def test_bf16_close_to_fp32(self):
        u = randomize_(M.UNet(M.UNetConfig(**UNET_TINY))).eval()
        x, t, ctx = inputs()
        with torch.no_grad():
            ref = u(x, t, ctx)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = u(x, t, ctx).float()
            low = M.UNet(M.UNetConfig(**UNET_TINY)).eval()
            low.load_state_dict(u.state_dict())
            low16 = low.to(torch.bfloat16)(x, t, ctx).float()
        assert rel_err(got, ref) < 5e-2 and rel_err(low16, ref) < 5e-2

    def test_bad_checkpoints_fail_clearly(self, written, tmp_path):
        from safetensors.torch import save_file
        d, unet2d, adapter = written
        sd = dict(M.load_state_dict_file(d / "sd" / "unet" / "diffusion_pytorch_model.safetensors"))
        (tmp_path / "unet").mkdir()
        (tmp_path / "unet" / "config.json").write_text((d / "sd" / "unet" / "config.json").read_text())
        cases = {"missing": ("conv_in.weight", None), "unexpected": ("conv_in.extra", torch.zeros(1)),
                 "mis-shaped": ("conv_out.bias", torch.zeros(5))}
        for word, (key, val) in cases.items():
            bad = dict(sd)
            if val is None:
                bad.pop(key)
            else:
                bad[key] = val
            save_file(bad, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
            with pytest.raises(ValueError, match=word) as e:
                M.load_unet(tmp_path)
            assert key in str(e.value)
        mm = dict(M.load_state_dict_file(d / "mm_ad.safetensors"))
        mm.pop("down_blocks.1.motion_modules.0.temporal_transformer.proj_out.bias")
        save_file(mm, tmp_path / "mm_bad.safetensors")
        with pytest.raises(ValueError, match="down_blocks.1.motion_modules.0.temporal_transformer.proj_out.bias"):
            M.load_unet(d / "sd", tmp_path / "mm_bad.safetensors")
        (tmp_path / "junk").mkdir()
        with pytest.raises(FileNotFoundError, match="not an SD diffusers folder"):
            M.load_unet(tmp_path / "junk")
        save_file({"foo": torch.zeros(1)}, tmp_path / "foo.safetensors")
        with pytest.raises(ValueError, match="not an SD single-file"):
            M.load_unet(tmp_path / "foo.safetensors")
        with pytest.raises(ValueError, match="not an AnimateDiff motion module"):
            M.load_unet(d / "sd", tmp_path / "foo.safetensors")
        with pytest.raises(FileNotFoundError):
            M.load_unet(tmp_path / "nope")
        torch.save({"state_dict": {"a": torch.zeros(1)}, "cfg": NotATensor()}, tmp_path / "x.ckpt")
        with pytest.raises(ValueError, match="weights_only"):
            M.load_state_dict_file(tmp_path / "x.ckpt")
        u = M.load_unet(d / "sd", d / "mm_ad.safetensors")
        x, t, ctx = inputs(frames=25)
        with pytest.raises(ValueError, match="positional encoding holds 24"):
            u(x, t, ctx)



# ====================================================================================================
class TestVAE:
    """vae.py: SD VAE and the Detail Enhancement Decoder"""

    def test_parity_with_diffusers(self):
        ref = df_vae()
        ours = VAE(VAEConfig(**VAE_TINY)).eval()
        ours.load_state_dict(ref.state_dict())  # strict: identical names and shapes
        for h, w in [(64, 64), (48, 80)]:
            x = images(3, h, w)
            with torch.no_grad():
                dist = ref.encode(x).latent_dist
                z = ours.encode(x, chunk=2)
                close(z, dist.mean * 0.18215)
                zs = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
                close(zs, dist.sample(generator=torch.Generator().manual_seed(5)) * 0.18215)
                close(ours.decode(z, chunk=2), ref.decode(z / 0.18215).sample)

    def test_every_layout_loads_identically(self, tmp_path):
        from diffusers import AutoencoderKL
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
        ref = df_vae()
        sd = ref.state_dict()
        ref.save_pretrained(tmp_path / "sd" / "vae")  # SD folder with vae/ subfolder
        ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
        ldm = to_ldm(sd)
        back = convert_ldm_vae_checkpoint(ldm, dict(DF_TINY))  # the test's LDM writer is faithful
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
        save_file(ldm, tmp_path / "ldm.safetensors")
        torch.save({"state_dict": ldm}, tmp_path / "ldm.ckpt")
        old = {re.sub(r"\.to_(q|k|v)\.", lambda m: "." + dict(q="query", k="key", v="value")[m.group(1)] + ".", k)
               .replace(".to_out.0.", ".proj_attn."): v for k, v in sd.items()}
        assert any(".query." in k for k in old) and any(".proj_attn." in k for k in old)
        (tmp_path / "old").mkdir()
        save_file(old, tmp_path / "old" / "diffusion_pytorch_model.safetensors")
        (tmp_path / "old" / "config.json").write_text(json.dumps(dict(DF_TINY)))
        save_vae(load_vae(tmp_path / "sd"), tmp_path / "ours")
        assert AutoencoderKL.from_pretrained(tmp_path / "ours").state_dict().keys() == sd.keys()  # diffusers reads ours

        models = [load_vae(tmp_path / "sd"), load_vae(tmp_path / "sd" / "vae"), load_vae(tmp_path / "bin"),
                  load_vae(tmp_path / "ours"), load_vae(tmp_path / "ldm.safetensors", **VAE_TINY),
                  load_vae(tmp_path / "ldm.ckpt", **VAE_TINY), load_vae(tmp_path / "old")]
        x = images(2, 32, 48)
        with torch.no_grad():
            z0 = models[0].encode(x)
            x0 = models[0].decode(z0)
            for m in models:
                assert m.config.block_out_channels == VAE_TINY["block_out_channels"] and m.config.norm_num_groups == 8
                assert all(torch.equal(m.state_dict()[k], sd[k]) for k in sd)
                assert torch.equal(m.encode(x), z0) and torch.equal(m.decode(z0), x0)

    def test_full_size_param_count_and_keys(self):
        from diffusers import AutoencoderKL
        with torch.device("meta"):
            ours = VAE(VAEConfig())
            ref = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                                norm_num_groups=32, sample_size=512)
        assert sum(p.numel() for p in ours.parameters()) == 83_653_863
        a, b = ours.state_dict(), ref.state_dict()
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)

    def test_strict_loading_errors(self, tmp_path):
        good = randomize_(VAE(VAEConfig(**VAE_TINY)))
        save_vae(good, tmp_path / "good")
        cfg = (tmp_path / "good" / "config.json").read_text()
        sd = good.state_dict()

        def write(name, d):
            (tmp_path / name).mkdir()
            save_file(d, tmp_path / name / "diffusion_pytorch_model.safetensors")
            (tmp_path / name / "config.json").write_text(cfg)
            return tmp_path / name
        key = "decoder.up_blocks.1.resnets.2.conv1.weight"
        with pytest.raises(ValueError, match=f"missing.*{re.escape(key)}"):
            load_vae(write("missing", {k: v for k, v in sd.items() if k != key}))
        with pytest.raises(ValueError, match="unexpected.*encoder.extra.weight"):
            load_vae(write("extra", {**sd, "encoder.extra.weight": torch.zeros(3)}))
        with pytest.raises(ValueError, match=f"mis-shaped.*{re.escape(key)}"):
            load_vae(write("shape", {**sd, key: torch.zeros(3, 3, 3, 3)}))
        with pytest.raises(ValueError, match="not a diffusers"):
            load_vae(tmp_path / "nowhere.safetensors")
        (tmp_path / "notes.txt").write_text("x")
        with pytest.raises(ValueError, match="not a diffusers"):
            load_vae(tmp_path / "notes.txt")
        (tmp_path / "empty").mkdir()
        with pytest.raises(ValueError, match="no vae/diffusion_pytorch_model"):
            load_vae(tmp_path / "empty")
        det = VAE(VAEConfig(**VAE_TINY, detail=True))  # detail checkpoints round-trip; a plain VAE rejects their keys
        save_vae(det, tmp_path / "det")
        assert load_vae(tmp_path / "det").config.detail
        with pytest.raises(ValueError, match="unexpected.*detail"):
            load_vae(tmp_path / "det", detail=False)
        with pytest.raises(ValueError, match="detail=True"):
            good.decode(torch.zeros(1, 4, 8, 8), ref=[])

    def test_fresh_detail_decoder_is_sd_decoder(self, tmp_path):
        base = randomize_(VAE(VAEConfig(**VAE_TINY)))
        save_vae(base, tmp_path / "base")
        det = load_vae(tmp_path / "base", detail=True)  # base checkpoint: only decoder.detail.* may be missing
        assert any(".detail." in k for k in det.state_dict())
        z = torch.randn(5, 4, 6, 10, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = det.encoder_features(images(1, 48, 80))
            assert [tuple(g.shape[-2:]) for g in ref] == [(6, 10), (12, 20), (24, 40), (48, 80)]
            assert torch.equal(det.decode(z, ref=ref, chunk=2), base.decode(z, chunk=2))
            assert torch.equal(det.decode(z), base.decode(z))

    def test_warp_zero_and_constant_displacement(self):
        x = torch.randn(2, 5, 32, 64)
        assert torch.equal(warp(x, torch.zeros(2, 2, 32, 64)), x)  # power-of-two size: exact
        y = torch.randn(1, 3, 48, 80)
        close(warp(y, torch.zeros(1, 2, 48, 80)), y, tol=1e-5)
        flow = torch.zeros(2, 2, 32, 64)
        flow[:, 0] = 2.0  # +2 pixels in x: s[p, q] = x[p, q + 2]
        close(warp(x, flow)[..., :, :-2], x[..., :, 2:], tol=1e-5)
        flow = torch.zeros(2, 2, 32, 64)
        flow[:, 1] = -1.5  # half-pixel in y: mean of rows p-1 and p-2
        close(warp(x, flow)[..., 2:, :], (x[..., 1:-1, :] + x[..., :-2, :]) / 2, tol=1e-5)

    def test_patch_attention_hand_formulas(self):
        blk = randomize_(DetailBlock(8, 8, dim=32, heads=4), seed=3)
        g = torch.randn(1, 8, 2, 2)
        with torch.no_grad():  # one 2x2 patch = one key: softmax is 1, output = the value path
            t = blk.patch_attention(torch.randn(3, 8, 2, 2), g.expand(3, -1, -1, -1))
            hand = blk.to_out(blk.to_v(blk.patch_in(g.reshape(1, 32)))).view(1, 8, 2, 2)
            close(t, hand.expand(3, -1, -1, -1), tol=1e-5)
            for lin in (blk.patch_in, blk.to_v, blk.to_out):  # identity maps, constant keys: uniform attention
                lin.weight.copy_(torch.eye(32)), lin.bias.zero_()
            blk.to_k.weight.zero_()
            g = torch.randn(1, 8, 4, 6)
            t = blk.patch_attention(torch.randn(2, 8, 4, 6), g)
            mean = g.view(8, 2, 2, 3, 2).mean(dim=(1, 3))  # mean over the 2x3 grid of reference patches
            close(t, mean[None].repeat(2, 1, 2, 3), tol=1e-5)

    def test_full_res_patch_attention_is_softmax_in_chunks(self, monkeypatch):
        """detail_full_res: patch attention at the full-resolution scale too, = softmax(Q K^T / sqrt(d)) V computed
        directly, run as model.attention's query chunks (no call sees more than chunk x L_k scores)."""
        vae = randomize_(VAE(VAEConfig(**VAE_TINY, detail=True, detail_full_res=True, detail_attn_chunk=16)), 4)
        blk = vae.decoder.detail["3"]  # the full-resolution block (channels 32)
        assert blk.attn and "decoder.detail.3.to_q.weight" in vae.state_dict()
        assert "decoder.detail.3.to_q.weight" not in VAE(VAEConfig(**VAE_TINY, detail=True)).state_dict()
        h, g = torch.randn(2, 32, 12, 16, generator=gen(1)), torch.randn(1, 32, 12, 16, generator=gen(2))
        calls = []
        sdpa = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention",
                            lambda q, k, v, **kw: calls.append((q.shape[-2], k.shape[-2])) or sdpa(q, k, v, **kw))
        with torch.no_grad():
            t = blk.patch_attention(h, g)
            # direct: 2x2 patches by F.unfold, one FC layer, per-head softmax(q k^T / sqrt(d)) v, patches back by F.fold
            pq = blk.patch_in(F.unfold(h, 2, stride=2).transpose(1, 2))  # N L (C 2 2)
            pk = blk.patch_in(F.unfold(g, 2, stride=2).transpose(1, 2))
            q, k, v = blk.to_q(pq), blk.to_k(pk), blk.to_v(pk)
            heads = []
            for i in range(blk.heads):
                sl = slice(i * 64, (i + 1) * 64)  # dim 256 / 4 heads
                scores = q[..., sl] @ k[..., sl].transpose(1, 2) / 64 ** 0.5  # N x 48 x 48: the full matrix
                heads.append(torch.softmax(scores, -1) @ v[..., sl])
            hand = F.fold(blk.to_out(torch.cat(heads, -1)).transpose(1, 2), (12, 16), 2, stride=2)
        close(t, hand, tol=1e-5)
        assert calls == [(16, 48)] * 3  # 48 patch queries in chunks of 16, each against all 48 keys
        calls.clear()
        blk.chunk = 0
        with torch.no_grad():
            close(blk.patch_attention(h, g), hand, tol=1e-5)
        assert calls == [(48, 48)]  # chunk 0: one call
        blk.chunk = 16
        # the whole decoder runs it, and sample.py --no-detail-full-res skips only that block
        z, ref = torch.randn(1, 4, 6, 8, generator=gen(3)), vae.encoder_features(images(1, 48, 64))
        with torch.no_grad():
            for m in vae.decoder.detail.values():  # non-zero fusion, so every branch shows in the output
                m.fuse[2].weight.normal_(0, 0.05, generator=gen(4))
            calls.clear()
            full = vae.decode(z, ref=ref)
            assert (16, 24 * 32) in calls  # full resolution 48x64: 24x32 = 768 patch tokens
            vae.full_res_attention(False)
            calls.clear()
            skipped = vae.decode(z, ref=ref)
            assert calls and max(k for _, k in calls) < 768 and not torch.equal(full, skipped)
            vae.full_res_attention(True)
            assert torch.equal(vae.decode(z, ref=ref), full)

    @pytest.mark.parametrize("branches,full_res", [(("warp",), False), (("patch",), False), (("patch",), True),
                                                   (("warp", "patch"), False), (("warp", "patch"), True)])
    def test_detail_branch_switches_exact_parameters(self, branches, full_res):
        """Table A2's decoder ablations build only the chosen branches: parameter count from the layer formulas."""
        vae = VAE(VAEConfig(**VAE_TINY, detail=True, detail_branches=branches, detail_full_res=full_res))
        conv = lambda cin, cout, k=3: cin * cout * k * k + cout
        lin = lambda cin, cout: cin * cout + cout
        # VAE_TINY channels (32, 32, 64, 64): h = the inputs of up blocks 0-2 (64, 64, 64) and the last block's
        # output (32); g = the encoder maps of equal size, H/8 .. H (64, 64, 32, 32)
        h_ch, g_ch, expect = (64, 64, 64, 32), (64, 64, 32, 32), 0
        for i, (h, g) in enumerate(zip(h_ch, g_ch)):
            warp_n = conv(2 * h, 64) + 2 * conv(64, 64) + conv(64, 2) if "warp" in branches else 0  # N: 4 convs
            attn_n = (lin(4 * h, 256) + 3 * lin(256, 256) + lin(256, 4 * h)
                      if "patch" in branches and (i < 3 or full_res) else 0)  # FC per patch, A, FC back
            if warp_n or attn_n:
                expect += conv(g, h, 1) + conv(2 * h, 64) + conv(64, h) + warp_n + attn_n  # g~ projection, M
        names = [n for n, _ in vae.named_parameters() if ".detail." in n]
        assert sum(p.numel() for n, p in vae.named_parameters() if ".detail." in n) == expect
        assert any(".warp." in n for n in names) == ("warp" in branches)
        assert any(".patch_in." in n for n in names) == ("patch" in branches)
        assert any(n.startswith("decoder.detail.3.") for n in names) == ("warp" in branches or full_res)
        with torch.no_grad():
            out = vae.decode(torch.randn(2, 4, 6, 8), ref=vae.encoder_features(images(1, 48, 64)))
        assert out.shape == (2, 3, 48, 64)
        with pytest.raises(ValueError, match="detail_branches"):
            VAE(VAEConfig(**VAE_TINY, detail=True, detail_branches=("warp", "flow")))

    def test_detail_shapes_and_gradients(self):
        vae = randomize_(VAE(VAEConfig(**VAE_TINY, detail=True)))
        names = [n for n, _ in vae.named_parameters() if "detail" in n]
        assert names and all(n.startswith("decoder.detail.") for n in names)
        for h, w, rh, rw in [(48, 80, 48, 80), (40, 72, 40, 72), (64, 64, 32, 48)]:  # odd latent 5x9; ref of other size
            with torch.no_grad():
                out = vae.decode(torch.randn(3, 4, h // 8, w // 8), ref=vae.encoder_features(images(1, rh, rw)), chunk=2)
            assert out.shape == (3, 3, h, w) and torch.isfinite(out).all()
        vae.requires_grad_(False)
        for n, p in vae.named_parameters():
            p.requires_grad_("detail" in n)
        out = vae.decode(torch.randn(2, 4, 6, 10), ref=vae.encoder_features(images(1, 48, 80)))
        out.square().mean().backward()
        for n, p in vae.named_parameters():
            assert (p.grad is not None and p.grad.abs().sum() > 0) == ("detail" in n), n

    def test_decoder_checkpointing_same_grads(self):
        """The decoder stage's gradient checkpointing (recompute every resnet and detail block) changes memory only."""
        vae = randomize_(VAE(VAEConfig(**VAE_TINY, detail=True, detail_full_res=True))).train()
        vae.requires_grad_(False)
        for n, p in vae.named_parameters():
            p.requires_grad_("detail" in n)
        z, ref = torch.randn(2, 4, 6, 10, generator=gen(3)), vae.encoder_features(images(1, 48, 80))
        grads = []
        for on in (False, True):
            vae.decoder.gradient_checkpointing = on
            vae.decode(z, ref=ref).square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in vae.named_parameters() if p.requires_grad})
            vae.zero_grad(set_to_none=True)
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
        for n in grads[0]:
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)



# ====================================================================================================
class TestCLIP:
    """clip_text.py: CLIP text encoder and tokenizer"""

    # ------------------------------------------------------------------------- model

    def test_parity_with_transformers(self, hf_folder):
        hf, folder = hf_folder
        ours = load_text_encoder(folder)
        for L in (77, 13):
            ids = rand_ids(L=L)
            with torch.no_grad():
                out = hf(input_ids=ids, output_hidden_states=True)
                ref, mine = out.last_hidden_state, ours(ids)
                err = (mine - ref).abs().max().item()
                print(f"L={L} max abs diff {err:.2e} (scale {ref.abs().max():.2f})")
                assert mine.shape == ref.shape and err <= 1e-4 * ref.abs().max().item()
                # clip_skip=k: hidden state -(k+1), then final LN (diffusers StableDiffusionPipeline)
                final_ln = getattr(hf, "text_model", hf).final_layer_norm  # transformers 5 dropped .text_model
                skip_ref = final_ln(out.hidden_states[-2])
                assert (ours(ids, clip_skip=1) - skip_ref).abs().max() <= 1e-4 * skip_ref.abs().max()

    def test_transformers_loads_our_save(self, hf_folder, tmp_path):
        transformers = pytest.importorskip("transformers")
        hf, folder = hf_folder
        ours = load_text_encoder(folder)
        save_text_encoder(ours, tmp_path / "te")
        back = transformers.CLIPTextModel.from_pretrained(tmp_path / "te").eval()
        ids = rand_ids()
        with torch.no_grad():
            assert torch.allclose(back(input_ids=ids).last_hidden_state, hf(input_ids=ids).last_hidden_state, atol=1e-6)

    def test_all_layouts_bit_identical(self, hf_folder, tmp_path):
        hf, folder = hf_folder
        ids = rand_ids()
        with torch.no_grad():
            ref = load_text_encoder(folder)(ids)
        # transformers 5 saves keys without `text_model.` (hf_folder); real SD-1.5 files and ours have it
        sd = load_text_encoder(folder).state_dict()
        assert all(k.startswith("text_model.") for k in sd)
        assert not any(k.startswith("text_model.") for k in load_file(folder / "model.safetensors"))
        # SD root folder (text_encoder/) with pytorch_model.bin
        (tmp_path / "sd/text_encoder").mkdir(parents=True)
        (tmp_path / "sd/text_encoder/config.json").write_text((folder / "config.json").read_text())
        torch.save(sd, tmp_path / "sd/text_encoder/pytorch_model.bin")
        # our own save
        save_text_encoder(load_text_encoder(folder), tmp_path / "ours")
        # LDM single files, with and without text_model., with a float-corrupted position_ids and non-CLIP keys
        bad_pos = torch.arange(77, dtype=torch.float32)[None] + 0.4999
        other = {"model.diffusion_model.conv_in.weight": torch.zeros(2, 2), "first_stage_model.decoder.x": torch.ones(1)}
        ldm1 = {"cond_stage_model.transformer." + k: v for k, v in sd.items()}
        ldm1["cond_stage_model.transformer.text_model.embeddings.position_ids"] = bad_pos
        ldm2 = {"cond_stage_model.transformer." + k[len("text_model."):]: v for k, v in sd.items()}
        ldm2["cond_stage_model.transformer.embeddings.position_ids"] = bad_pos
        save_file({**ldm1, **other}, tmp_path / "ldm1.safetensors")
        torch.save({"state_dict": {**ldm2, **other}}, tmp_path / "ldm2.ckpt")
        cases = [(tmp_path / "sd", {}), (tmp_path / "sd/text_encoder", {}), (tmp_path / "ours", {}),
                 (tmp_path / "ldm1.safetensors", CLIP_TINY), (tmp_path / "ldm2.ckpt", CLIP_TINY)]
        for path, overrides in cases:
            with torch.no_grad():
                assert torch.equal(load_text_encoder(path, **overrides)(ids), ref), path

    def test_full_size_meta(self):
        with torch.device("meta"):
            model = CLIPTextModel(CLIPTextConfig())
        assert sum(p.numel() for p in model.parameters()) == 123_060_480
        transformers = pytest.importorskip("transformers")
        cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
        with torch.device("meta"):
            hf = transformers.CLIPTextModel(cfg)
        hf_sd = {k if k.startswith("text_model.") else "text_model." + k: v  # transformers 5 dropped the text_model. level
                 for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
        assert set(model.state_dict()) == set(hf_sd)
        assert all(v.shape == hf_sd[k].shape for k, v in model.state_dict().items())

    def test_strict_loading_errors(self, tmp_path):
        save_text_encoder(CLIPTextModel(CLIPTextConfig(**CLIP_TINY)), tmp_path / "te")
        good = load_file(tmp_path / "te/model.safetensors")

        def load_with(sd):
            save_file(sd, tmp_path / "te/model.safetensors")
            return load_text_encoder(tmp_path / "te")

        key = "text_model.encoder.layers.1.mlp.fc1.weight"
        with pytest.raises(ValueError, match=r"1 missing key\(s\): " + key):
            load_with({k: v for k, v in good.items() if k != key})
        with pytest.raises(ValueError, match=r"1 unexpected key\(s\): text_model.encoder.layers.2.mlp.fc1.weight"):
            load_with({**good, "text_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(1)})
        with pytest.raises(ValueError, match=r"1 mis-shaped key\(s\): " + key):
            load_with({**good, key: torch.zeros(128, 65)})
        with pytest.raises(ValueError, match="mis-shaped"):  # tiny weights, full-size default config (no config.json)
            torch.save(good, tmp_path / "tiny.bin")
            load_text_encoder(tmp_path / "tiny.bin")
        with pytest.raises(FileNotFoundError, match="not found"):
            load_text_encoder(tmp_path / "does_not_exist.safetensors")
        (tmp_path / "empty").mkdir()
        with pytest.raises(FileNotFoundError, match="model.safetensors"):
            load_text_encoder(tmp_path / "empty")
        with pytest.raises(FileNotFoundError, match="vocab.json"):
            load_tokenizer(tmp_path / "empty")

    def test_real_vocab_facts(self, real_vocab):
        vocab, merges = real_vocab
        assert len(vocab) == 49408 and len(merges) == 48894 and merges[-1] == "jeky ll</w>"
        assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0
        assert sorted(vocab.values()) == list(range(49408))
        tok = Tokenizer(vocab, merges)
        ids = tok("a photo of a cat")
        assert ids.shape == (1, 77) and ids.dtype == torch.long and tok.max_length == 77
        assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407] and (ids[0, 6:] == 49407).all()
        assert tok("")[0].tolist() == [49406] + [49407] * 76

    def test_tokenizer_matches_transformers_and_reference(self, real_vocab, tmp_path):
        transformers = pytest.importorskip("transformers")
        vocab, merges = real_vocab
        save_tokenizer(real_vocab, tmp_path / "sd/tokenizer")
        tok = load_tokenizer(tmp_path / "sd")
        folder = tmp_path / "sd/tokenizer"
        hf = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
        with pytest.warns(UserWarning, match="dropped"):
            ours = tok(PROMPTS).tolist()
        hf_ids = hf(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        for prompt, a, b in zip(PROMPTS, ours, hf_ids):
            assert a == b, prompt
            assert a == ref_tokenize(prompt, vocab, merges), prompt
        assert tok(PROMPTS[3]).tolist()[0] == ours[3]  # str and list give the same row

    def test_long_prompt_truncation(self, real_vocab):
        tok = Tokenizer(*real_vocab)
        with pytest.warns(UserWarning, match=r"dropped its last \d+ tokens"):
            ids = tok(["short", PROMPTS[-1]])
        assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and (ids[1, 1:-1] != 49407).all()
        assert ids[0, :3].tolist() == tok("short")[0, :3].tolist()

    @pytest.mark.filterwarnings("ignore:prompt longer")
    def test_byte_vocab_and_roundtrip(self, tmp_path):
        vocab, merges = byte_vocab()
        assert len(vocab) == 514 and merges == [] and vocab["<|startoftext|>"] == 512 and vocab["<|endoftext|>"] == 513
        save_tokenizer(Tokenizer(vocab, merges), tmp_path)
        tok = load_tokenizer(tmp_path)
        for p in PROMPTS[:-1]:
            assert tok(p)[0].tolist() == ref_tokenize(p, vocab, merges), p
        assert tok("ab c")[0, :5].tolist() == [512, vocab["a"], vocab["b</w>"], vocab["c</w>"], 513]
        # byte-level ids feed the tiny model end to end
        assert CLIPTextModel(CLIPTextConfig(**CLIP_TINY))(tok(["a cat", "a dog"])).shape == (2, 77, 32)



# ----------------------------------------------------------------------------- eval.py helpers

CLIP_VISION_TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=56,
                        patch_size=14)


def hf_clip_model(eos_token_id=2, seed=0):
    """A tiny transformers CLIPModel with random weights; eos_token_id 2 is the legacy value of OpenAI's configs"""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(text_config=dict(CLIP_TINY, hidden_act="quick_gelu", bos_token_id=0, pad_token_id=1,
                                                   eos_token_id=eos_token_id, max_position_embeddings=77),
                                  vision_config=dict(CLIP_VISION_TINY, hidden_act="quick_gelu"), projection_dim=24)
    return randomize_(transformers.CLIPModel(cfg), seed)


def save_hf_clip(hf, folder):
    """The layout of openai/clip-vit-large-patch14 on the hub: config.json, model.safetensors, vocab.json, merges.txt"""
    hf.save_pretrained(folder)
    save_tokenizer(byte_vocab(), folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    hf = hf_clip_model()
    return hf, save_hf_clip(hf, tmp_path_factory.mktemp("clip") / "clip-vit-large-patch14")


def hf_features(hf, images=None, ids=None):
    """transformers' projected CLIP features, L2-normalised: images (uint8 H W 3 list) through CLIPImageProcessorPil
    (transformers' CLIPImageProcessor without torchvision) at the tiny model's size, or token ids"""
    transformers = pytest.importorskip("transformers")
    with torch.no_grad():
        if images is not None:
            s = hf.config.vision_config.image_size
            proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
            out = hf.get_image_features(pixel_values=proc([Image.fromarray(a) for a in images],
                                                          return_tensors="pt").pixel_values)
        else:
            out = hf.get_text_features(input_ids=ids)
    out = getattr(out, "pooler_output", out)  # transformers 5 returns an output object
    return (out / out.norm(dim=-1, keepdim=True)).double().numpy()


def disc_frames(T=12, size=64):
    """A disc gliding 2 px per frame over a smooth background: consecutive frames are the most alike"""
    yy, xx = np.mgrid[0:size, 0:size]
    bg = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 90)], -1)
    frames = np.repeat(bg[None], T, 0).astype(np.uint8)
    for t in range(T):
        frames[t][(yy - 32) ** 2 + (xx - 10 - 2 * t) ** 2 < 100] = (250, 240, 20)
    return frames


# ====================================================================================================
class TestEval:
    """eval.py: the CLIP ViT-L/14 vision tower and projections, CLIP preprocessing, the App. A3.3 metrics, the CLI"""

    def test_clip_model_parity_with_transformers(self, clip_dir, tmp_path):
        hf, folder = clip_dir
        model, tok = E.load_clip(folder)
        px = torch.randn(3, 3, 56, 56, generator=gen(0))
        ids = torch.cat([tok(["a person waving", "", "a disc jumps to the right"]), rand_ids(B=2)])
        ids[3:, 30] = 7  # random rows: an id 7 (the eos of the second config) before their largest id
        with torch.no_grad():
            out = hf.get_image_features(pixel_values=px)  # random pixels: the tower alone, no preprocessing
            ref_img = getattr(out, "pooler_output", out)
            ref_img = (ref_img / ref_img.norm(dim=-1, keepdim=True)).double().numpy()
            img, txt = model.encode_image(px).double().numpy(), model.encode_text(ids).double().numpy()
        ref_txt = hf_features(hf, ids=ids)
        errs = [np.abs(a - b).max() / np.abs(b).max() for a, b in ((img, ref_img), (txt, ref_txt),
                                                                   (img @ txt.T, ref_img @ ref_txt.T))]
        print(f"relative max diff: image {errs[0]:.1e}, text {errs[1]:.1e}, cosine {errs[2]:.1e}")
        assert max(errs) <= 1e-4 and img.shape == (3, 24) and txt.shape == (5, 24)
        assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-6)
        # the other pooling rule (a config whose eos_token_id is not the legacy 2): first position of that id
        hf7 = hf_clip_model(eos_token_id=7)
        model7, _ = E.load_clip(save_hf_clip(hf7, tmp_path / "eos7"))
        with torch.no_grad():
            txt7 = model7.encode_text(ids).double().numpy()
        assert np.abs(txt7 - hf_features(hf7, ids=ids)).max() <= 1e-4
        # pytorch_model.bin (weights_only) with the old files' position_ids buffers, one of them float-corrupted
        sd = load_file(folder / "model.safetensors")
        sd["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.float32)[None] + 0.4999
        sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        shutil.copytree(folder, tmp_path / "bin", ignore=shutil.ignore_patterns("model.safetensors"))
        torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
        again, _ = E.load_clip(tmp_path / "bin")
        with torch.no_grad():
            assert torch.equal(again.encode_image(px), model.encode_image(px))
            assert torch.equal(again.encode_text(ids), model.encode_text(ids))

    def test_preprocess_matches_clip_image_processor(self, tmp_path):
        """CLIPImageProcessorPil = transformers' CLIPImageProcessor without torchvision (the PIL path).
        Measured max abs difference after normalisation: 0.0 on every size and mode below."""
        transformers = pytest.importorskip("transformers")
        hf = transformers.CLIPImageProcessorPil()
        rng, worst = np.random.default_rng(0), 0.0
        for h, w in [(37, 81), (300, 17), (224, 224), (225, 224), (224, 227), (333, 500), (1, 5), (97, 1001)]:
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ours = E.preprocess(a[None])
            assert ours.shape == (1, 3, 224, 224)
            worst = max(worst, (ours - hf(Image.fromarray(a), return_tensors="pt").pixel_values).abs().max().item())
        # other modes, as files read the way eval.py reads a reference image (at its own size: no resize there)
        rgb = rng.integers(0, 256, (45, 71, 3), dtype=np.uint8)
        rgba = Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (45, 71), dtype=np.uint8)]), "RGBA")
        pal = Image.fromarray(rgb).convert("P")
        pal.info["transparency"] = 0
        modes = {"l.png": Image.fromarray(rgb).convert("L"), "p.png": Image.fromarray(rgb).convert("P"),
                 "p_transparent.png": pal, "rgba.png": rgba, "la.png": rgba.convert("LA"),
                 "cmyk.jpg": Image.fromarray(rgb).convert("CMYK")}
        for name, im in modes.items():
            im.save(tmp_path / name)
            with Image.open(tmp_path / name) as f:
                ref = hf(f, return_tensors="pt").pixel_values
            worst = max(worst, (E.preprocess(E.read_reference(tmp_path / name, 45, 71)[None]) - ref).abs().max().item())
        print(f"max abs difference after normalisation: {worst:.1e}")
        assert worst <= 1e-6

    def test_full_size_clip_model_on_meta(self):
        with torch.device("meta"):
            model = E.CLIPModel()
        n = lambda prefix: sum(p.numel() for k, p in model.named_parameters() if k.startswith(prefix))
        assert n("vision_model.") == 303_179_776 and n("text_model.") == 123_060_480
        assert n("visual_projection.") == 786_432 and n("text_projection.") == 589_824
        assert n("") == 427_616_513
        transformers = pytest.importorskip("transformers")
        cfg = transformers.CLIPConfig(projection_dim=768, text_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=224, patch_size=14))
        with torch.device("meta"):
            hf = transformers.CLIPModel(cfg)
        hf_sd = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
        assert sum(p.numel() for p in hf.parameters()) == 427_616_513
        assert set(model.state_dict()) == set(hf_sd)
        assert all(v.shape == hf_sd[k].shape for k, v in model.state_dict().items())

    def test_clip_folder_strict_loading(self, clip_dir, tmp_path):
        _, folder = clip_dir
        good = load_file(folder / "model.safetensors")
        shutil.copytree(folder, tmp_path / "c")
        key = "vision_model.encoder.layers.1.mlp.fc1.weight"
        for sd, match in (({k: v for k, v in good.items() if k != key}, r"1 missing key\(s\): " + key),
                          ({**good, "vision_model.x": torch.zeros(1)}, r"1 unexpected key\(s\): vision_model.x"),
                          ({**good, key: torch.zeros(96, 47)}, r"1 mis-shaped key\(s\): " + key)):
            save_file(sd, tmp_path / "c" / "model.safetensors")
            with pytest.raises(ValueError, match=match):
                E.load_clip(tmp_path / "c")

    def test_metric_properties(self, clip_dir, tmp_path):
        hf, folder = clip_dir
        model, tok = E.load_clip(folder)
        frames = disc_frames()
        Image.fromarray(frames[0]).save(tmp_path / "ref.png")
        ref = E.embed_images(model, E.read_reference(tmp_path / "ref.png", 64, 64)[None])[0]
        text = E.embed_text(model, tok, "a disc glides to the right")
        static = E.clip_scores(E.embed_images(model, np.repeat(frames[:1], 8, 0), batch=3), text, ref)
        assert static["temporal_consistency"] == pytest.approx(100, abs=1e-4)
        assert static["image_alignment"] == pytest.approx(100, abs=1e-4)
        moving = E.embed_images(model, frames, batch=5)
        in_order = E.clip_scores(moving, text, ref)
        for seed in range(5):
            perm = np.random.default_rng(seed).permutation(len(frames))
            shuffled = E.clip_scores(moving[perm], text, ref)
            assert shuffled["temporal_consistency"] < in_order["temporal_consistency"] < 100
            # the other two are means over frames: the order does not matter
            for k in ("text_alignment", "image_alignment"):
                assert shuffled[k] == pytest.approx(in_order[k], abs=1e-9)
        # against transformers' features and the A3.3 formulas written out; frame 1 dropped with first_frame=False
        f, t, r = hf_features(hf, images=frames), hf_features(hf, ids=tok("a disc glides to the right"))[0], \
            hf_features(hf, images=[E.read_reference(tmp_path / "ref.png", 64, 64)])[0]
        for first, g in ((True, f), (False, f[1:])):
            want = {"text_alignment": 100 * np.mean(g @ t), "image_alignment": 100 * np.mean(g @ r),
                    "temporal_consistency": 100 * np.mean([g[i] @ g[i + 1] for i in range(len(g) - 1)])}
            got = E.clip_scores(moving, text, ref, first_frame=first)
            assert all(got[k] == pytest.approx(want[k], abs=1e-3) for k in want), (got, want)

    def test_cli_on_sample_and_demo_outputs(self, clip_dir, sd, fast_run, tmp_path, capsys):
        hf, folder = clip_dir
        common = ["--image", sd / "ref.png", "--base", sd, "--motion-module", sd / "motion_module.safetensors",
                  "--prompt", "a person waving", "--height", 64, "--width", 64, "--frames", 4, "--steps", 1,
                  "--device", "cpu"]
        procs = [cli(*common, "--seed", 1, "--out", tmp_path / "sample" / "a.mp4"),
                 cli(*common, "--seed", 2, "--out", tmp_path / "sample" / "pngs")]  # a frame folder + pngs.json
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        E.main(list(map(str, ["--videos", tmp_path / "sample", "--clip", folder, "--out", tmp_path / "s.json"])))
        out = capsys.readouterr().out
        assert "Text Alignment" in out and "mean ± std over 2 videos" in out and "Cosine RGB" not in out
        res = json.loads((tmp_path / "s.json").read_text())
        rows = res["variants"]["videos"]["videos"]
        assert [Path(r["video"]).name for r in rows] == ["a.mp4", "pngs"]
        assert all(r["prompt"] == "a person waving" and r["reference"] == str(sd / "ref.png") for r in rows)
        assert {"first_frame", "frames", "preprocess", "reference", "text"} <= set(res["settings"])
        t = hf_features(hf, ids=Tokenizer(*byte_vocab())("a person waving"))[0]
        r = hf_features(hf, images=[E.read_reference(sd / "ref.png", 64, 64)])[0]
        for row in rows:  # the JSON against transformers' features and the formulas written out
            f = hf_features(hf, images=data.read_video(row["video"])[0])
            assert row["frames"] == 4
            assert row["text_alignment"] == pytest.approx(100 * np.mean(f @ t), abs=1e-3)
            assert row["image_alignment"] == pytest.approx(100 * np.mean(f @ r), abs=1e-3)
            assert row["temporal_consistency"] == pytest.approx(100 * np.mean(np.sum(f[1:] * f[:-1], 1)), abs=1e-3)
        mean = res["variants"]["videos"]["text_alignment"]
        assert mean["mean"] == pytest.approx(np.mean([x["text_alignment"] for x in rows]), abs=1e-3)
        assert mean["std"] == pytest.approx(np.std([x["text_alignment"] for x in rows]), abs=1e-3)
        # the demo's videos (no JSON beside them: prompt and reference from the command line)
        gifs = sorted(Path(fast_run["out"]).rglob("*.gif"))
        assert gifs
        data.write_video(data.read_video(gifs[0])[0][:1], tmp_path / "ref_png")  # any image will do as a reference
        E.main(list(map(str, ["--videos", *gifs, "--clip", folder, "--prompt", "a disc jumps", "--reference",
                              tmp_path / "ref_png" / "frame_000.png", "--out", tmp_path / "d.json", "--first-frame",
                              "exclude"])))
        demo_res = json.loads((tmp_path / "d.json").read_text())
        assert demo_res["variants"]["videos"]["n_videos"] == len(gifs)
        assert demo_res["settings"]["first_frame"].startswith("excluded")
        # Table 2 style: one row per variant
        capsys.readouterr()
        E.main(["--compare", f"sample={tmp_path / 'sample'}", f"mp4={tmp_path / 'sample' / 'a.mp4'}",
                "--clip", str(folder), "--out", str(tmp_path / "c.json")])
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("variant") and lines[1].startswith("sample") and lines[2].startswith("mp4")
        res_c = json.loads((tmp_path / "c.json").read_text())["variants"]
        assert res_c["mp4"]["videos"][0] == rows[0] and res_c["sample"]["videos"] == rows

    def test_eval_bad_input_matrix(self, clip_dir, bad_files, tmp_path):
        _, folder = clip_dir
        d, out = bad_files, lambda name: tmp_path / f"{name}.json"
        data.write_video(disc_frames(4), tmp_path / "v" / "v.gif")  # no JSON beside it
        Image.fromarray(disc_frames(1)[0]).save(tmp_path / "ref.png")
        shutil.copytree(folder, tmp_path / "clip_cut")
        (tmp_path / "clip_cut" / "model.safetensors").write_bytes(b"\x00" * 100)
        shutil.copytree(folder, tmp_path / "clip_no_config", ignore=shutil.ignore_patterns("config.json"))
        base = ["--videos", tmp_path / "v", "--clip", folder, "--prompt", "p", "--reference", tmp_path / "ref.png",
                "--out", "OUT"]
        cases = [("no_videos", set_flag(base, "--videos", d / "empty"), "no videos found"),
                 ("not_a_video", set_flag(base, "--videos", d / "a_file"), "not a video file"),
                 ("unreadable_video", set_flag(base, "--videos", d / "junk"), "a.mp4: cannot read video"),
                 ("no_prompt", [a for a in base if a not in ("--prompt", "p")], "v.gif: no prompt"),
                 ("no_reference", set_flag(base, "--reference", d / "missing.png"), "reference image not found"),
                 ("garbage_reference", set_flag(base, "--reference", d / "garbage.png"), "cannot read image"),
                 ("no_clip", set_flag(base, "--clip", d / "missing_clip"), "--clip"),
                 ("clip_no_config", set_flag(base, "--clip", tmp_path / "clip_no_config"), "no config.json"),
                 ("clip_cut", set_flag(base, "--clip", tmp_path / "clip_cut"), "truncated or corrupt"),
                 ("one_frame", set_flag(base, "--max-frames", 1), "--max-frames"),
                 ("unwritable_out", set_flag(base, "--out", d / "a_file" / "x.json"), "cannot write there")]
        cases = [(n, [str(out(n)) if a == "OUT" else a for a in argv], m) for n, argv, m in cases]
        run_matrix("eval.py", cases, lambda name: [out(name)])


# ====================================================================================================
class TestData:
    """data.py: videos, clips, augmentations"""

    # ------------------------------------------------------------------------- loading

    def test_load_videos_all_kinds(self, video_dir, capsys):
        vids = data.load_videos(video_dir, "a person jumping", frames=16, stride=1)
        assert [v.path.split("/")[-1] for v in vids] == ["a.mp4", "b.gif", "c"]
        for v in vids:
            assert v.frames.dtype == np.uint8 and v.frames.shape == (20, 48, 64, 3)
            assert abs(v.frames[7, 24, 32].astype(float).mean() - 70) < 4  # frame order kept
        assert [round(v.fps, 2) for v in vids] == [12.0, 10.0, 8.0]
        assert [v.caption for v in vids] == ["a person jumping", "a person waving", "a person jumping"]
        assert (vids[2].frames[3] == vids[2].frames[3][..., :1]).all()  # greyscale frame -> RGB
        out = capsys.readouterr().out
        assert "a.mp4" in out and "b.gif" in out and "total: 3 videos, 60 frames" in out

    def test_write_video_formats(self, tmp_path):
        """The one writer: H.264 mp4 of any size (odd sizes padded by an edge pixel), GIF delays that add up to 1/fps,
        a PNG folder; files are written beside and renamed, so no partial file is ever left."""
        import imageio.v3 as imageio
        frames = ramp_frames(5, 40, 56)  # not multiples of 16
        data.write_video(frames, tmp_path / "a.mp4", fps=8)
        back = imageio.imread(tmp_path / "a.mp4", plugin="FFMPEG")
        assert back.shape == (5, 40, 56, 3) and np.abs(back.astype(int) - frames).mean() < 3
        assert data.read_video(tmp_path / "a.mp4")[1] == pytest.approx(8)
        data.write_video(frames[:, :39, :55], tmp_path / "odd.mp4", fps=8)
        assert imageio.imread(tmp_path / "odd.mp4", plugin="FFMPEG").shape == (5, 40, 56, 3)
        data.write_video(np.concatenate([frames] * 4), tmp_path / "g.gif", fps=8)  # 125 ms is no whole 1/100 s
        gif, delays = Image.open(tmp_path / "g.gif"), []
        for i in range(gif.n_frames):
            gif.seek(i)
            delays.append(gif.info["duration"])
        assert len(delays) == 20 and set(delays) == {120, 130} and sum(delays) == 20 * 125
        still = np.repeat(frames[:2], [3, 4], axis=0)  # runs of identical frames: Pillow stores one frame per run
        for fps in (8, 12.5, 24):
            data.write_video(still, tmp_path / "s.gif", fps=fps)
            assert Image.open(tmp_path / "s.gif").n_frames == 2
            back, got_fps = data.read_video(tmp_path / "s.gif")
            assert got_fps == fps and np.array_equal(back, still)  # all 7 frames again, in place
        data.write_video(torch.zeros(3, 3, 8, 8), tmp_path / "pngs", fps=8)  # a tensor in [-1, 1] -> grey frames
        assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["frame_000.png", "frame_001.png",
                                                                          "frame_002.png"]
        assert np.asarray(Image.open(tmp_path / "pngs" / "frame_000.png")).max() == 128
        assert not list(tmp_path.glob(".*partial*"))

    def test_short_side_resize(self, video_dir):
        v = data.load_videos(video_dir, "p", frames=4, short_side=24)[0]
        assert v.frames.shape == (20, 24, 32, 3)

    def test_load_errors(self, tmp_path):
        with pytest.raises(ValueError, match="does_not_exist"):
            data.load_videos(tmp_path / "does_not_exist", "p")
        (tmp_path / "readme.txt").write_text("x")
        with pytest.raises(ValueError, match=r"no videos found.*\.mp4"):
            data.load_videos(tmp_path, "p")
        (tmp_path / "x.mp4").write_bytes(b"\x00garbage" * 100)
        with pytest.raises(ValueError, match=r"x\.mp4: cannot read video"):
            data.load_videos(tmp_path, "p")
        (tmp_path / "x.mp4").unlink()
        (tmp_path / "y.gif").write_bytes(b"GIF89a-garbage")
        with pytest.raises(ValueError, match=r"y\.gif: cannot read video"):
            data.load_videos(tmp_path, "p")

    def test_short_videos_skipped_or_strided_down(self, tmp_path, capsys):
        data.write_video(ramp_frames(5), tmp_path / "short.gif", fps=8)
        with pytest.warns(UserWarning), pytest.raises(ValueError, match="shorter than 16"):
            data.load_videos(tmp_path, "p", frames=16)
        data.write_video(ramp_frames(20), tmp_path / "long.gif", fps=8)
        with pytest.warns(UserWarning, match=r"short\.gif: only 5 frames"):
            vids = data.load_videos(tmp_path, "p", frames=16)
        assert [v.path.split("/")[-1] for v in vids] == ["long.gif"]
        capsys.readouterr()
        with pytest.warns(UserWarning, match="short"):  # stride 3 needs 1 + 7*3 = 22 frames: 20 take stride 2
            data.load_videos(tmp_path, "p", frames=8, stride=3)
        out = capsys.readouterr().out
        assert re.search(r"long\.gif .* stride 2 \(too short for stride 3: 22 frames\)", out), out
        assert "(4.00-4.00 fps)" in out  # the clip's rate at the stride actually used: 8 fps / 2

    def test_captions_json_sidecars_and_prompt(self, tmp_path):
        for name in ("a.mp4", "b.mp4", "c.mp4"):
            data.write_video(ramp_frames(16), tmp_path / name, fps=8)
        (tmp_path / "captions.json").write_text(json.dumps({"a.mp4": "a person waves", "b.mp4": "a person jumps"}))
        (tmp_path / "b.txt").write_text("a person jumps high")  # a sidecar beats captions.json
        vids = data.load_videos(tmp_path, "a person runs", frames=16)
        assert [v.caption for v in vids] == ["a person waves", "a person jumps high", "a person runs"]
        with pytest.raises(ValueError, match=r"c\.mp4: no caption.*captions\.json"):
            data.load_videos(tmp_path, None, frames=16)
        (tmp_path / "captions.json").write_text(json.dumps({"a.mp4": "x", "missing.mp4": "y"}))
        with pytest.raises(ValueError, match=r"captions\.json: missing\.mp4 not among the videos"):
            data.load_videos(tmp_path, "p", frames=16)
        (tmp_path / "captions.json").write_text(json.dumps({"a.mp4": 3}))
        with pytest.raises(ValueError, match="non-empty caption string for a.mp4"):
            data.load_videos(tmp_path, "p", frames=16)

    # ------------------------------------------------------------------------- clip sampling

    def test_sample_clip_shape_range_determinism(self):
        v = data.Video("mem", ramp_frames(40), 8.0, "p")
        a = data.sample_clip(v, 16, 2, 32, 48, gen(0))
        assert a.shape == (16, 3, 32, 48) and a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1
        assert torch.equal(a, data.sample_clip(v, 16, 2, 32, 48, gen(0)))
        assert any(not torch.equal(a, data.sample_clip(v, 16, 2, 32, 48, gen(s))) for s in range(1, 5))

    def test_sample_clip_stride(self):
        v = data.Video("mem", ramp_frames(25), 8.0, "p")
        for s in range(5):
            grey = (data.sample_clip(v, 8, 3, 24, 24, gen(s), scale=(0.3, 0.3))[:, 0, 12, 12] + 1) * 127.5
            assert torch.allclose(grey.diff(), torch.full((7,), 30.0), atol=0.5)  # every 3rd source frame

    def test_clip_frame_indices_each_start_and_short_video(self):
        """The source frames a clip takes, read back from the clip (frame i of the ramp video is grey 10 i):
        --clip-start first = 0, s, 2s, ...; random = a uniform start over every start that fits; a video too short
        for the stride takes the largest that fits, (T - 1) // (frames - 1)."""
        def indices(n, frames, stride, start, seed):
            grey = np.repeat(np.arange(0, 10 * n, 10, dtype=np.uint8), 8 * 8 * 3).reshape(n, 8, 8, 3)
            clip = data.sample_clip(data.Video("mem", grey, 8.0, "p"), frames, stride, 8, 8, gen(seed), start=start)
            return ((clip[:, 0, 4, 4] + 1) * 127.5 / 10).round().long().tolist()

        for n, frames, stride, s in ((25, 4, 4, 4), (25, 4, 8, 8), (20, 8, 4, 2), (8, 8, 4, 1)):  # (n-1)//(F-1)
            span = 1 + (frames - 1) * s
            assert data.clip_stride(n, frames, stride) == s and span <= n
            for seed in range(3):
                assert indices(n, frames, stride, "first", seed) == list(range(0, span, s))
            starts = [indices(n, frames, stride, "random", seed) for seed in range(120)]
            assert all(ix == list(range(ix[0], ix[0] + span, s)) for ix in starts)  # stride s from its start
            assert {ix[0] for ix in starts} == set(range(n - span + 1))  # every start that fits, nothing else
        assert data.clip_stride(7, 8, 4) == 0
        with pytest.raises(ValueError, match="a clip needs 8"):
            indices(7, 8, 4, "first", 0)
        g1, g2 = gen(3), gen(3)  # both modes draw the same random numbers: crop and flip do not depend on it
        data.sample_clip(ramp_frames(25), 4, 4, 24, 24, g1, start="first")
        data.sample_clip(ramp_frames(25), 4, 4, 24, 24, g2, start="random")
        assert torch.equal(g1.get_state(), g2.get_state())

    @pytest.mark.parametrize("out_hw", [(32, 32), (32, 40)])
    def test_sample_clip_never_stretches(self, out_hw):
        H, W, r = 48, 72, 10  # wide source, centred disc, always inside the crop at scale 1
        yy, xx = np.mgrid[:H, :W]
        frame = np.where(((yy - 23.5) ** 2 + (xx - 35.5) ** 2 < r * r)[..., None], 255, 0).astype(np.uint8)
        v = np.repeat(frame[None].repeat(3, -1), 4, 0)
        for s in range(4):
            m = data.sample_clip(v, 2, 1, *out_hw, gen(s), scale=(1.0, 1.0))[0, 0] > 0
            w, h = m.any(0).sum().item(), m.any(1).sum().item()
            assert abs(w - h) <= 1 and abs(h - 2 * r * out_hw[0] / H) <= 1.5  # stretch would give w/h 2/3 or 5/6

    # ------------------------------------------------------------------------- colour primitives

    def test_identity_and_formulas(self):
        x = torch.rand(2, 3, 16, 16, generator=gen(0))
        assert torch.allclose(data.color_jitter(x, 1.0, 1.0, 1.0, 0.0, (3, 2, 1, 0)), x, atol=1e-5)
        assert torch.equal(data.gaussian_blur(x, 1, 1.0), x)
        assert torch.allclose(data.adjust_brightness(x, 1.3), (1.3 * x).clamp(0, 1))
        grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        mean = grey.mean((-2, -1)).view(2, 1, 1, 1)
        assert torch.allclose(data.adjust_contrast(x, 0.6), (0.6 * x + 0.4 * mean).clamp(0, 1), atol=1e-3)
        s0 = data.adjust_saturation(x, 0.0)
        for c in range(3):
            assert torch.allclose(s0[:, c], grey, atol=1e-3)

    def test_hsv(self):
        x = torch.rand(4, 3, 8, 8, generator=gen(1))
        hsv = data.rgb_to_hsv(x)
        assert (data.hsv_to_rgb(hsv) - x).abs().max() <= 1e-5
        for px in x.permute(0, 2, 3, 1).reshape(-1, 3)[:20]:  # colorsys (stdlib) as the oracle
            ref = torch.tensor(colorsys.rgb_to_hsv(*px.tolist()))
            got = data.rgb_to_hsv(px.view(3, 1, 1)).view(3)
            assert torch.allclose(got, ref, atol=1e-5) or abs(abs(got[0] - ref[0]) - 1) < 1e-5
        red = torch.tensor([1.0, 0, 0]).view(3, 1, 1)
        assert torch.allclose(data.adjust_hue(red, 1 / 3).view(3), torch.tensor([0.0, 1, 0]), atol=1e-5)
        assert torch.allclose(data.adjust_hue(red, -1 / 3).view(3), torch.tensor([0.0, 0, 1]), atol=1e-5)

    def test_gaussian_blur(self):
        for k in (3, 5, 7, 9):
            assert abs(data.gaussian_kernel(k, 1.3).sum().item() - 1) < 1e-6
        c = torch.full((2, 3, 12, 12), 0.37)
        assert torch.allclose(data.gaussian_blur(c, 9, 2.0), c, atol=1e-6)
        imp = torch.zeros(1, 1, 15, 15)
        imp[..., 7, 7] = 1
        out = data.gaussian_blur(imp, 5, 1.0)
        k = data.gaussian_kernel(5, 1.0)
        assert torch.allclose(out[0, 0, 5:10, 5:10], k[:, None] * k[None], atol=1e-6)

    # ------------------------------------------------------------------------- strong augmentation (Sec. 3.2)

    def test_strong_augment_one_draw_per_clip(self):
        frame = torch.rand(3, 24, 24, generator=gen(2)) * 2 - 1
        clip = frame.expand(6, 3, 24, 24).clone()
        for s in range(10):
            out, p = data.strong_augment(clip, gen(s), return_params=True)
            assert out.shape == clip.shape and out.min() >= -1 and out.max() <= 1
            assert (out - out[:1]).abs().max() < 1e-6
            assert p["kernel"] in (3, 5, 7, 9) and 0.1 <= p["sigma"] <= 2.0
            assert all(0.5 <= p[k] <= 1.5 for k in ("brightness", "contrast", "saturation"))
            assert -0.25 <= p["hue"] <= 0.25 and sorted(p["order"]) == [0, 1, 2, 3]
        assert torch.equal(data.strong_augment(clip, gen(5)), data.strong_augment(clip, gen(5)))

    # ------------------------------------------------------------------------- decoder distortions (Sec. 3.3)

    def test_decoder_distort_determinism_and_ranges(self):
        clip = torch.rand(3, 3, 16, 16, generator=gen(3)) * 2 - 1
        n_none, seen = 0, set()
        for s in range(120):
            out, p = data.decoder_distort(clip, gen(s), return_params=True)
            if s < 10:
                assert torch.equal(out, data.decoder_distort(clip, gen(s)))
            assert out.shape == clip.shape and out.min() >= -1 and out.max() <= 1
            seen.update(p["ops"])
            if not p["ops"]:
                n_none += 1
                assert torch.equal(out, clip)
            if "blur" in p["ops"]:
                assert p["kernel"] in (3, 5, 7, 9) and 0.1 <= p["sigma"] <= 2.0
            if "elastic" in p["ops"]:
                assert 1.0 <= p["alpha"] <= 20.0

            if "jitter" in p["ops"]:
                m = p["regions"]
                assert m.shape == (3, 4, 4) and (m.flatten(1).sum(1) == 13).all()  # round(0.8 * 16) per frame
                for k in ("brightness", "contrast", "saturation"):
                    assert ((p[k][m] >= 0.7) & (p[k][m] <= 1.3)).all() and (p[k][~m] == 1).all()
                assert (p["hue"][m].abs() <= 0.2).all() and (p["hue"][~m] == 0).all()
        assert seen == {"blur", "jitter", "elastic"} and 10 <= n_none <= 40  # p_none = 0.2: 24 expected

    def test_regional_jitter_touches_80_percent(self):
        clip = (torch.rand(2, 3, 32, 32, generator=gen(4)) * 0.6 + 0.2) * 2 - 1
        s = next(s for s in range(1000) if data.decoder_distort(clip, gen(s), return_params=True)[1]["ops"] == ["jitter"])
        out, p = data.decoder_distort(clip, gen(s), return_params=True)
        changed = (out - clip).abs().view(2, 3, 4, 8, 4, 8).amax((1, 3, 5)) > 1e-4  # F, grid rows, grid cols
        assert torch.equal(changed, p["regions"])  # exactly the chosen cells change
        assert abs(changed.float().mean().item() - 0.8) < 0.05

    @staticmethod
    def torchvision_field(n, H, W, alpha, g, sigma=5.0):
        """torchvision's ElasticTransform.get_params re-derived in plain torch (torchvision is not installed): per
        image, uniform noise in [-1, 1] for dx then dy, a k x k Gaussian (k = int(8 sigma + 1), odd) with reflect
        padding, scaled by alpha/size in normalised [-1, 1] coordinates; returned in pixels (x size/2)."""
        k = int(8 * sigma + 1)
        k += k % 2 == 0
        x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k)
        k1 = torch.exp(-0.5 * (x / sigma) ** 2)
        k2 = (k1[:, None] * k1[None] / k1.sum() ** 2).view(1, 1, k, k)  # the 2-D kernel, not separable passes
        fields = []
        for _ in range(n):
            dxy = []
            for size in (W, H):  # dx by the width, dy by the height
                d = torch.rand(1, 1, H, W, generator=g) * 2 - 1
                d = F.conv2d(F.pad(d, [k // 2] * 4, mode="reflect"), k2) * alpha / size  # normalised
                dxy.append(d * size / 2)  # -> pixels (align_corners=False: 2/size per pixel)
            fields.append(torch.cat(dxy, 1))
        return torch.cat(fields)

    def test_elastic_field_is_torchvision_elastic_transform(self):
        """FLASH A3.2: ElasticTransform, displacement strength alpha in [1, 20], sigma 5 (torchvision's default)."""
        got = data.elastic_field(3, 64, 64, 20.0, gen(0))
        assert got.shape == (3, 2, 64, 64)
        close(got, self.torchvision_field(3, 64, 64, 20.0, gen(0)), tol=1e-5)  # same draws: the same field
        for alpha in (1.0, 20.0):  # independent draws: the same statistics
            ours, ref = data.elastic_field(16, 64, 64, alpha, gen(1)), self.torchvision_field(16, 64, 64, alpha, gen(2))
            mean, ref_mean = ours.abs().mean().item(), ref.abs().mean().item()
            peak, ref_peak = ours.abs().amax().item(), ref.abs().amax().item()
            print(f"alpha {alpha:g}: mean |d| {mean:.4f} px (torchvision {ref_mean:.4f}), "
                  f"max |d| {peak:.3f} px ({ref_peak:.3f})")
            assert abs(mean / ref_mean - 1) < 0.1 and abs(peak / ref_peak - 1) < 0.3
            assert mean < 0.02 * alpha and peak < 0.15 * alpha  # the old pixel-peak form: max |d| = alpha px

    def test_elastic_transform_moves_pixels_by_the_field(self):
        x = torch.rand(2, 3, 20, 24, generator=gen(5))
        assert torch.allclose(data.elastic_transform(x, 0.0, gen(0)), x, atol=1e-5)
        H, W = 40, 48
        ramps = torch.stack([torch.arange(W * 1.0).expand(H, W), torch.arange(H * 1.0)[:, None].expand(H, W)])
        ramps = ramps[None].expand(2, 2, H, W)  # channel 0 = x, channel 1 = y coordinate, 2 images
        out = data.elastic_transform(ramps, 20.0, gen(1))
        d = data.elastic_field(2, H, W, 20.0, gen(1))
        inner = (..., slice(4, -4), slice(4, -4))  # away from the reflected border (|d| < 3 px)
        close((out - ramps)[inner], d[inner], tol=1e-4)  # bilinear on a linear ramp: output - input = d
        assert d.abs().amax() < 3


# ====================================================================================================
class TestSample:
    """sample.py: DDIM, guidance, first frame, AdaIN, CLI"""

    # ------------------------------------------------------------------------- pure functions

    def test_mixed_noise_prior_statistics(self):
        # PYoCo's mixed prior: share 0 is exactly torch.randn; otherwise each frame stays N(0, 1) and two frames
        # correlate by the share (a property of sqrt(s) shared + sqrt(1 - s) own, checked on 2M samples)
        shape = (1, 4, 2, 512, 512)
        assert torch.equal(S.video_noise(shape, torch.Generator().manual_seed(3)),
                           torch.randn(shape, generator=torch.Generator().manual_seed(3)))
        for share in (0.3, 0.8):
            n = S.video_noise(shape, torch.Generator().manual_seed(4), share)
            a, b = n[:, :, 0].flatten(), n[:, :, 1].flatten()
            assert abs(a.std().item() - 1) < 0.01 and abs(b.std().item() - 1) < 0.01
            assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item() - share) < 0.01

    def test_shared_noise_mean_changes_only_the_mean(self):
        # --shared-noise-mean: every frame's per-channel spatial mean is frame 1's, the deviations are the plain
        # draw's, and each frame is still N(0, I): the spatial mean of h*w iid N(0, 1) has std 1/sqrt(h*w)
        shape = (4000, 2, 3, 8, 8)
        plain = S.video_noise(shape, torch.Generator().manual_seed(5), 0.3)
        n = S.video_noise(shape, torch.Generator().manual_seed(5), 0.3, shared_mean=True)
        dc, dc_plain = n.mean(dim=(3, 4)), plain.mean(dim=(3, 4))
        torch.testing.assert_close(dc, dc[:, :, :1].expand_as(dc), atol=1e-6, rtol=0)
        torch.testing.assert_close(dc[:, :, 0], dc_plain[:, :, 0])  # frame 1 keeps its own
        torch.testing.assert_close(n - dc[..., None, None], plain - dc_plain[..., None, None], atol=1e-6, rtol=0)
        assert abs(dc[:, :, 2].std().item() * 8 - 1) < 0.03  # frame 3's mean: std 1/8 over 8000 draws
        assert abs(n[:, :, 2].std().item() - 1) < 0.01
        assert not torch.allclose(dc_plain[:, :, 2], dc_plain[:, :, 0])  # without the switch frames differ

    def test_ddim_matches_diffusers(self):
        diffusers = pytest.importorskip("diffusers")
        ref = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
                                      clip_sample=False)
        acp = S.alphas_cumprod()
        assert (acp - ref.alphas_cumprod).abs().max() <= 1e-6
        g = torch.Generator().manual_seed(0)
        x, eps = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 4, 3, 8, 8, generator=g)
        for n in (25, 50):
            ref.set_timesteps(n)
            ts = S.ddim_timesteps(n)
            assert ts.tolist() == ref.timesteps.tolist() and ts[0] == 1000 - 1000 // n + 1 and ts[-1] == 1
            for t in (ts[0].item(), ts[n // 2].item(), ts[-1].item()):  # first, middle, last (a_prev = 1) step
                want = ref.step(eps, t, x, eta=0.0).prev_sample
                got = S.ddim_step(x, eps, t, t - 1000 // n, acp)
                assert (got - want).abs().max() <= 1e-6, (n, t)

    def test_v_prediction_is_salimans_and_hos_v(self):
        """v = sqrt(a) eps - sqrt(1 - a) x_0 (Salimans & Ho, Sec. 4): predicted_eps recovers eps from a v-model's
        output and x_t, DDIM's predicted x_0 then recovers x_0; "epsilon" passes the output through."""
        g = torch.Generator().manual_seed(0)
        x0, eps = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
        for t in (1, 500, 999):
            a = S.alphas_cumprod()[t]
            xt, v = a.sqrt() * x0 + (1 - a).sqrt() * eps, a.sqrt() * eps - (1 - a).sqrt() * x0
            torch.testing.assert_close(S.predicted_eps(v, xt, a, "v_prediction"), eps, atol=1e-5, rtol=0)
            torch.testing.assert_close(S.predicted_x0(xt, S.predicted_eps(v, xt, a, "v_prediction"), a), x0,
                                       atol=2e-3 if t == 999 else 1e-4, rtol=0)  # 1/sqrt(a_999) = 25 scales fp32 error
            assert S.predicted_eps(v, xt, a, "epsilon") is v

    def test_scheduler_config_round_trip(self, sd, tmp_path):
        """save_pipeline writes the DDIM animate() runs as scheduler/scheduler_config.json: diffusers' DDIMScheduler
        built from it has our alphas_cumprod and timesteps; load_pipeline reads prediction_type back ("epsilon"
        when the file is absent, as diffusers); an unknown one is an error naming the file."""
        diffusers = pytest.importorskip("diffusers")
        ref = diffusers.DDIMScheduler.from_pretrained(sd / "scheduler")
        assert (ref.alphas_cumprod - S.alphas_cumprod()).abs().max() <= 1e-6 and ref.config.prediction_type == "epsilon"
        ref.set_timesteps(25)
        assert ref.timesteps.tolist() == S.ddim_timesteps(25).tolist()
        assert load(sd).prediction_type == "epsilon"
        folder = tmp_path / "v"
        shutil.copytree(sd, folder)
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        for kind, want in (("v_prediction", "v_prediction"), (None, "epsilon")):
            (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
                {k: v for k, v in cfg.items() if k != "prediction_type"} | ({"prediction_type": kind} if kind else {})))
            assert load(folder).prediction_type == want
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg | {"prediction_type": "sample"}))
        with pytest.raises(ValueError, match=r"scheduler_config\.json: prediction_type 'sample' is not supported"):
            load(folder)

    def test_adain_moments_and_pattern(self):
        g = torch.Generator().manual_seed(0)
        content = torch.randn(1, 4, 3, 8, 8, generator=g) * 3 + 2
        style = torch.randn(1, 4, 1, 8, 8, generator=g) * 0.5 - 1
        out = S.adaptive_instance_norm(content, style)
        torch.testing.assert_close(out.mean((-2, -1)), style.mean((-2, -1)).expand(1, 4, 3), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.std((-2, -1)), style.std((-2, -1)).expand(1, 4, 3), atol=1e-4, rtol=1e-4)
        z = lambda a: (a - a.mean((-2, -1), keepdim=True)) / a.std((-2, -1), keepdim=True)
        torch.testing.assert_close(z(out), z(content), atol=1e-4, rtol=1e-4)
        manual = (content[0, 1, 2] - content[0, 1, 2].mean()) / (content[0, 1, 2].var() + 1e-8).sqrt() \
            * (style[0, 1, 0].var() + 1e-8).sqrt() + style[0, 1, 0].mean()  # LAMP's formula, by hand
        torch.testing.assert_close(out[0, 1, 2], manual)

    def test_load_image_modes_and_centre_crop(self):
        rgb = np.zeros((60, 180, 3), np.uint8)
        rgb[:, :60], rgb[:, 60:120], rgb[:, 120:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
        wide = Image.fromarray(rgb)
        tall = Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 0, 2)))
        for im in (wide, tall):  # cover + centre crop keeps the green middle third only
            x = S.load_image(im, 32, 32)
            assert x.shape == (3, 32, 32)
            torch.testing.assert_close(x[:, 4:-4, 4:-4].mean((1, 2)), torch.tensor([-1.0, 1.0, -1.0]), atol=0.02, rtol=0)
        rgba = Image.new("RGBA", (50, 70), (255, 0, 0, 0))  # fully transparent -> white
        for im in (rgba, wide.convert("L"), wide.convert("P"), Image.new("LA", (33, 17), (10, 255))):
            x = S.load_image(im, 64, 48)
            assert x.shape == (3, 64, 48) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
        assert torch.allclose(S.load_image(rgba, 16, 16), torch.ones(3, 16, 16))
        grey16 = Image.fromarray(np.full((20, 30), 257 * 200, np.uint16))  # a 16-bit PNG: scaled, not clipped to white
        assert grey16.mode.startswith("I;16")
        torch.testing.assert_close(S.load_image(grey16, 16, 24), torch.full((3, 16, 24), 200 / 127.5 - 1))
        cmyk = S.load_image(wide.convert("CMYK"), 32, 32)  # print-ready JPEGs: CMYK -> RGB, the same green third
        torch.testing.assert_close(cmyk[:, 4:-4, 4:-4].mean((1, 2)), torch.tensor([-1.0, 1.0, -1.0]), atol=0.02, rtol=0)
        with pytest.raises(ValueError, match="96 or 104"):
            S.check_size(100, 64)

    # ------------------------------------------------------------------------- sampling

    def test_seed_first_latent_and_guidance_batches(self, sd):
        pipe = load(sd)
        ref_latent = pipe.vae.encode(S.load_image(sd / "ref.png", H, W)[None])
        batches, firsts = [], []
        hook = pipe.unet.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
        kw = dict(frames=6, steps=3, height=H, width=W, progress=False)
        a = S.animate(pipe, sd / "ref.png", "a person waving", seed=0,
                      callback=lambda i, t, x: firsts.append((i, t, x[:, :, 0].clone())), **kw)
        assert batches == [2, 2, 2]  # CFG: one batched call per step
        assert [(i, t) for i, t, _ in firsts] == [(0, 667), (1, 334), (2, 1)]
        assert all(torch.equal(z, ref_latent) for _, _, z in firsts)  # frame 1 stays E(I) after every step
        batches.clear()
        b = S.animate(pipe, sd / "ref.png", "a person waving", seed=0, **kw)
        c = S.animate(pipe, sd / "ref.png", "a person waving", seed=1, **kw)
        assert a.shape == (6, H, W, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b) and not np.array_equal(a[1:], c[1:])
        assert np.abs(a[0].astype(int) - c[0]).max() <= 1  # frame 1 comes from E(I) whatever the seed
        batches.clear()
        S.animate(pipe, sd / "ref.png", "a person waving", seed=0, guidance=1.0, **kw)
        assert batches == [1, 1, 1]  # no wasted unconditional batch
        d = S.animate(pipe, sd / "ref.png", "a person waving", seed=0, adain="off", shared_noise=0.2, **kw)
        assert not np.array_equal(a[1:], d[1:])
        hook.remove()

    def test_stg_is_the_papers_formula_with_an_identity_motion_module_as_weak_model(self):
        # STG (arXiv 2411.18664): eps_u + w_cfg (eps_c - eps_u) + w_stg (eps_c - eps_weak). The weak model is
        # built independently here: a copy of the U-Net whose motion modules' proj_out are zero, so each returns its
        # input exactly (the residual); its eps must differ from the full U-Net's, or the test proves nothing.
        pipe = tiny_pipeline(3)
        weak = copy.deepcopy(pipe.unet)
        with torch.no_grad():
            for n, p in weak.named_parameters():
                if "motion_modules" in n and "proj_out" in n:
                    p.zero_()
        g = gen(4)
        x, ctx = torch.randn(1, 4, 5, 8, 8, generator=g), torch.randn(2, 7, UNET_TINY["cross_attention_dim"], generator=g)
        t, a_t = torch.tensor([500]), S.alphas_cumprod()[500]
        with torch.no_grad():
            eps_u, eps_c = pipe.unet(torch.cat([x, x]), t, ctx).chunk(2)
            eps_w = weak(x, t, ctx[1:])
            assert (eps_c - eps_w).abs().max() > 1e-3  # the motion modules matter in this net
            for guidance, w in ((7.5, 2.0), (1.0, 3.0)):
                want = (eps_u + guidance * (eps_c - eps_u) if guidance > 1 else eps_c) + w * (eps_c - eps_w)
                cond = ctx if guidance > 1 else ctx[1:]
                got = S.guided_eps(pipe.unet, x, t, cond, guidance, a_t, "epsilon", stg=w)
                # guided_eps runs the three branches as one batch of 3, this test as batches of 2 and 1: float32 sums
                # then differ by ~1e-6 per branch (CPU kernels block by batch), and the formula multiplies them by up
                # to 1 + guidance + w; the STG term itself is > 10x that tolerance, so a wrong formula still fails
                atol = 1e-5 * (1 + guidance + w)
                assert (w * (eps_c - eps_w)).abs().max() > 10 * atol
                torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)
            assert all(m.skip is None for m in pipe.unet.modules() if isinstance(m, S.MotionModule))  # restored
            torch.testing.assert_close(S.guided_eps(pipe.unet, x, t, ctx, 7.5, a_t, "epsilon"),
                                       eps_u + 7.5 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)  # stg 0: plain CFG

    def test_encode_prompt_where_the_text_encoder_is(self, sd):
        """train.py moves the text encoder off the GPU; its periodic samples encode prompts all the same. Here the
        pipeline's device is 'meta' while the encoder stays on the CPU: ids go to the encoder, the result to the device."""
        pipe = load(sd)
        want = S.encode_prompt(pipe, ["a person waving"])
        pipe.device = torch.device("meta")
        got = S.encode_prompt(pipe, ["a person waving", ""])[:1]  # a new prompt list: not from encode_prompt's cache
        assert got.is_meta and got.shape == want.shape

    def test_apply_checkpoint_strict_and_detail(self, sd, tmp_path):
        pipe = load(sd)
        kw = dict(frames=4, steps=2, height=H, width=W, progress=False, seed=3)
        before = S.animate(pipe, sd / "ref.png", "jump", **kw)
        tensors = unet_tensors(pipe)
        S.apply_checkpoint(pipe, write_checkpoint(tmp_path / "ok", tensors, motion_version="v2", height=H, width=W))
        after = S.animate(pipe, sd / "ref.png", "jump", **kw)
        assert not np.array_equal(before[1:], after[1:]) and pipe.info["settings"]["height"] == H
        name = next(iter(tensors))
        for bad, match in (({"unet.down_blocks.0.nope.weight": torch.zeros(2)}, "down_blocks.0.nope.weight"),
                           ({name: torch.zeros(3, 3)}, name[len("unet."):]), ({"text.x": torch.zeros(1)}, "text.x")):
            with pytest.raises(ValueError, match=match):
                S.apply_checkpoint(pipe, write_checkpoint(tmp_path / "bad", bad))
        with pytest.raises(ValueError, match="motion module v3"):
            S.apply_checkpoint(pipe, write_checkpoint(tmp_path / "v3", tensors, motion_version="v3"))
        # decoder stage: vae.decoder.detail.* -> the VAE gains detail branches; --no-detail is the plain decoder
        g = torch.Generator().manual_seed(7)
        det = {f"vae.{k}": torch.randn(v.shape, generator=g) * 0.1 for k, v in
               VAE(VAEConfig(**PIPE_VAE, detail=True)).state_dict().items() if ".detail." in k}
        S.apply_checkpoint(pipe, write_checkpoint(tmp_path / "dec", det, stage="decoder"))
        assert pipe.vae.config.detail and pipe.info["settings"]["height"] == H  # decoder stage keeps unet settings
        plain = S.animate(pipe, sd / "ref.png", "jump", detail=False, **kw)
        assert np.array_equal(plain, after)
        enhanced = S.animate(pipe, sd / "ref.png", "jump", **kw)
        assert pipe.info["last_run"]["detail"] and not np.array_equal(enhanced, after)

    # ------------------------------------------------------------------------- CLI (subprocesses run in parallel)

    def test_cli_outputs(self, sd, tmp_path):
        iio = pytest.importorskip("imageio.v3")
        ck = write_checkpoint(tmp_path / "ck", unet_tensors(load(sd)), prompt="a person waving", height=H, width=W,
                              frames=16, fps=10, base=str(sd), motion_module=str(sd / "motion_module.safetensors"),
                              motion_version="v2")
        common = ["--image", sd / "ref.png", "--steps", 2, "--device", "cpu"]
        procs = [cli(*common, "--base", sd, "--motion-module", sd / "motion_module.safetensors", "--prompt", "wave",
                     "--height", H, "--width", W, "--seed", 7, "--out", tmp_path / "a.mp4"),
                 cli(*common, "--checkpoint", ck, "--seed", 7, "--out", tmp_path / "b.gif"),  # settings = defaults
                 cli(*common, "--checkpoint", ck, "--frames", 5, "--adain", "off", "--out", tmp_path / "pngs")]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            assert out.strip().splitlines()[-1].startswith("saved ")
        video = iio.imread(tmp_path / "a.mp4", plugin="FFMPEG")
        assert video.shape == (16, H, W, 3)
        gif = Image.open(tmp_path / "b.gif")
        assert gif.n_frames == 16 and gif.size == (W, H) and gif.info["duration"] == 100  # fps 10 from the checkpoint
        pngs = sorted(os.listdir(tmp_path / "pngs"))
        assert pngs == [f"frame_{i:03d}.png" for i in range(5)]
        meta = json.loads((tmp_path / "a.json").read_text())
        assert meta["seed"] == 7 and meta["frames"] == 16 and meta["guidance"] == 7.5
        assert meta["weights"]["motion_module"].endswith("motion_module.safetensors") and meta["motion_version"] == "v2"
        meta = json.loads((tmp_path / "b.gif").with_suffix(".json").read_text())
        assert meta["prompt"] == "a person waving" and meta["fps"] == 10 and meta["weights"]["checkpoints"]
        assert isinstance(json.loads((tmp_path / "pngs.json").read_text())["seed"], int)

    # ------------------------------------------------------------------------- longer and looping videos, colour

    def test_long_video_past_the_pe_deterministic_and_anchored(self, sd):
        """N = 40 with a 24-frame PE: every U-Net call sees <= 16 frames (the training length) whose first is the
        clean E(I) (naive: the previous segment's last frame); phased and naive start with the plain 16-frame video."""
        pipe = load(sd)
        ref_latent = pipe.vae.encode(S.load_image(sd / "ref.png", 32, 32)[None])
        seen = []
        hook = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0][:1, :, 0].clone()) and None)
        sizes = []
        size_hook = pipe.unet.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[2]))
        kw = dict(steps=2, height=32, width=32, progress=False, adain="off")
        plain = S.animate(pipe, sd / "ref.png", "wave", frames=16, seed=0, **kw)
        for mode in ("phased", "windows", "naive"):
            seen.clear(), sizes.clear()
            a = S.animate(pipe, sd / "ref.png", "wave", frames=40, long=mode, seed=0, **kw)
            last = pipe.info["last_run"]
            assert a.shape == (40, 32, 32, 3) and last["long"] == mode and last["context_frames"] == 16
            assert max(sizes) <= 16 and len(sizes) == last["unet_calls"], (mode, sizes)
            anchors = [ref_latent] if mode != "naive" else [ref_latent] + [last["latents"][:, :, 15 * k] for k in (1, 2)]
            per_segment = len(seen) // len(anchors)
            for k, z in enumerate(anchors):  # naive: 2 steps per segment, each keyed on its own first frame
                assert all(torch.allclose(s, z, atol=1e-6) for s in seen[k * per_segment:(k + 1) * per_segment]), mode
            if mode != "windows":
                assert np.array_equal(a[:16], plain), mode  # segment 1 is the plain sampler, noise and all
            again = S.animate(pipe, sd / "ref.png", "wave", frames=40, long=mode, seed=0, **kw)
            other = S.animate(pipe, sd / "ref.png", "wave", frames=40, long=mode, seed=1, **kw)
            assert np.array_equal(a, again) and not np.array_equal(a[16:], other[16:]), mode
        hook.remove(), size_hook.remove()
        assert S.animate(pipe, sd / "ref.png", "wave", frames=40, seed=0, **kw).shape[0] == 40
        assert pipe.info["last_run"]["long"] == "phased"  # the default past the training length

    def test_long_modes_equal_plain_sampler_when_frames_fit(self, sd):
        pipe = load(sd)
        kw = dict(frames=8, steps=2, height=H, width=W, progress=False, seed=4)
        plain = S.animate(pipe, sd / "ref.png", "wave", **kw)
        for mode in ("phased", "windows", "naive"):
            assert np.array_equal(S.animate(pipe, sd / "ref.png", "wave", long=mode, **kw), plain), mode
            assert pipe.info["last_run"]["long"] == "plain" and pipe.info["last_run"]["unet_calls"] == 2

    def test_windows_cover_every_frame_and_fuse_per_frame_predictions(self):
        for n, size, overlap in [(39, 15, 4), (63, 15, 4), (20, 5, 2), (16, 15, 0), (7, 3, 1), (5, 5, 2)]:
            wins = S.context_windows(n, size, overlap)
            assert wins[0][0] == 0 and wins[-1][1] == n and all(b - a == min(size, n) for a, b in wins)
            assert set().union(*(range(a, b) for a, b in wins)) == set(range(n))
            assert all(b0 - a1 >= overlap for (_, b0), (a1, _) in zip(wins, wins[1:]))  # neighbours share frames
        assert S.pyramid_weights(4).tolist() == [1, 2, 2, 1] and S.pyramid_weights(5).tolist() == [1, 2, 3, 2, 1]
        # a U-Net that treats frames independently (no motion modules, per-frame attention): the windows' fused
        # prediction of a frame must equal its own prediction, so each frame of a long video ends where the plain
        # sampler takes the same noise; FreeNoise gives every frame past the first window an earlier frame's noise.
        torch.manual_seed(0)
        models = (UNet(UNetConfig(**{**PIPE_UNET, "motion_modules": False, "cross_frame": False})),
                  VAE(VAEConfig(**PIPE_VAE)), CLIPTextModel(CLIPTextConfig(**CLIP_TINY)))
        pipe = S.Pipeline(*(randomize_(m, i) for i, m in enumerate(models)), Tokenizer(*byte_vocab()),
                          torch.device("cpu"), torch.float32, {"settings": {"frames": 6}})
        image = torch.rand(3, 32, 32, generator=gen(0)) * 2 - 1
        kw = dict(steps=2, height=32, width=32, progress=False, seed=3, adain="off")
        steps_seen = []
        S.animate(pipe, image, "wave", frames=20, long="windows", overlap=2,
                  callback=lambda i, t, x: steps_seen.append(x.shape[2]), **kw)
        assert steps_seen == [20, 20] and pipe.info["last_run"]["unet_calls"] == 2 * 6  # all frames, every step
        long = pipe.info["last_run"]["latents"][0].transpose(0, 1)  # F 4 h w
        S.animate(pipe, image, "wave", frames=6, **kw)
        short = pipe.info["last_run"]["latents"][0].transpose(0, 1)
        torch.testing.assert_close(long[:6], short, atol=1e-5, rtol=1e-5)
        for f in range(6, 20):
            assert min((long[f] - short[j]).abs().max().item() for j in range(1, 6)) < 1e-5, f

    def test_phased_later_segments_rerun_only_the_late_steps(self):
        """Eq. 9-12 with omega = 0 and one frame per segment: every later segment starts at segment 1's state at the
        split (M = ceil(0.8 T) of T steps shared) and re-runs the last T - M steps, so it reproduces segment 1."""
        pipe = tiny_pipeline(seed=2)
        pipe.info["settings"] = {"frames": 2}  # segments of [E(I); one frame]
        image = torch.rand(3, 32, 32, generator=gen(1)) * 2 - 1
        calls = []
        hook = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[1]))
        kw = dict(frames=6, steps=5, height=32, width=32, progress=False, seed=0, adain="off")
        S.animate(pipe, image, "wave", omega=0.0, **kw)
        lat = pipe.info["last_run"]["latents"][0]
        ts = S.ddim_timesteps(5).tolist()
        assert [int(t) for t in calls] == ts + ts[4:] * 4  # M = 4: segments 2..5 run the last step only
        for f in range(2, 6):
            torch.testing.assert_close(lat[:, f], lat[:, 1], atol=1e-4, rtol=1e-4)
        S.animate(pipe, image, "wave", omega=0.2, **kw)  # Eq. 11's randomness: later segments vary
        lat = pipe.info["last_run"]["latents"][0]
        assert all((lat[:, f] - lat[:, 1]).abs().max() > 1e-3 for f in range(2, 6))
        hook.remove()

    def test_loop_weight_zero_is_plain_and_loop_lowers_the_loss(self, sd):
        pipe = load(sd)
        kw = dict(frames=8, steps=3, height=H, width=W, progress=False, seed=2)
        plain = S.animate(pipe, sd / "ref.png", "wave", **kw)
        lat, loss = pipe.info["last_run"]["latents"], pipe.info["last_run"]["loop_loss"]
        first, last = lat[:, :, 0], lat[:, :, -1]  # LVMM's L_t by hand on the final latents
        by_hand = (last - first).abs().sum() + ((last - lat[:, :, -2]) - (lat[:, :, 1] - first)).abs().sum()
        assert loss == pytest.approx(by_hand.item(), rel=1e-6)
        assert np.array_equal(S.animate(pipe, sd / "ref.png", "wave", loop=True, loop_weight=0.0, **kw), plain)
        for grad in ("x0", "unet"):
            S.animate(pipe, sd / "ref.png", "wave", loop=True, loop_grad=grad, **kw)
            assert pipe.info["last_run"]["loop_loss"] < 0.95 * loss, grad
        pipe.info["settings"] = {"frames": 6}  # a 12-frame loop over sliding windows and over naive segments
        for mode in ("windows", "naive"):
            S.animate(pipe, sd / "ref.png", "wave", frames=12, steps=3, height=H, width=W, seed=2, long=mode,
                      progress=False)
            without = pipe.info["last_run"]["loop_loss"]
            S.animate(pipe, sd / "ref.png", "wave", frames=12, steps=3, height=H, width=W, seed=2, long=mode,
                      progress=False, loop=True, loop_weight=0.05)
            assert pipe.info["last_run"]["loop_loss"] < without, mode
        with pytest.raises(ValueError, match="--loop with --long phased"):
            S.animate(pipe, sd / "ref.png", "wave", frames=12, long="phased", loop=True,
                      **{k: v for k, v in kw.items() if k != "frames"})
        with pytest.raises(ValueError, match="--loop needs --frames 3"):
            S.animate(pipe, sd / "ref.png", "wave", frames=2, loop=True, **{k: v for k, v in kw.items() if k != "frames"})
        with pytest.raises(ValueError, match="--loop-grad unet"):
            S.animate(pipe, sd / "ref.png", "wave", frames=12, long="windows", loop=True, loop_grad="unet",
                      **{k: v for k, v in kw.items() if k != "frames"})

    def test_adain_post_only_moves_later_frames_to_frame_one_statistics(self, sd):
        pipe = load(sd)
        kw = dict(frames=6, steps=2, height=H, width=W, progress=False, seed=5)
        runs = {}
        for mode in ("off", "post", "lamp"):
            video = S.animate(pipe, sd / "ref.png", "wave", adain=mode, **kw)
            runs[mode] = video, pipe.info["last_run"]["latents"][0]  # 4 F h w
        (v_off, off), (v_post, post), (_, lamp) = runs["off"], runs["post"], runs["lamp"]
        assert torch.equal(post[:, 0], off[:, 0]) and np.array_equal(v_post[0], v_off[0])  # frame 1 untouched
        mean, std = lambda a: a.mean((-2, -1)), lambda a: a.std((-2, -1))  # per channel (and frame), over h w
        torch.testing.assert_close(mean(post[:, 1:]), mean(post[:, :1]).expand(-1, 5), atol=1e-5, rtol=0)
        torch.testing.assert_close(std(post[:, 1:]), std(post[:, :1]).expand(-1, 5), atol=1e-4, rtol=1e-4)
        z = lambda a: (a - a.mean((-2, -1), keepdim=True)) / a.std((-2, -1), keepdim=True)
        torch.testing.assert_close(z(post[:, 1:]), z(off[:, 1:]), atol=1e-4, rtol=1e-4)  # one affine map per channel
        assert not np.array_equal(v_post[1:], v_off[1:]) and not torch.allclose(lamp[:, 2:], post[:, 2:])
        torch.testing.assert_close(mean(lamp[:, 1:]), mean(lamp[:, :1]).expand(-1, 5), atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="--adain True"):
            S.animate(pipe, sd / "ref.png", "wave", adain=True, **kw)

    def test_histogram_matching_gives_the_reference_histogram(self, sd):
        rng = np.random.default_rng(0)
        ref = rng.integers(0, 200, (40, 30, 3)).astype(np.uint8)
        lut = np.arange(256) + np.arange(256) ** 2 // 800  # strictly increasing, 0..199 -> 0..248: a "colour grade"
        graded = lut.astype(np.uint8)[ref]
        assert len(np.unique(graded)) == len(np.unique(ref))
        assert np.array_equal(S.match_histograms(graded[None], ref)[0], ref)  # undone exactly
        frames = np.stack([rng.normal(120, 40, (40, 30, 3)).clip(0, 255).astype(np.uint8),
                           rng.integers(100, 110, (40, 30, 3)).astype(np.uint8)])  # wide, and 10 levels only

        def cdf_gap(frame):  # (ref CDF - frame CDF), and the frame's largest bin, per channel, as fractions
            cdf = lambda a, c: np.cumsum(np.bincount(a[..., c].ravel(), minlength=256)) / a[..., c].size
            return [(cdf(ref, c) - cdf(frame, c), np.bincount(frame[..., c].ravel()).max() / frame[..., c].size)
                    for c in range(3)]
        for before, after in zip(frames, S.match_histograms(frames, ref)):
            for (gap, _), (gap_before, biggest) in zip(cdf_gap(after), cdf_gap(before)):
                assert gap.min() >= -1e-12 and gap.max() < biggest + 1e-12  # equal up to one bin of the input
                assert np.abs(gap).max() < np.abs(gap_before).max()
        pipe = load(sd)
        kw = dict(frames=5, steps=2, height=H, width=W, progress=False, seed=1)
        plain = S.animate(pipe, sd / "ref.png", "wave", **kw)
        matched = S.animate(pipe, sd / "ref.png", "wave", hist_match=True, **kw)
        assert np.array_equal(matched[0], plain[0]) and np.array_equal(matched[1:], S.match_histograms(plain[1:], plain[0]))

    def test_cli_several_images_long_loop_sidecar(self, sd, tmp_path):
        (tmp_path / "refs").mkdir()
        shutil.copy(sd / "ref.png", tmp_path / "refs" / "a.png")
        Image.open(sd / "ref.png").transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "refs" / "b.jpg")
        p = cli("--image", tmp_path / "refs", "--base", sd, "--motion-module", sd / "motion_module.safetensors",
                "--prompt", "wave", "--height", H, "--width", W, "--steps", 2, "--frames", 12, "--context-frames", 6,
                "--long", "windows", "--overlap", 2, "--loop", "--adain", "lamp", "--hist-match", "--seed", 3, "--device", "cpu",
                "--stg", 1.5, "--out", tmp_path / "out")
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        lines = out.strip().splitlines()
        assert sum(ln.startswith("base ") for ln in lines) == 1 and sum(ln.startswith("saved ") for ln in lines) == 2
        for name in ("a", "b"):
            meta = json.loads((tmp_path / "out" / f"{name}.json").read_text())
            assert (tmp_path / "out" / f"{name}.mp4").stat().st_size > 0 and meta["image"].endswith(name + "." +
                                                                                                     ("png" if name == "a" else "jpg"))
            assert (meta["long"], meta["context_frames"], meta["overlap"], meta["frames"]) == ("windows", 6, 2, 12)
            assert meta["loop"] and meta["loop_weight"] == S.LOOP_WEIGHT and meta["loop_grad"] == "x0"
            assert meta["adain"] == "lamp" and meta["hist_match"] and meta["unet_calls"] == 2 * 3
            assert meta["gamma"] == 0.8 and meta["omega"] == 0.2 and meta["seed"] == 3 and meta["stg"] == 1.5

    def test_text_to_video_matches_animatediff_pipeline(self, written):
        """image=None is AnimateDiff's own text-to-video: diffusers' AnimateDiffPipeline (its DDIM scheduler as
        AnimateDiff's configs set it, CFG 7.5) on the same U-Net + motion-module files, the same initial latents and
        prompt embeddings, gives the same final latents; FLASH's cross-frame attention is off for the run only."""
        diffusers = pytest.importorskip("diffusers")
        pipe, dp, ctx, unet = t2v_pair(diffusers, written)
        assert unet.config.cross_frame
        kw = dict(frames=5, steps=4, guidance=7.5, seed=3, height=64, width=96)
        # PYoCo's mixed prior (the same draw over every frame: none is a reference); a v-prediction base (SD-2.x's kind)
        results = {}
        for mixed, kind in ((0.0, "epsilon"), (0.3, "epsilon"), (0.3, "v_prediction")):
            pipe.prediction_type = kind
            dp.scheduler = diffusers.DDIMScheduler.from_config(dp.scheduler.config, prediction_type=kind)
            S.animate(pipe, None, "a person waving", "blurry", progress=False, mixed_noise=mixed, **kw)
            ours, last = pipe.info["last_run"]["latents"], pipe.info["last_run"]
            assert last["text_to_video"] and last["long"] == "plain" and not last["detail"]
            assert all(m.cross_frame for n, m in unet.named_modules() if n.endswith("attn1"))  # switched back on
            g = gen(kw["seed"])  # PYoCo Eq. 4 by hand: sqrt(s) * one draw shared by all frames + sqrt(1 - s) * own
            own, shared = torch.randn((1, 4, 5, 8, 12), generator=g), torch.randn((1, 4, 1, 8, 12), generator=g)
            noise = mixed ** 0.5 * shared + (1 - mixed) ** 0.5 * own if mixed else own
            with torch.no_grad():
                want = dp(prompt_embeds=ctx[1:], negative_prompt_embeds=ctx[:1], num_frames=5, height=64, width=96,
                          num_inference_steps=4, guidance_scale=7.5, latents=noise.clone(), output_type="latent").frames
            assert want.shape == ours.shape and not torch.allclose(want, noise, atol=1e-2)
            assert rel_err(ours, want) <= 1e-4, (mixed, kind, rel_err(ours, want))
            results[kind] = ours.clone()
        assert rel_err(results["epsilon"], results["v_prediction"]) > 0.05  # the switch is not a no-op

    def test_freeinit_matches_animatediff_pipeline_free_init(self, written):
        """FreeInit (arXiv 2312.07537) in text-to-video is diffusers' AnimateDiffPipeline with enable_free_init on the
        same weights: its Butterworth filter, the re-noising to t = 999 with pass 1's noise, fresh draws from the same
        generator, full passes and coarse-to-fine (passes of 1, 2 and 4 of 4 steps). The filter is Butterworth's
        (one half at the stop frequency) and even in every frequency, so the mixed spectrum of real latents stays
        Hermitian: the imaginary part ifftn leaves is rounding only, at odd sizes too (image-to-video's 15 frames)."""
        diffusers = pytest.importorskip("diffusers")
        pipe, dp, ctx, _ = t2v_pair(diffusers, written)
        kw = dict(frames=6, steps=4, guidance=7.5, seed=5, height=64, width=96)  # even sizes: diffusers' grid
        for passes, fast, calls in ((2, False, 8), (3, True, 1 + 2 + 4)):
            S.animate(pipe, None, "a person waving", "blurry", progress=False, freeinit=passes, freeinit_fast=fast,
                      **kw)
            ours, last = pipe.info["last_run"]["latents"], pipe.info["last_run"]
            assert last["unet_calls"] == calls and last["long"] == "plain"
            g = gen(kw["seed"])
            noise = torch.randn((1, 4, 6, 8, 12), generator=g)  # pass 1's draw; g goes on to the fresh draws
            dp.enable_free_init(num_iters=passes, use_fast_sampling=fast)
            with torch.no_grad():
                want = dp(prompt_embeds=ctx[1:], negative_prompt_embeds=ctx[:1], num_frames=6, height=64, width=96,
                          num_inference_steps=4, guidance_scale=7.5, latents=noise, generator=g,
                          output_type="latent").frames
            assert rel_err(ours, want) <= 1e-4, (passes, fast, rel_err(ours, want))
            dp.disable_free_init()
            plain = dp(prompt_embeds=ctx[1:], negative_prompt_embeds=ctx[:1], num_frames=6, height=64, width=96,
                       num_inference_steps=4, guidance_scale=7.5, latents=noise, output_type="latent").frames
            assert rel_err(ours, plain) > 0.05  # FreeInit changed the result
        lowpass = S.freeinit_filter((15, 16, 16))
        assert lowpass[0, 0, 0] == 1 and abs(lowpass[0, 2, 0] - 0.5) < 1e-6  # f_h = 2 * 2 / 16 = 0.25: half power
        assert abs(lowpass[0, 0, 2] - 0.5) < 1e-6 and abs(lowpass[2, 0, 0] - 1 / (1 + (16 / 15) ** 8)) < 1e-6  # f_t 4/15
        for f in (15, 16):
            x, n, fresh = (torch.randn(1, 4, f, 16, 16, generator=gen(i)) for i in range(3))
            mixed = torch.fft.fftn(x, dim=(-3, -2, -1)) * S.freeinit_filter((f, 16, 16))
            assert torch.fft.ifftn(mixed, dim=(-3, -2, -1)).imag.abs().max() < 1e-5
            z = S.freeinit_noise(x, n, fresh, torch.tensor(0.0016))
            assert z.shape == x.shape and z.dtype == torch.float32
        tiny = tiny_pipeline(seed=1)  # image-to-video: every pass keeps frame 1 = E(I); 16 frames -> 15 re-noised
        image = torch.rand(3, 32, 32, generator=gen(0)) * 2 - 1
        kw = dict(frames=16, steps=3, height=32, width=32, progress=False, adain="off", seed=2)
        plain = S.animate(tiny, image, "wave", **kw)
        again = S.animate(tiny, image, "wave", freeinit=2, **kw)
        lat = tiny.info["last_run"]["latents"]
        assert torch.equal(lat[:, :, :1], tiny.vae.encode(image[None]).float()[:, :, None])
        assert tiny.info["last_run"]["unet_calls"] == 6 and np.abs(again[1:].astype(float) - plain[1:]).mean() > 1

    def test_non_finite_sampling_names_its_cause(self, monkeypatch):
        """A NaN/inf in the sampler stops it with one ValueError naming the setting (the loop weight, else the
        dtype, else the weights) instead of decoding a black video; loop weights outside 0..10 are refused."""
        pipe = tiny_pipeline(seed=1)
        image = torch.rand(3, 32, 32, generator=gen(0)) * 2 - 1
        kw = dict(frames=4, steps=2, height=32, width=32, progress=False)
        with pytest.raises(ValueError, match=r"--loop-weight 11\.0: want 0 to 10"):
            S.animate(pipe, image, "wave", loop=True, loop_weight=11.0, **kw)
        monkeypatch.setattr(S, "LOOP_WEIGHT_MAX", 1e31)  # past the range check: the sampler's own guard
        with pytest.raises(ValueError, match=r"non-finite values in .* --loop-weight 1e\+30 is too strong"):
            S.animate(pipe, image, "wave", loop=True, loop_weight=1e30, **kw)
        with torch.no_grad():
            pipe.unet.conv_out.bias[0] = float("nan")
        with pytest.raises(ValueError, match="noise prediction at DDIM step 1 .* fp32 predicts NaN/inf: check the"):
            S.animate(pipe, image, "wave", **kw)
        pipe.dtype = torch.bfloat16  # what the message names for a half-precision U-Net
        with pytest.raises(ValueError, match="the U-Net runs in bfloat16: try --dtype fp32"):
            S.animate(pipe, image, "wave", **kw)

    def test_text_to_video_long_windows_and_what_it_refuses(self):
        """Past the training length text-to-video runs FreeNoise windows over all frames (no reference to restart
        segments from: naive and phased are refused); AdaIN and histogram matching need the reference."""
        pipe = tiny_pipeline(seed=1)
        pipe.info["settings"] = {"frames": 6}
        kw = dict(steps=2, height=32, width=32, progress=False, seed=0)
        sizes = []
        hook = pipe.unet.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[2]))
        video = S.animate(pipe, None, "wave", frames=14, overlap=2, **kw)
        hook.remove()
        last = pipe.info["last_run"]
        windows = S.context_windows(14, 6, 2)  # all 14 frames in 6-frame windows, no clean frame in any
        assert video.shape == (14, 32, 32, 3) and last["long"] == "windows" and sizes == [6] * 2 * len(windows)
        assert last["unet_calls"] == 2 * len(windows)
        for mode in ("naive", "phased"):
            with pytest.raises(ValueError, match=f"--long {mode} restarts every segment"):
                S.animate(pipe, None, "wave", frames=14, long=mode, **kw)
        for bad, match in ((dict(adain="lamp"), "--adain lamp aligns"), (dict(hist_match=True), "--hist-match")):
            with pytest.raises(ValueError, match=match):
                S.animate(pipe, None, "wave", frames=4, **bad, **kw)

    def test_cli_text_to_video_plan_line_and_rough_edges(self, sd, tmp_path):
        common = ["--base", sd, "--motion-module", sd / "motion_module.safetensors", "--prompt", "wave", "--height", H,
                  "--width", W, "--steps", 2, "--device", "cpu", "--seed", 1]
        procs = {"t2v": cli(*common, "--frames", 6, "--shared-noise-mean", "--freeinit", 2, "--freeinit-fast",
                            "--out", tmp_path / "t.mp4"),
                 "loop": cli(*common, "--image", sd / "ref.png", "--loop", "--loop-weight", "1e30",
                             "--out", tmp_path / "l.mp4"),
                 "naive": cli(*common, "--frames", 40, "--long", "naive", "--out", tmp_path / "n.mp4"),
                 "adain": cli(*common, "--adain", "lamp", "--out", tmp_path / "a.mp4")}
        res = {k: p.communicate(timeout=180) for k, p in procs.items()}
        assert procs["t2v"].returncode == 0, res["t2v"][1]
        out = res["t2v"][0]  # before the run: its U-Net calls; after the first call: the time it will take
        # FreeInit, coarse-to-fine: passes of 1 and 2 of the 2 steps
        assert "plan: 1 video(s) of 6 frames 64x96 from text alone: 3 U-Net calls of up to 6 frames each over 2 " \
               "FreeInit passes" in out
        assert re.search(r"3 U-Net calls of up to 6 frames; the first took [0-9.]+ s: about [0-9.e+-]+ s in all", out)
        meta = json.loads((tmp_path / "t.json").read_text())
        assert meta["image"] is None and meta["mode"] == "text-to-video" and meta["adain"] == "off"
        assert meta["shared_noise_mean"] is True and meta["mixed_noise"] == 0.0
        assert meta["freeinit"] == 2 and meta["freeinit_fast"] is True and meta["unet_calls"] == 3
        assert (tmp_path / "t.mp4").stat().st_size > 0
        for k, match in (("loop", "--loop-weight 1e+30: want 0 to 10"), ("naive", "--long naive restarts"),
                         ("adain", "--adain lamp aligns")):
            err = res[k][1]
            assert procs[k].returncode == 2 and err.startswith(f"error: {match}") and err.count("\n") == 1, err
            assert not (tmp_path / f"{k[0]}.mp4").exists()

    def test_sampler_unchanged_in_every_mode(self):
        # recorded on this code with torch 2.13 CPU, one thread (AMD EPYC), where its outputs were bit-identical to
        # those of the unsplit sampler (commit d125dce: the SHA-256s this test held before matched it on the machine
        # they were recorded on, and 337eac4 gives the same bits as this code here)
        recorded = {
            "plain": [-0.00880613448, 0.0139791881, 0.0282346479, 124.589789],
            "adain post": [-0.00880613571, 0.0139791879, 0.0161541357, 124.365289],
            "adain off": [0.415949508, 25.5447919, -0.137267573, 129.779731],
            "shared noise": [-0.00880613504, 0.0139791882, 0.0554591927, 123.665853],
            "mixed noise": [-0.00880613507, 0.0139791882, -0.0858923675, 122.923937],
            "hist match": [-0.00880613448, 0.0139791881, 0.0282346479, 125.722548],
            "no cfg": [-0.00880613425, 0.0139791881, 0.0091482379, 123.597385],
            "loop x0": [-0.00880613499, 0.013979188, 0.00676830514, 123.529514],
            "loop unet": [-0.00880613494, 0.0139791879, -0.00349276535, 122.034451],
            "windows": [-0.00880613485, 0.0139791886, 0.181943467, 123.770671],
            "windows loop mixed": [-0.00880613446, 0.0139791884, 0.00966125324, 123.172635],
            "naive": [-0.00880613476, 0.0139791888, -0.0617585693, 121.861762],
            "naive loop unet": [-0.00880613532, 0.0139791889, -0.0626969571, 121.076714],
            "naive mixed": [-0.00880613478, 0.013979189, 0.0426100668, 123.138482],
            "phased": [-0.00880613451, 0.0139791888, 0.115557206, 124.355903],
            "phased mixed post": [-0.00880613482, 0.0139791888, 0.0659704064, 121.5743],
        }
        got = sampler_fingerprints()
        close = lambda a, b: all(abs(x - y) <= 1e-3 * abs(y) + 1e-5 for x, y in zip(a, b))
        names = list(recorded)
        assert not any(close(recorded[p], recorded[q]) for i, p in enumerate(names) for q in names[i + 1:])  # distinct
        assert {k: v for k, v in got.items() if not close(v, recorded[k])} == {}

    def test_demo_measure_long_smoke(self, fast_run, tmp_path):
        refs, starts = demo.make_demo_references(1, demo.SIZE, seed=1000)
        table = demo.measure_long(fast_run["pipe"], refs, starts, tmp_path, frames=20, steps=2)
        assert {"16 frames", "20, phased", "20, windows", "20, naive", "16, loop (x0)", "16, loop (unet)"} <= set(table)
        for name, row in table.items():
            assert (row["join_ratio"] is None) == name.startswith("16") and np.isfinite(row["seam_ratio"]), name
        assert table["16 frames"]["time_vs_16"] == pytest.approx(1.0)
        video = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 10, 20, 30, 0)])  # steps 10, 10, 10, 30
        assert demo.seam_ratio(video) == 0 and demo.frame_steps(video).tolist() == [10, 10, 10, 30]
        assert demo.join_ratio(video, segment=3) == pytest.approx(3.0)  # the join 4|5 is 3x the other steps


# ====================================================================================================
class TestTrain:
    """train.py: Motion Alignment Module, training loop, checkpoints, resume"""

    def test_v_prediction_loss_is_diffusers_velocity_target(self):
        """For a base that predicts v (scheduler_config.json), FLASH's eps-MSE of the converted output is a_t times the
        MSE against diffusers' velocity target (DDPMScheduler.get_velocity, what its v-prediction training scripts
        regress on) over frames 2..N; "epsilon" is the plain eps-MSE."""
        diffusers = pytest.importorskip("diffusers")
        sched = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear")
        unet = tiny_pipeline(seed=2).unet
        g = gen(1)
        lat, noise = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(1, 4, 4, 8, 8, generator=g)
        ctx, acp, off = torch.randn(1, 77, CLIP_TINY["hidden_size"], generator=g), S.alphas_cumprod(), nullcontext()
        for t in (30, 700):
            with torch.no_grad():
                v_loss = T.unet_loss(unet, lat, t, noise, ctx, acp, off, prediction_type="v_prediction")
                eps_loss = T.unet_loss(unet, lat, t, noise, ctx, acp, off, "epsilon")
                xt = acp[t].sqrt() * lat + (1 - acp[t]).sqrt() * noise
                xt[:, :, 0] = lat[:, :, 0]
                out = unet(xt, t, ctx.expand(2, -1, -1))
            target = sched.get_velocity(lat, noise.expand_as(lat), torch.tensor([t, t]))
            want = acp[t] * (out - target)[:, :, 1:].square().mean(dim=(1, 2, 3, 4))
            torch.testing.assert_close(v_loss, want, rtol=1e-4, atol=0)
            torch.testing.assert_close(eps_loss, (out - noise)[:, :, 1:].square().mean(dim=(1, 2, 3, 4)))

    def test_motion_align_identity_when_clips_equal(self):
        x, _ = feats()
        both = torch.cat([x, x])
        assert torch.allclose(M.motion_align(both, 6, 90.0), both, atol=1e-5)

    def test_motion_align_formula(self):
        frames, c, eps = 6, 20, 1e-5
        ori, scale = feats(frames=frames, c=c, seed=1)
        aug, _ = feats(frames=frames, c=c, seed=2)
        out = M.motion_align(torch.cat([ori, aug]), frames, 90.0, eps)
        o, a = ori.view(frames, c, 3, 4), aug.view(frames, c, 3, 4)
        out_o, out_a = out[:frames].view(frames, c, 3, 4), out[frames:].view(frames, c, 3, 4)
        assert torch.equal(out_o, o)  # the original's features are untouched
        # the augmented output keeps its own per-channel mean and std over frames
        assert torch.allclose(out_a.mean(0), a.mean(0), atol=1e-5)
        assert torch.allclose(out_a.std(0, unbiased=False), a.std(0, unbiased=False), atol=1e-3)
        # exactly the top 10 % channels by the ORIGINAL's temporal std (mean over h, w) are replaced
        s = o.std(0, unbiased=False).mean((1, 2))
        top = set(s.argsort(descending=True)[:2].tolist())  # 10 % of 20 channels
        norm = lambda v: (v - v.mean(0)) / (v.var(0, unbiased=False) + eps).sqrt()
        expect = norm(o) * (a.var(0, unbiased=False) + eps).sqrt() + a.mean(0)
        for ch in range(c):
            if ch in top:
                assert torch.allclose(out_a[:, ch], expect[:, ch], atol=1e-5), ch
            else:
                assert torch.allclose(out_a[:, ch], a[:, ch], atol=1e-5), ch
        assert not torch.allclose(out_a, a, atol=1e-3)

    def test_motion_align_gradients_reach_both_clips(self):
        ori, _ = feats(seed=3)
        aug, _ = feats(seed=4)
        ori.requires_grad_(True)
        aug.requires_grad_(True)
        out = M.motion_align(torch.cat([ori, aug]), 6, 90.0)
        out[6:].square().sum().backward()  # a loss on the augmented clip only
        assert ori.grad.abs().sum() > 0 and aug.grad.abs().sum() > 0

    def test_shared_qk_equals_hand_computed_attention(self):
        torch.manual_seed(0)
        dim, heads, frames, n = 16, 2, 3, 5
        attn = M.Attention(dim, heads, cross_frame=True)
        x = torch.randn(2 * frames, n, dim)  # [original clip frames ; augmented clip frames]
        attn.share_qk = True
        got = attn(x, frames=frames)
        hs = dim // heads
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        out = []
        for clip in range(2):
            for f in range(frames):
                i = clip * frames + f
                qo = q[f]  # the ORIGINAL clip's queries and keys (first frame + current frame) ...
                ko = torch.cat([k[0], k[f]])
                va = torch.cat([v[clip * frames], v[i]])  # ... applied to this clip's own values
                heads_out = []
                for h in range(heads):
                    sl = slice(h * hs, (h + 1) * hs)
                    S = torch.softmax(qo[:, sl] @ ko[:, sl].T / hs ** 0.5, dim=-1)
                    heads_out.append(S @ va[:, sl])
                out.append(attn.to_out[0](torch.cat(heads_out, -1)))
        assert torch.allclose(got, torch.stack(out), atol=1e-5)

    def test_trainable_set_is_motion_modules_and_attn1_kv(self):
        with torch.device("meta"):
            u = M.UNet(M.UNetConfig())  # SD-1.5 + v2 motion modules
        names = [n for n, _ in u.named_parameters() if T.is_trainable(n, "unet")]
        others = {n.split(".motion_modules.")[0] if "motion_modules." in n else n.rsplit(".", 2)[-2] for n in names}
        assert others <= {"down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block", "up_blocks.0",
                          "up_blocks.1", "up_blocks.2", "up_blocks.3", "to_k", "to_v"}
        kv = [n for n in names if "motion_modules." not in n]
        assert all(n.endswith((".attn1.to_k.weight", ".attn1.to_v.weight")) for n in kv) and len(kv) == 32
        # 16 spatial transformers: attn1 K and V are C x C, C = 320 (5 layers), 640 (5), 1280 (6)
        n_kv = 2 * (5 * 320 ** 2 + 5 * 640 ** 2 + 6 * 1280 ** 2)
        total = sum(p.numel() for n, p in u.named_parameters() if T.is_trainable(n, "unet"))
        assert total == 453_209_280 + n_kv == 477_990_080

    def test_timestep_weights_favour_large_t(self):
        w = T.timestep_weights(0.5)
        assert w[0] == pytest.approx(0.5) and w[999] == pytest.approx(1.5, abs=1e-4) and (w[1:] >= w[:-1]).all()
        assert (T.timestep_weights(0.0) == 1).all()
        w1 = T.timestep_weights(1.0)  # ReVersion's strongest setting: p(0) = 0, p(T) = 2 p(T/2)
        assert w1[0] == 0 and w1[500] == pytest.approx(1.0) and w1[999] == pytest.approx(2.0, abs=1e-4)
        with pytest.raises(ValueError, match="timestep-alpha"):
            T.check_args(T.get_parser().parse_args(["--videos", "v", "--base", "b", "--motion-module", "m",
                                                    "--timestep-alpha", "1.5"]))

    def test_trunc_snr_loss_weight_is_max_one_inverse_snr(self, tiny):
        """--loss-weight trunc-snr scales the loss that is backpropagated by max(1, 1/SNR_t), SNR from diffusers'
        compute_snr on AnimateDiff's scheduler; the logged losses stay the eps-MSE, and the default is the paper's eps."""
        from diffusers import DDPMScheduler
        from diffusers.training_utils import compute_snr
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear")  # AnimateDiff's training
        pipe = S.load_pipeline(tiny / "pipe", verbose=False)
        frames, fps = data.read_video(tiny / "videos" / "clip0.mp4")
        clip = data.sample_clip(data.Video("clip0", frames, fps, "a disc jumps"), 8, 1, 64, 64,
                                torch.Generator().manual_seed(0))
        embed = S.encode_prompt(pipe, ["a disc jumps"])
        off, acp = torch.autocast("cpu", enabled=False), S.alphas_cumprod()
        n_layers = len(T.cross_frame_layers(pipe.unet))
        assert T.get_parser().parse_args([]).loss_weight == "eps"
        for t in (50, 400, 999):
            one_t = torch.zeros(1000, dtype=torch.float64)
            one_t[t] = 1  # the step draws this t
            got = {}
            for kind in ("eps", "trunc-snr"):
                args = T.get_parser().parse_args(["--frames", "8", "--loss-weight", kind, "--null-text-prob", "0"])
                with torch.no_grad():
                    got[kind] = T.unet_step(args, pipe, clip, embed, embed, torch.Generator().manual_seed(1), off,
                                            acp, one_t, n_layers)
            want = compute_snr(sched, torch.tensor([t])).reciprocal().clamp(min=1).item()
            assert got["trunc-snr"][1] == got["eps"][1]  # the log rows: the unweighted eps-MSE
            assert got["trunc-snr"][0].item() == pytest.approx(want * got["eps"][0].item(), rel=1e-5)
            assert (want == 1) == (t < 400)  # SNR_t > 1 below t ~ 300 on this schedule

    def test_cosine_lr_schedule_halves_at_midpoint_and_constant_stays(self):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
        args = T.get_parser().parse_args(["--lr", "0.004", "--steps", "100"])
        assert args.lr_schedule == "constant"  # A3.2's default
        assert [T.set_lr(opt, args.lr, s) for s in (0, 50, 99)] == [0.004] * 3
        # cosine: 0.5 (1 + cos(pi s / S)): 1 at s = 0, 1/2 at S/2, (1 + cos(0.99 pi)) / 2 at S - 1
        got = [T.set_lr(opt, args.lr, s, args.steps) for s in range(100)]
        assert got[0] == 0.004 and got[50] == pytest.approx(0.002) and opt.param_groups[0]["lr"] == got[-1]
        assert got[-1] == pytest.approx(0.004 * (1 - math.cos(0.01 * math.pi)) / 2) and got[-1] < 1e-5
        assert all(a > b for a, b in zip(got, got[1:]))

    def test_ema_update_is_the_exponential_average(self):
        # from 0, k updates towards a constant c give c (1 - d^k); then one step towards a new value v moves by (1 - d)
        p = {"w": torch.full((3,), 2.0)}
        ema = {"w": torch.zeros(3)}
        for _ in range(5):
            T.ema_update(ema, p, 0.9)
        assert torch.allclose(ema["w"], torch.full((3,), 2.0 * (1 - 0.9 ** 5)))
        before = ema["w"].clone()
        p["w"].fill_(-4.0)
        T.ema_update(ema, p, 0.9)
        assert torch.allclose(ema["w"], before + 0.1 * (-4.0 - before))
        assert T.get_parser().parse_args([]).ema_decay == 0.0  # off by default: the last weights (A3.2)

    def test_ema_checkpoint_holds_the_average_and_resumes_exactly(self, tiny):
        ema, every = ["--ema-decay", "0.5"], ["--save-every", "1", "--keep", "10"]
        T.main(train_argv(tiny, tiny / "ema_plain", "--steps", "3", *every))
        T.main(train_argv(tiny, tiny / "ema_full", "--steps", "6", *every, *ema))
        T.main(train_argv(tiny, tiny / "ema_part", "--steps", "3", "--save-every", "3", *ema))
        T.main(train_argv(tiny, tiny / "ema_part", "--steps", "6", "--save-every", "3",
                          "--resume", str(tiny / "ema_part"), *ema))
        weights = lambda run, s: load_file(tiny / run / f"checkpoint-{s:06d}" / "flash.safetensors")
        a, b = weights("ema_full", 6), weights("ema_part", 6)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # resumed == uninterrupted
        raw = torch.load(tiny / "ema_full" / "checkpoint-000003" / "state.pt", weights_only=True)["raw"]
        w1, w2, w3 = (weights("ema_plain", s) for s in (1, 2, 3))  # the same run without the average: its iterates
        assert all(torch.equal(raw[k[5:]], w3[k]) for k in w3)  # the average does not change training
        e1, e3 = weights("ema_full", 1), weights("ema_full", 3)
        for k in w3:  # decay 1/2 from the start w0 (e1 = (w0 + w1) / 2): e3 = w0/8 + w1/8 + w2/4 + w3/2
            w0 = 2 * e1[k] - w1[k]
            assert torch.allclose(e3[k], w0 / 8 + w1[k] / 8 + w2[k] / 4 + w3[k] / 2, atol=1e-6)
        assert any(not torch.equal(e3[k], w3[k]) for k in w3)  # the checkpoint holds the average, not the last

    def test_train_end_to_end_resume_and_sample(self, tiny, capsys):
        T.main(train_argv(tiny, tiny / "full", "--steps", "6", "--save-every", "3"))
        T.main(train_argv(tiny, tiny / "part", "--steps", "3", "--save-every", "3"))
        T.main(train_argv(tiny, tiny / "part", "--steps", "6", "--save-every", "3", "--resume", str(tiny / "part")))
        a = load_file(tiny / "full" / "checkpoint-000006" / "flash.safetensors")
        b = load_file(tiny / "part" / "checkpoint-000006" / "flash.safetensors")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # resumed run == uninterrupted run
        assert all(k.startswith("unet.") and T.is_trainable(k[5:], "unet") for k in a)
        settings = json.loads((tiny / "full" / "settings.json").read_text())
        assert settings["height"] == 64 and settings["frames"] == 8 and settings["stage"] == "unet"
        assert (tiny / "full" / "loss.png").is_file() and (tiny / "full" / "flash.safetensors").is_file()
        assert "step 000005 | loss_ori" in capsys.readouterr().out
        # the trained weights load in sample.py and change its output
        pipe = S.load_pipeline(tiny / "pipe", tiny / "pipe" / "motion_module.safetensors", verbose=False)
        ref = torch.zeros(3, 64, 64)
        before = S.animate(pipe, ref, "a disc jumps", frames=8, steps=2, height=64, width=64, progress=False)
        S.apply_checkpoint(pipe, tiny / "full")
        after = S.animate(pipe, ref, "a disc jumps", frames=8, steps=2, height=64, width=64, progress=False)
        assert after.shape == (8, 64, 64, 3) and not np.array_equal(before, after)

    def test_train_loss_falls(self, tiny):
        hist = []
        args = T.get_parser().parse_args(train_argv(tiny, tiny / "fall", "--steps", "40", "--save-every", "1000",
                                                    "--timesteps", "uniform", "--log-every", "100"))
        T.check_args(args)
        videos = data.load_videos(args.videos, args.prompt, args.frames, args.stride)
        pipe = S.load_pipeline(args.base, args.motion_module, verbose=False)
        embeds = [S.encode_prompt(pipe, [v.caption]) for v in videos]
        hist = T.train(args, pipe, videos, embeds, log=lambda *a: None)
        first = np.mean([h["loss_ori"] + h["loss_aug"] for h in hist[:10]])
        last = np.mean([h["loss_ori"] + h["loss_aug"] for h in hist[-10:]])
        assert last < 0.8 * first, (first, last)

    def test_null_text_dropout_rate(self, tiny):
        """--null-text-prob p: the U-Net gets the empty prompt's embedding on a share p of the steps (AnimateDiff's
        cfg_random_null_text_ratio), else the caption's; 0 = never. A stub U-Net records the context it is fed."""
        class ContextRecorder(nn.Module):
            def __init__(self):
                super().__init__()
                self.motion_modules = nn.Linear(1, 1)  # one trainable tensor, named as train.py expects
                self.gradient_checkpointing, self.seen = False, []

            def forward(self, x, t, ctx):
                self.seen.append(ctx[0].clone())
                return x * self.motion_modules.weight.sum()

        pipe = S.load_pipeline(tiny / "pipe", verbose=False)
        null, cap = S.encode_prompt(pipe, [""]), S.encode_prompt(pipe, ["a disc jumps"])
        for p, steps in ((0.25, 300), (0.0, 40)):
            args = T.get_parser().parse_args(map(str, train_argv(
                tiny, tiny / f"null{p}", "--steps", steps, "--null-text-prob", p, "--frames", 4, "--height", 32,
                "--width", 32, "--no-strong-aug", "--save-every", 1000, "--log-every", 1000)))
            T.check_args(args)
            videos = [data.Video("mem", ramp_frames(8, 32, 32), 8.0, "a disc jumps")]
            pipe.unet = ContextRecorder()
            T.train(args, pipe, videos, [cap], log=lambda *a: None)
            seen = pipe.unet.seen
            is_null = [torch.equal(c, null[0]) for c in seen]
            assert len(seen) == steps and all(n or torch.equal(c, cap[0]) for n, c in zip(is_null, seen))
            print(f"null-text prob {p}: {sum(is_null)} of {steps} steps")
            assert abs(sum(is_null) - p * steps) <= 3.5 * (steps * p * (1 - p)) ** 0.5  # binomial, 3.5 sigma

    def test_joint_training_two_actions(self, tiny, tmp_path, monkeypatch, capsys):
        """Joint training (Table A1): captions.json gives two actions; training feeds both captions' embeddings and
        writes one periodic sample per caption, named by it."""
        videos = tmp_path / "videos"
        videos.mkdir()
        for i in range(3):
            shutil.copy(tiny / "videos" / f"clip{i}.mp4", videos / f"clip{i}.mp4")
        caps = {"clip0.mp4": "a disc jumps to the right", "clip1.mp4": "a disc hops", "clip2.mp4": "a disc hops"}
        (videos / "captions.json").write_text(json.dumps(caps))
        Image.new("RGB", (64, 64), (40, 120, 200)).save(tmp_path / "ref.png")
        fed = []
        unet_loss = T.unet_loss
        monkeypatch.setattr(T, "unet_loss", lambda unet, lat, t, noise, ctx, *a, **kw:
                            fed.append(ctx.cpu().clone()) or unet_loss(unet, lat, t, noise, ctx, *a, **kw))
        argv = [str(a) for a in set_flag(train_argv(tiny, tmp_path / "run", "--steps", 6, "--sample-image",
                                                    tmp_path / "ref.png", "--sample-steps", 1, "--null-text-prob", 0),
                                         "--videos", videos)]
        T.main(argv[:argv.index("--prompt")] + argv[argv.index("--prompt") + 2:])  # no --prompt: captions only
        settings = json.loads((tmp_path / "run" / "settings.json").read_text())
        assert settings["captions"] == ["a disc hops", "a disc jumps to the right"]
        pipe = S.load_pipeline(tiny / "pipe", verbose=False)
        for c in settings["captions"]:
            assert any(torch.equal(f, S.encode_prompt(pipe, [c])) for f in fed), c  # both actions trained
        assert sorted(os.listdir(tmp_path / "run" / "samples")) == ["step_000006_a_disc_hops.mp4",
                                                                    "step_000006_a_disc_jumps_to_the_right.mp4"]
        capsys.readouterr()
        with pytest.raises(SystemExit):  # sample.py must be told which action
            S.main(["--image", str(tmp_path / "ref.png"), "--checkpoint", str(tmp_path / "run"), "--out",
                    str(tmp_path / "x.mp4")])
        assert "error: --prompt is required" in capsys.readouterr().err and not (tmp_path / "x.mp4").exists()

    def test_decoder_branches_recorded_and_rebuilt_by_sample(self, tiny):
        """--detail-branches / --detail-full-res (Table A2): only those branches train, the settings record them, and
        sample.apply_checkpoint rebuilds the same decoder (a checkpoint whose settings disagree is an error)."""
        runs = ((["--detail-branches", "warp"], ("warp",), False),
                (["--detail-branches", "patch", "--detail-full-res", "on"], ("patch",), True))
        for flags, branches, full_res in runs:
            out = tiny / f"dec_{branches[0]}"
            T.main(["--stage", "decoder", "--videos", str(tiny / "videos"), "--prompt", "x", "--base",
                    str(tiny / "pipe"), "--frames", "8", "--height", "64", "--width", "64", "--out", str(out),
                    "--steps", "1", "--decoder-frames", "2", "--log-every", "1", *flags])
            settings = json.loads((out / "settings.json").read_text())
            assert settings["detail_branches"] == ",".join(branches)
            assert settings["detail_full_res"] == ("on" if full_res else "off")  # auto = off on the CPU
            keys = load_file(out / "flash.safetensors")
            want = VAE(VAEConfig(**PIPE_VAE, detail=True, detail_branches=branches, detail_full_res=full_res))
            assert set(keys) == {f"vae.{k}" for k, _ in want.named_parameters() if ".detail." in k}
            pipe = S.load_pipeline(tiny / "pipe", verbose=False)
            S.apply_checkpoint(pipe, out)
            assert pipe.vae.config.detail_branches == branches and pipe.vae.config.detail_full_res == full_res
        shutil.copy(tiny / "dec_warp" / "flash.safetensors", tiny / "dec_patch" / "flash.safetensors")
        with pytest.raises(ValueError, match="missing .*patch_in"):  # settings say patch, the weights are warp
            S.apply_checkpoint(S.load_pipeline(tiny / "pipe", verbose=False), tiny / "dec_patch")

    def test_decoder_stage_trains_only_detail_branches(self, tiny):
        T.main(["--stage", "decoder", "--videos", str(tiny / "videos"), "--prompt", "x", "--base", str(tiny / "pipe"),
                "--frames", "8", "--height", "64", "--width", "64", "--out", str(tiny / "dec"), "--steps", "2",
                "--decoder-frames", "3", "--log-every", "1"])
        sd = load_file(tiny / "dec" / "flash.safetensors")
        assert sd and all(k.startswith("vae.decoder.detail.") for k in sd)
        pipe = S.load_pipeline(tiny / "pipe", tiny / "pipe" / "motion_module.safetensors", verbose=False)
        S.apply_checkpoint(pipe, tiny / "dec")
        assert pipe.vae.config.detail

    def test_decoder_stage_beats_plain_decoder_on_held_out_clips(self, tiny):
        """Issue 5: on distorted inputs the trained branches reconstruct held-out clips better than the plain decoder."""
        args = T.get_parser().parse_args(["--stage", "decoder", "--videos", str(tiny / "videos"), "--prompt", "x",
                                          "--base", str(tiny / "pipe"), "--frames", "8", "--height", "64", "--width",
                                          "64", "--out", str(tiny / "dec2"), "--steps", "40", "--lr", "2e-3",
                                          "--decoder-frames", "4", "--log-every", "100", "--save-every", "1000"])
        T.check_args(args)
        videos = data.load_videos(args.videos, args.prompt, args.frames, args.stride)
        pipe = S.load_pipeline(args.base, verbose=False)
        pipe.vae = load_vae(args.base, detail=True)
        hist = T.train(args, pipe, videos, None, log=lambda *a: None)
        assert np.mean([h["loss"] for h in hist[-10:]]) < np.mean([h["loss"] for h in hist[:10]])
        clips, _ = demo.make_demo_clips(3, frames=8, size=64, seed=123)  # held out: never trained on
        g = torch.Generator().manual_seed(0)
        plain, detail = [], []
        with torch.no_grad():
            for c in clips:
                dis = data.decoder_distort(c, g, p_none=0.0)
                z = pipe.vae.encode(dis)
                ref = pipe.vae.encoder_features(c[:1])
                plain.append(torch.nn.functional.mse_loss(pipe.vae.decode(z), c).item())
                detail.append(torch.nn.functional.mse_loss(pipe.vae.decode(z, ref=ref), c).item())
        print(f"held-out MSE plain {np.mean(plain):.4f} detail {np.mean(detail):.4f}")
        assert np.mean(detail) < np.mean(plain), (detail, plain)



# ====================================================================================================
class Unpickler:
    """A .ckpt payload that creates a folder when unpickled: torch.load(weights_only=True) must never call it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, sd):
    """Every kind of broken input a new user hands the two command lines."""
    d = tmp_path_factory.mktemp("bad")
    for name in ("empty", "junk", "short", "long", "captions", "ck_corrupt", "ck_wrong"):
        (d / name).mkdir()
    (d / "junk" / "a.mp4").write_bytes(b"not a video at all")
    data.write_video(np.zeros((5, 64, 64, 3), np.uint8), d / "short" / "s.gif", fps=8)
    data.write_video(np.zeros((45, 64, 64, 3), np.uint8), d / "long" / "l.mp4", fps=8)
    data.write_video(np.zeros((10, 64, 64, 3), np.uint8), d / "captions" / "a.mp4", fps=8)
    (d / "captions" / "captions.json").write_text('{"a.mp4": "a person waves", "b.mp4": "a typo"}')
    (d / "garbage.png").write_bytes(os.urandom(300))
    (d / "a_file").write_text("a file, not a folder")
    mm = (sd / "motion_module.safetensors").read_bytes()
    (d / "mm_cut.safetensors").write_bytes(mm[:len(mm) // 2])  # an interrupted download
    shutil.copytree(sd, d / "sd_cut")
    (d / "sd_cut/unet/diffusion_pytorch_model.safetensors").write_bytes(mm[:1000])
    torch.save({"state_dict": {"down_blocks.0.motion_modules.0.x": torch.zeros(1)},
                "config": Unpickler(str(d / "PICKLE_RAN"))}, d / "evil.ckpt")
    (d / "ck_corrupt" / "flash.safetensors").write_bytes(bytes(50))
    save_file({"foo.bar": torch.zeros(1)}, d / "ck_wrong" / "flash.safetensors")
    return d


def set_flag(argv, flag, value):
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = str(value)
    else:
        argv += [flag, str(value)]
    return argv


def run_matrix(script, cases, outputs):
    """Run every case as a new user would (a subprocess, 3 at a time); each must exit 2 with one `error:` line that
    names the problem (warnings before it allowed), no traceback, and leave none of its outputs behind."""
    from concurrent.futures import ThreadPoolExecutor
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def go(case):
        name, argv, match = case
        r = subprocess.run([sys.executable, script, *map(str, argv)], cwd=HERE, capture_output=True, text=True,
                           env=env, timeout=120)
        lines = r.stderr.strip().splitlines()
        errors = [ln for ln in lines if ln.startswith("error:")]
        ok = (r.returncode == 2 and len(errors) == 1 and lines[-1] == errors[0] and match in errors[0]
              and all(ln.startswith(("error:", "warning:")) for ln in lines) and "Traceback" not in r.stderr)
        left = [str(p) for p in outputs(name) if os.path.exists(p)]
        return None if ok and not left else f"{name}: rc {r.returncode}, left {left}, stderr {r.stderr[-600:]!r}"

    with ThreadPoolExecutor(3) as ex:
        failures = [f for f in ex.map(go, cases) if f]
    assert not failures, "\n".join(failures)


class TestBadInput:
    """train.py and sample.py on broken input: one `error:` line naming the file or flag, exit 2, nothing written,
    no pickled code run."""

    def test_train_bad_input_matrix(self, tiny, bad_files, tmp_path):
        d, out = bad_files, lambda name: tmp_path / name
        base = train_argv(tiny, "OUT", "--steps", "1")
        cases = [("no_folder", set_flag(base, "--videos", d / "missing"), "video folder does not exist"),
                 ("empty_folder", set_flag(base, "--videos", d / "empty"), "no videos found"),
                 ("unreadable_video", set_flag(base, "--videos", d / "junk"), "a.mp4: cannot read video"),
                 ("too_short_video", set_flag(base, "--videos", d / "short"), "shorter than 8 frames"),
                 ("no_base", set_flag(base, "--base", d / "missing_sd"), "base model not found"),
                 ("base_cut", set_flag(base, "--base", d / "sd_cut"), "truncated or corrupt"),
                 ("base_wrong_kind", set_flag(base, "--base", tiny / "pipe" / "motion_module.safetensors"),
                  "not an SD single-file checkpoint"),
                 ("no_motion_module", set_flag(base, "--motion-module", d / "mm.ckpt"), "not found"),
                 ("motion_module_cut", set_flag(base, "--motion-module", d / "mm_cut.safetensors"),
                  "mm_cut.safetensors: not a readable .safetensors file"),
                 ("motion_module_wrong_kind", set_flag(base, "--motion-module",
                                                       tiny / "pipe/vae/diffusion_pytorch_model.safetensors"),
                  "not an AnimateDiff motion module"),
                 ("pickled_code", set_flag(base, "--motion-module", d / "evil.ckpt"), "refused: it pickles"),
                 ("odd_height", set_flag(base, "--height", 100), "--height 100"),
                 ("one_frame", set_flag(base, "--frames", 1), "--frames 1"),
                 ("frames_past_pe", set_flag(set_flag(base, "--frames", 40), "--videos", d / "long"),
                  "positional encoding holds 24"),
                 ("zero_steps", set_flag(base, "--steps", 0), "--steps 0"),
                 ("negative_lr", set_flag(base, "--lr", -1), "--lr"),
                 ("null_text_prob", set_flag(base, "--null-text-prob", 1.5), "--null-text-prob 1.5"),
                 ("unknown_branch", set_flag(base, "--detail-branches", "warp,flow"), "--detail-branches warp,flow"),
                 ("captions_json_typo", set_flag(base, "--videos", d / "captions"), "b.mp4 not among the videos"),
                 ("bad_sample_image", set_flag(base, "--sample-image", d / "garbage.png"), "cannot read image"),
                 ("no_resume", set_flag(base, "--resume", d / "missing_run"), "--resume"),
                 ("unwritable_out", set_flag(base, "--out", d / "a_file" / "run"), "cannot create it")]
        cases = [(n, [str(out(n)) if a == "OUT" else a for a in argv], m) for n, argv, m in cases]
        run_matrix("train.py", cases, lambda name: [out(name)])
        assert not (d / "PICKLE_RAN").exists()

    def test_sample_bad_input_matrix(self, sd, bad_files, tmp_path):
        d, out = bad_files, lambda name: tmp_path / f"{name}.mp4"
        base = ["--image", sd / "ref.png", "--base", sd, "--motion-module", sd / "motion_module.safetensors",
                "--prompt", "p", "--height", 64, "--width", 64, "--steps", 1, "--out", "OUT"]
        cases = [("no_image", set_flag(base, "--image", d / "missing.png"), "image not found"),
                 ("garbage_image", set_flag(base, "--image", d / "garbage.png"), "cannot read image"),
                 ("odd_height", set_flag(base, "--height", 100), "96 or 104"),
                 ("zero_steps", set_flag(base, "--steps", 0), "--steps 0"),
                 ("one_frame", set_flag(base, "--frames", 1), "--frames 1"),
                 ("zero_frames", set_flag(base, "--frames", 0), "--frames 0"),
                 ("loop_two_frames", set_flag(base, "--frames", 2) + ["--loop"], "--loop needs --frames 3"),
                 ("negative_loop_weight", base + ["--loop", "--loop-weight", -1], "--loop-weight -1"),
                 ("overlap_fills_window", set_flag(base, "--frames", 40) + ["--long", "windows", "--overlap", 15],
                  "--overlap 15"),
                 ("empty_image_folder", set_flag(base, "--image", d / "empty"), "no images"),
                 ("nan_guidance", set_flag(base, "--guidance", "nan"), "--guidance nan"),
                 ("negative_stg", set_flag(base, "--stg", -1), "--stg -1"),
                 ("zero_freeinit", set_flag(base, "--freeinit", 0), "--freeinit 0"),
                 ("freeinit_long", set_flag(base, "--frames", 40) + ["--freeinit", 3], "--freeinit re-samples one"),
                 ("zero_fps", set_flag(base, "--fps", 0), "--fps"),
                 ("base_cut", set_flag(base, "--base", d / "sd_cut"), "truncated or corrupt"),
                 ("no_weights", set_flag(base, "--base", d / "empty"), "empty"),
                 ("motion_module_cut", set_flag(base, "--motion-module", d / "mm_cut.safetensors"), "mm_cut"),
                 ("pickled_code", set_flag(base, "--motion-module", d / "evil.ckpt"), "refused: it pickles"),
                 ("no_checkpoint", set_flag(base, "--checkpoint", d / "missing_run"), "checkpoint not found"),
                 ("checkpoint_cut", set_flag(base, "--checkpoint", d / "ck_corrupt"), "truncated or corrupt"),
                 ("checkpoint_wrong_kind", set_flag(base, "--checkpoint", d / "ck_wrong"), "key foo.bar"),
                 ("unwritable_out", set_flag(base, "--out", d / "a_file" / "x.mp4"), "cannot write there")]
        cases = [(n, [str(out(n)) if a == "OUT" else a for a in argv], m) for n, argv, m in cases]
        run_matrix("sample.py", cases, lambda name: [out(name), out(name).with_suffix(".json")])
        assert not (d / "PICKLE_RAN").exists()
        ck = write_checkpoint(tmp_path / "ck64", {"unet.x": torch.zeros(1)}, height=64, width=64, prompt="p")
        run_matrix("sample.py", [("size_mismatch", ["--image", sd / "ref.png", "--checkpoint", ck, "--base", sd,
                                                    "--height", 128, "--width", 128, "--out", out("size")],
                                  "trained at 64x64, you asked for 128x128")], lambda name: [out("size")])


# ====================================================================================================
class TestDemo:
    """demo.py: the toy world, the scorer, the shipped base and the demo run"""

    # ------------------------------------------------------------------------- the toy world

    def test_demo_clips(self):
        clips, trajs = demo.make_demo_clips(6, frames=16, size=64, seed=0)
        clips2, trajs2 = demo.make_demo_clips(6, frames=16, size=64, seed=0)
        assert all(torch.equal(a, b) for a, b in zip(clips + trajs, clips2 + trajs2))
        r = demo.DEMO_RADIUS * 64
        for c, t in zip(clips, trajs):
            assert c.shape == (16, 3, 64, 64) and c.min() >= -1 and c.max() <= 1 and t.shape == (16, 2)
            assert torch.allclose(t, demo.demo_trajectory(t[0], 16, 64))
            assert (t - r >= 0).all() and (t + r <= 64).all()  # object inside the frame
            assert (t[:, 0].max() - t[:, 0].min() >= 15) and (t[:, 1].max() - t[:, 1].min() >= 15)
            assert (demo.centroid_track(c) - t).abs().max() < 1.0
        plate = clips[0][0].clone()  # explicit background image: the frame with the disc painted over
        t0 = trajs[0][0].round().long()
        plate[:, t0[1] - 8:t0[1] + 9, t0[0] - 8:t0[0] + 9] = plate[:, t0[1] - 8:t0[1] + 9, :1].mean(-1, keepdim=True)
        assert (demo.centroid_track(clips[0], plate) - trajs[0]).abs().max() < 1.0
        assert demo.centroid_track(plate[None], plate).isnan().all()  # no foreground -> NaN

    def test_demo_references_unseen_looks_same_positions(self):
        clips, trajs = demo.make_demo_clips(32, seed=0)
        refs, starts = demo.make_demo_references(8, seed=1000)
        diag, diag_starts = demo.make_demo_references(8, seed=2000, ranges=demo.DEMO_DIAG)
        assert all(torch.equal(a, b) for a, b in zip(refs, demo.make_demo_references(8, seed=1000)[0]))

        def appearance(img, pos):  # (object hue, background hue) measured from the image
            hsv = data.rgb_to_hsv((img + 1) / 2)
            x, y = pos.round().long().tolist()
            return hsv[0, y, x].item(), hsv[0, 1, 1].item()

        train = [appearance(c[0], t[0]) for c, t in zip(clips, trajs)]
        test = [appearance(im, st) for im, st in zip(refs + diag, starts + diag_starts)]
        for k in range(2):
            assert max(a[k] for a in train) < min(b[k] for b in test)  # disjoint: object hue, bg hue
        box = lambda pts: (torch.stack(pts).amin(0), torch.stack(pts).amax(0))
        (lo, hi), (rlo, rhi) = box([t[0] for t in trajs]), box(starts)
        assert (rlo >= lo - 3).all() and (rhi <= hi + 3).all()  # held-out starts: within the training spread
        assert (hi - lo > 15).all()  # the training clips' starts spread over the frame
        assert all((s > hi).any() or (s < lo).any() for s in diag_starts)  # diagnostic: outside it
        for im, st in zip(refs + diag, starts + diag_starts):
            assert im.shape == (3, 64, 64)
            assert (demo.centroid_track(im[None])[0] - st).abs().max() < 1.0
        for st in diag_starts:  # the whole arc stays inside the frame there too
            traj = demo.demo_trajectory(st)
            r = demo.DEMO_RADIUS * 64
            assert (traj - r >= 0).all() and (traj + r <= 64).all()

    def test_references_are_other_shapes(self):
        g = torch.Generator().manual_seed(0)
        shapes = {demo.draw_look(g, demo.DEMO_REF)["shape"] for _ in range(20)}
        assert shapes == {"square", "diamond"} and not shapes & set(demo.DEMO_TRAIN["shapes"])
        looks = [demo.draw_look(g, demo.ALL) for _ in range(200)]
        assert {lk["shape"] for lk in looks} == set(demo.SHAPES)  # pretraining sees every shape
        for shape in demo.SHAPES:  # equal areas (the disc's), so no shape is easier to track
            look = dict(looks[0], shape=shape, bg1=torch.zeros(3), bg2=torch.zeros(3), obj=torch.ones(3))
            img = demo.render(look, torch.tensor([[32.0, 32.0]]))
            area = ((img[0, 0] + 1) / 2).sum().item()
            assert area == pytest.approx(math.pi * (demo.DEMO_RADIUS * 64) ** 2, rel=0.03), shape

    def test_generic_motion_follows_its_caption_and_is_never_the_action(self):
        clips, captions = demo.make_generic_clips(120, seed=4)
        assert len(set(captions)) > 20 and len(demo.MOTIONS) * len(demo.SHAPES) == 57
        assert not any("jump" in c for c in captions)
        for clip, caption in zip(clips, captions):
            track = demo.centroid_track(clip)
            assert not track.isnan().any(), caption  # inside the frame all along
            path = demo.motion_path(caption.split(" ", 2)[-1])  # one path per caption: what gate (b) scores
            assert (track - track[0] - path).norm(dim=-1).max() < 1.0, caption
            move = track[-1] - track[0]
            if "stays still" in caption or "circles" in caption:
                assert move.norm() < 1.0, caption  # a full circle comes back
            else:
                words = caption.split(maxsplit=3)[-1]
                want = torch.tensor(demo.DIRECTIONS[words], dtype=torch.float32)
                assert torch.cosine_similarity(move, want, dim=0) > 0.95, caption
                assert move.norm() == pytest.approx(demo.LINE * 64, abs=1.0), caption
            if "circles" in caption:  # clockwise on screen (y down): the first quarter goes up from the left
                assert (track - track[0]).norm(dim=-1).max() == pytest.approx(2 * demo.CIRCLE * 64, abs=1.0)
                assert (track[4, 1] < track[0, 1]) == caption.endswith(" clockwise"), caption
            assert not demo.score(clip, track[0])["performs"], caption  # never the target's jump

    # ------------------------------------------------------------------------- scoring

    def test_score_perfect_video_performs_and_static_floor_does_not(self):
        clips, trajs = demo.make_demo_clips(4, seed=3)
        for clip, traj in zip(clips, trajs):
            s = demo.score(clip, traj[0])
            assert s["mean_err"] < 0.5 and s["end_err"] < 0.5 and s["peak_err"] < 0.5 and s["performs"]
            assert s["jitter"] < 0.5  # the rendering's sub-pixel noise only
            static = demo.score(clip[:1].expand_as(clip), traj[0])
            assert not static["performs"]
            assert static["end_err"] == pytest.approx(demo.DISP, abs=0.5)  # the whole displacement is missed
            assert static["peak_err"] == pytest.approx(demo.JUMP, abs=0.5)
            assert static["mean_err"] > 10
        backwards = demo.score(clips[0].flip(0), trajs[0][0])  # the motion run backwards does not count
        assert not backwards["performs"]

    def test_score_counts_a_lost_object_as_the_frame_size(self):
        clip, traj = demo.make_demo_clips(1, seed=5)
        empty = clip[0].clone()
        empty[1:] = empty[1:, :, :1, :1]  # frames 2.. are the background colour of the corner: no disc found
        s = demo.score(empty, traj[0][0])
        assert s["end_err"] == 64.0 and not s["performs"]

    def test_scorer_ignores_speckle(self):
        # ground truth: clean clips with 2 % of the pixels replaced by random colours (the generated backgrounds'
        # speckle). Without the tracker's 3x3 majority filter: mean err 3.7 px, jitter 2.5 px, performs 4 of 8;
        # with it the clean clip's own numbers (< 0.5 px)
        clips, trajs = demo.make_demo_clips(8, seed=3)
        g = torch.Generator().manual_seed(0)
        for clip, traj in zip(clips, trajs):
            hit = torch.rand(len(clip), 1, 64, 64, generator=g) < 0.02
            speckled = torch.where(hit, torch.rand(clip.shape, generator=g) * 2 - 1, clip)
            s, clean = demo.score(speckled, traj[0]), demo.score(clip, traj[0])
            assert s["performs"] and s["mean_err"] < 0.5 and s["jitter"] < 0.6, s
            assert abs(s["mean_err"] - clean["mean_err"]) < 0.3
            assert not demo.score(speckled.flip(0), traj[0])["performs"]  # reversed, speckled: still refused
            assert not demo.score(speckled[:1].expand_as(clip), traj[0])["performs"]  # static, speckled

    def test_jitter_measures_shake_beyond_the_true_motion(self):
        clip, traj = demo.make_demo_clips(1, seed=6)
        look = dict(shape="disc", obj=torch.ones(3), bg1=-torch.ones(3), bg2=-torch.ones(3), split=0.5)
        offset = demo.render(look, traj[0] + torch.tensor([3.0, -2.0]))  # a constant offset is not jitter
        assert demo.score(offset, traj[0][0])["jitter"] < 0.5
        shake = torch.tensor([[2.0, 0.0], [-2.0, 0.0]]).repeat(8, 1)  # +-2 px every other frame
        s = demo.score(demo.render(look, traj[0] + shake), traj[0][0])
        assert s["jitter"] == pytest.approx(8.0, abs=0.6)  # |d2| of the shake: 2 + 4 + 2

    def test_background_psnr(self):
        clips, trajs = demo.make_demo_clips(2, seed=7)
        clip, start = clips[0], trajs[0]
        assert demo.background_psnr(clip, clip[0], start) > 40  # only the moving disc differs, and it is masked out
        noisy = (clip + 0.1 * torch.randn(clip.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
        assert demo.background_psnr(noisy, clip[0], start) == pytest.approx(10 * math.log10(4 / 0.01), abs=1.0)
        assert demo.background_psnr(clips[1], clip[0], start) < 30  # another clip's background

    def test_background_psnr_when_the_object_is_never_found(self):
        # a video with no object in any frame (a base that drew none): every pixel is background, scored as a whole;
        # before, the empty centroid list crashed the gates (measure_base) after a whole pretraining run
        g = torch.Generator().manual_seed(1)
        blank = torch.full((16, 3, 64, 64), -0.5)
        noisy = blank + 0.1 * torch.randn(blank.shape, generator=g)
        lost = torch.full((16, 2), math.nan)
        assert demo.background_psnr(noisy, blank[0], lost) == pytest.approx(10 * math.log10(4 / 0.01), abs=0.2)
        s = demo.follow_scores(noisy.clamp(-1, 1), demo.motion_path("moves right"))
        # follow_scores compares frames 2..16 with frame 1, both noisy: twice the noise variance
        assert s["mean_err"] == 64.0 and s["bg_psnr"] == pytest.approx(10 * math.log10(4 / 0.02), abs=0.2)

    def test_summary_averages(self):
        rows = [dict(mean_err=1.0, end_err=2.0, peak_err=3.0, jitter=0.5, performs=True),
                dict(mean_err=3.0, end_err=4.0, peak_err=5.0, jitter=1.5, performs=False)]
        s = demo.summary(rows)
        assert (s["mean_err"], s["end_err"], s["peak_err"], s["jitter"], s["performs"]) == (2.0, 3.0, 4.0, 1.0, 0.5)

    # ------------------------------------------------------------------------- the toy base

    def test_shipped_base_is_intact_small_and_strict(self):
        build = json.loads((demo.BASE / "build.json").read_text())
        files = [p for p in demo.BASE.rglob("*") if p.is_file() and p.name != "build.json"]
        assert sorted(str(p.relative_to(demo.BASE)) for p in files) == sorted(build["sha256"])
        for p in files:  # the weights in git are the ones build.json (and docs/demo.md) name
            assert hashlib.sha256(p.read_bytes()).hexdigest() == build["sha256"][str(p.relative_to(demo.BASE))], p
        assert sum(p.stat().st_size for p in demo.BASE.rglob("*")) <= 20 * 2**20
        for stage, (first, last) in build["losses"].items():
            assert last < first, stage
        assert build["mixed_noise"] == demo.MIXED_NOISE  # the prior the demo trains with (it samples with SAMPLE_SHARE)
        assert build["shared_noise_mean"] == demo.SHARED_MEAN and build["loss_weight"] == "max(1, 1/SNR)"
        assert build.get("prediction_type", "epsilon") == demo.PREDICTION  # rebuild 5 predates the key (epsilon)
        assert set(build["gates"]["passed"]) == set(demo.GATES) and len(build["gate_rows"]["t2v"]) == len(demo.MOTIONS)
        pipe = demo.load_base(demo.BASE, "cpu")  # sample.py's strict loader, the SD-1.5 + AnimateDiff layouts
        assert pipe.info["motion_version"] == "v2" and pipe.info["unet_format"] == "diffusers"
        assert pipe.prediction_type == demo.PREDICTION  # read from its scheduler/scheduler_config.json
        window = tuple(pipe.unet.config.motion_window)  # read from unet/config.json: the one demo.py builds with
        assert window == tuple(build.get("motion_window", ())) == tuple(demo.UNET_CFG.motion_window)
        proj = [p for k, p in pipe.unet.named_parameters() if "temporal_transformer.proj_out.weight" in k]
        assert proj and all(p.abs().max() > 0 for p in proj)  # pretrained: no longer AnimateDiff's zero init
        sd = load_file(demo.BASE / "motion_module.safetensors")  # AnimateDiff's own key layout
        assert all(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) and ".motion_modules." in k for k in sd)
        embeds = S.encode_prompt(pipe, ["a disc moves left", "a disc moves right", "a square moves left", ""])
        flat = embeds.flatten(1)
        sims = torch.cosine_similarity(flat[:, None], flat[None], dim=-1)
        assert (sims[~torch.eye(4, dtype=bool)] < 0.999).all()  # the text encoder tells the prompts apart

    @pytest.mark.parametrize("kind", S.PREDICTION_TYPES)
    def test_pretrain_loss_is_truncated_snr_weighted(self, kind, monkeypatch):
        # a stub U-Net that returns the true noise + c: each sample's eps-MSE is c^2, so the loss must be
        # c^2 * mean_t max(1, (1 - a_t) / a_t) (Salimans & Ho's truncated SNR weighting) over the t it was called with;
        # a stub v-model (PREDICTION "v_prediction") returning the true v = sqrt(a) eps - sqrt(1 - a) x_0 + c has eps
        # error sqrt(a) c, so there the loss must be c^2 * mean_t a_t max(1, (1 - a_t) / a_t) = c^2 mean max(a_t, 1 - a_t)
        monkeypatch.setattr(demo, "PREDICTION", kind)
        acp, z0, c, seen = S.alphas_cumprod(), torch.randn(64, 4, 3, 4, 4), 0.1, []

        def unet(x, t, ctx):
            seen.append(t)
            a = acp[t].view(-1, 1, 1, 1, 1)
            eps = (x - a.sqrt() * z0) / (1 - a).sqrt()
            return (eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z0) + c
        loss = demo.diffusion_loss(unet, z0, None, acp, torch.Generator().manual_seed(0))
        a = acp[seen[0]]
        weight = torch.maximum(torch.ones_like(a), (1 - a) / a) * (1 if kind == "epsilon" else a)
        assert seen[0].unique().numel() > 10 and ((1 - a) / a > 1).any() and ((1 - a) / a < 1).any()
        assert loss.item() == pytest.approx((c ** 2 * weight.mean()).item(), rel=1e-4)
        if kind == "v_prediction":
            assert loss.item() == pytest.approx((c ** 2 * torch.maximum(a, 1 - a).mean()).item(), rel=1e-4)

    def test_pretrain_image_to_video_batches_keep_frame_one_clean(self):
        # clean_first: the U-Net must see frame 1 exactly clean and frames 2..F noised per q(x_t | x_0); a stub that is
        # right on frames 2..F up to c and wrong by 100 on frame 1 must score c^2 * mean max(1, 1/SNR_t) (frame 1 unscored)
        acp, z0, c, seen = S.alphas_cumprod(), torch.randn(64, 4, 3, 4, 4), 0.1, []
        assert demo.PREDICTION == "epsilon"

        def unet(x, t, ctx):
            seen.append((x.clone(), t))
            a = acp[t].view(-1, 1, 1, 1, 1)
            eps = (x - a.sqrt() * z0) / (1 - a).sqrt() + c
            eps[:, :, 0] = 100.0
            return eps
        loss = demo.diffusion_loss(unet, z0, None, acp, torch.Generator().manual_seed(0), clean_first=True)
        x, t = seen[0]
        a = acp[t]
        assert torch.equal(x[:, :, 0], z0[:, :, 0]) and not torch.allclose(x[:, :, 1], z0[:, :, 1])
        assert loss.item() == pytest.approx((c ** 2 * torch.maximum(torch.ones_like(a), (1 - a) / a).mean()).item(),
                                            rel=1e-4)

    def test_pretrain_fast_writes_loadable_layouts(self, tmp_path):
        result = demo.main(["pretrain", "--fast", "--threads", "1", "--out", str(tmp_path / "base")])
        build = json.loads((tmp_path / "base" / "build.json").read_text())
        assert build["steps"] == demo.PRETRAIN_FAST and len(result["motion_losses"]) == demo.PRETRAIN_FAST["motion"]
        for name, digest in build["sha256"].items():  # the recorded hashes are the written files'
            assert hashlib.sha256((tmp_path / "base" / name).read_bytes()).hexdigest() == digest, name
        assert {"unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                "text_encoder/config.json", "tokenizer/vocab.json", "motion_module.safetensors",
                "scheduler/scheduler_config.json"} <= set(build["sha256"])
        pipe = demo.load_base(tmp_path / "base", "cpu")
        assert pipe.prediction_type == build["prediction_type"] == demo.PREDICTION
        assert pipe.unet.config.block_out_channels == demo.UNET_CFG.block_out_channels
        assert all(a.cross_frame for a in T.cross_frame_layers(pipe.unet))  # FLASH's attention back on
        with pytest.raises(FileNotFoundError, match="demo.py pretrain"):
            demo.load_base(tmp_path / "nothing", "cpu")

    def test_check_base_measures_the_gates(self, tmp_path):
        r = demo.main(["--check-base", "--fast", "--threads", "1", "--out", str(tmp_path)])
        saved = json.loads((tmp_path / "gates.json").read_text())
        assert saved["measured"]["vae_psnr"] == pytest.approx(r["vae_psnr"])
        for mode in ("t2v", "i2v"):
            assert {"mean_err", "end_err", "jitter", "bg_psnr"} <= set(r[mode]) and np.isfinite(r[mode]["mean_err"])
        assert set(r["passed"]) == set(demo.GATES)
        build = json.loads((demo.BASE / "build.json").read_text())
        assert r["t2v_noise"]["mixed_noise"] == build["mixed_noise"]  # gate (b): the prior the base was trained with
        assert saved["measured"]["t2v_noise"] == r["t2v_noise"] and saved["measured"]["i2v_noise"] == r["i2v_noise"]
        # the gates' scorer on ground truth: a rendered generic clip follows its caption exactly, its background stays
        clips, captions = demo.make_generic_clips(3, seed=9)
        for clip, caption in zip(clips, captions):
            s = demo.follow_scores(clip, demo.motion_path(caption.split(" ", 2)[-1]))
            assert s["mean_err"] < 1.0 and s["jitter"] < 0.6 and s["bg_psnr"] > 40, caption
            assert demo.follow_scores(clip.flip(0), demo.motion_path("moves right"))["mean_err"] > 3 or \
                "still" in caption or "circles" in caption
        assert demo.vae_psnr(demo.load_base(demo.BASE, "cpu").vae, n=16) > 25

    # ------------------------------------------------------------------------- the demo run (--fast)

    def test_fast_demo_writes_videos_sheet_and_scores(self, fast_run):
        out, n = fast_run["out"], fast_run["report"]["n_refs"]
        for name in ("base", "flash"):
            for i in range(n):
                for ext in ("gif", "mp4"):
                    frames, fps = data.read_video(out / name / "held_out" / f"ref{i}.{ext}")
                    assert frames.shape == (demo.FRAMES, demo.SIZE, demo.SIZE, 3)
                    assert fps == pytest.approx(demo.FPS, rel=0.05)
        with Image.open(out / "flash_contact_sheet.png") as sheet:  # a training clip, then one row per reference
            assert sheet.size == (demo.FRAMES * demo.SIZE, (n + 1) * demo.SIZE)
        report = json.loads((out / "scores.json").read_text())
        for key in ("#5", "base", "static"):
            assert {"mean_err", "end_err", "peak_err", "jitter", "performs", "per_reference"} <= set(report[key])
            assert len(report[key]["per_reference"]) == n
        assert "bg_psnr" in report["#5"] and report["static"]["performs"] == 0.0
        assert set(report["validation_loss"]) == {"base", "#1", "#2", "#5"}
        assert all(np.isfinite(v) for v in report["validation_loss"].values())  # falls over the full run: README
        trained = load_file(out / "flash" / "flash.safetensors")
        base = load_file(demo.BASE / "motion_module.safetensors")
        shared = [k for k in base if "unet." + k in trained]
        assert len(shared) > 100  # the motion-module tensors, under the same names
        moved = [k for k in shared if not torch.equal(base[k], trained["unet." + k])]
        assert moved  # the few FLASH steps changed the base's motion modules
        assert (out / "reference.png").is_file() and (out / "flash" / "flash.safetensors").is_file()
        assert set(fast_run["table"]) == {"#1", "#2", "#5", "#6", "base", "static"}  # --ablation: Table 2's variants
        assert set(fast_run["diagnostic"]) == set(fast_run["table"])  # and the unseen-position row set
        assert set(report["diagnostic"]["#5"]) >= {"mean_err", "performs", "bg_psnr", "per_reference"}
        gif, _ = data.read_video(out / "demo.gif")  # the README's picture: 3 columns, upscaled, one row per reference
        assert gif.shape[0] == demo.FRAMES and gif.shape[2] == 3 * 3 * demo.SIZE and gif.shape[1] > n * 3 * demo.SIZE
        assert (out / "demo.gif").stat().st_size <= 2 * 2**20
        decoder = load_file(out / "flash_decoder" / "flash.safetensors")  # #6: train.py's decoder stage ran
        assert decoder and all(".detail." in k for k in decoder)
        ablation = json.loads((out / "ablation.json").read_text())
        assert ablation["seeds"] == [0] and ablation["table"]["#5"]["mean_err"]["per_seed"] == [report["#5"]["mean_err"]]
        settings = {k: json.loads((out / d / "settings.json").read_text()) for k, d in
                    (("#1", "no_aug"), ("#2", "no_align"), ("#5", "flash"), ("#6", "flash_decoder"))}
        for key, (_, _, switches) in demo.VARIANTS.items():  # each variant trained with its own train.py switches
            assert {k: settings[key][k] for k in switches} == switches, key
        assert settings["#6"]["stage"] == "decoder"
        assert all(settings[k]["mixed_noise"] == demo.MIXED_NOISE for k in ("#1", "#2", "#5"))  # the base's prior
        assert all(settings[k]["steps"] == 3 and settings[k]["lr_schedule"] == demo.FLASH["lr_schedule"]
                   and settings[k]["ema_decay"] == demo.FLASH["ema_decay"]
                   and settings[k]["loss_weight"] == demo.FLASH["loss_weight"] == "trunc-snr"
                   for k in ("#1", "#2", "#5")) and report["flash"]["steps"] == 3  # --flash-steps reaches train.py

    def test_ablation_table_mean_and_spread(self, capsys):
        rows = lambda e: dict(mean_err=e, end_err=e, peak_err=e, jitter=e, performs=e > 1, per_reference=[{}])
        reports = [{"seed": s, "#5": rows(e), "static": rows(9.0)} for s, e in ((0, 1.0), (1, 2.0), (2, 4.0))]
        table = demo.print_table(reports)
        assert table["#5"]["mean_err"] == dict(mean=7 / 3, spread=1.5, per_seed=[1.0, 2.0, 4.0])  # half the range
        assert table["#5"]["performs"]["mean"] == pytest.approx(2 / 3) and "bg_psnr" not in table["#5"]
        assert "FLASH (#5)" in capsys.readouterr().out

    def test_fast_demo_result_reloads_through_sample_py(self, fast_run):
        out, report = fast_run["out"], fast_run["report"]
        pipe = S.load_pipeline(demo.BASE, demo.BASE / "motion_module.safetensors", [out / "flash"], device="cpu",
                               dtype="fp32", verbose=False)
        refs, starts = demo.make_demo_references(1, seed=1000 + report["seed"])
        video = S.animate(pipe, refs[0], demo.PROMPT, frames=demo.FRAMES, height=demo.SIZE, width=demo.SIZE,
                          seed=report["seed"], progress=False, **report["sampling"])
        again = S.animate(fast_run["pipe"], refs[0], demo.PROMPT, frames=demo.FRAMES, height=demo.SIZE,
                          width=demo.SIZE, seed=report["seed"], progress=False, **report["sampling"])
        assert np.abs(video.astype(int) - again.astype(int)).max() <= 1  # the saved files are the demo's model
        s = demo.score(demo.to_tensor(video), starts[0])
        assert s["mean_err"] == pytest.approx(report["#5"]["per_reference"][0]["mean_err"], abs=0.05)
        gif, _ = data.read_video(out / "flash" / "held_out" / "ref0.gif")
        assert np.abs(gif.astype(int) - video.astype(int)).mean() < 3  # the written GIF (palette-quantised)


# ====================================================================================================
class TestBench:
    """bench.py: FLOP counter and smoke run"""

    def test_flops_match_published_counts(self):
        """Analytic counts (BK-SDM's 339 GMAC for the U-Net without attention, plus attention): SD-1.5 U-Net 0.803 TFLOP
        per 64² frame, 1.109 with the v2 motion module (16 frames), VAE decoder ~2.5 TFLOP per 512² frame, a 16-frame
        25-step CFG sample ≈ 927 TFLOP. Pure arithmetic."""
        full = M.UNetConfig()
        spatial = B.unet_flops(M.UNetConfig(motion_modules=False), 64, 64, 1)[0]
        video = B.unet_flops(full, 64, 64, 16)[0] / 16
        assert abs(spatial / 0.803e12 - 1) < 0.03, spatial
        assert abs(video / 1.109e12 - 1) < 0.03, video
        dec = B.decoder_flops(VAEConfig(), 64, 64, 1)
        assert abs(dec / 2.5e12 - 1) < 0.03, dec
        sample = 25 * B.unet_flops(full, 64, 64, 16, batch=2)[0] + B.decoder_flops(VAEConfig(), 64, 64, 16)
        assert abs(sample / 927e12 - 1) < 0.03, sample
        fwd, wgrad = B.unet_flops(full, 64, 64, 16, batch=2)
        assert fwd * 3 < B.train_flops(fwd, wgrad) < fwd * 3.4  # recompute + the trainable set's weight grads
        # FLASH's cross-frame attn1 doubles the keys: + one more self-attention QK^T/AV, ~122 GFLOP per 64² frame
        extra = B.unet_flops(M.UNetConfig(motion_modules=False, cross_frame=True), 64, 64, 1, cross_frame=True)[0] - spatial
        assert abs(extra / 122e9 - 1) < 0.03, extra

    @pytest.mark.parametrize("cross_frame", [False, True])
    def test_flops_match_torch_flop_counter(self, cross_frame, one_thread):
        """Exact cross-check on a small odd-sized config: torch counts convs, matmuls and (math) SDPA the same way."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode
        cfg = M.UNetConfig(block_out_channels=(32, 64, 64, 64), attention_heads=2, cross_attention_dim=16,
                           norm_num_groups=8, motion_heads=2, cross_frame=cross_frame)
        unet = M.UNet(cfg).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            unet(torch.randn(2, 4, 3, 10, 6), torch.tensor([3, 4]), torch.randn(2, 7, 16))
        want = B.unet_flops(cfg, 10, 6, 3, batch=2, ctx_len=7, cross_frame=cross_frame)[0]
        assert abs(fc.get_total_flops() / want - 1) < 1e-3  # only the time-embedding MLP is left out
        vcfg = VAEConfig(block_out_channels=(32, 64, 64, 64), norm_num_groups=8)
        with torch.no_grad(), FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            VAE(vcfg).eval().decode(torch.randn(3, 4, 6, 5))
        assert fc.get_total_flops() == B.decoder_flops(vcfg, 6, 5, 3)

    def test_bench_tiny_smoke(self, tmp_path, capsys, one_thread):
        """The GPU script (--all) end to end at tiny size: every eager row, one compiled row (dynamo tracing only on
        CPU), each measured row's estimate beside it."""
        pytest.importorskip("diffusers")
        out = tmp_path / "b.json"
        res = B.main(["--device", "cpu", "--tiny", "--all", "--compile-rows", "decoder", "--compile-backend", "eager",
                      "--repeats", "1", "--train-repeats", "1", "--warmup", "0", "--json", str(out)])
        text = capsys.readouterr().out
        for row in ("unet fwd, cross-frame off", "unet fwd, cross-frame on", "sample 2 steps + decode",
                    "train step, align on", "train step, align off", "decoder-stage step", "decoder-stage step, compiled"):
            assert row in text and row in res["rows"]
        r = res["rows"]["unet fwd, cross-frame off"]
        assert r["rel_diff"] <= 1e-4, r  # ours == diffusers' UNetMotionModel (per-frame motion GroupNorm) on the same files
        assert all(v["ours_s"] > 0 and v["flops"] > 0 for v in res["rows"].values())
        for row in ("sample 2 steps + decode", "train step, align on", "decoder-stage step"):
            r = res["rows"][row]  # no CUDA: no measured peak, the estimate still computed
            assert r["peak_bytes"] is None and r["est_peak_bytes"] > 0 and r["est_error"] is None
        train, plain = res["rows"]["train step, align on"], res["rows"]["train step, align off"]
        assert train["trainable_params"] == plain["trainable_params"] > 0 and 0 < train["aug_s"] < train["ours_s"]
        assert json.loads(out.read_text())["rows"].keys() == res["rows"].keys()

    def test_bench_without_diffusers(self, monkeypatch, capsys, one_thread):
        monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
        res = B.main(["--device", "cpu", "--tiny", "--rows", "unet", "--repeats", "1", "--warmup", "0"])
        r = res["rows"]["unet fwd, cross-frame off"]
        assert "diffusers_s" not in r and "ratio" not in r and r["ours_s"] > 0
        assert "diffusers absent" in capsys.readouterr().out


# ====================================================================================================
class TestMemory:
    """memory.py: the peak-GPU-memory estimate (meta tensors) and its three command lines"""

    def test_estimate_attention_by_hand(self):
        """LiveBytes on one attention module (meta tensors, trainable fp32 weights), against a hand count: the fused
        kernel keeps q, k, v (the projections), its output and a float32 logsumexp per query and head (plus an 8-byte
        RNG seed and offset), never the N h L x L scores. Under the CUDA autocast stand-in, each projection keeps
        its bf16 copy of x (for its weight grad), the trainable weights are cast once and cached until autocast
        exits; afterwards only to_out's copy stays (its input needs a grad, the others' does not)."""
        N, L, C, h = 3, 256, 64, 4
        with torch.device("meta"):
            attn, x = M.Attention(C, h), torch.empty(N, L, C)
        act = "activations, workspace"
        with MEM.LiveBytes(block=1) as track:
            for q in [x, *attn.parameters()]:
                track.add(q, "given")
            y = attn(x)
            assert track.kinds[act] == 5 * N * L * C * 4 + N * h * L * 4 + 16
            assert track.kinds[act] < N * h * L * L * 4  # the math path's scores alone would exceed it
            assert track.flops == 4 * 2 * N * L * C * C + 2 * 2 * N * h * L * L * (C // h)
        with MEM.LiveBytes(block=1) as track, MEM.MetaAutocast(torch.bfloat16):
            for q in [x, *attn.parameters()]:
                track.add(q, "given")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = attn(x)
                assert track.kinds[act] == 8 * N * L * C * 2 + 4 * C * C * 2 + C * 2 + N * h * L * 4 + 16
            assert y.dtype == torch.bfloat16 and track.kinds[act] == 8 * N * L * C * 2 + C * C * 2 + N * h * L * 4 + 16
            with torch.autocast("cpu", dtype=torch.bfloat16):  # CUDA's fp32 list: norms come out in float32
                x16 = torch.empty(2, 8, 4, 4, device="meta", dtype=torch.bfloat16)
                assert nn.functional.group_norm(x16, 2).dtype == torch.float32

    def test_estimate_full_size_weights_and_optimizer_bytes(self):
        """Full-size training step (2 frames of 64x64 px, so the AdamW step is the peak) and sample: the kinds at the
        peak against exact parameter counts. U-Net 859,520,964 + v2 motion modules 453,209,280; the trainable set
        (motion modules + attn1.to_k/to_v) 477,990,080 in fp32 with its grads, AdamW's two moments, and the one
        full-size temporary of the foreach AdamW (sqrt of the second moment); VAE 83,653,863 and text encoder
        123,060,480 in fp32; the motion modules' positional encodings, 21 modules x 2 attentions x 32 x C."""
        unet, mm, trainable, vae, clip = 859_520_964, 453_209_280, 477_990_080, 83_653_863, 123_060_480
        channels = 2 * (320 + 640 + 1280 + 1280) + 1280 + 3 * (1280 + 1280 + 640 + 320)
        pe = 2 * 32 * channels * 2  # bf16, as the U-Net
        e = MEM.estimate("train", train=MEM.train_args("unet", 2, 64, 64), block=1)
        got = e["at_peak"]
        assert e["phase"] == "AdamW step" and e["trainable_params"] == trainable
        assert got["frozen weights"] == 2 * (unet + mm - trainable) + pe + 4 * vae
        assert got["trainable (fp32)"] == got["gradients"] == 4 * trainable
        assert got["AdamW state"] == 2 * 4 * trainable
        assert 4 * trainable <= got["activations, workspace"] < 4 * trainable * 1.01
        e = MEM.estimate("sample", frames=2, height=64, width=64, detail=False, block=1)
        assert e["at_peak"]["frozen weights"] == 2 * (unet + mm) + pe + 4 * (vae + clip)

    def test_estimate_cli(self, tmp_path, capsys):
        """train.py's flags pass through; each switch moves the peak the way it must; bad settings are one line."""
        tiny = ["--estimate", "train", "--size", "tiny", "--frames", "4", "--height", "64", "--width", "64"]
        base = B.main(tiny)
        text = capsys.readouterr().out
        assert "peak" in text and "fits" in text and "assumed: SDPA runs a fused kernel" in text
        assert B.main(tiny + ["--no-gradient-checkpointing"])["peak"] > base["peak"]
        assert B.main(tiny + ["--no-strong-aug"])["peak"] < base["peak"]  # one clip, half the activations
        dec = B.main(tiny + ["--stage", "decoder", "--decoder-frames", "2", "--json", str(tmp_path / "e.json")])
        assert "decoder stage" in dec["what"] and json.loads((tmp_path / "e.json").read_text())["peak"] == dec["peak"]
        sample = ["--estimate", "sample", "--size", "tiny", "--frames", "4", "--height", "64", "--width", "64"]
        e = B.main(sample)
        assert "CFG batch of 2" in e["what"] and e["phase"] in ("U-Net forward", "VAE decode") and e["flops"] > 0
        stg = B.main(sample + ["--stg", "2"])  # STG's weak branch joins the CFG batch: 3 clips through the U-Net
        assert "+ 1 for STG" in stg["what"] and stg["flops"] > e["flops"]
        assert stg["phases"]["U-Net forward"] > e["phases"]["U-Net forward"]
        r = subprocess.run([sys.executable, str(HERE / "bench.py"), *sample[:-2], "--width", "60"], capture_output=True,
                           text=True, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.startswith("error: --width 60") and r.stderr.count("\n") == 1

    def test_estimate_memory_on_train_and_sample_equals_bench(self, tmp_path, capsys):
        """train.py / sample.py --estimate-memory print the estimate for exactly their flags without reading any
        weights or videos (none are given), with the numbers of bench.py --estimate for the same flags; sample.py's
        follows its own plan past the context length (phased over 8-frame calls here) and its text-to-video mode."""
        same = lambda a, b: {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items()
                                                                              if k != "seconds"}
        flags = ["--frames", "2", "--height", "64", "--width", "64", "--no-gradient-checkpointing"]
        t = T.main(["--estimate-memory", *flags])
        assert "memory estimate: training step, unet stage" in capsys.readouterr().out
        assert same(t, B.main(["--estimate", "train", *flags]))
        Image.new("RGB", (64, 64)).save(tmp_path / "ref.png")
        flags = ["--frames", "20", "--height", "64", "--width", "64", "--context-frames", "8", "--vae-dtype", "bf16"]
        s = S.main(["--estimate-memory", "--image", str(tmp_path / "ref.png"), *flags])
        assert "(phased, " in s["what"] and same(s, B.main(["--estimate", "sample", "--no-detail", *flags]))
        s = S.main(["--estimate-memory", *flags])  # no --image: text-to-video, windows over all 20 frames
        assert "(windows, " in s["what"] and same(s, B.main(["--estimate", "sample", "--no-detail", "--text-only",
                                                            *flags]))


# ====================================================================================================
class TestRepo:
    """the repository's own rules: a README a newcomer takes in, a paper map that names real functions, short
    functions in the core files"""

    def test_readme_short_and_its_links_exist(self):
        text = (HERE / "README.md").read_text()
        assert len(text.splitlines()) <= 150
        links = re.findall(r"(?<!!)\[[^\]]*\]\(([^)#:]+)\)", text)  # relative links, not images or URLs
        assert {"docs/paper.md", "docs/demo.md", "docs/performance.md", "docs/tests.md"} <= set(links)
        assert [link for link in links if not (HERE / link).exists()] == []

    def test_markdown_commands_sit_in_code_blocks(self):
        # a command line outside a ``` block renders as prose (and its "# comment" as a heading): it happened to the
        # README's command block once; every fence must also be closed
        stray = []
        for page in [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]:
            inside = False
            for n, line in enumerate(page.read_text().splitlines(), 1):
                if line.lstrip().startswith("```"):
                    inside = not inside
                elif not inside and re.match(r"(python|torchrun|bash|pip) ", line):
                    stray.append(f"{page.name}:{n}")
            stray += [f"{page.name}: unclosed ```"] if inside else []
        assert stray == []

    def test_paper_map_names_functions_that_exist(self):
        """In docs/paper.md every `name` after a `file.py` (same table cell or index line) is defined in that file."""
        missing, checked = [], 0
        for line in (HERE / "docs/paper.md").read_text().splitlines():
            cells = line.split("|")[1:3] if line.startswith("|") else [line]
            for cell in cells:
                file = None
                for token in re.findall(r"`([^`]+)`", cell):
                    if token.endswith(".py"):  # ours; others' (LAMP's inference_script.py) are not checked
                        file = (HERE / token).read_text() if (HERE / token).exists() else None
                    elif file and re.fullmatch(r"[A-Za-z_]\w*(\.\w+)?", token):
                        name = token.split(".")[-1]
                        checked += 1
                        if not re.search(rf"(def|class) {name}\b|\b{name}\s*(:[^=\n]*)?=", file):
                            missing.append(token)
        assert checked >= 30 and missing == []

    def test_core_functions_at_most_80_lines(self):
        import ast
        long = []
        for name in ("model", "vae", "clip_text", "data", "train", "sample"):
            for node in ast.walk(ast.parse((HERE / f"{name}.py").read_text())):
                if isinstance(node, ast.FunctionDef) and node.name != "get_parser":  # argparse builders exempt
                    n = node.end_lineno - node.lineno + 1
                    long += [f"{name}.{node.name}: {n}"] if n > 80 else []
        assert long == []



# ====================================================================================================
# metrics.py (App. A3.3's Cosine RGB / Cosine Flow / CD-FVD) against the reference code: cd-fvd's copies of
# pytorch-i3d, VideoMAE v2 and its Fréchet distance, and ptlflow's copy of princeton-vl's RAFT. Both packages are
# installed without their dependencies (.ci/run); their files are loaded by path, never imported as packages.
import argparse  # noqa: E402
import ast  # noqa: E402
import importlib.util  # noqa: E402
import types  # noqa: E402
from functools import partial  # noqa: E402

import metrics as MX  # noqa: E402


def oracle_path(package, rel):
    spec = importlib.util.find_spec(package)  # locates the package without running its __init__
    assert spec is not None, f"test oracle {package} not installed (.ci/run installs it with --no-deps)"
    return Path(spec.submodule_search_locations[0]) / rel


def oracle_module(package, rel, name):
    spec = importlib.util.spec_from_file_location(name, oracle_path(package, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def oracle_functions(package, rel, names, **namespace):
    """Only the named top-level functions/classes of an oracle file, executed in `namespace` (the rest of the file
    imports what CI does not install: requests, tqdm, torchvision, einops)"""
    tree = ast.parse(oracle_path(package, rel).read_text())
    nodes = [n for n in tree.body if getattr(n, "name", None) in names]
    assert len(nodes) == len(names), names
    exec(compile(ast.Module(nodes, []), str(rel), "exec"), namespace)
    return [namespace[n] for n in names]


def ptlflow_raft():
    """ptlflow's models/raft package (princeton-vl's RAFT code) with the few ptlflow/loguru/lightning imports of
    raft.py stubbed: BaseModel's pre/post-processing is the identity (inputs go in already in [-1, 1])."""
    class BaseModel(nn.Module):
        def __init__(self, **kwargs):
            super().__init__()

        def preprocess_images(self, images, **kwargs):
            return images, None

        def postprocess_predictions(self, x, resizer, is_flow):
            return x

    def stub(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return name, mod
    keep = lambda c: c
    stubs = dict([stub("loguru", logger=None), stub("ptlflow"), stub("ptlflow.utils"),
                  stub("ptlflow.utils.registry", register_model=keep, trainable=keep, ptlflow_trained=keep),
                  stub("ptlflow.utils.utils", forward_interpolate_batch=None),
                  stub("ptlflow.utils.correlation", IterativeCorrBlock=None), stub("oracle_ptl"),
                  stub("oracle_ptl.base_model"), stub("oracle_ptl.base_model.base_model", BaseModel=BaseModel)])
    folder = oracle_path("ptlflow", "models/raft")
    saved = {k: sys.modules.get(k) for k in [*stubs, "oracle_ptl.raft"]}
    try:
        sys.modules.update(stubs)
        spec = importlib.util.spec_from_file_location("oracle_ptl.raft", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        mod = sys.modules["oracle_ptl.raft"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)
    return mod


def torchvision_raft():
    """torchvision's models/optical_flow/raft.py from the unpacked wheel in .oracles/ (.ci/run puts it there; never
    installed: torchvision's package __init__ does not import next to the CPU torch, and transformers would find it).
    The package __init__s are skipped; the few helpers raft.py imports for its weight registry are stubbed."""
    root = HERE / ".oracles" / "torchvision" / "torchvision"
    if not (root / "models/optical_flow/raft.py").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{root}: torchvision's sources missing (.ci/run unpacks the torchvision==0.28.0 wheel there)")
        pytest.skip("torchvision's sources not unpacked in .oracles/ (see .ci/run)")

    class WeightsEnum(__import__("enum").Enum):
        @classmethod
        def verify(cls, w):
            return w

    def module(name, path=None, file=None, **attrs):
        if file:
            spec = importlib.util.spec_from_file_location(name, root / file)
            mod = sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        mod = sys.modules[name] = types.ModuleType(name)
        mod.__dict__.update(attrs)
        if path is not None:
            mod.__path__ = [str(root / path)]
        return mod
    saved = {k: v for k, v in sys.modules.items() if k.startswith("torchvision")}
    try:
        module("torchvision", "")
        module("torchvision.utils", file="utils.py")
        module("torchvision.ops", Conv2dNormActivation=module("torchvision.ops.misc", file="ops/misc.py")
               .Conv2dNormActivation)
        module("torchvision.transforms", "transforms")
        module("torchvision.transforms._presets", OpticalFlow=object)
        module("torchvision.models", "models")
        module("torchvision.models._api", register_model=lambda *a, **k: (lambda f: f), Weights=dict,
               WeightsEnum=WeightsEnum)
        module("torchvision.models._utils", handle_legacy_interface=lambda **k: (lambda f: f))
        module("torchvision.models.optical_flow", "models/optical_flow")
        return module("torchvision.models.optical_flow.raft", file="models/optical_flow/raft.py")
    finally:
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]
        sys.modules.update(saved)


def videomae_oracle():
    return oracle_module("cdfvd", "third_party/VideoMAEv2/videomaev2_finetune.py", "oracle_videomae")


def random_net(module, seed):
    """randomize_ plus BatchNorm statistics away from 0 / 1, so a swapped running mean or variance shows"""
    randomize_(module, seed)
    g = gen(seed + 100)
    with torch.no_grad():
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return module.eval()


def live_net(module, seed, sample):
    """random_net whose BatchNorm statistics are those of `sample` (one training-mode pass with momentum 1): a deep
    random ReLU net whose activations neither die nor drown in its biases, so its output depends on its input"""
    random_net(module, seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    with torch.no_grad():
        module.train()(sample) if not isinstance(module, MX.I3D) else module.train().features(sample)
    return module.eval()


def smooth_clip(n, c, t, seed, size=224):
    """n c t size size in [-1, 1]: random 3x3 layouts, trilinearly upsampled (structure, unlike white noise, which
    every spatially pooled network averages to the same features)"""
    x = torch.rand(n, c, t, 3, 3, generator=gen(seed)) * 2 - 1
    return F.interpolate(x, size=(t, size, size), mode="trilinear")


def small_vit_oracle(vm, num_classes=7):
    """A reduced VideoMAE v2 ViT of the oracle: 16x16 patches x 8 tubelets, as its position-table code assumes"""
    return vm.VisionTransformer(img_size=32, patch_size=2, embed_dim=48, depth=2, num_heads=4, mlp_ratio=48 / 11,
                                qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=num_classes,
                                all_frames=16, tubelet_size=2, use_mean_pooling=True)


class TestMetrics:
    """metrics.py and eval.py's motion metrics: parity with the reference networks on identical random weights,
    preprocessing and Fréchet distance equal to cd-fvd's, full-size counts, properties, the CLI and its errors"""

    def test_i3d_rgb_and_flow_match_pytorch_i3d(self, tmp_path):
        pi = oracle_module("cdfvd", "third_party/i3d/pytorch_i3d.py", "oracle_i3d")
        errs = []
        for cin, seed in ((3, 0), (2, 1)):
            ref = pi.InceptionI3d(400, in_channels=cin)
            t = 10 if cin == 3 else 9  # flow clips are one shorter (T frames, T - 1 flows): odd sizes' SAME padding
            live_net(ref, seed, smooth_clip(1, cin, t, seed))
            sd = ref.state_dict()
            if cin == 2:  # piergiaj's files predate BatchNorm's num_batches_tracked; cd-fvd's newer one has them
                sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
            torch.save(sd, tmp_path / "i3d.pt")
            ours = MX.load_net(MX.I3D(cin), tmp_path / "i3d.pt", "I3D")
            x = smooth_clip(2, cin, t, seed + 10)
            with torch.no_grad():
                logits = ours.features(x)
                assert MX.cosine(*logits) < 99.5  # features that depend on the input
                errs.append(rel_err(logits, ref(x)))
                if cin == 3:  # the other --i3d-features choice
                    errs.append(rel_err(ours.features(x, "pool"), ref.extract_features(x).mean((2, 3, 4))))
        print(f"I3D relative max diff: rgb logits {errs[0]:.1e}, rgb pool {errs[1]:.1e}, flow logits {errs[2]:.1e}")
        assert max(errs) <= 1e-4

    def test_raft_matches_princeton_vl_code(self, tmp_path):
        raft = ptlflow_raft()
        ref = random_net(raft.RAFT(iters=3), 2)
        torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "raft-things.pth")
        ours = MX.load_net(MX.RAFT(), tmp_path / "raft-things.pth", "RAFT")  # DataParallel layout
        a, b = (255 * torch.rand(2, 3, 128, 160, generator=gen(i)) for i in (3, 4))
        with torch.no_grad():
            want = ref({"images": torch.stack([2 * a / 255 - 1, 2 * b / 255 - 1], 1)})["flows"][:, 0]
            got = ours(a, b, iters=3)
        print(f"RAFT relative max diff (3 iterations, 128x160): {rel_err(got, want):.1e}")
        assert rel_err(got, want) <= 1e-4 and got.shape == (2, 2, 128, 160) and want.abs().max() > 1

    def test_raft_torchvision_layout_matches_torchvision(self, tmp_path):
        tv = torchvision_raft()
        ref = random_net(tv.raft_large(), 13)
        torch.save(ref.state_dict(), tmp_path / "raft_large.pth")  # torchvision's file: a plain state dict
        sd = MX.raft_state_dict(MX.read_weights(tmp_path / "raft_large.pth"))
        ours = MX.load_net(MX.RAFT(), tmp_path / "raft_large.pth", "RAFT", sd)
        a, b = (255 * torch.rand(1, 3, 128, 160, generator=gen(i)) for i in (14, 15))
        with torch.no_grad():
            want = ref(2 * a / 255 - 1, 2 * b / 255 - 1, num_flow_updates=3)[-1]
            got = ours(a, b, iters=3)
        print(f"RAFT (torchvision layout) relative max diff: {rel_err(got, want):.1e}")
        assert rel_err(got, want) <= 1e-4 and want.abs().max() > 1
        with torch.device("meta"):
            assert sum(p.numel() for p in tv.raft_large().parameters()) == 5_257_536

    def test_videomae_matches_reference_vit(self, tmp_path):
        vm = videomae_oracle()
        ref = random_net(small_vit_oracle(vm), 5)
        x = torch.rand(2, 3, 16, 32, 32, generator=gen(6))
        with torch.no_grad():
            want = ref.forward_features(x)
        # a training checkpoint: {'model': ...} beside its argparse.Namespace (loads without running code)
        torch.save({"model": ref.state_dict(), "epoch": 7, "args": argparse.Namespace(lr=1e-3, model="vit")},
                   tmp_path / "ft.pth")
        torch.save({"module": ref.state_dict()}, tmp_path / "module.pth")
        for f in ("ft.pth", "module.pth"):
            cfg = MX.vit_config(MX.read_weights(tmp_path / f), heads=4, img_size=32)
            ours = MX.load_net(MX.VideoMAE(cfg), tmp_path / f, "VideoMAE v2")
            with torch.no_grad():
                err = rel_err(ours.features(x), want)
            assert err <= 1e-4 and (cfg.dim, cfg.depth, cfg.mlp, cfg.num_classes) == (48, 2, 209, 7)
        print(f"VideoMAE v2 relative max diff (depth 2, width 48): {err:.1e}")

    def test_full_size_counts_and_keys_match_the_references(self, monkeypatch):
        pi = oracle_module("cdfvd", "third_party/i3d/pytorch_i3d.py", "oracle_i3d")
        vm, raft = videomae_oracle(), ptlflow_raft()
        linspace = torch.linspace  # the reference ViT reads its drop-path rates with .item(): keep them on the CPU
        monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
        count = lambda m: sum(p.numel() for p in m.parameters())
        with torch.device("meta"):
            pairs = [(MX.I3D(3), pi.InceptionI3d(400, in_channels=3)), (MX.I3D(2), pi.InceptionI3d(400, in_channels=2)),
                     (MX.RAFT(), raft.RAFT()),
                     (MX.VideoMAE(), vm.vit_giant_patch14_224(num_classes=174, all_frames=16, tubelet_size=2,
                                                              use_mean_pooling=True))]
        for ours, ref in pairs:
            assert count(ours) == count(ref) and set(ours.state_dict()) == set(ref.state_dict())
        assert [count(o) for o, _ in pairs] == [12_697_264, 12_675_312, 5_257_536, 1_011_855_918]

    def test_preprocessing_equals_cd_fvd(self):
        (pre_i3d,) = oracle_functions("cdfvd", "third_party/i3d/utils.py", ["preprocess_i3d"], torch=torch, F=F,
                                      TARGET_RESOLUTION=(224, 224))
        compose = lambda fs: lambda x: [x := f(x) for f in fs][-1]  # torchvision's Compose: apply in turn
        *_, pre_mae = oracle_functions(
            "cdfvd", "third_party/VideoMAEv2/utils.py",
            ["to_normalized_float_tensor", "resize", "ToFloatTensorInZeroOne", "Resize", "preprocess_videomae"],
            torch=torch, transforms=types.SimpleNamespace(Compose=compose))
        rng = np.random.default_rng(0)
        for shape in [(2, 5, 37, 53, 3), (1, 3, 300, 17, 3), (1, 2, 224, 224, 3)]:
            v = rng.integers(0, 256, shape, dtype=np.uint8)
            assert torch.equal(MX.i3d_input(v), pre_i3d(v))
            assert torch.equal(MX.videomae_input(v), pre_mae(v))
        short = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)  # shorter than the clip: the last frame repeats
        assert MX.clip(short, 5).shape[0] == 5 and (MX.clip(short, 5)[2:] == short[2]).all()

    @pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # the oracle's scipy call
    def test_frechet_distance_equals_cd_fvd(self):
        mu = oracle_module("cdfvd", "utils/metric_utils.py", "oracle_metric_utils")
        import scipy.linalg
        fns = oracle_functions("cdfvd", "fvd.py", ["cdfvd"], np=np, scipy=scipy, torch=torch,
                               FeatureStats=mu.FeatureStats, npt=__import__("numpy.typing").typing,
                               **{n: getattr(__import__("typing"), n) for n in ("List", "Optional", "Union")})
        fvd = fns[0].compute_fvd_from_stats
        rng = np.random.default_rng(1)
        for n_real, n_gen, d in [(64, 50, 8), (6, 5, 12)]:  # the second: fewer videos than dimensions
            real, fake = rng.normal(size=(n_real, d)), 0.5 + 1.3 * rng.normal(size=(n_gen, d))
            stats = [mu.FeatureStats(capture_mean_cov=True) for _ in range(2)]
            stats[0].append(real), stats[1].append(fake)
            want = fvd(None, stats[1], stats[0])
            assert abs(MX.frechet_distance(real.astype(np.float32), fake.astype(np.float32)) - want) <= 1e-6 * want

    def test_metric_properties(self):
        x = np.random.default_rng(2).normal(size=(40, 8))
        assert abs(MX.frechet_distance(x, x)) < 1e-9 and MX.frechet_distance(x, x + 0.1) > 0.079  # |0.1|² x 8
        f = torch.randn(3, 400, generator=gen(7))
        assert torch.allclose(MX.cosine(f, f), torch.full((3,), 100.0, dtype=torch.float64))
        assert MX.small_set_warning(1, 1, 1408).startswith("CD-FVD on 1 video") and "fewer than the 1408" in \
            MX.small_set_warning(30, 30, 1408) and MX.small_set_warning(2000, 2000, 1408) is None
        # a static video: RAFT whose update predicts no motion returns exactly zero flow (the coordinate grids, the
        # convex upsampling, the pad-and-crop of an odd size), and zero flow is I3D-flow's zero input
        raft = random_net(MX.RAFT(), 8)
        with torch.no_grad():
            raft.update_block.flow_head.conv2.weight.zero_(), raft.update_block.flow_head.conv2.bias.zero_()
            still = torch.full((1, 3, 3, 130, 150), 128.0)
            flow = MX.flow_input(lambda a, b, iters: raft(a, b, iters), still, iters=2)
        assert flow.shape == (1, 2, 2, 130, 150) and not flow.any()
        # flow_input: pairs in time order, pixels / bound, clipped at +-1
        fake = lambda a, b, iters: (b - a)[:, :2]
        video = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 3, 4, 2, 2) * torch.tensor([10.0, -30.0, 0.0]
                                                                                            ).view(1, 3, 1, 1, 1)
        out = MX.flow_input(fake, video, bound=20)
        assert torch.equal(out[0, :, :, 0, 0], torch.tensor([[0.5] * 3, [-1.0] * 3]))

    def test_batched_features_equal_one_by_one(self, tmp_path):
        """--metric-batch: videos of different sizes and lengths batched give each video's own features"""
        rng = np.random.default_rng(4)
        videos = []
        for i, (t, h, w) in enumerate([(12, 40, 56), (7, 32, 32), (16, 50, 30)]):
            videos.append(tmp_path / f"v{i}.gif")
            data.write_video(rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8), videos[-1])
        vit = random_net(MX.VideoMAE(MX.ViTConfig(dim=32, depth=1, heads=4, mlp=64, num_classes=5)), 16)
        feats = [MX.video_features({"videomae": vit}, videos, argparse.Namespace(metric_batch=b, motion_frames=10),
                                   torch.device("cpu"), torch.float32, "test")["videomae"] for b in (1, 2)]
        assert feats[0].shape == (3, 32) and torch.allclose(feats[0], feats[1], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(feats[0][0], feats[0][1], atol=1e-3)

    def test_cli_end_to_end_every_layout(self, clip_dir, tmp_path, capsys):
        """Two variants (Table 2 rows): 'same' = the ground truth itself, 'shuffled' = its frames out of order;
        random weights in the public layouts (a .pt state dict, DataParallel .pth, wrapped VideoMAE .pth,
        safetensors); the CLIP metrics in the same run, each video's scores side by side"""
        d = tmp_path
        rng = np.random.default_rng(3)
        base = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        video = np.stack([np.roll(base, (t, 3 * t), (0, 1)) for t in range(10)])
        for sub, v in [("real", video), ("same", video), ("shuffled", video[rng.permutation(10)])]:
            data.write_video(v, d / sub / "a")  # a folder of PNG frames: lossless
        Image.fromarray(base).save(d / "ref.png")
        from safetensors.torch import save_file as save
        raft = random_net(MX.RAFT(), 11)
        with torch.no_grad():
            flow = MX.flow_input(raft, MX.resize(video[None]), iters=1)
        save(live_net(MX.I3D(3), 9, MX.i3d_input(video[None])).state_dict(), d / "rgb.safetensors")
        torch.save(live_net(MX.I3D(2), 10, flow).state_dict(), d / "flow_imagenet.pt")
        torch.save({f"module.{k}": v for k, v in raft.state_dict().items()}, d / "raft.pth")
        vit = random_net(MX.VideoMAE(MX.ViTConfig(dim=32, depth=1, heads=4, mlp=64, num_classes=5)), 12)
        torch.save({"model": vit.state_dict(), "args": argparse.Namespace(batch_size=2)}, d / "vit.pth")
        with pytest.warns(UserWarning, match="CD-FVD on 1 video"):
            E.main(["--compare", f"same={d / 'same'}", f"shuffled={d / 'shuffled'}", "--real", str(d / "real"),
                    "--i3d-rgb", str(d / "rgb.safetensors"), "--i3d-flow", str(d / "flow_imagenet.pt"), "--raft",
                    str(d / "raft.pth"), "--videomae", str(d / "vit.pth"), "--videomae-heads", "4",
                    "--motion-frames", "10", "--raft-iters", "1", "--out", str(d / "scores.json"), "--clip",
                    str(clip_dir[1]), "--prompt", "a pattern drifts", "--reference", str(d / "ref.png")])
        out = capsys.readouterr().out
        res = json.loads((d / "scores.json").read_text())["variants"]
        same, shuffled = res["same"], res["shuffled"]
        assert abs(same["cosine_rgb"]["mean"] - 100) < 1e-6 and abs(same["cosine_flow"]["mean"] - 100) < 1e-6
        assert shuffled["cosine_flow"]["mean"] < 99.9 and shuffled["cosine_rgb"]["mean"] < 100 - 1e-6
        assert abs(same["cd_fvd"]) < 1e-6 and shuffled["cd_fvd"] > 1e-3 and "can" in same["cd_fvd_note"]
        assert "Cosine Flow" in out and "same (1 videos)" in out and "shuffled (1 videos)" in out
        assert "Text Alignment" in out and "text_alignment" in same and "temporal_consistency" in shuffled
        row = same["videos"][0]  # one row per video: CLIP's scores and the motion ones
        assert {"text_alignment", "cosine_rgb", "cosine_flow"} <= set(row) and row["real"].endswith("a")

    def test_cli_errors(self, tmp_path):
        d = tmp_path
        for sub in ("gen", "real", "real_extra", "wide"):
            (d / sub).mkdir()
        still = np.zeros((10, 32, 32, 3), np.uint8)
        for path in ("gen/a.gif", "real/a.gif", "real_extra/a.gif", "real_extra/b.gif"):
            data.write_video(still, d / path)
        data.write_video(np.zeros((10, 32, 64, 3), np.uint8), d / "wide" / "a.gif")
        torch.save(MX.I3D(3).state_dict(), d / "rgb.pt")
        torch.save({f"module.{k}": v for k, v in MX.RAFT().state_dict().items()}, d / "raft.pth")
        (d / "cut.pt").write_bytes((d / "rgb.pt").read_bytes()[:5000])
        torch.save({"Conv3d_1a_7x7.conv3d.weight": torch.zeros(1), "x": Unpickler(str(d / "PICKLE_RAN"))},
                   d / "evil.pt")
        base = ["--videos", d / "gen", "--real", d / "real", "--i3d-rgb", d / "rgb.pt", "--out", "OUT"]
        cases = [("missing_weights", set_flag(base, "--i3d-rgb", d / "nope.pt"), "weights file not found"),
                 ("corrupt_weights", set_flag(base, "--i3d-rgb", d / "cut.pt"), "truncated or corrupt"),
                 ("wrong_network", set_flag(base, "--i3d-rgb", d / "raft.pth"), "not a I3D-RGB checkpoint"),
                 ("rgb_for_flow", base + ["--i3d-flow", d / "rgb.pt", "--raft", d / "raft.pth"],
                  "Conv3d_1a_7x7.conv3d.weight (64, 3, 7, 7, 7) != expected (64, 2, 7, 7, 7)"),
                 ("real_without_partner", set_flag(base, "--real", d / "real_extra"), "b.gif: real video with no"),
                 ("generated_without_partner", set_flag(base, "--videos", d / "real_extra"), "b.gif: no ground-truth"),
                 ("mismatched_frame_sizes", set_flag(base, "--real", d / "wide"), "mismatched frame sizes"),
                 ("pickled_code", set_flag(base, "--i3d-rgb", d / "evil.pt"), "refused: it pickles"),
                 ("flow_without_raft", base + ["--i3d-flow", d / "rgb.pt"], "needs both --i3d-flow and --raft"),
                 ("videomae_wrong_network", base + ["--videomae", d / "raft.pth"], "not a VideoMAE v2 checkpoint"),
                 ("nothing_to_score", ["--videos", d / "gen", "--out", "OUT"], "nothing to score")]
        cases = [(n, [str(d / f"{n}.json") if a == "OUT" else a for a in argv], m) for n, argv, m in cases]
        run_matrix("eval.py", cases, lambda name: [d / f"{name}.json"])
        assert not (d / "PICKLE_RAN").exists()



# ----------------------------------------------------------------------------- export.py helpers

def flash_run(folder, base_dir, mm, trained_keys=T.is_trainable, seed=7, scale=0.3):
    """A train.py-style run folder over the `written` base: every tensor trained_keys picks moved by a random delta
    (per-row scaled, so deltas have full rank) -> (folder, {name: trained tensor})."""
    unet = M.load_unet(base_dir, mm)
    g = torch.Generator().manual_seed(seed)
    trained = {k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=g)
               for k, v in unet.state_dict().items() if trained_keys(k, "unet") and "pe" != k.rsplit(".", 1)[-1]}
    write_checkpoint(folder, {f"unet.{k}": v for k, v in trained.items()}, base=str(base_dir), motion_module=str(mm),
                     motion_version="v2")
    return Path(folder), trained


def ours_with(base_dir, mm, trained):
    """Our U-Net with cross-frame attention off (stock AnimateDiff attention) and the trained tensors in."""
    u = M.load_unet(base_dir, mm, cross_frame=False).eval()
    M.load_checked(u, trained, "trained", keys=list(trained))
    return u


def diffusers_lora_holder(unet):
    """The smallest object diffusers' pipeline LoRA loader (load_lora_weights) works on: it needs .unet only."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class Holder(StableDiffusionLoraLoaderMixin):
        text_encoder, lora_scale, hf_device_map, components = None, 1.0, None, {}

    h = Holder()
    h.unet = unet
    return h


def export_cli(*args):
    return subprocess.run([sys.executable, "export.py", *map(str, args)], cwd=HERE, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


class TestExport:
    """export.py: AnimateDiff / diffusers / MotionLoRA exports checked through diffusers' own loaders"""

    def test_export_diffusers_round_trip_matches_diffusers(self, written, tmp_path, capsys):
        pytest.importorskip("peft")
        from diffusers import MotionAdapter, UNet2DConditionModel
        d, _, _ = written
        run, trained = flash_run(tmp_path / "run", d / "sd", d / "mm_ad.safetensors")
        X.main([str(run), "--to", "diffusers", "--out", str(tmp_path / "out")])
        assert "attn1 K/V LoRA rank full: relative Frobenius error" in capsys.readouterr().out
        folder = tmp_path / "out" / "motion_adapter"
        adapter = MotionAdapter.from_pretrained(folder)
        fresh = MotionAdapter(**{k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                                 if not k.startswith("_")})
        assert set(load_file(folder / "diffusion_pytorch_model.safetensors")) == set(fresh.state_dict())  # strict
        ref = motion_oracle(UNet2DConditionModel.from_pretrained(d / "sd" / "unet"), adapter)
        diffusers_lora_holder(ref).load_lora_weights(str(tmp_path / "out" / "attn1_lora"))
        ours = ours_with(d / "sd", d / "mm_ad.safetensors", trained)
        x, t, ctx = inputs(frames=5, b=2, hw=(8, 12))
        with torch.no_grad():
            want = ref(x, t, encoder_hidden_states=ctx.repeat_interleave(5, 0)).sample
            got = ours(x, t, ctx)
            no_kv = ours_with(d / "sd", d / "mm_ad.safetensors",
                              {k: v for k, v in trained.items() if "motion_modules." in k})(x, t, ctx)
        assert rel_err(got, want) <= 1e-4, rel_err(got, want)
        assert rel_err(no_kv, want) > 1e-3  # the attn1 LoRA carried the K/V training

    def test_export_warns_only_for_a_windowed_base(self, written, tmp_path, capsys):
        d, _, _ = written
        shutil.copytree(d / "sd", tmp_path / "sd")
        cfg = tmp_path / "sd" / "unet" / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "motion_window": [1, 3, 3, 3]}))
        for name, base in (("plain", d / "sd"), ("window", tmp_path / "sd")):
            run, _ = flash_run(tmp_path / name, base, d / "mm_ad.safetensors")
            X.main([str(run), "--to", "lora", "--rank", "2", "--out", str(tmp_path / f"out_{name}")])
            err = capsys.readouterr().err
            assert ("warning: this base's motion modules attend over (1, 3, 3, 3)" in err) == (name == "window"), err

    def test_export_animatediff_loads_strictly_and_through_diffusers_converters(self, written, tmp_path):
        pytest.importorskip("peft")
        from diffusers import MotionAdapter, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
        d, _, adapter0 = written
        run, trained = flash_run(tmp_path / "run", d / "sd", d / "mm_ad.safetensors", seed=8)
        r = export_cli(run, "--to", "animatediff", "--out", tmp_path / "out")
        assert r.returncode == 0, r.stderr
        mm = tmp_path / "out" / "motion_module_v2.safetensors"
        got, base = load_file(mm), load_file(d / "mm_ad.safetensors")
        assert set(got) == set(base) and all(got[k].shape == base[k].shape for k in base)  # the base file's layout
        u = M.load_unet(d / "sd", mm)  # our strict loader
        assert u.info["motion_version"] == "v2"
        assert all(torch.equal(u.state_dict()[k], v) for k, v in trained.items() if "motion_modules." in k)
        conv = convert_animatediff_checkpoint_to_diffusers(got)  # diffusers' single-file AnimateDiff conversion
        ad = MotionAdapter(**{k: v for k, v in adapter0.config.items() if not k.startswith("_")})
        missing, unexpected = ad.load_state_dict(conv, strict=False)
        assert not unexpected and all(k.endswith("pos_embed.pe") for k in missing)
        ref = motion_oracle(UNet2DConditionModel.from_pretrained(d / "sd" / "unet"), ad.eval())
        diffusers_lora_holder(ref).load_lora_weights(str(tmp_path / "out" / "attn1_lora.safetensors"))  # kohya keys
        x, t, ctx = inputs(frames=4)
        with torch.no_grad():
            want = ref(x, t, encoder_hidden_states=ctx.repeat_interleave(4, 0)).sample
            got_out = ours_with(d / "sd", d / "mm_ad.safetensors", trained)(x, t, ctx)
        assert rel_err(got_out, want) <= 1e-4, rel_err(got_out, want)
        assert "attn1 K/V LoRA rank full: relative Frobenius error" in r.stdout and "MiB" in r.stdout

    def test_export_motion_lora_exact_at_full_rank_error_falls(self, written, tmp_path, capsys):
        pytest.importorskip("peft")
        from diffusers import MotionAdapter, UNet2DConditionModel
        d, _, _ = written
        proj = lambda k, stage: "motion_modules." in k and k.endswith(
            (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))
        run, trained = flash_run(tmp_path / "run", d / "sd", d / "mm_ad.safetensors", trained_keys=proj, seed=9)
        base = M.load_unet(d / "sd", d / "mm_ad.safetensors").state_dict()
        errs = []
        for rank in (1, 4, 16, 64):  # 64 = the largest projection's full rank in the tiny U-Net (32 and 64 wide)
            (f,) = X.main([str(run), "--to", "lora", "--rank", str(rank), "--out", str(tmp_path / f"r{rank}")])
            lora = load_file(f)
            assert all(".processor." in k and k.endswith(("_lora.down.weight", "_lora.up.weight")) for k in lora)
            num = den = 0.0
            for k in (k for k in lora if k.endswith(".down.weight")):  # merge as ComfyUI / AnimateDiff: W + up @ down
                w = k.replace("processor.", "").replace("_lora.down", "").replace("to_out.", "to_out.0.")
                assert lora[k].shape[0] == min(rank, *base[w].shape)  # above a layer's full rank: its full rank
                delta = lora[k.replace(".down.", ".up.")] @ lora[k]
                num += (base[w] + delta - trained[w]).square().sum().item()
                den += (trained[w] - base[w]).square().sum().item()
            errs.append((num / den) ** 0.5)
            printed = float(re.search(rf"rank {rank}: relative Frobenius error (\S+) ", capsys.readouterr().out)[1])
            assert printed == pytest.approx(errs[-1], rel=1e-3, abs=1e-6)  # the printed error is the one kept
        assert errs[-1] <= 1e-5 and errs[0] > errs[1] > errs[2] > errs[3], errs
        assert len(lora) == 2 * 4 * 2 * (2 * 4 + 1 + 3 * 4)  # down/up x q,k,v,out x 2 attentions x 21 motion modules
        (h,) = X.main([str(run), "--to", "lora", "--rank", "64", "--dtype", "fp16", "--out", str(tmp_path / "h")])
        half = load_file(h)
        assert all(half[k].dtype == torch.float16 and torch.equal(half[k], lora[k].half()) for k in lora)
        n = sum(v.numel() for v in lora.values())
        for file, width in ((Path(f), 4), (Path(h), 2)):  # safetensors: u64 header length, JSON header, the data
            assert file.stat().st_size == 8 + int.from_bytes(file.read_bytes()[:8], "little") + width * n
        # diffusers loads it after its own MotionLoRA conversion script's renaming (unet. prefix, diffusers names)
        converted = {"unet." + X.to_diffusers_name(k): v for k, v in lora.items()}
        ref = motion_oracle(UNet2DConditionModel.from_pretrained(d / "sd" / "unet"),
                            MotionAdapter.from_pretrained(d / "adapter"))
        diffusers_lora_holder(ref).load_lora_weights(converted)
        x, t, ctx = inputs(frames=4)
        with torch.no_grad():
            want = ref(x, t, encoder_hidden_states=ctx.repeat_interleave(4, 0)).sample
            got = ours_with(d / "sd", d / "mm_ad.safetensors", trained)(x, t, ctx)
        assert rel_err(got, want) <= 1e-4, rel_err(got, want)

    def test_export_refuses_bad_input_with_one_line(self, written, tmp_path):
        d, _, _ = written
        run, _ = flash_run(tmp_path / "run", d / "sd", d / "mm_ad.safetensors", seed=10)
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "flash.safetensors").write_bytes((run / "flash.safetensors").read_bytes())
        dec = write_checkpoint(tmp_path / "dec", {"vae.decoder.detail.x": torch.zeros(1)}, stage="decoder")
        cases = [(tmp_path / "plain", "lora", [], "not a FLASH run folder"),
                 (tmp_path / "nothing", "diffusers", [], "no such folder"),
                 (dec, "animatediff", [], "'decoder'-stage run"),
                 (run, "lora", ["--rank", "65"], "--rank 65: want 1 <= rank <= 64"),
                 (run, "animatediff", ["--rank", "80"], "--rank 80: want 1 <= rank <= 64")]
        procs = [subprocess.Popen([sys.executable, "export.py", str(r), "--to", to, "--out", str(tmp_path / f"o{i}"),
                                   *extra], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
                 for i, (r, to, extra, _) in enumerate(cases)]
        for i, (p, (_, _, _, msg)) in enumerate(zip(procs, cases)):
            _, err = p.communicate()
            assert p.returncode == 2 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
            assert not (tmp_path / f"o{i}").exists()  # nothing written



# ----------------------------------------------------------------------------- DDP helpers

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_rank(rank, world, port, argv, report):
    """One torch.multiprocessing rank, set up as torchrun sets its workers up (env vars only), running train.main:
    it records a hash of the trainable weights after every optimizer step, and every file-system write it makes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    hashes, writes = [], []
    writing = {"os.mkdir", "os.rename", "os.replace", "os.remove", "shutil.rmtree", "shutil.copyfile"}
    out = open(f"{report}.{rank}.log", "w")
    sys.addaudithook(lambda ev, a: writes.append(f"{ev} {a[0]}") if isinstance(a[0], str) and (ev in writing or (
        ev == "open" and isinstance(a[1], str) and set(a[1]) & set("wax+"))) else None)
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(lambda opt, *_: hashes.append(hashlib.sha256(b"".join(
        p.detach().numpy().tobytes() for g in opt.param_groups for p in g["params"])).hexdigest()))
    sys.stdout = sys.stderr = out
    T.main(argv)
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    out.close()
    Path(f"{report}.{rank}.json").write_text(json.dumps({"hashes": hashes, "writes": writes}))


def torchrun(*argv):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train.py", *map(str, argv)], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def same_weights(a, b, tol=0.0):
    a, b = load_file(Path(a) / "flash.safetensors"), load_file(Path(b) / "flash.safetensors")
    return set(a) == set(b) and all((a[k] - b[k]).abs().max().item() <= tol for k in a)


class TestDDP:
    """train.py under torchrun: gloo DDP on CPU, --grad-accum, rank-0-only writes, exact resume"""

    def test_two_ranks_agree_every_step_equal_grad_accum_and_only_rank0_writes(self, tiny, tmp_path):
        import torch.multiprocessing as mp
        steps = ["--steps", "3", "--save-every", "2", "--log-every", "1"]
        report = str(tmp_path / "rank")
        mp.spawn(ddp_rank, args=(2, free_port(), train_argv(tiny, tmp_path / "ddp", *steps), report), nprocs=2)
        r0, r1 = (json.loads(Path(f"{report}.{r}.json").read_text()) for r in (0, 1))
        assert len(r0["hashes"]) == 3 and r0["hashes"] == r1["hashes"]  # identical weights after every step
        assert len(set(r0["hashes"])) == 3  # and they moved every step
        mine = lambda r: [w for w in r["writes"] if str(tmp_path) in w and str(report) not in w]
        assert mine(r1) == [], mine(r1)  # rank 1 writes nothing (only torch's own temp files elsewhere)
        assert Path(f"{report}.1.log").read_text() == ""  # and prints no line
        assert any("checkpoint-000002" in w for w in mine(r0)) and "step 000003" in Path(f"{report}.0.log").read_text()
        s = json.loads((tmp_path / "ddp" / "settings.json").read_text())
        assert s["world_size"] == 2 and s["effective_batch"] == 2 and s["grad_accum"] == 1
        # 1 process x --grad-accum 2 draws the same two clips (slot generators) and averages the same two gradients
        T.main(train_argv(tiny, tmp_path / "acc", *steps, "--grad-accum", "2"))
        assert same_weights(tmp_path / "ddp", tmp_path / "acc", tol=1e-6)
        s = json.loads((tmp_path / "acc" / "settings.json").read_text())
        assert s["world_size"] == 1 and s["effective_batch"] == 2
        T.main(train_argv(tiny, tmp_path / "one", *steps))  # one clip per step: another run
        assert not same_weights(tmp_path / "one", tmp_path / "acc", tol=1e-6)

    def test_sigkilled_two_rank_run_resumes_bit_identically(self, tiny, tmp_path, capsys):
        import signal
        import time
        args = lambda out, *x: train_argv(tiny, out, "--save-every", "2", "--log-every", "100", *map(str, x))
        killed = torchrun(*args(tmp_path / "killed", "--steps", "1000"))
        t0 = time.time()
        while not (tmp_path / "killed" / "checkpoint-000002").is_dir():
            assert killed.poll() is None and time.time() - t0 < 120, killed.communicate()
            time.sleep(0.02)
        ranks = [int(d) for d in os.listdir("/proc") if d.isdigit() and Path(f"/proc/{d}/stat").exists()
                 and Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[-1].split()[1] == str(killed.pid)]
        for pid in [killed.pid, *ranks]:  # torchrun and both ranks (each in its own session), mid-run
            os.kill(pid, signal.SIGKILL)
        killed.wait()
        assert len(ranks) == 2, ranks
        found = sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-??????"))
        assert found and found[-1] < "checkpoint-000006" and not (tmp_path / "killed" / "flash.safetensors").exists()
        shutil.copytree(tmp_path / "killed", tmp_path / "moved")  # the same checkpoint, resumed on one process below
        resumed = torchrun(*args(tmp_path / "killed", "--steps", "6", "--resume", tmp_path / "killed"))
        out, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err
        assert out.count("resumed from") == 1 and "effective batch" not in out  # rank 0 alone says it
        # the uninterrupted run: 1 process x --grad-accum 2 is the 2-rank run bit for bit (test above)
        T.main(args(tmp_path / "whole", "--steps", "6", "--grad-accum", "2"))
        assert same_weights(tmp_path / "killed", tmp_path / "whole")  # bit-identical
        # resuming under another world size: the same effective batch continues exactly, another one says so
        T.main(args(tmp_path / "moved", "--steps", "6", "--grad-accum", "2", "--resume", tmp_path / "moved"))
        assert "2 rank(s) -> 1, effective batch 2 -> 2: the same micro-batch streams continue" in capsys.readouterr().out
        assert same_weights(tmp_path / "moved", tmp_path / "whole")
        T.main(args(tmp_path / "moved", "--steps", "6", "--grad-accum", "1", "--resume", tmp_path / "moved"))
        assert "effective batch 2 -> 1: weights and optimizer continue" in capsys.readouterr().out

    def test_save_dtype_halves_flash_safetensors(self, tiny, tmp_path):
        T.main(train_argv(tiny, tmp_path / "fp32", "--steps", "1"))
        T.main(train_argv(tiny, tmp_path / "bf16", "--steps", "1", "--save-dtype", "bf16"))
        a, b = load_file(tmp_path / "fp32" / "flash.safetensors"), load_file(tmp_path / "bf16" / "flash.safetensors")
        assert all(v.dtype == torch.float32 for v in a.values()) and all(v.dtype == torch.bfloat16 for v in b.values())
        assert all(torch.equal(a[k].bfloat16(), b[k]) for k in a)  # the same weights, rounded
        n = sum(v.numel() for v in a.values())
        header = lambda f: 8 + int.from_bytes(f.read_bytes()[:8], "little")  # safetensors: u64 length + JSON
        for f, width in ((tmp_path / "fp32" / "flash.safetensors", 4), (tmp_path / "bf16" / "flash.safetensors", 2)):
            assert f.stat().st_size == header(f) + width * n


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
