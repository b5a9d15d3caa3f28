"""Methods and their combinations: parsing `--method a+b`, building the model and the training
task (a module whose forward(x) returns (logits, regulariser)).

  baseline    the ViT with timm's default init
  structured  structured (impulse) init of every attention layer (fastattnreg.init), on a ViT
              with the fixed sin-cos position embedding that the init is computed for
  mimetic     mimetic init (fastattnreg.init)
  refiner     RefinerAttention in every block (ViTConfig attn="refiner")
  gta         fine-tune from a source ViT with GTALoss (source: --gta-source CKPT or auto)
  finetune    fine-tune from the same source without the regulariser (gta's reference row)
  link        train with AttentionLink to a frozen CNN (--link-cnn auto or torchvision:...)
  link_advanced  AAL's advanced links: the links a `link` run of the same seed ends with keep,
              per CNN channel, their --link-advanced-k strongest entries (AttentionLink.advanced);
              a fresh ViT (the same initial weights) trains with those sparse links
  cnn         the small CNN alone (the guide `link` trains), for reference; not combinable

Combinations join them with '+': at most one init (structured / mimetic) and at most one of gta
/ finetune / link / link_advanced. With gta the init applies to the *source* (the model trained from scratch): the student
starts as a copy of the source's weights, as GTA fine-tunes. refiner does not combine with gta
or link: both read the attention through FusedAttention's map slots, which RefinerAttention's
refined maps do not feed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from ..backend import resolve
from ..init import mimetic_init_, structured_init_
from ..models import ViTConfig, VisionTransformer, create_model
from ..nn.regularizers import AttentionLink, GTALoss
from .config import TrainConfig

METHODS = ("baseline", "structured", "mimetic", "refiner", "gta", "finetune", "link",
           "link_advanced", "cnn")
INITS = ("structured", "mimetic")
# at most one: each decides how the ViT starts or trains
REGULARISERS = ("gta", "link", "link_advanced", "finetune")
LINKS = ("link", "link_advanced")  # the regularisers that train AttentionLink


class MethodError(ValueError):
    """An unknown or impossible method; one-line message."""


@dataclass(frozen=True)
class MethodSpec:
    init: Optional[str] = None  # "structured" | "mimetic"
    refiner: bool = False
    regulariser: Optional[str] = None  # "gta" | "finetune" | "link" | "link_advanced"
    cnn: bool = False

    @property
    def name(self) -> str:
        if self.cnn:
            return "cnn"
        parts = [p for p in (self.init, "refiner" if self.refiner else None, self.regulariser) if p]
        return "+".join(parts) or "baseline"

    @property
    def scratch_name(self) -> str:
        """The method of the model trained from scratch (the GTA source): init (+ refiner)."""
        return MethodSpec(self.init, self.refiner).name

    @property
    def basic_link_name(self) -> str:
        """The `link` method whose final links link_advanced starts from (same init)."""
        return MethodSpec(self.init, self.refiner, "link").name


def parse_method(text: str) -> MethodSpec:
    """'structured+gta' -> MethodSpec; MethodError naming the problem otherwise."""
    parts = [p.strip() for p in str(text).split("+")]
    for p in parts:
        if p not in METHODS:
            raise MethodError(f"unknown method {p!r} in {text!r}; methods: {', '.join(METHODS)} "
                              "(combine with '+', e.g. structured+gta)")
    if len(set(parts)) != len(parts):
        raise MethodError(f"method {text!r} repeats a part")
    if "cnn" in parts and len(parts) > 1:
        raise MethodError(f"method {text!r}: cnn trains the CNN alone and combines with nothing")
    inits = [p for p in parts if p in INITS]
    regs = [p for p in parts if p in REGULARISERS]
    if len(inits) > 1:
        raise MethodError(f"method {text!r}: choose one init, structured or mimetic")
    if len(regs) > 1:
        raise MethodError(f"method {text!r}: {' and '.join(regs)} each decide how the ViT "
                          "starts or trains; choose one")
    if "refiner" in parts and set(regs) & {"gta", *LINKS}:
        raise MethodError(f"method {text!r}: refiner does not combine with {regs[0]} (the "
                          "regularisers read FusedAttention maps, not refined ones)")
    if "baseline" in parts and len(parts) > 1:
        raise MethodError(f"method {text!r}: baseline combines with nothing")
    return MethodSpec(init=inits[0] if inits else None, refiner="refiner" in parts,
                      regulariser=regs[0] if regs else None, cnn="cnn" in parts)


def parse_overrides(items) -> dict:
    """['depth=6', 'global_pool=avg'] -> {'depth': 6, 'global_pool': 'avg'} (ints, floats,
    true/false parsed)."""
    out = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MethodError(f"--model-opt must be KEY=VALUE; got {item!r}")
        value: object = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    pass
        out[key] = value
    return out


# ------------------------------------------------------------------------------ models

def vit_overrides(config: TrainConfig, data_info: dict, spec: MethodSpec) -> dict:
    over = dict(img_size=data_info["img_size"], in_chans=data_info["in_chans"],
                num_classes=data_info["num_classes"], backend=config.backend)
    if spec.init == "structured":
        # the impulse fit is computed on the fixed sin-cos embedding (docs/methods.md section 2)
        over["pos_embed"] = "sincos"
    over.update(config.model_overrides)
    if spec.refiner:
        over["attn"] = "refiner"
        over["backend"], _ = refiner_backend(over["backend"], config.device)
    return over


def refiner_backend(backend: str, device: str) -> tuple[str, str]:
    """(backend for a refiner ViT, note or ''): where the chosen backend has no fused
    refined_attention kernel (the C++ extension not built, or Triton not installed on CUDA), the
    refiner runs on the reference path instead of failing, and the note says so in every log
    line."""
    chosen = resolve(backend, torch.device(device))
    if chosen == "triton" and not hasattr(torch.ops.fastattnreg, "triton_refined_attention_fwd"):
        return "reference", "refiner on the reference path (no Triton refined_attention kernel)"
    if chosen == "reference" and backend != "reference":
        missing = "Triton not installed" if device.startswith("cuda") else "C++ kernels not built"
        return "reference", f"refiner on the reference path ({missing})"
    return backend, ""


def build_vit(config: TrainConfig, data_info: dict, spec: MethodSpec) -> nn.Module:
    """The ViT of `spec`, initialised from the current torch RNG (the caller seeds it)."""
    try:
        model = create_model(config.resolved_model(), **vit_overrides(config, data_info, spec))
    except (ValueError, RuntimeError) as exc:
        raise MethodError(f"model {config.resolved_model()!r}: {exc}") from None
    if spec.init is not None:
        apply_init(model, spec.init, config)
    return model


def apply_init(model: nn.Module, init: str, config: TrainConfig) -> None:
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # from the seeded torch RNG
    if init == "structured":
        structured_init_(model, kernel_size=config.structured_kernel,
                         method=config.structured_method, seed=seed)
    else:
        mimetic_init_(model, seed=seed)


def vit_from_checkpoint(ckpt: dict) -> nn.Module:
    """The ViT saved in a checkpoint of this tool (its ViTConfig is stored beside it)."""
    model = VisionTransformer(ViTConfig(**ckpt["vit_config"]))
    model.load_state_dict(ckpt["model"])
    return model


# ------------------------------------------------------------------------------ tasks

class PlainTask(nn.Module):
    """forward(x) -> (logits, 0): training without a regulariser."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x), x.new_zeros(())


