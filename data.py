"""
Data for FLASH (arXiv 2503.00276): reading the ≤16 example videos, sampling training clips, the strong
augmentation of the Motion Alignment Module (Sec. 3.2 / A3.2), the distortions used to train the Detail
Enhancement Decoder (Sec. 3.3 / A3.2).
Colour ops follow torchvision's ColorJitter semantics on [0,1] images, the elastic field its ElasticTransform's;
captions come from name.txt sidecars or a captions.json (joint multi-action training, Table A1); plain torch, seeded by
an explicit torch.Generator, with one random draw per clip unless stated otherwise.
"""
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence
import imageio.v3 as iio

from model import read_json

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".webm", ".mkv", ".gif")
FRAME_EXTS = (".png", ".jpg", ".jpeg")
DEFAULT_FPS = 8.0  # when a container or a frame folder has no frame rate (AnimateDiff's default)


# -----------------------------------------------------------------------------
# progress bars: tqdm when installed, else this stand-in (the runtime stays at torch, safetensors, tokenizers, numpy,
# pillow and imageio)

try:
    from tqdm import tqdm
except ImportError:
    def tqdm(it, desc="", disable=False):
        """stand-in progress bar on stderr: count, it/s, ETA"""
        it, t0 = list(it), time.time()
        for i, x in enumerate(it):
            yield x
            rate, n = (i + 1) / max(time.time() - t0, 1e-9), len(it)
            if not disable:
                print(f"\r{desc} {i + 1}/{n} {rate:.2f} it/s ETA {(n - i - 1) / rate:.0f}s", end="\n" if i + 1 == n else "",
                      file=sys.stderr, flush=True)


def plain_warnings():
    """Command lines: print each warning as one `warning: ...` line on stderr (no source line, no traceback)."""
    warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)


