"""
CLIP ViT-L/14 text encoder + BPE tokenizer: the prompt encoder of SD-1.5, AnimateDiff and FLASH (arXiv 2503.00276).
Model and key names follow transformers' CLIPTextModel (models/clip/modeling_clip.py); the tokenizer is the HF
`tokenizers` pipeline of transformers' CLIPConverter; the vocab derivation follows OpenAI CLIP's simple_tokenizer.py
(https://github.com/openai/CLIP/blob/main/clip/simple_tokenizer.py). SD conditions on last_hidden_state (B, 77, 768).
"""
import gzip
import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from model import attention, load_checked, load_state_dict_file, read_json


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # head dim 64
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # SD-1.5 / OpenAI CLIP; "gelu" for SD-2's OpenCLIP folders


class CLIPAttention(nn.Module):
    def __init__(self, c, causal=True):
        super().__init__()
        self.n_head, self.causal = c.num_attention_heads, causal
        d = c.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = (p(x).view(B, L, self.n_head, C // self.n_head).transpose(1, 2)  # B nh L hs
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = attention(q, k, v, causal=self.causal)  # causal (text): token i sees tokens <= i; ViT: all patches
        return self.out_proj(y.transpose(1, 2).reshape(B, L, C))


class CLIPLayer(nn.Module):
    def __init__(self, c, causal=True):
        super().__init__()
        self.act = c.hidden_act
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c, causal)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.mlp.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        h = self.mlp.fc1(self.layer_norm2(x))
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return x + self.mlp.fc2(h)


class CLIPTextModel(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = c = config or CLIPTextConfig()
        assert c.hidden_act in ("quick_gelu", "gelu"), c.hidden_act
        self.text_model = tm = nn.Module()  # plain namespaces so attribute paths = transformers keys
        tm.embeddings = nn.Module()
        tm.embeddings.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        tm.embeddings.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        tm.encoder = nn.Module()
        tm.encoder.layers = nn.ModuleList(CLIPLayer(c) for _ in range(c.num_hidden_layers))
        tm.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids, clip_skip=0):
        """ids (B, L) long -> (B, L, hidden). clip_skip=k: output of layer N-k, then final LN (diffusers' clip_skip)."""
        tm = self.text_model
        pos = torch.arange(ids.shape[1], device=ids.device)  # never the stored position_ids (often corrupted)
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding(pos)
        for layer in tm.encoder.layers[:len(tm.encoder.layers) - clip_skip]:
            x = layer(x)
        return tm.final_layer_norm(x)


# ----------------------------------------------------------------------------- tokenizer

def _byte_chars():
    """GPT-2 bytes_to_unicode in its own order: printable bytes map to themselves, the other 68 to chr(256+n)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in bs] + [chr(256 + n) for n in range(256 - len(bs))]


def bpe_from_gz(path):
    """CLIP's bpe_simple_vocab_16e6.txt.gz -> (vocab {token: id} with 49408 entries, 48894 merges 'a b')."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is the '#version' header
    chars = _byte_chars()
    tokens = chars + [ch + "</w>" for ch in chars] + ["".join(m.split()) for m in merges]
    return {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}, merges


def byte_vocab():
    """Tiny byte-level vocab (514 tokens, no merges) for tests and the demo: one token per byte."""
    chars = _byte_chars()
    tokens = chars + [ch + "</w>" for ch in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, []


class Tokenizer:
    """Tokenizer(vocab.json | dict, merges.txt | list); __call__(prompt | prompts) -> LongTensor (B, 77), EOS-padded."""

    def __init__(self, vocab, merges, max_length=77):
        self.vocab = vocab if isinstance(vocab, dict) else read_json(vocab)
        if not isinstance(merges, list):
            lines = Path(merges).read_text(encoding="utf-8").split("\n")
            merges = [m for m in lines[1 if lines[0].startswith("#version") else 0:] if m.strip()]
        self.merges, self.max_length = merges, max_length
        self.bos, self.eos = self.vocab["<|startoftext|>"], self.vocab["<|endoftext|>"]
        tok = HFTokenizer(BPE(self.vocab, [tuple(m.split()) for m in merges], continuing_subword_prefix="",
                              end_of_word_suffix="</w>", fuse_unk=False, unk_token="<|endoftext|>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase(), normalizers.Strip()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([  # CLIP's split regex (digits one by one), then bytes -> unicode
            pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                                 "removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>", special_tokens=[
            ("<|startoftext|>", self.bos), ("<|endoftext|>", self.eos)])
        # the two special strings inside a prompt are single tokens, as in OpenAI's simple_tokenizer and transformers
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|startoftext|>", "<|endoftext|>")])
        tok.decoder = decoders.ByteLevel()
        self.tok = tok

    def __call__(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out, dropped = torch.full((len(prompts), self.max_length), self.eos, dtype=torch.long), []
        for i, enc in enumerate(self.tok.encode_batch(prompts)):
            ids = enc.ids
            if len(ids) > self.max_length:  # keep BOS + first max_length-2 tokens + EOS, like SD's truncation=True
                dropped.append((len(ids) - self.max_length, prompts[i]))
                ids = ids[:self.max_length - 1] + [self.eos]
            out[i, :len(ids)] = torch.tensor(ids)
        if dropped:
            n, p = dropped[0]
            more = f" (and {len(dropped) - 1} more prompts)" if len(dropped) > 1 else ""
            warnings.warn(f"prompt longer than {self.max_length - 2} tokens, dropped its last {n} tokens: "
                          f"{p[:60]!r}...{more}")
        return out


def load_tokenizer(path):
    """SD folder (tokenizer/vocab.json + merges.txt) or a folder holding vocab.json + merges.txt."""
    for d in (Path(path) / "tokenizer", Path(path)):
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return Tokenizer(d / "vocab.json", d / "merges.txt")
    raise FileNotFoundError(f"no vocab.json + merges.txt in {path} or {Path(path) / 'tokenizer'}")


def save_tokenizer(tok, folder):
    """tok: a Tokenizer or a (vocab, merges) pair, e.g. from bpe_from_gz / byte_vocab. Writes HF's two files."""
    vocab, merges = (tok.vocab, tok.merges) if isinstance(tok, Tokenizer) else tok
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2"] + list(merges)) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- checkpoints

def load_text_encoder(path, **overrides):
    """SD folder (text_encoder/), a text_encoder folder itself, or a single-file LDM checkpoint
    (cond_stage_model.transformer.[text_model.]*). config.json is read when present; overrides win. Returns fp32."""
    path, cfg = Path(path), {}
    if path.is_dir():
        path = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        if (path / "config.json").is_file():
            cfg = read_json(path / "config.json")
        files = [path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()]
        if not files:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
        path = files[0]
    elif not path.is_file():
        raise FileNotFoundError(f"text encoder checkpoint not found: {path}")
    sd = load_state_dict_file(path)
    prefix = "cond_stage_model.transformer."
    if any(k.startswith(prefix) for k in sd):  # LDM single file: keep the CLIP part only
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    # old LDM files and transformers>=5 saves lack `text_model.`; stored position_ids are ignored on purpose
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v
          for k, v in sd.items() if not k.endswith("position_ids")}
    names = {f.name for f in fields(CLIPTextConfig)}
    config = CLIPTextConfig(**{k: v for k, v in {**cfg, **overrides}.items() if k in names})
    model = CLIPTextModel(config)
    load_checked(model, sd, f"text encoder ({path})")
    return model.eval()


def save_text_encoder(model, folder):
    """transformers layout: config.json + model.safetensors. Pass <sd_root>/text_encoder for an SD folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **asdict(model.config),
           "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}  # SD-1.5's legacy values (unused by SD)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"))