class LinkTask(nn.Module):
    """AttentionLink with the CNN's own input transform (e.g. grey -> RGB for torchvision)."""

    def __init__(self, link: nn.Module, cnn_input: Optional[nn.Module]) -> None:
        super().__init__()
        self.link = link
        self.cnn_input = cnn_input

    def set_epoch(self, epoch: int) -> None:
        self.link.set_epoch(epoch)

    def forward(self, x: torch.Tensor):
        cnn_x = self.cnn_input(x) if self.cnn_input is not None else None
        return self.link(x, cnn_x)


def make_gta_task(student: nn.Module, source: nn.Module, config: TrainConfig) -> nn.Module:
    return GTALoss(student, source, kind=config.gta_kind, rows=config.gta_rows,
                   weight=config.gta_weight)


def make_link_task(vit: nn.Module, cnn: nn.Module, cnn_layers, cnn_input, config: TrainConfig,
                   data_info: dict) -> nn.Module:
    c = 3 if cnn_input is not None else data_info["in_chans"]
    s = max(32, data_info["img_size"]) if cnn_input is not None else data_info["img_size"]
    link = AttentionLink(vit, cnn, list(cnn_layers), weight=config.link_weight,
                         decay=config.link_decay, cnn_input_size=(c, s, s))
    return LinkTask(link, cnn_input)


def advance_links(task: LinkTask, k: int, links: Optional[dict] = None) -> LinkTask:
    """link_advanced's task: `links` ({"weight": (C, M*H, 1, 1), "bias": (C,)}, the final links
    of a `link` run) are loaded into the task's links, then AttentionLink.advanced(k) keeps, per
    CNN channel, the k largest in magnitude; the kept links go on training. links=None keeps
    the task's own (freshly initialised) links, which is what a dry run checks. ValueError
    when k is outside [1, M*H]."""
    if links is not None:
        with torch.no_grad():
            task.link.links.weight.copy_(links["weight"])
            task.link.links.bias.copy_(links["bias"])
    task.link = task.link.advanced(k)
    return task


def new_head(student: nn.Module, num_classes: int) -> None:
    """Replaces the classifier by a fresh one for num_classes labels (timm's init: truncated
    normal weights, std .02, zero bias; from the seeded RNG), and records the class count in
    the ViT's config (checkpoints rebuild the ViT from it)."""
    head = nn.Linear(student.head.in_features, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    student.head = head
    student.config = replace(student.config, num_classes=num_classes)


def gta_student(source: nn.Module) -> nn.Module:
    """GTA's student: a trainable copy of the source (fine-tuning starts from its weights)."""
    student = copy.deepcopy(source)
    student.requires_grad_(True)
    student.train()
    return student
