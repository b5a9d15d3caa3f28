"""Attention regularisers for ViTs trained on little data (docs/methods.md sections 3 and 4).

GTALoss       Guided Transfer of spatial Attention: a frozen source ViT guides the attention of
              the student being fine-tuned, through the fused `attention_match` op (no map is
              ever materialised).
AttentionLink Adaptive attention links (AAL): a trainable 1x1 conv maps the ViT's CLS->patch
              attention maps onto a frozen CNN's channel maps, with an attention-transfer loss.

Both wrap the models they regularise and return `(logits, regulariser)` from `forward(x)`, so a
training step is `logits, reg = module(x); loss = ce(logits, y) + reg`. Both drive the models'
FusedAttention layers through the layers' own slots (capture_qk / match_teacher / export) and
clear those slots before returning, so that no tensor outlives the step.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.checks import MATCH_KINDS, MATCH_ROWS, check_choice
from .attention import FusedAttention
from .layer_select import check_number, fused_attention_layers, select_indices

VIT_MAPS = ("auto", "cls", "received")


class GTALoss(nn.Module):
    """GTA (Seo et al., arXiv 2401.02656): match the student's attention to a frozen source's.

    regulariser = weight * sum_l H_l * loss_l, where loss_l is `attention_match`'s loss at
    chosen layer l: the mean over batch, heads and matched rows of the per-row divergence
    between student and source attention. Since attention_match already averages over the H_l
    heads, multiplying by H_l turns that mean into GTA's *sum* over heads, so the regulariser is
    weight * sum_layers sum_heads mean_batch (mean_rows) divergence. With the defaults
    (kind="mse_logits", rows="cls") the divergence is GTA's ||S_t[CLS, patches] -
    S_s[CLS, patches]||^2 of scaled pre-softmax logits; rows="all" / kind="kl" are the
    extensions described in docs/methods.md.

    Args:
        student: the model being trained; its attention layers must be FusedAttention.
        source: the frozen pre-trained model (same number of heads at the matched layers; the
            head dim may differ). Its parameters get requires_grad=False and it is kept in eval
            mode (also when this module's .train() is called). It must not be `student` itself:
            pass a copy (copy.deepcopy(source) is GTA's initialisation).
        layers: None = every FusedAttention layer, paired by their index in module order; or a
            list of such indices, valid in both models.
        kind, rows: as in `attention_match`.
        weight: lambda, a finite number.

    forward(x) runs the source under torch.no_grad() capturing each chosen layer's (q, k), then
    the student with those layers calling attention_match against them, and returns
    (student logits, regulariser). At step 0 with student = deepcopy(source) the regulariser is
    exactly 0 and so is its gradient (the kernels compute both sides identically).
    """

    def __init__(self, student: nn.Module, source: nn.Module, *,
                 layers: Optional[Sequence[int]] = None, kind: str = "mse_logits",
                 rows: str = "cls", weight: float = 1.0) -> None:
        super().__init__()
        check_choice("kind", kind, MATCH_KINDS)
        check_choice("rows", rows, MATCH_ROWS)
        self.weight = check_number("weight", weight)
        if student is source:
            raise ValueError("student and source must be two models; got the same object twice "
                             "(pass copy.deepcopy(source) as the student)")
        if rows == "cls":
            # rows="cls" matches query row 0, which is a patch's row in a model without a
            # class token (e.g. global average pooling)
            for role, model in (("student", student), ("source", source)):
                prefix = getattr(model, "num_prefix_tokens", None)
                if prefix == 0:
                    raise ValueError(f"rows='cls' needs a class token but the {role} has "
                                     f"num_prefix_tokens=0; use rows='all'")
        student_layers = fused_attention_layers(student, "student")
        source_layers = fused_attention_layers(source, "source")
        if layers is None and len(student_layers) != len(source_layers):
            raise ValueError(
                f"student has {len(student_layers)} FusedAttention layers but source has "
                f"{len(source_layers)}; pass layers=[...] to choose indices present in both"
            )
        self.layers = select_indices(layers, len(student_layers), "student")
        select_indices(self.layers, len(source_layers), "source")
        for i in self.layers:
            s, t = student_layers[i], source_layers[i]
            if s.num_heads != t.num_heads:
                raise ValueError(
                    f"layer {i}: student has num_heads={s.num_heads} but source has "
                    f"num_heads={t.num_heads}; attention_match needs equal head counts"
                )
        self.kind, self.rows = kind, rows
        self.student = student
        self.source = source
        source.requires_grad_(False)
        source.eval()
        # Plain lists (not registered): the layers are already submodules of the two models.
        self._student_layers = [student_layers[i] for i in self.layers]
        self._source_layers = [source_layers[i] for i in self.layers]

    def train(self, mode: bool = True) -> "GTALoss":
        super().train(mode)
        self.source.eval()  # the source is frozen: no dropout, fixed norm statistics
        return self

    def _teacher_qk(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """The source's detached (q, k) (B, H, N, Dt) and logit scale at each chosen layer."""
        try:
            for t in self._source_layers:
                t.capture_qk, t.captured_qk = True, None
            with torch.no_grad():
                self.source(x)
            teachers = []
            for i, t in zip(self.layers, self._source_layers):
                if t.captured_qk is None:
                    raise RuntimeError(f"source FusedAttention layer {i} did not run in source(x)")
                teachers.append((*t.captured_qk, t.scale))
            return teachers
        finally:
            for t in self._source_layers:
                t.capture_qk, t.captured_qk = False, None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teachers = self._teacher_qk(x)
        try:
            for s, (tq, tk, tscale) in zip(self._student_layers, teachers):
                s.match_teacher, s.match_loss = (tq, tk, self.kind, self.rows, tscale), None
            logits = self.student(x)
            per_layer = []
            for i, s in zip(self.layers, self._student_layers):
                if s.match_loss is None:
                    raise RuntimeError(f"student FusedAttention layer {i} did not run in student(x)")
                per_layer.append(s.num_heads * s.match_loss)  # mean over heads -> sum over heads
        finally:
            for s in self._student_layers:
                s.match_teacher, s.match_loss = None, None
        return logits, self.weight * torch.stack(per_layer).sum()


class AttentionLink(nn.Module):
    """AAL (Jin & Choi, arXiv 2211.13852): trainable links from ViT attention to CNN channels.

    ViT maps A (B, M*H, gh, gw): for each chosen FusedAttention layer m (default: all M) and
    head n, a map over the patch grid:
      vit_map="cls"       the softmax row of the CLS query over the patch keys (exported with
                          export="cls", O(B*H*N) memory), as in the paper; not renormalised.
      vit_map="received"  for ViTs without prefix tokens (global average pooling): the attention
                          each patch receives, averaged over all N queries, (1/N) sum_i P[i, j]
                          (exported with export="key_mean": the kernels reduce the columns,
                          O(B*H*N) memory).
      vit_map="auto"      "cls" when the ViT has prefix tokens (CLS, registers), else "received".
    Prefix tokens (num_prefix_tokens, default the ViT's own attribute, else inferred as
    N - isqrt(N)^2) are dropped from the keys; the rest are reshaped to the patch grid.
    CNN maps Bm (B, C, gh, gw): the outputs of the named submodules of the frozen CNN (forward
    hooks, each (B, C_l, h, w)), resized bicubically to the grid and concatenated: C = sum C_l.
    Links: a 1x1 conv with bias, M*H -> C, trained with the ViT: A_hat = links(A).
    Loss: mean over the batch of sum_c || A_hat_c/||A_hat_c||_2 - Bm_c/||Bm_c||_2 ||^2 (norms
    over the grid, clamped below at `eps`), times weight(epoch) = weight * decay**epoch, or
    schedule(epoch) when a schedule is given. Set the epoch with set_epoch(epoch).

    advanced(k) derives the "advanced" module: per CNN channel only its k strongest links (by
    |weight|) are kept, the rest are fixed at 0 by a mask.

    Args:
        vit: the ViT being trained (FusedAttention layers; returns logits).
        cnn: the frozen guide: any nn.Module; gets requires_grad=False and stays in eval mode.
        cnn_layers: names of cnn's submodules (as in cnn.named_modules()) whose outputs are used.
        layers: ViT FusedAttention layer indices (module order); None = all.
        cnn_input_size: (C_in, H, W) of one CNN input, for a dry run that counts the CNN
            channels; default the ViT's patch_embed (in_channels, *img_size).
    forward(x, cnn_x=None) -> (vit logits, weighted loss); the CNN sees cnn_x (default x).
    """

    def __init__(self, vit: nn.Module, cnn: nn.Module, cnn_layers: Sequence[str], *,
                 layers: Optional[Sequence[int]] = None, vit_map: str = "auto",
                 num_prefix_tokens: Optional[int] = None,
                 cnn_input_size: Optional[Sequence[int]] = None, weight: float = 2000.0,
                 decay: float = 0.99, schedule: Optional[Callable[[int], float]] = None,
                 eps: float = 1e-12) -> None:
        super().__init__()
        # Kept to build advanced() copies that share vit and cnn.
        self._init_kwargs = dict(vit=vit, cnn=cnn, cnn_layers=cnn_layers, layers=layers,
                                 vit_map=vit_map, num_prefix_tokens=num_prefix_tokens,
                                 cnn_input_size=cnn_input_size, weight=weight, decay=decay,
                                 schedule=schedule, eps=eps)
        check_choice("vit_map", vit_map, VIT_MAPS)
        self.base_weight = check_number("weight", weight)
        self.decay = check_number("decay", decay, positive=True)
        self.eps = check_number("eps", eps, positive=True)
        if schedule is not None and not callable(schedule):
            raise ValueError(f"schedule must be None or a callable epoch -> weight; got {schedule!r}")
        self.schedule = schedule
        self.epoch = 0
        found = fused_attention_layers(vit, "vit")
        self.layers = select_indices(layers, len(found), "vit")
        self._attn = [found[i] for i in self.layers]  # plain list: already submodules of vit
        if num_prefix_tokens is None:
            num_prefix_tokens = getattr(vit, "num_prefix_tokens", None)
        if num_prefix_tokens is not None and (
                isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int)
                or num_prefix_tokens < 0):
            raise ValueError(f"num_prefix_tokens must be None or an int >= 0; got {num_prefix_tokens!r}")
        if vit_map == "cls" and num_prefix_tokens == 0:
            raise ValueError("vit_map='cls' needs a CLS token but the ViT has num_prefix_tokens=0; "
                             "use vit_map='received' (or 'auto')")
        self.num_prefix_tokens = num_prefix_tokens
        self.vit_map = vit_map
        self.vit = vit
        self.cnn = cnn
        cnn.requires_grad_(False)
        cnn.eval()
        self.cnn_layers, self._cnn_modules = self._find_cnn_layers(cnn, cnn_layers)
        in_maps = sum(m.num_heads for m in self._attn)  # M * H
        out_maps = self._count_cnn_channels(cnn_input_size)  # C
        self.links = nn.Conv2d(in_maps, out_maps, kernel_size=1, bias=True)
        # (C, M*H, 1, 1) 0/1 mask of the links kept by advanced(); None = all links.
        self.register_buffer("link_mask", None)

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _find_cnn_layers(cnn: nn.Module, names: Sequence[str]):
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or not names:
            raise ValueError(f"cnn_layers must be a non-empty list of submodule names; got {names!r}")
        modules = dict(cnn.named_modules())
        for name in names:
            if name not in modules or name == "":
                some = [n for n in modules if n][:8]
                raise ValueError(f"cnn_layers: cnn has no submodule named {name!r}; "
                                 f"its submodules include {some}")
        return tuple(names), [modules[n] for n in names]

    def _count_cnn_channels(self, input_size: Optional[Sequence[int]]) -> int:
        """C = sum of the chosen CNN layers' channels, from one dry run on a zero image."""
        if input_size is None:
            pe = getattr(self.vit, "patch_embed", None)
            proj, img = getattr(pe, "proj", None), getattr(pe, "img_size", None)
            if not isinstance(getattr(proj, "in_channels", None), int) or img is None:
                raise ValueError("cnn_input_size must be given as (C_in, H, W): the ViT has no "
                                 "patch_embed.proj.in_channels / patch_embed.img_size to read it from")
            input_size = (proj.in_channels, *img)
        if len(input_size) != 3 or any(not isinstance(d, int) or d < 1 for d in input_size):
            raise ValueError(f"cnn_input_size must be 3 positive ints (C_in, H, W); got {input_size!r}")
        param = next(self.cnn.parameters(), None)
        like = dict(device=param.device, dtype=param.dtype) if param is not None else {}
        feats = self._run_cnn(torch.zeros(1, *input_size, **like))
        return sum(f.shape[1] for f in feats)

    def _run_cnn(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs (B, C_l, h, w) of the chosen CNN layers, captured by temporary hooks."""
        feats: dict[int, torch.Tensor] = {}
        handles = [m.register_forward_hook(lambda _m, _i, out, j=j: feats.__setitem__(j, out))
                   for j, m in enumerate(self._cnn_modules)]
        try:
            with torch.no_grad():
                self.cnn(x)
        finally:
            for h in handles:
                h.remove()
        outs = []
        for j, name in enumerate(self.cnn_layers):
            out = feats.get(j)
            if not isinstance(out, torch.Tensor) or out.dim() != 4:
                got = "nothing (it did not run)" if out is None else (
                    f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__)
                raise RuntimeError(f"cnn layer {name!r} must output a 4-D (B, C, h, w) tensor; got {got}")
            outs.append(out)
        return outs

    # ------------------------------------------------------------------------------- schedule

    def weight(self, epoch: Optional[int] = None) -> float:
        """lambda at `epoch` (default self.epoch): schedule(epoch), else weight * decay**epoch."""
        epoch = self.epoch if epoch is None else epoch
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0; got {epoch!r}")
        if self.schedule is not None:
            return float(self.schedule(epoch))
        return self.base_weight * self.decay ** epoch

    def set_epoch(self, epoch: int) -> None:
        self.weight(epoch)  # validates
        self.epoch = epoch

    # --------------------------------------------------------------------------------- maps

    def _grid(self, n_tokens: int) -> tuple[int, int, int]:
        """(prefix tokens p, gh, gw) for a sequence of n_tokens = p + gh * gw."""
        p = self.num_prefix_tokens
        if p is None:  # e.g. 197 -> 1 CLS + 14x14, 201 -> CLS + 4 registers + 14x14
            p = n_tokens - math.isqrt(n_tokens) ** 2
        n_patches = n_tokens - p
        grid = getattr(getattr(self.vit, "patch_embed", None), "grid_size", None)
        if grid is not None and len(grid) == 2 and grid[0] * grid[1] == n_patches:
            return p, int(grid[0]), int(grid[1])
        g = math.isqrt(max(n_patches, 0))
        if n_patches < 1 or g * g != n_patches:
            raise RuntimeError(f"cannot lay out N={n_tokens} tokens minus {p} prefix tokens "
                               f"= {n_patches} patches on a square grid")
        return p, g, g

    def _resolved_map(self, prefix: int) -> str:
        if self.vit_map == "auto":
            return "cls" if prefix >= 1 else "received"
        if self.vit_map == "cls" and prefix == 0:
            raise RuntimeError("vit_map='cls' needs a CLS token but the ViT has no prefix tokens")
        return self.vit_map

    def vit_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, ViT maps (B, M*H, gh, gw)) from one forward of the ViT, maps with graph."""
        # The export kind depends on N (prefix tokens), known only once tokens exist: use "cls"
        # unless the ViT is known to have no prefix token; a CLS-less ViT exports "key_mean".
        prefix_known = self.num_prefix_tokens
        received = self.vit_map == "received" or (self.vit_map == "auto" and prefix_known == 0)
        export = "key_mean" if received else "cls"
        saved = [m.export for m in self._attn]
        try:
            for m in self._attn:
                m.export, m.maps = export, None
            logits = self.vit(x)
            maps = []
            for i, m in zip(self.layers, self._attn):
                if m.maps is None:
                    raise RuntimeError(f"vit FusedAttention layer {i} did not run in vit(x)")
                maps.append(m.maps)  # (B, H, N): the CLS row, or what each key receives
        finally:
            for m, e in zip(self._attn, saved):
                m.export, m.maps = e, None
        n_tokens = maps[0].shape[2]
        p, gh, gw = self._grid(n_tokens)
        kind = self._resolved_map(p)
        if kind == "received" and export != "key_mean":
            raise RuntimeError("vit_map resolved to 'received' (no prefix tokens) after a 'cls' "
                               "export; pass num_prefix_tokens=0 or vit_map='received'")
        rows = torch.cat(maps, dim=1)[:, :, p:]  # (B, M*H, gh*gw): patch keys only
        return logits, rows.reshape(rows.shape[0], rows.shape[1], gh, gw)

    def cnn_maps(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The frozen CNN's channel maps (B, C, *size), bicubically resized, no gradient."""
        with torch.no_grad():
            feats = [F.interpolate(f, size=tuple(size), mode="bicubic", align_corners=False)
                     for f in self._run_cnn(x)]
            return torch.cat(feats, dim=1)

    # --------------------------------------------------------------------------------- loss

    def link_weight(self) -> torch.Tensor:
        """The links' 1x1 conv weight (C, M*H, 1, 1), masked when advanced()."""
        w = self.links.weight
        return w if self.link_mask is None else w * self.link_mask

    def link_loss(self, vit_maps: torch.Tensor, cnn_maps: torch.Tensor) -> torch.Tensor:
        """Unweighted loss: mean_batch sum_c ||A_hat_c/|A_hat_c| - B_c/|B_c|||^2."""
        a_hat = F.conv2d(vit_maps, self.link_weight().to(vit_maps.dtype),
                         self.links.bias.to(vit_maps.dtype))  # (B, C, gh, gw)
        if a_hat.shape != cnn_maps.shape:
            raise RuntimeError(f"linked ViT maps {tuple(a_hat.shape)} and CNN maps "
                               f"{tuple(cnn_maps.shape)} must have one shape")
        a_n = F.normalize(a_hat.flatten(2), dim=-1, eps=self.eps)  # (B, C, gh*gw)
        b_n = F.normalize(cnn_maps.to(a_hat.dtype).flatten(2), dim=-1, eps=self.eps)
        return (a_n - b_n).square().sum(dim=(1, 2)).mean()

    def train(self, mode: bool = True) -> "AttentionLink":
        super().train(mode)
        self.cnn.eval()  # frozen guide: fixed BatchNorm statistics, no dropout
        return self

    def forward(self, x: torch.Tensor, cnn_x: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, vit_maps = self.vit_forward(x)
        cnn_maps = self.cnn_maps(x if cnn_x is None else cnn_x, vit_maps.shape[-2:])
        return logits, self.weight() * self.link_loss(vit_maps, cnn_maps)

    # ----------------------------------------------------------------------------- advanced

    def advanced(self, k: int, *, train_links: bool = True) -> "AttentionLink":
        """A new AttentionLink (sharing vit and cnn) keeping per CNN channel its k strongest links.

        The kept set is fixed: the other weights are zeroed and masked out of the forward, so
        they get zero gradient and stay 0. The kept weights and the bias start from this
        module's values and stay trainable (train_links=True, our choice: docs/methods.md's
        "retrain with them"), or are frozen (train_links=False). Epoch and schedule are copied.
        """
        in_maps = self.links.in_channels
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= in_maps:
            raise ValueError(f"k must be an int in [1, {in_maps}] (links per CNN channel, at most "
                             f"M*H = {in_maps}); got {k!r}")
        new = type(self)(**self._init_kwargs)
        new.epoch = self.epoch
        with torch.no_grad():
            w = self.link_weight().detach()  # (C, M*H, 1, 1)
            top = w.abs().flatten(1).topk(k, dim=1).indices  # (C, k)
            mask = torch.zeros_like(w.flatten(1)).scatter_(1, top, 1.0).view_as(w)
            new.links.weight.copy_(w * mask)
            new.links.bias.copy_(self.links.bias)
        new.link_mask = mask
        new.links.requires_grad_(train_links)
        return new
