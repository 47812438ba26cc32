"""
FLASH evaluation (arXiv 2503.00276, Sec. 4.1 / App. A3.3): the paper's three CLIP metrics of a generated video, x100,
with OpenAI's CLIP ViT-L/14: Text Alignment (frames vs prompt), Image Alignment (frames vs reference image), Temporal
Consistency (consecutive frames), all cosines of CLIP's projected, L2-normalised embeddings. The ViT is hand-written
with transformers' CLIPModel key names (models/clip/modeling_clip.py); the text tower is clip_text.py's. The paper's
motion metrics (I3D Cosine RGB / Flow with RAFT, VideoMAE v2 CD-FVD) live in metrics.py. CLI: python eval.py --help
"""
import argparse
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import metrics
from clip_text import CLIPLayer, CLIPTextConfig, CLIPTextModel, load_tokenizer
from data import FRAME_EXTS, VIDEO_EXTS, exit_on_error, plain_warnings, read_video, to_uint8, tqdm
from model import autocast_dtype, find_weights, load_checked, load_state_dict_file, read_json
from sample import load_image

METRICS = {"text_alignment": "Text Alignment", "image_alignment": "Image Alignment",
           "temporal_consistency": "Temporal Consistency"}
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])  # OpenAI CLIP's normalisation (clip/clip.py)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
CLIP_LAYOUT = "config.json, model.safetensors or pytorch_model.bin, vocab.json, merges.txt"


@dataclass
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16  # head dim 64
    projection_dim: int = 768  # the joint image-text space (CLIPConfig.projection_dim)
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"


