"""TrainConfig: everything that decides one training run, saved whole in metrics.json and in
every checkpoint. The defaults are the ones chosen on a validation split of 10% of the digits
(scripts/tune.sh; docs/results.md, "How the defaults were chosen")."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

DIGITS_MODEL = "vit_tiny_patch2_8"
DIGITS32_MODEL = "vit_mini_patch4_32"
IMAGE_MODEL = "vit_tiny_patch4_32"


# The learning rate each method trained from scratch gets when --lr is not given: the best of
# 5e-4, 1e-3, 2e-3 and 4e-3 on the validation split (2 seeds; scripts/tune.sh stage 1). The
# regularisers (gta, link, link_advanced) tune their weight instead, at their starting point's
# rate: finetune's for gta (the best of 2.5e-4 to 2e-3), the baseline's for the links.
TUNED_LR = {"baseline": 2e-3, "structured": 2e-3, "mimetic": 1e-3, "refiner": 5e-4,
            "finetune": 2e-3}


def default_lr(spec) -> float:
    """The learning rate of a method (a MethodSpec) when --lr is not given: its TUNED_LR entry;
    a combination takes its regulariser's starting point (finetune for gta and finetune), else
    its init's, else the refiner's, else the baseline's."""
    if spec.regulariser in ("gta", "finetune"):
        return TUNED_LR["finetune"]
    if spec.init is not None:
        return TUNED_LR[spec.init]
    if spec.refiner:
        return TUNED_LR["refiner"]
    return TUNED_LR["baseline"]


@dataclass
class TrainConfig:
    method: str = "baseline"  # a method or a '+' combination (methods.py)
    data: str = "digits"  # digits | cifar10:PATH | folder:PATH
    train_fraction: float = 1.0  # stratified fraction of the training split, fixed seed 0
    # a stratified part of that subset held out for validation (fixed seed); 0: evaluate on test
    val_fraction: float = 0.0
    classes: str = ""  # the task's classes ('' = all; '5-9', '0,2,4'), labels renumbered from 0
    seed: int = 0  # model init, data order, augmentation
    epochs: int = 50
    # evaluate on the test (or validation) split after every this many epochs and after the
    # last one; evaluation never changes training, so the final numbers do not depend on it
    eval_every: int = 1
    batch_size: int = 32  # global batch (split over DDP ranks)
    lr: float = 2e-3  # AdamW peak learning rate (the command line's default: default_lr)
    weight_decay: float = 0.05  # AdamW, not applied to biases, norms, tokens, embeddings
    warmup_epochs: int = 5  # linear warm-up, then cosine decay to 0 (per step)
    label_smoothing: float = 0.0
    augment: str = "none"  # none | flip | crop | crop-flip (flips are wrong for digits)
    img_size: int = 32  # folder: images are resized to this
    # a ViT preset; auto: DIGITS_MODEL for digits, DIGITS32_MODEL for digits32, else IMAGE_MODEL
    model: str = "auto"
    model_overrides: dict = field(default_factory=dict)  # ViTConfig fields
    backend: str = "auto"  # attention backend (fastattnreg.backend)
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 (torch.autocast in bfloat16 for forward passes)
    # structured init (docs/methods.md section 2)
    # closed_form's maps are too peaked to train (q/k norm ~6x fit's): 21.9% on the digits
    structured_method: str = "fit"
    structured_kernel: int = 3
    # gta (docs/methods.md section 3)
    gta_source: str = "auto"  # auto | path of a checkpoint written by this tool
    gta_weight: float = 0.01  # validation: 0.001 47.5%, 0.01 / 0.1 / 1.0 50.0% (finetune 67.5%)
    gta_kind: str = "mse_logits"
    gta_rows: str = "cls"
    gta_source_epochs: int = 20  # auto source: epochs on the full training split
    gta_source_seed: int = 0
    # the source's classes: other (those not in `classes`: it never sees the task's labels) |
    # all | a --classes list
    gta_source_classes: str = "other"
    # link (docs/methods.md section 4)
    link_cnn: str = "auto"  # auto (SmallCNN trained here) | torchvision:ARCH:WEIGHTS
    link_weight: float = 0.3  # validation: 0.03 53.8%, 0.1 53.8, 0.3 56.2, 1.0 33.8
    link_decay: float = 0.99
    link_cnn_layers: str = ""  # comma-separated CNN submodule names; '' = the CNN's default
    # link_advanced: links kept per CNN channel, of M*H = 16 on the digits preset; validation:
    # k = 1 41.2%, 2 46.2, 4 50.0, 8 51.2
    link_advanced_k: int = 8
    cnn_epochs: int = 40  # auto CNN: epochs on the same training subset
    cnn_lr: float = 3e-3

    def resolved_model(self) -> str:
        if self.model != "auto":
            return self.model
        return {"digits": DIGITS_MODEL, "digits32": DIGITS32_MODEL}.get(self.data, IMAGE_MODEL)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def key(self) -> str:
        """A short hash of the whole configuration (cache keys)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def with_(self, **changes) -> "TrainConfig":
        d = self.to_dict()
        d.update(changes)
        return TrainConfig.from_dict(d)