def exit_on_error(fn, *args, oom="out of GPU memory"):
    """Command lines: fn(*args), where an expected error (a missing or unreadable file, a bad setting, mismatched
    weights, out of GPU memory: then `oom`, the script's advice) becomes one `error: ...` line on stderr and exit
    status 2, nothing written. Anything else is a bug and keeps its traceback."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        msg = oom
    except (OSError, ValueError) as e:
        msg = " ".join(str(e).split())
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)

# -----------------------------------------------------------------------------
# video I/O

def read_video(path, short_side=None):
    """-> (frames uint8 (T,H,W,3), fps). Containers via imageio-ffmpeg, gif and frame folders via Pillow.
    short_side: downscale (never upscale) each frame so its short side is at most this, keeping aspect."""
    path = Path(path)
    def resize(f):
        h, w = f.shape[:2]
        if short_side is None or min(h, w) <= short_side: return f
        s = short_side / min(h, w)
        return np.asarray(Image.fromarray(f).resize((round(w * s), round(h * s)), Image.LANCZOS))
    try:
        if path.is_dir():  # numbered frames, sorted by the last number in the name
            files = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTS),
                           key=lambda p: ([int(n) for n in re.findall(r"\d+", p.stem)][-1:], p.name))
            frames = [resize(np.asarray(Image.open(p).convert("RGB"))) for p in files]
            fps = DEFAULT_FPS
        elif path.suffix.lower() == ".gif":
            with Image.open(path) as im:
                frames, ms = [], []
                for f in ImageSequence.Iterator(im):
                    frames.append(resize(np.asarray(f.convert("RGB"))))
                    ms.append(f.info.get("duration") or 0)
                tag = re.fullmatch(rb"fps (\d+(?:\.\d+)?)", im.info.get("comment", b""))  # write_video's GIFs
            fps = float(tag[1]) if tag else 1000.0 / np.mean(ms) if np.mean(ms) > 0 else DEFAULT_FPS
            if tag:  # Pillow merges identical consecutive frames into one longer one: repeat them back
                frames = [f for f, d in zip(frames, ms) for _ in range(max(1, round(d * fps / 1000)))]
        else:
            fps = float(iio.immeta(path, plugin="FFMPEG").get("fps") or DEFAULT_FPS)
            frames = [resize(f) for f in iio.imiter(path, plugin="FFMPEG")]  # always rgb24 uint8
        if not frames: raise ValueError("no frames")
        if len({f.shape for f in frames}) > 1: raise ValueError("frames differ in size")
    except Exception as e:  # first line only: ffmpeg appends its whole banner and log
        raise ValueError(f"{path}: cannot read video: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from e
    return np.stack(frames), float(fps)

def write_video(frames, path, fps=8.0):
    """The one video writer (sample.py, train.py's samples, the demo, the tests). frames: uint8 (F,H,W,3), or a float
    tensor (F,3,H,W) in [-1,1]. .mp4/.mov/.mkv: H.264 yuv420p (plays in browsers); .gif: looping; any other path: a
    folder of frame_000.png, frame_001.png, ..."""
    frames = to_uint8(frames) if torch.is_tensor(frames) else frames
    path = Path(path)
    ext = path.suffix.lower()
    if ext in (".mp4", ".mov", ".mkv", ".gif"):  # written beside, then renamed: never a half-written video
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
        if ext == ".gif":  # delays in whole 1/100 s: round the running time so the mean delay is 1000/fps ms
            ends = [round((i + 1) * 100 / fps) for i in range(len(frames))]
            imgs = [Image.fromarray(f) for f in frames]  # identical neighbours get merged: the fps comment undoes it
            imgs[0].save(tmp, save_all=True, append_images=imgs[1:], loop=0, comment=f"fps {fps:g}",
                         duration=[10 * (b - a) for a, b in zip([0] + ends, ends)])
        else:  # yuv420p needs even sizes: pad odd ones by an edge pixel; macro_block_size=1 stops a resize to 16
            frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
            iio.imwrite(tmp, frames, plugin="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p", quality=8,
                        macro_block_size=1)
        os.replace(tmp, path)
    else:
        path.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(frames):
            Image.fromarray(f).save(path / f"frame_{i:03d}.png")


def to_uint8(clip):
    """(F,3,H,W) in [-1,1] -> uint8 (F,H,W,3)"""
    return ((clip.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

@dataclass
class Video:
    path: str
    frames: np.ndarray = field(repr=False)  # uint8 (T,H,W,3)
    fps: float
    caption: str

def read_captions(folder, names):
    """`folder`/captions.json, a JSON object {video file or frame-folder name: caption}, -> dict ({} if absent).
    An entry that names no video in the folder, or a caption that is not a non-empty string, is an error."""
    path = Path(folder) / "captions.json"
    if not path.is_file(): return {}
    caps = read_json(path)
    unknown = sorted(set(caps) - set(names))
    if unknown: raise ValueError(f"{path}: {', '.join(unknown)} not among the videos in {folder}")
    bad = [k for k, c in caps.items() if not isinstance(c, str) or not c.strip()]
    if bad: raise ValueError(f"{path}: want a non-empty caption string for {', '.join(bad)}")
    return {k: c.strip() for k, c in caps.items()}

def load_videos(folder, prompt, frames=16, stride=4, short_side=None):
    """Every video file (VIDEO_EXTS) and every sub-folder of png/jpg frames in `folder`, decoded once.
    Caption of each video, first found: a sidecar `<name>.txt`, its entry in `folder`/captions.json, `prompt`.
    Several captions = joint training over several actions (FLASH Table A1).
    stride: a clip takes every stride-th *source* frame (no fps resampling), so it spans 1+(frames-1)*stride
    source frames and plays at fps/stride; a video too short for that uses the largest stride that fits
    (clip_stride; the table below shows each video's). Videos with fewer than `frames` frames are skipped with a
    warning; if all are skipped, or any video cannot be read, a ValueError names the folder / the file."""
    folder = Path(folder)
    if not folder.is_dir(): raise ValueError(f"{folder}: video folder does not exist")
    need = 1 + (frames - 1) * stride
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and (
        p.suffix.lower() in VIDEO_EXTS if p.is_file() else any(q.suffix.lower() in FRAME_EXTS for q in p.iterdir()))]
    if not entries:
        raise ValueError(f"{folder}: no videos found (accepted: {', '.join(VIDEO_EXTS)} files, "
                         f"or sub-folders of numbered {', '.join(FRAME_EXTS)} frames)")
    captions = read_captions(folder, [p.name for p in entries])
    videos = []
    for p in entries:
        arr, fps = read_video(p, short_side)
        if len(arr) < frames:
            warnings.warn(f"{p}: only {len(arr)} frames, a clip needs at least {frames} (frames={frames}); skipped")
            continue
        txt = p.with_suffix(".txt") if p.is_file() else p.parent / (p.name + ".txt")
        caption = (txt.read_text().strip() if txt.is_file() else "") or captions.get(p.name) or prompt or ""
        if not caption: raise ValueError(f"{p}: no caption (pass a prompt, add {txt.name} or a captions.json entry)")
        videos.append(Video(str(p), arr, fps, caption))
    if not videos: raise ValueError(f"{folder}: all {len(entries)} videos are shorter than {frames} frames")
    print(f"load_videos: {folder}")
    for v in videos:
        T, H, W, _ = v.frames.shape
        s = clip_stride(T, frames, stride)
        note = f" (too short for stride {stride}: {need} frames)" if s < stride else ""
        print(f"  {Path(v.path).name:<28} {T:5d} frames {v.fps:6.2f} fps {W}x{H}  stride {s}{note}  '{v.caption}'")
    lo, hi = min(v.fps for v in videos), max(v.fps for v in videos)
    rates = [v.fps / clip_stride(len(v.frames), frames, stride) for v in videos]
    n_caps = len({v.caption for v in videos})
    print(f"  total: {len(videos)} videos, {sum(len(v.frames) for v in videos)} frames, fps {lo:.2f}-{hi:.2f}, "
          f"{n_caps} caption{'s' * (n_caps > 1)}; clip = {frames} frames x stride {stride} = {need} source frames "
          f"({min(rates):.2f}-{max(rates):.2f} fps)")
    return videos

# -----------------------------------------------------------------------------
# clip sampling: stride, start (random or the first frame), flip, aspect-preserving crop, antialiased resize

def _rand(g, lo=0.0, hi=1.0, shape=()):
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=g.device)

def _randint(g, lo, hi):  # integer in [lo, hi)
    return int(torch.randint(lo, hi, (1,), generator=g, device=g.device))

def clip_stride(T, frames, stride):
    """The stride a clip of `frames` frames takes from a T-frame video: `stride`, or the largest that fits
    (1 + (frames-1) stride <= T) when the video is too short for it; 0 when not even stride 1 fits."""
    return min(stride, (T - 1) // (frames - 1)) if T >= frames else 0

def clip_indices(T, frames, stride, start, generator):
    """Source frame indices of one clip: stride = clip_stride(T, frames, stride); start "random" (AnimateDiff's
    dataset: uniform over every start that fits) or "first" (frame 0, the action's start, as FLASH's test
    references are first frames, A3.1). The random start is drawn either way: the same random stream."""
    s = clip_stride(T, frames, stride)
    if s < 1: raise ValueError(f"video has {T} frames, a clip needs {frames}")
    if start not in ("random", "first"): raise ValueError(f"clip start {start!r}: want 'random' or 'first'")
    i0 = _randint(generator, 0, T - (1 + (frames - 1) * s) + 1)
    return list(range(0 if start == "first" else i0, T, s))[:frames]

def sample_clip(video, frames, stride, height, width, generator, scale=(0.8, 1.0), flip=True, start="random"):
    """-> (F,3,height,width) float in [-1,1], from the source frames clip_indices() picks. Crops the largest box of
    the target aspect ratio times a scale in `scale`, at a random place, then resizes: never stretches.
    Horizontal flip with p=0.5 when `flip`."""
    arr = video.frames if isinstance(video, Video) else video
    T, H, W, _ = arr.shape
    idx = clip_indices(T, frames, stride, start, generator)
    flip = bool(_rand(generator) < 0.5) and flip  # drawn either way: the same random stream
    ch, cw = (H, H * width / height) if W * height >= H * width else (W * height / width, W)  # max crop
    s = float(_rand(generator, *scale))
    ch, cw = max(1, min(H, round(ch * s))), max(1, min(W, round(cw * s)))
    y0, x0 = _randint(generator, 0, H - ch + 1), _randint(generator, 0, W - cw + 1)
    x = torch.from_numpy(arr[idx, y0:y0 + ch, x0:x0 + cw]).permute(0, 3, 1, 2).float()
    if flip: x = x.flip(-1)
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return (x / 127.5 - 1).clamp(-1, 1)

# -----------------------------------------------------------------------------
# primitives: Gaussian blur, torchvision-style colour jitter on [0,1] images (..., 3, H, W)

def gaussian_kernel(k, sigma):
    t = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    w = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return w / w.sum()

def gaussian_blur(x, k, sigma):
    """separable k x k Gaussian blur with reflect padding, on (..., H, W)"""
    if k <= 1 or sigma <= 0: return x
    w, p, shape = gaussian_kernel(k, sigma).to(x), k // 2, x.shape
    y = x.reshape(-1, 1, *shape[-2:])  # (N C) 1 H W
    y = F.conv2d(F.pad(y, (p, p, 0, 0), mode="reflect"), w.view(1, 1, 1, k))
    y = F.conv2d(F.pad(y, (0, 0, p, p), mode="reflect"), w.view(1, 1, k, 1))
    return y.reshape(shape)

def grayscale(x):
    r, g, b = x.unbind(-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)  # torchvision's weights (ITU-R 601)

# factors may be floats or tensors broadcastable to (..., 1, H, W) (regional jitter); contrast always blends
# with the mean grey of the whole image (torchvision), also when its factor varies by region
def adjust_brightness(x, f): return (f * x).clamp(0, 1)  # blend with black
def adjust_contrast(x, f): return (f * x + (1 - f) * grayscale(x).mean((-3, -2, -1), keepdim=True)).clamp(0, 1)
def adjust_saturation(x, f): return (f * x + (1 - f) * grayscale(x)).clamp(0, 1)

def adjust_hue(x, h):
    hsv = rgb_to_hsv(x)
    return hsv_to_rgb(torch.cat([(hsv[..., :1, :, :] + h) % 1.0, hsv[..., 1:, :, :]], -3))

def rgb_to_hsv(x):
    r, g, b = x.unbind(-3)
    v, mn = x.amax(-3), x.amin(-3)
    c = v - mn
    s = torch.where(v > 0, c / v.clamp_min(1e-12), torch.zeros_like(v))
    cz = c.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / cz, torch.where(v == g, 2 + (b - r) / cz, 4 + (r - g) / cz))
    h = torch.where(c > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], -3)

def hsv_to_rgb(x):
    h, s, v = x.unbind(-3)
    k = lambda n: (n + 6 * h) % 6  # f(n) = v - v s clamp(min(k, 4 - k), 0, 1), n = 5, 3, 1 for r, g, b
    return torch.stack([v - v * s * torch.minimum(k(n), 4 - k(n)).clamp(0, 1) for n in (5, 3, 1)], -3)

def color_jitter(x, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, order=(0, 1, 2, 3)):
    """x in [0,1]; the four adjustments in `order` (0 brightness, 1 contrast, 2 saturation, 3 hue)"""
    ops = (lambda y: adjust_brightness(y, brightness), lambda y: adjust_contrast(y, contrast),
           lambda y: adjust_saturation(y, saturation), lambda y: adjust_hue(y, hue))
    for i in order: x = ops[int(i)](x)
    return x

def elastic_field(N, H, W, alpha, generator, sigma=5.0, device="cpu"):
    """-> (N,2,H,W) displacements (dx, dy) in pixels, one field per image, as torchvision's
    ElasticTransform(alpha, sigma).get_params draws them: per image, uniform noise in [-1,1] for dx then dy, each
    blurred by a Gaussian of sigma (kernel int(8 sigma + 1), made odd; capped to fit images under 4 sigma, where
    torchvision would fail) and scaled by alpha/size in normalised [-1,1] coordinates, i.e. alpha/2 x the blurred
    noise in pixels (x by the width, y by the height, as torchvision since its fix of dx/H, vision#9299; the same
    for square frames). At sigma 5 the blurred noise has std ~0.033: alpha 20 moves a pixel 0.27 px on average
    (per axis), ~2 px at most over a 512^2 frame."""
    k = int(8 * sigma + 1)
    k = min(k + (k % 2 == 0), 2 * min(H, W) - 1)  # odd; reflect padding needs k // 2 < H, W
    noise = torch.stack([_rand(generator, -1, 1, (2, H, W)) for _ in range(N)])  # N 2 H W: dx, dy per image
    return gaussian_blur(noise.to(device), k, sigma) * alpha / 2

def elastic_transform(x, alpha, generator, sigma=5.0):
    """x (N,C,H,W) -> x resampled at (q + dx, p + dy), elastic_field's independent field per image (FLASH A2.3/A3.2:
    torchvision's ElasticTransform, displacement strength alpha); bilinear, reflection at the borders (torchvision
    fills with 0, a black sliver the decoder would learn to undo). alpha=0 is the identity."""
    N, _, H, W = x.shape
    d = elastic_field(N, H, W, alpha, generator, sigma, x.device).to(x)
    ys = torch.linspace(-1 + 1 / H, 1 - 1 / H, H, device=x.device).view(1, H, 1).expand(N, H, W)
    xs = torch.linspace(-1 + 1 / W, 1 - 1 / W, W, device=x.device).view(1, 1, W).expand(N, H, W)
    grid = torch.stack([xs + d[:, 0] * 2 / W, ys + d[:, 1] * 2 / H], -1)  # N H W 2, pixel centres + offsets
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

# -----------------------------------------------------------------------------
# FLASH Sec. 3.2: strong augmentation (new appearance, same motion), one draw per clip

def strong_augment(clip, generator, return_params=False):
    """clip (F,3,H,W) in [-1,1]: Gaussian blur (odd kernel in {3,5,7,9}, sigma in [0.1,2]) then colour jitter
    (brightness/contrast/saturation in [0.5,1.5], hue in [-0.25,0.25], random order), identical for every frame."""
    g = generator
    p = dict(kernel=2 * _randint(g, 0, 4) + 3, sigma=float(_rand(g, 0.1, 2.0)),
             brightness=float(_rand(g, 0.5, 1.5)), contrast=float(_rand(g, 0.5, 1.5)),
             saturation=float(_rand(g, 0.5, 1.5)), hue=float(_rand(g, -0.25, 0.25)),
             order=torch.randperm(4, generator=g, device=g.device).tolist())
    x = gaussian_blur((clip + 1) / 2, p["kernel"], p["sigma"])
    x = color_jitter(x, p["brightness"], p["contrast"], p["saturation"], p["hue"], p["order"]) * 2 - 1
    return (x, p) if return_params else x

# -----------------------------------------------------------------------------
# FLASH Sec. 3.3: distortions for the Detail Enhancement Decoder. Unlike Sec. 3.2 they are inconsistent:
# regions and jitter are drawn independently per frame and per region, elastic fields per frame.

def decoder_distort(clip, generator, p_none=0.2, grid=4, region_frac=0.8, alpha_range=(1.0, 20.0),
                    return_params=False):
    """clip (F,3,H,W) in [-1,1]. With prob p_none unchanged; otherwise a random non-empty subset of
    blur (odd kernel in [3,10], sigma in [0.1,2]); colour jitter (b/c/s in [0.7,1.3], hue in [-0.2,0.2]) on
    round(region_frac*grid^2) randomly chosen cells of a grid x grid split of each frame, an independent draw
    per frame and cell; elastic transform (torchvision semantics, sigma 5) of strength alpha ~ U(alpha_range)."""
    g, (Fn, _, H, W) = generator, clip.shape
    p = dict(ops=[])
    if float(_rand(g)) < p_none: return (clip, p) if return_params else clip
    p["ops"] = [op for op in ("blur", "jitter", "elastic") if float(_rand(g)) < 0.5]
    p["ops"] = p["ops"] or [("blur", "jitter", "elastic")[_randint(g, 0, 3)]]
    x = (clip + 1) / 2
    if "blur" in p["ops"]:
        p.update(kernel=2 * _randint(g, 0, 4) + 3, sigma=float(_rand(g, 0.1, 2.0)))
        x = gaussian_blur(x, p["kernel"], p["sigma"])
    if "jitter" in p["ops"]:
        n = round(region_frac * grid * grid)
        mask = torch.stack([torch.randperm(grid * grid, generator=g, device=g.device) < n for _ in range(Fn)])
        mask = mask.view(Fn, grid, grid).cpu()  # (F, g, g) selected cells
        p.update(grid=grid, regions=mask, order=torch.randperm(4, generator=g, device=g.device).tolist())
        for name, lo, hi, off in (("brightness", 0.7, 1.3, 1.0), ("contrast", 0.7, 1.3, 1.0),
                                  ("saturation", 0.7, 1.3, 1.0), ("hue", -0.2, 0.2, 0.0)):
            p[name] = torch.where(mask, _rand(g, lo, hi, (Fn, grid, grid)).cpu(), torch.tensor(off))
        up = lambda t: F.interpolate(t.view(Fn, 1, grid, grid).to(x), size=(H, W), mode="nearest")  # F 1 H W
        x = color_jitter(x, *(up(p[k]) for k in ("brightness", "contrast", "saturation", "hue")), p["order"])
    if "elastic" in p["ops"]:
        p["alpha"] = float(_rand(g, *alpha_range))
        x = elastic_transform(x, p["alpha"], g)
    x = x * 2 - 1
    return (x, p) if return_params else x
