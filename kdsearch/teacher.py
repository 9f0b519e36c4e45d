"""Teachers: load one (a timm model + checkpoint or hub weights, or the built-in digits CNN),
train the built-in one, and cache a teacher's logits over the training set once per search.

Every teacher is used through timm's two-step interface, `forward_features(x)` then
`forward_head(features)`, so feature distillation gets the features for free. The cache is
keyed by a content hash of the teacher's weights and of the training images' identity and
transform: trials read it instead of running the teacher. Only feature or attention
distillation, or a random training augmentation, needs the teacher live.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.atomic import atomic_path, write_text_atomic
from kdsearch.data import Data, evaluate, load_data
from kdsearch.errors import KdsearchError
from kdsearch.specs import DataSpec, TeacherSpec

BUILTIN = "kdsearch/digits_cnn"
TOPK_CLASSES = 100  # above this many classes the cache keeps the top-k logits only (TinyViT)
TOPK = 10


# --------------------------------------------------------------------------------------
# The built-in teacher
# --------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """A small CNN for the embedded digits: two conv stages, global pooling, a linear head."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

        self.stem = stage(in_chans, width)
        self.stage2 = stage(width, 2 * width)
        self.head = nn.Linear(2 * width, num_classes)
        self.num_classes = num_classes
        self.num_features = 2 * width

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 2w, H/4, W/4) feature map."""
        x = F.max_pool2d(self.stem(x), 2)
        return F.max_pool2d(self.stage2(x), 2)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def train_digits_teacher(
    data: Data, epochs: int = 20, seed: int = 0, log: Callable[[str], None] = lambda s: None
) -> tuple[DigitsCNN, float]:
    """Train the built-in CNN on `data`; returns it (eval mode) and its val accuracy."""
    torch.manual_seed(seed)
    model = DigitsCNN(data.in_chans, data.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * -(-data.num_train // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        for x, y, _ in data.train_batches(64, epoch, seed):
            x = _shift(x, epoch)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, data)
        log(f"teacher epoch {epoch + 1}/{epochs}: val_acc {acc:.4f}")
    model.eval()
    return model, acc


def _shift(x: Tensor, epoch: int) -> Tensor:
    """A random shift by up to one pixel (a cheap augmentation for 16px digits)."""
    g = torch.Generator().manual_seed(epoch)
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_teacher(
    space: Any,
    train_if_missing: bool = False,
    log: Callable[[str], None] = lambda s: None,
    data: Data | None = None,
) -> nn.Module:
    """The teacher a space (or TrialSpec) names, in eval mode with gradients off.

    Raises KdsearchError with one clear line for an unknown timm name, a missing or
    unreadable checkpoint, hub weights that can't be fetched, or a class-count mismatch.
    The built-in teacher is trained and saved where the space points when it is missing
    and `train_if_missing` is set.
    """
    tspec: TeacherSpec = space.teacher
    dspec: DataSpec = space.data
    if tspec.model == BUILTIN:
        model = _load_builtin(tspec, dspec, train_if_missing, log, data)
    else:
        model = _load_timm(tspec, dspec)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_builtin(tspec: TeacherSpec, dspec: DataSpec, train_if_missing: bool, log: Callable[[str], None], data: Data | None) -> nn.Module:
    path = Path(tspec.checkpoint) if tspec.checkpoint else None
    if path is None:
        raise KdsearchError("teacher.checkpoint: the built-in teacher needs a checkpoint path to load from or save to")
    in_chans = 1 if dspec.name == "digits" else 3
    if not path.exists():
        if not train_if_missing:
            raise KdsearchError(f"teacher.checkpoint: {path} does not exist; train it with `kdsearch teacher train SPACE`")
        log(f"teacher checkpoint {path} is missing: training the built-in {BUILTIN} on {dspec.name} (once)")
        data = data or load_data(dspec)
        t0 = time.perf_counter()
        model, acc = train_digits_teacher(data, log=log)
        save_teacher(model, path, {"model": BUILTIN, "data": dspec.name, "img_size": dspec.img_size, "val_acc": acc})
        log(f"teacher trained in {time.perf_counter() - t0:.1f} s: val_acc {acc:.4f}, saved to {path}")
        return model
    model = DigitsCNN(in_chans, dspec.num_classes or 10)
    _load_state(model, _read_checkpoint(path), path)
    return model


def _load_timm(tspec: TeacherSpec, dspec: DataSpec) -> nn.Module:
    import timm

    if not timm.is_model(tspec.model):
        near = timm.list_models(f"*{tspec.model.split('.')[0][:6]}*")[:3]
        hint = f" (similar: {', '.join(near)})" if near else ""
        raise KdsearchError(f"teacher.model: {tspec.model!r} is not a timm model{hint}")
    in_chans = 1 if dspec.name == "digits" else 3
    if tspec.pretrained:
        try:
            model = timm.create_model(tspec.model, pretrained=True, in_chans=in_chans)
        except Exception as e:  # hub errors come in many types; all mean the same to the user
            raise KdsearchError(
                f"teacher.pretrained: could not fetch weights for {tspec.model} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                "without internet give a local checkpoint instead"
            ) from None
        if model.num_classes != dspec.num_classes:
            raise KdsearchError(
                f"teacher.pretrained: {tspec.model}'s weights have {model.num_classes} classes but {dspec.name} has {dspec.num_classes}; "
                "fine-tune the teacher on your data and give its checkpoint"
            )
        return model
    model = timm.create_model(tspec.model, pretrained=False, num_classes=dspec.num_classes, in_chans=in_chans)
    path = Path(tspec.checkpoint or "")
    if not path.is_file():
        raise KdsearchError(f"teacher.checkpoint: {path} does not exist")
    _load_state(model, _read_checkpoint(path), path)
    return model


def _read_checkpoint(path: Path) -> dict[str, Tensor]:
    """safetensors, or a torch file read with weights_only=True (never unpickling code)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise KdsearchError(f"teacher.checkpoint: cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from None
    for key in ("state_dict", "model", "model_ema"):  # common training-script wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise KdsearchError(f"teacher.checkpoint: {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e).splitlines()[0]
        raise KdsearchError(f"teacher.checkpoint: {path} does not fit the teacher model: {first[:200]}") from None


def save_teacher(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """Weights as safetensors and a small YAML beside them, each written then renamed."""
    import yaml
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_text_atomic(path.with_suffix(".yaml"), yaml.safe_dump(meta, sort_keys=False))


# --------------------------------------------------------------------------------------
# Running the teacher
# --------------------------------------------------------------------------------------


@dataclass
class TeacherOutput:
    logits: Tensor
    features: Tensor | None = None  # (B, C, h, w) for a CNN, (B, N, D) patch tokens for a ViT
    attn: Tensor | None = None  # last block's attention probabilities (B, H, T, T)
    num_prefix_tokens: int = 0


@torch.no_grad()
def run_teacher(teacher: nn.Module, x: Tensor, features: bool = False, attn: bool = False) -> TeacherOutput:
    """The teacher's logits, and its final features / last attention map when asked for."""
    prefix = int(getattr(teacher, "num_prefix_tokens", 0))
    captured: dict[str, Tensor] = {}
    handle = None
    if attn:
        last = _last_attention_module(teacher)
        handle = last.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
    try:
        feats = teacher.forward_features(x)
        logits = teacher.forward_head(feats)
    finally:
        if handle is not None:
            handle.remove()
    attn_map = _attention_probs(_last_attention_module(teacher), captured["x"]) if attn else None
    if features and feats.dim() == 3:  # ViT tokens: keep the patch tokens
        feats = feats[:, prefix:]
    return TeacherOutput(logits.float(), feats.float() if features else None, attn_map, prefix)


def _last_attention_module(teacher: nn.Module) -> nn.Module:
    blocks = getattr(teacher, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not hasattr(attn, "qkv"):
        raise KdsearchError(
            f"recipe.attention_weight: the teacher {type(teacher).__name__} has no ViT attention (blocks[-1].attn.qkv); "
            "attention distillation needs a timm ViT teacher"
        )
    return attn


def _attention_probs(attn: nn.Module, x: Tensor) -> Tensor:
    """Recompute timm's Attention probabilities from its input (its fused path never forms them)."""
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).float()


# --------------------------------------------------------------------------------------
# The once-per-search logit cache
# --------------------------------------------------------------------------------------


@dataclass
class TeacherLogits:
    """The teacher's logits for every training image, dense or top-k sparse.

    Sparse rows keep the k largest logits; the other classes get that row's smallest kept
    logit, which keeps the top-k order and (at any temperature) gives each dropped class at
    most the probability of the least likely kept one.
    """

    values: Tensor  # (N, K) dense, or (N, k) top-k values
    indices: Tensor | None = None  # (N, k) class indices when sparse
    num_classes: int = 0
    key: str = ""

    def take(self, idx: Tensor) -> Tensor:
        """Dense (B, K) float32 logits of the training images with dataset indices `idx`."""
        vals = self.values[idx].float()
        if self.indices is None:
            return vals
        dense = vals.min(dim=1, keepdim=True).values.expand(-1, self.num_classes).clone()
        return dense.scatter_(1, self.indices[idx].long(), vals)


def cache_key(tspec: TeacherSpec, data: Data) -> str:
    """A content hash of the teacher's weights and the exact training images and transform."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": tspec.model, "pretrained": tspec.pretrained, "data": data.fingerprint}).encode())
    if tspec.checkpoint and Path(tspec.checkpoint).is_file():
        with open(tspec.checkpoint, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def teacher_logits(
    teacher: nn.Module, data: Data, tspec: TeacherSpec, cache_dir: str | os.PathLike, batch_size: int = 256
) -> tuple[TeacherLogits, int]:
    """Read the cached logits, or compute them once and cache them.

    Returns the logits and how many images went through the teacher (0 on a cache hit).
    The files are written to a temporary name and renamed, so concurrent trials never
    read a torn cache.
    """
    key = cache_key(tspec, data)
    cache_dir = Path(cache_dir)
    sparse = data.num_classes > TOPK_CLASSES
    vpath = cache_dir / f"teacher-logits-{key}.values.npy"
    ipath = cache_dir / f"teacher-logits-{key}.indices.npy"
    if vpath.exists() and (not sparse or ipath.exists()):
        values = torch.from_numpy(np.load(vpath))
        indices = torch.from_numpy(np.load(ipath)) if sparse else None
        return TeacherLogits(values, indices, data.num_classes, key), 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = teacher.to(device)
    chunks = []
    seen = 0
    for x, _, idx in data.train_batches_in_order(batch_size):
        assert int(idx[0]) == seen, "training images must come in index order"
        chunks.append(run_teacher(teacher, x.to(device)).logits.cpu())
        seen += len(idx)
    logits = torch.cat(chunks)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if sparse:
        top = logits.topk(TOPK, dim=1)
        result = TeacherLogits(top.values.contiguous(), top.indices.to(torch.int32).contiguous(), data.num_classes, key)
        _save_npy(ipath, result.indices.numpy())
    else:
        result = TeacherLogits(logits, None, data.num_classes, key)
    _save_npy(vpath, result.values.numpy())
    return result, seen


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