class CLIPModel(CLIPTextModel):
    """OpenAI CLIP: clip_text's text tower (text_model.*, inherited), a ViT vision tower and the two projections;
    attribute paths = transformers' CLIPModel keys. eos_token_id: config.json's text_config value (pooling rule)."""

    def __init__(self, vision=None, text=None, eos_token_id=2):
        super().__init__(text)
        self.vision_config = v = vision or CLIPVisionConfig()
        assert v.hidden_act in ("quick_gelu", "gelu"), v.hidden_act
        self.eos_token_id = eos_token_id
        self.vision_model = vm = nn.Module()
        vm.embeddings = nn.Module()
        vm.embeddings.class_embedding = nn.Parameter(torch.zeros(v.hidden_size))
        vm.embeddings.patch_embedding = nn.Conv2d(3, v.hidden_size, v.patch_size, v.patch_size, bias=False)
        vm.embeddings.position_embedding = nn.Embedding((v.image_size // v.patch_size) ** 2 + 1, v.hidden_size)
        vm.pre_layrnorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)  # (sic) the checkpoints' spelling
        vm.encoder = nn.Module()
        vm.encoder.layers = nn.ModuleList(CLIPLayer(v, causal=False) for _ in range(v.num_hidden_layers))
        vm.post_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.visual_projection = nn.Linear(v.hidden_size, v.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.config.hidden_size, v.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # in the checkpoint; the metrics are cosines

    def encode_image(self, pixels):
        """(N,3,S,S) preprocessed pixels -> (N, projection_dim) fp32, L2-normalised"""
        e, vm = self.vision_model.embeddings, self.vision_model
        x = e.patch_embedding(pixels).flatten(2).transpose(1, 2)  # N (h w) C: one token per patch
        x = torch.cat([e.class_embedding.to(x.dtype).expand(len(x), 1, -1), x], 1) + e.position_embedding.weight
        x = vm.pre_layrnorm(x)
        for layer in vm.encoder.layers:
            x = layer(x)
        return F.normalize(self.visual_projection(vm.post_layernorm(x[:, 0])).float(), dim=-1)  # class token

    def encode_text(self, ids):
        """(B, 77) token ids -> (B, projection_dim) fp32, L2-normalised: the state at the end-of-text token, as
        transformers does: argmax(ids) (OpenAI's rule, EOT is the largest id) for the legacy eos_token_id 2 of
        OpenAI's configs, else the first eos_token_id"""
        h = self(ids)  # B L C after final_layer_norm
        pos = ids.argmax(-1) if self.eos_token_id == 2 else (ids == self.eos_token_id).int().argmax(-1)
        return F.normalize(self.text_projection(h[torch.arange(len(ids)), pos]).float(), dim=-1)


def load_clip(folder):
    """OpenAI CLIP folder as on the HF hub (openai/clip-vit-large-patch14) -> (CLIPModel fp32, eval; Tokenizer).
    Sizes from config.json; strict keys; stored position_ids buffers are skipped on purpose."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--clip {folder}: no config.json there (want OpenAI's clip-vit-large-patch14 "
                                f"folder: {CLIP_LAYOUT})")
    cfg = read_json(folder / "config.json")
    if not isinstance(cfg.get("vision_config"), dict) or not isinstance(cfg.get("text_config"), dict):
        raise ValueError(f"{folder / 'config.json'}: not a CLIPModel config (no text_config / vision_config)")
    pick = lambda cls, d: cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
    vision = pick(CLIPVisionConfig, {**cfg["vision_config"], "projection_dim": cfg.get("projection_dim", 768)})
    model = CLIPModel(vision, pick(CLIPTextConfig, cfg["text_config"]), cfg["text_config"].get("eos_token_id", 2))
    file = find_weights(folder, ["model.safetensors", "pytorch_model.bin"])
    sd = {k: v for k, v in load_state_dict_file(file).items() if not k.endswith("position_ids")}
    load_checked(model, sd, f"CLIP ({file})")
    return model.eval(), load_tokenizer(folder)


def preprocess(images, size=224):
    """CLIP's preprocessing as transformers' CLIPImageProcessor: uint8 RGB images (N,H,W,3) -> (N,3,size,size) fp32.
    Shortest side to `size` (PIL bicubic, long side int(size * long / short)), centre crop (offsets rounded down),
    /255, OpenAI's mean and std."""
    out = []
    for a in images:
        h, w = a.shape[:2]
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        a = np.asarray(Image.fromarray(a).resize((nw, nh), Image.BICUBIC))
        top, left = (nh - size) // 2, (nw - size) // 2
        out.append(a[top:top + size, left:left + size])
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255  # N 3 S S
    return (x - MEAN[:, None, None]) / STD[:, None, None]


def read_reference(path, height, width):
    """The reference as sample.py feeds it to the generator (any mode -> RGB over white, scaled to cover the video's
    frame size, centre-cropped) -> uint8 (height, width, 3)"""
    return to_uint8(load_image(str(path), height, width)[None])[0]


@torch.no_grad()
def embed_images(model, images, batch=32, dtype=torch.float32):
    """uint8 (N,H,W,3) -> (N, D) float64 CPU, `batch` images per CLIP call; autocast in `dtype` (fp32: off)"""
    dev, out = next(model.parameters()).device, []
    for i in range(0, len(images), batch):
        x = preprocess(images[i:i + batch], model.vision_config.image_size).to(dev)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            out.append(model.encode_image(x).double().cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_text(model, tokenizer, prompt, dtype=torch.float32):
    dev = next(model.parameters()).device
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        return model.encode_text(tokenizer(prompt).to(dev))[0].double().cpu()


def clip_scores(frames, text, reference, first_frame=True):
    """L2-normalised embeddings of the frames (F,D) in order, the prompt (D,) and the reference image (D,) -> the
    three metrics of App. A3.3, x100. first_frame=False drops frame 1 (the reference itself) from all three."""
    f = frames if first_frame else frames[1:]
    return {"text_alignment": 100 * (f @ text).mean().item(),  # (1) mean over frames of cos(frame, prompt)
            "image_alignment": 100 * (f @ reference).mean().item(),  # (2) mean over frames of cos(frame, reference)
            "temporal_consistency": 100 * (f[:-1] * f[1:]).sum(-1).mean().item()}  # (3) consecutive pairs


# ----------------------------------------------------------------------------- CLI

def is_frame_folder(p):
    return p.is_dir() and any(q.suffix.lower() in FRAME_EXTS for q in p.iterdir())


def find_videos(path):
    """A video file; a folder of PNG/JPG frames; or a folder whose video files and frame sub-folders are the videos"""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in VIDEO_EXTS:
            raise ValueError(f"{p}: not a video file (accepted: {', '.join(VIDEO_EXTS)}, or a folder of frames)")
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such video file or folder")
    found = [q for q in sorted(p.iterdir()) if not q.name.startswith(".") and (
        q.suffix.lower() in VIDEO_EXTS if q.is_file() else is_frame_folder(q))]
    found = found or ([p] if is_frame_folder(p) else [])
    if not found:
        raise ValueError(f"{p}: no videos found (accepted: {', '.join(VIDEO_EXTS)} files, or folders of numbered "
                         f"{', '.join(FRAME_EXTS)} frames)")
    return found


def video_inputs(video, prompt=None, reference=None):
    """(prompt, reference): the command line's, else those of sample.py's JSON beside the video (x.mp4 -> x.json,
    frame folder x -> x.json)"""
    side = video.with_suffix(".json") if video.is_file() else Path(f"{video}.json")
    meta = read_json(side) if side.is_file() else {}
    prompt = prompt if prompt is not None else meta.get("prompt")
    reference = reference or meta.get("image")
    why = f"pass --{{}}, or keep sample.py's {side.name} beside it"
    if prompt is None:
        raise ValueError(f"{video}: no prompt: {why.format('prompt')}")
    if not reference:
        raise ValueError(f"{video}: no reference image: {why.format('reference')}")
    if not os.path.isfile(reference):
        raise FileNotFoundError(f"{video}: reference image not found: {reference}")
    return prompt, str(reference)


def print_table(first, count, rows):
    """rows: (label, count, {metric: score or (mean, std)})"""
    w = max(len(first), *(len(r[0]) for r in rows))
    cell = lambda v: f"{v[0]:.2f} ± {v[1]:.2f}" if isinstance(v, tuple) else f"{v:.2f}"
    print(f"{first:<{w}}  {count:>6}  " + "  ".join(f"{n:>20}" for n in METRICS.values()))
    for label, n, vals in rows:
        print(f"{label:<{w}}  {n:>6}  " + "  ".join(f"{cell(vals[k]):>20}" for k in METRICS))


def video_frames(video, args):
    """The frames scored: (T,H,W,3) uint8, in order, every --stride-th, at most --max-frames"""
    frames = read_video(video)[0][::args.stride][:args.max_frames]
    if len(frames) < 3 - (args.first_frame == "include"):
        raise ValueError(f"{video}: {len(frames)} frame(s) to score; Temporal Consistency needs 2 consecutive ones")
    return frames


def run(args):
    if args.stride < 1 or args.batch_size < 1 or (args.max_frames is not None and args.max_frames < 2):
        raise ValueError("want --stride >= 1, --batch-size >= 1 and --max-frames >= 2")
    groups = [("videos", args.videos)] if args.videos else [
        (c.partition("=")[0], [c.partition("=")[2]]) if "=" in c else (Path(c).name, [c]) for c in args.compare]
    if len({n for n, _ in groups}) < len(groups):
        raise ValueError(f"--compare: variant names repeat: {', '.join(n for n, _ in groups)}")
    out, parent = Path(args.out), Path(args.out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise PermissionError(f"--out {out}: cannot write there ({parent} is not a writable folder)")
    if args.clip and not Path(args.clip).is_dir():
        raise FileNotFoundError(f"--clip {args.clip}: folder not found (want {CLIP_LAYOUT})")
    motion = metrics.plan(args, {n: [v for p in ps for v in find_videos(p)] for n, ps in groups}, find_videos)
    if not args.clip and not motion:
        raise ValueError("nothing to score: give --clip (CLIP metrics) and/or the motion metrics' weights")
    if not args.clip:
        return run_motion(args, motion, out, {"variants": {n: {} for n, _ in groups}})
    todo, refs = [], {}  # every input is read once before CLIP loads: a bad one fails in seconds, not at video 200
    for name, paths in groups:
        for video in (v for p in paths for v in find_videos(p)):
            prompt, ref = video_inputs(video, args.prompt, args.reference)
            key = (ref, *video_frames(video, args).shape[1:3])  # the reference is cropped to the video's frame size
            refs[key] = refs[key] if key in refs else read_reference(*key)
            todo.append((name, video, prompt, key))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = autocast_dtype(args.dtype, device)
    model, tok = load_clip(args.clip)
    model.to(device)
    texts = {p: embed_text(model, tok, p, dtype) for p in dict.fromkeys(t[2] for t in todo)}  # warnings: before the bar
    ref_emb, rows = {}, {n: [] for n, _ in groups}
    for name, video, prompt, key in tqdm(todo, desc="CLIP"):
        frames = video_frames(video, args)
        if key not in ref_emb:
            ref_emb[key] = embed_images(model, refs[key][None], 1, dtype)[0]
        s = clip_scores(embed_images(model, frames, args.batch_size, dtype), texts[prompt], ref_emb[key],
                        args.first_frame == "include")
        rows[name].append(dict(video=str(video), frames=len(frames), prompt=prompt, reference=key[0],
                               **{k: round(v, 4) for k, v in s.items()}))
    variants = {n: {"n_videos": len(r), **{k: {"mean": float(np.mean([x[k] for x in r])),  # population std
                                               "std": float(np.std([x[k] for x in r]))} for k in METRICS},
                    "videos": r} for n, r in rows.items()}
    stats = lambda v: {k: (v[k]["mean"], v[k]["std"]) for k in METRICS}
    if args.videos:  # one row per video, then the mean
        r = variants["videos"]
        print_table("video", "frames", [(x["video"], x["frames"], x) for x in r["videos"]]
                    + [(f"mean ± std over {len(r['videos'])} videos", "", stats(r))])
    else:  # one row per variant (Table 2)
        print_table("variant", "videos", [(n, v["n_videos"], stats(v)) for n, v in variants.items()])
    result = {"settings": settings(args, device, dtype), "variants": variants}
    if motion:
        return run_motion(args, motion, out, result)
    write_json(out, result)


def write_json(out, result):
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    os.replace(tmp, out)  # never a half-written file
    print(f"wrote {out}")


def run_motion(args, motion, out, result):
    """metrics.py's Cosine RGB / Cosine Flow (per video) and CD-FVD (per set), added to the CLIP result"""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = autocast_dtype(args.dtype, device)
    scores = metrics.score(args, motion, device, dtype)
    cols = [(k, n) for k, n in (("cosine_rgb", "Cosine RGB"), ("cosine_flow", "Cosine Flow"), ("cd_fvd", "CD-FVD"))
            if any(k in v for v in scores.values())]
    cell = lambda v: "" if v is None else f"{v['mean']:.2f} ± {v['std']:.2f}" if isinstance(v, dict) else f"{v:.2f}"
    rows = [(x["video"], [x.get(k) for k, _ in cols]) for x in scores["videos"]["videos"]] if args.videos else []
    rows += [(f"{n} ({v['n_videos']} videos)", [v.get(k) for k, _ in cols]) for n, v in scores.items()]
    w = max(len(r[0]) for r in rows)
    print(f"{'video' if args.videos else 'variant':<{w}}  " + "  ".join(f"{n:>16}" for _, n in cols))
    for label, vals in rows:
        print(f"{label:<{w}}  " + "  ".join(f"{cell(v):>16}" for v in vals))
    result["motion_settings"] = metrics.settings(args, device, dtype)
    for name, v in scores.items():
        clip_rows = result["variants"][name].pop("videos", None)
        result["variants"][name].update({k: x for k, x in v.items() if k != "videos"})
        if clip_rows:  # one row per video: the CLIP scores and the motion ones side by side
            v["videos"] = [{**c, **m} for c, m in zip(clip_rows, v["videos"])]
        result["variants"][name]["videos"] = v["videos"]
    write_json(out, result)


def settings(args, device, dtype):
    """Every choice App. A3.3 leaves open, as this run made it"""
    frames = f"every {args.stride}-th frame" if args.stride > 1 else "every frame"
    return dict(
        clip=str(Path(args.clip).absolute()), device=str(device), dtype=str(dtype)[6:], batch_size=args.batch_size,
        metrics="100 x mean cosine of CLIP's projected, L2-normalised embeddings (App. A3.3); mean and population "
                "std over each variant's videos",
        frames=f"{frames} of the file, in order" + (f", the first {args.max_frames}" if args.max_frames else ""),
        first_frame=f"{args.first_frame}d in all three metrics (frame 1 is the reference image, re-encoded)",
        preprocess="shortest side to 224, PIL bicubic; centre crop 224x224; /255; OpenAI CLIP mean/std "
                   "(transformers' CLIPImageProcessor)",
        reference="read as sample.py feeds it to the generator (RGB over white, scaled to cover the video's frame "
                  "size, centre-cropped, Lanczos), then the same CLIP preprocessing",
        text="prompt tokenised to 77 tokens (longer: truncated, with a warning); embedding at the end-of-text token")


def get_parser():
    p = argparse.ArgumentParser(description="FLASH (arXiv 2503.00276) App. A3.3: score videos with the paper's CLIP "
                                            "metrics (Text Alignment, Image Alignment, Temporal Consistency, x100).")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--videos", nargs="+", help="video files (mp4, gif, ...), folders of them, or folders of frames")
    g.add_argument("--compare", nargs="+", metavar="NAME=PATH",
                   help="one variant per item (Table 2 style): a folder or video, optionally named (default: its name)")
    p.add_argument("--clip", help=f"OpenAI clip-vit-large-patch14 folder ({CLIP_LAYOUT}): the CLIP metrics")
    p.add_argument("--prompt", help="text prompt of every video (default: from sample.py's JSON beside each video)")
    p.add_argument("--reference", help="reference image of every video (default: from sample.py's JSON)")
    p.add_argument("--out", default="clip_scores.json", help="JSON with every video's scores and the settings")
    p.add_argument("--first-frame", default="include", choices=["include", "exclude"],
                   help="frame 1 (the reference) in the metrics: the paper averages over all frames")
    p.add_argument("--stride", type=int, default=1, help="score every k-th frame (default: all)")
    p.add_argument("--max-frames", type=int, help="score at most this many frames (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="frames per CLIP call")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="CLIP and motion-metric autocast dtype (auto: bf16/fp16 on a GPU, fp32 on CPU)")
    m = p.add_argument_group("motion metrics (App. A3.3; metrics.py; docs/metrics.md): each runs when its inputs "
                             "are given")
    m.add_argument("--real", metavar="DIR",
                   help="ground-truth videos: paired with the generated ones by file stem for the cosines; the real "
                        "set of CD-FVD")
    m.add_argument("--i3d-rgb", metavar="FILE",
                   help="I3D RGB weights (pytorch-i3d rgb_imagenet.pt, cd-fvd i3d_pretrained_400.pt): Cosine RGB")
    m.add_argument("--i3d-flow", metavar="FILE",
                   help="I3D flow weights (pytorch-i3d flow_imagenet.pt): Cosine Flow, with --raft")
    m.add_argument("--raft", metavar="FILE",
                   help="RAFT-large weights (princeton-vl raft-things.pth, or torchvision raft_large): the flow of "
                        "Cosine Flow")
    m.add_argument("--videomae", metavar="FILE", help="VideoMAE v2 weights (vit_g_hybrid_pt_1200e_ssv2_ft.pth): CD-FVD")
    m.add_argument("--videomae-heads", type=int, default=16, help="attention heads of that ViT (not stored in it)")
    m.add_argument("--motion-frames", type=int, default=16, help="frames per video for I3D/RAFT (the first ones)")
    m.add_argument("--i3d-features", default="logits", choices=["logits", "pool"],
                   help="I3D features compared: the 400 logits (cd-fvd's FVD features) or the 1024-d average pool")
    m.add_argument("--flow-bound", type=float, default=20.0, help="flow (pixels at 224²) / this, clipped to [-1, 1]")
    m.add_argument("--raft-iters", type=int, default=20, help="RAFT refinement iterations")
    m.add_argument("--metric-batch", type=int, default=4, help="videos per I3D/RAFT/VideoMAE call")
    return p


def main(argv=None):
    exit_on_error(run, get_parser().parse_args(argv),
                  oom="CUDA out of memory: try a smaller --batch-size (CLIP) or --metric-batch (I3D, RAFT, VideoMAE)")


if __name__ == "__main__":
    plain_warnings()
    main()
