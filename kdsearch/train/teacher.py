"""Teachers: load one (a timm model + checkpoint or hub weights, or the built-in digits CNN)
and run it, for its logits and, for feature or attention distillation, its inner activations.

Every teacher is used through timm's two-step interface, `forward_features(x)` then
`forward_head(features)`, so feature distillation gets the features for free. The built-in
CNN is in kdsearch.models.digits_cnn, the once-per-search logit cache in kdsearch.train.logit_cache.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdsearch.atomic import atomic_path, write_text_atomic
from kdsearch.errors import KdsearchError
from kdsearch.space.datasets import DATASETS
from kdsearch.space.specs import BUILTIN_TEACHER, DataSpec, TeacherSpec
from kdsearch.train.data import Data, load_data

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
    if tspec.model == BUILTIN_TEACHER:
        return _frozen(_load_builtin(tspec, dspec, train_if_missing, log, data))
    return _frozen(_load_timm(tspec, dspec, data))


_SHARED: dict[Any, nn.Module] = {}  # teachers built in this process from shipped weights, by key


@dataclass
class ShippedTeacher:
    """A teacher the driver loaded, as it travels to Ray workers: what it is and its weights on
    the CPU. A worker rebuilds it with `build()`, so no node needs the checkpoint file."""

    key: str  # names these weights (the logit cache's content key)
    teacher: TeacherSpec
    data: DataSpec
    state: dict[str, Tensor]
    input_size: int | None = None  # set: every image is resized to it first (`ResizedInput`)

    @classmethod
    def of(cls, model: nn.Module, spec: Any, key: str, input_size: int | None = None) -> ShippedTeacher:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        return cls(key, spec.teacher, spec.data, state, input_size)

    def build(self) -> nn.Module:
        """The teacher in eval mode with gradients off, built once per process."""
        if self.key not in _SHARED:
            model = _architecture(self.teacher, self.data)
            model.load_state_dict(self.state, strict=True)
            model = _frozen(model)
            _SHARED[self.key] = model if self.input_size is None else ResizedInput(model, self.input_size).eval()
        return _SHARED[self.key]


class ResizedInput(nn.Module):
    """A teacher fed at the input size it was trained at: each batch is resized to `size` x `size`
    (bilinear, antialiased) before its `forward_features`. A study's students train at other
    resolutions than the search's, from the same teacher's signal at its own resolution."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, size
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))

    def forward_features(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.model.forward_features(x)

    def forward_head(self, feats: Tensor) -> Tensor:
        return self.model.forward_head(feats)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _architecture(tspec: TeacherSpec, dspec: DataSpec) -> nn.Module:
    """The teacher's network with fresh weights, sized for the data."""
    if tspec.model == BUILTIN_TEACHER:
        from kdsearch.models.digits_cnn import DigitsCNN

        return DigitsCNN(DATASETS[dspec.name].in_chans, dspec.num_classes or 10)
    import timm

    return timm.create_model(tspec.model, pretrained=False, **timm_kwargs(tspec.model, dspec))


def timm_kwargs(model_name: str, dspec: DataSpec) -> dict[str, Any]:
    """What a timm teacher is created with for the data: its classes, its channels and, for a
    model with a patch embedding (a ViT), its image size (timm resamples the position table of
    pretrained weights to it; a CNN takes any size as it is).

    Args:
        model_name: A timm model name.
        dspec: The data the teacher runs on.

    Returns:
        Keyword arguments of `timm.create_model`.
    """
    import timm

    kwargs: dict[str, Any] = {"num_classes": dspec.num_classes, "in_chans": DATASETS[dspec.name].in_chans}
    with torch.device("meta"):  # the architecture only: no memory, no initialization cost
        probe = timm.create_model(model_name, pretrained=False)
    if isinstance(getattr(getattr(probe, "patch_embed", None), "img_size", None), tuple):
        kwargs["img_size"] = dspec.img_size
    return kwargs


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_builtin(
    tspec: TeacherSpec, dspec: DataSpec, train_if_missing: bool, log: Callable[[str], None], data: Data | None
) -> nn.Module:
    path = Path(tspec.checkpoint) if tspec.checkpoint else None
    if path is None:
        raise KdsearchError("teacher.checkpoint: the built-in teacher needs a checkpoint path to load from or save to")
    stale = path.exists() and _trained_on(path) != (data or load_data(dspec)).fingerprint
    if not path.exists() or stale:
        why = "was trained on other training images than this space's" if stale else "is missing"
        if not train_if_missing:
            raise KdsearchError(
                f"teacher.checkpoint: {path} {why}; train it with `kdsearch teacher train SPACE --force`"
            )
        log(f"teacher checkpoint {path} {why}: training the built-in {BUILTIN_TEACHER} on {dspec.name} (once)")
        from kdsearch.train.digits_teacher import train_digits_teacher

        data = data or load_data(dspec)
        t0 = time.perf_counter()
        model, acc = train_digits_teacher(data, log=log)
        save_teacher(model, path, builtin_teacher_meta(data, acc))
        log(f"teacher trained in {time.perf_counter() - t0:.1f} s: val_acc {acc:.4f}, saved to {path}")
        return model
    model = _architecture(tspec, dspec)
    _load_state(model, read_checkpoint(path), path)
    return model


FINETUNE = "kdsearch teacher finetune SPACE"
"""The command that makes a timm teacher for a space's data (kdsearch.train.finetune)."""


def _load_timm(tspec: TeacherSpec, dspec: DataSpec, data: Data | None) -> nn.Module:
    """The checkpoint when the space gives one (checked against the data: its classes, the
    training split it learned from), else timm's pretrained weights with their own head."""
    check_timm_name(tspec.model)
    if tspec.checkpoint:
        path = Path(tspec.checkpoint)
        if not path.is_file():
            make = (
                f"make it with `{FINETUNE}`"
                if tspec.pretrained
                else f"or set pretrained: true and make it with `{FINETUNE}`"
            )
            raise KdsearchError(f"teacher.checkpoint: {path} does not exist; {make}")
        model = _architecture(tspec, dspec)
        state = read_checkpoint(path)
        classes = checkpoint_classes(model, state)
        if classes is not None and classes != dspec.num_classes:
            raise KdsearchError(
                f"teacher.checkpoint: {path} has {classes} classes but {dspec.name} has {dspec.num_classes}; "
                f"fine-tune {tspec.model} on this data with `{FINETUNE} --force`"
            )
        trained_on = _trained_on(path)
        if trained_on is not None and trained_on != (data or load_data(dspec)).fingerprint:
            raise KdsearchError(
                f"teacher.checkpoint: {path} was trained on other training images than this space's; "
                f"fine-tune it again with `{FINETUNE} --force`"
            )
        _load_state(model, state, path)
        return model
    sized = {k: v for k, v in timm_kwargs(tspec.model, dspec).items() if k != "num_classes"}  # the hub's own head
    model = pretrained_model(tspec, sized)
    if model.num_classes != dspec.num_classes:
        raise KdsearchError(
            f"teacher.pretrained: {tspec.model}'s weights have {model.num_classes} classes but {dspec.name} has {dspec.num_classes}; "
            f"give teacher.checkpoint a path and fine-tune it on your data with `{FINETUNE}`"
        )
    return model


def check_timm_name(name: str) -> None:
    """Raises KdsearchError (one line, with similar names) when timm has no model `name`."""
    import timm

    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('.')[0][:6]}*")[:3]
        hint = f" (similar: {', '.join(near)})" if near else ""
        raise KdsearchError(f"teacher.model: {name!r} is not a timm model{hint}")


def pretrained_model(tspec: TeacherSpec, kwargs: dict[str, Any], overlay: dict[str, Any] | None = None) -> nn.Module:
    """`tspec.model` with timm's pretrained weights, loaded by timm's pretrained config: from the
    hub, or from `teacher.pretrained_file` (the config's `file`), or from what `overlay` sets.

    Args:
        tspec: The teacher.
        kwargs: `timm.create_model`'s other arguments (a new head's classes, channels, image size).
        overlay: Entries of the pretrained config set on top of the file's.

    Returns:
        The model, in train mode.

    Raises:
        KdsearchError: the weights cannot be fetched or read, in one line.
    """
    import timm

    overlay = {**({"file": tspec.pretrained_file} if tspec.pretrained_file else {}), **(overlay or {})}
    if "file" in overlay and not Path(overlay["file"]).is_file():
        raise KdsearchError(f"teacher.pretrained_file: {overlay['file']} does not exist")
    try:
        with _missing_keys() as missing:
            model = timm.create_model(tspec.model, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except Exception as e:  # hub errors come in many types; all mean the same to the user
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if "state_dict" in overlay:
            raise KdsearchError(f"teacher.checkpoint: its weights do not load into {tspec.model} ({error})") from None
        if "file" in overlay:
            raise KdsearchError(
                f"teacher.pretrained_file: {overlay['file']} does not load into {tspec.model} ({error})"
            ) from None
        raise KdsearchError(
            f"teacher.pretrained: could not fetch weights for {tspec.model} from the hub ({error}); "
            "without internet give teacher.pretrained_file: a local copy of them"
        ) from None
    classifier = {f"{name}.{p}" for name, _ in [_classifier(model)] if name for p in ("weight", "bias")}
    lost = [k for k in missing if k not in classifier]
    if lost:  # timm loads non-strictly once it drops a head: weights of another model would load as nothing
        what = "the checkpoint" if "state_dict" in overlay else overlay.get("file", "the hub's weights")
        raise KdsearchError(
            f"teacher.pretrained: {what} lacks {len(lost)} of {tspec.model}'s weights ({', '.join(lost[:3])}, ...): "
            "they are another model's"
        )
    return model


@contextlib.contextmanager
def _missing_keys() -> Iterator[list[str]]:
    """The weights timm's pretrained loading left at their initialization, read from its log
    record ("Missing keys (a, b) discovered while loading pretrained weights"), which is kept
    from the user's console while the block runs."""
    logger, found = logging.getLogger("timm.models._builder"), []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            match = re.match(r"Missing keys \((.*)\) discovered", record.getMessage())
            found.extend(match.group(1).split(", ") if match else [])

    handler, level, propagate = Collect(logging.INFO), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _classifier(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    """The name and module of a timm model's classifier (get_classifier), when it is one Linear."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        return None, None
    return next((n for n, m in model.named_modules() if m is head), None), head


def checkpoint_classes(model: nn.Module, state: dict[str, Tensor]) -> int | None:
    """The classes of a state dict's classifier, found by the model's (timm's get_classifier);
    None when the model or the state has none."""
    name, _ = _classifier(model)
    weight = state.get(f"{name}.weight") if name is not None else None
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def read_checkpoint(path: Path) -> dict[str, Tensor]:
    """safetensors, or a torch file read with weights_only=True (never unpickling code), told
    apart by their content, whatever the file's suffix."""
    try:
        if is_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with open(path, "rb") as f:  # a file object: torch.load would go by a .safetensors suffix itself
                state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KdsearchError(
            f"teacher.checkpoint: cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        ) from None
    for key in ("state_dict", "model", "model_ema"):  # common training-script wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise KdsearchError(f"teacher.checkpoint: {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def is_safetensors(path: Path) -> bool:
    """A safetensors file begins with its JSON header's length (8 bytes, little-endian) and then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000


def _load_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e).splitlines()[0]
        raise KdsearchError(f"teacher.checkpoint: {path} does not fit the teacher model: {first[:200]}") from None


def builtin_teacher_meta(data: Data, val_acc: float) -> dict[str, Any]:
    """What the built-in teacher's YAML says: what it is and the training split it learned from
    (its fingerprint): a teacher trained on other images (say, before the test split was held
    out) would carry what it saw of the test images into every student."""
    d = data.spec
    return {
        "model": BUILTIN_TEACHER,
        "data": d.name,
        "img_size": d.img_size,
        "val_acc": val_acc,
        "train_fingerprint": data.fingerprint,
    }


def teacher_meta(path: Path) -> dict[str, Any]:
    """The YAML beside a teacher's checkpoint (`save_teacher`'s), or {} when there is none to read."""
    import yaml

    meta_path = path.with_suffix(".yaml")
    try:
        meta = yaml.safe_load(meta_path.read_text()) if meta_path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _trained_on(path: Path) -> str | None:
    """The training split's fingerprint in a teacher's YAML (None when it has none)."""
    return teacher_meta(path).get("train_fingerprint")


def save_teacher(model: nn.Module | dict[str, Tensor], path: Path, meta: dict[str, Any]) -> None:
    """Weights (a model's, or a state dict) as safetensors and a small YAML beside them, each
    written then renamed."""
    import yaml
    from safetensors.torch import save_file

    state = model if isinstance(model, dict) else model.state_dict()
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
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
