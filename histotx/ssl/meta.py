"""Student and teacher: the SSL objective of one step, and the teacher as an fp32 EMA of the student.

:class:`SSLNetwork` is a backbone with its heads; the student's is the module an optimiser (or a
DeepSpeed engine) trains, the teacher's is a copy that gets no gradients and follows the student by
:meth:`SSLMetaArch.update_teacher`. One step:

    targets = meta.teacher_targets(batch, teacher_temperature)     # no grad, global crops only
    out = student(batch)                                            # any wrapper of meta.student
    losses = meta.losses(out, targets, batch)                       # losses["loss"] is the total
    ... backward, optimiser step ...
    meta.commit(targets); meta.update_teacher(momentum, weights)    # centres, then the EMA

Data-parallel training needs every rank to call the same modules in the same order (ZeRO-3 gathers
parameters per module call) and every trainable parameter in the backward graph (ZeRO-1/2 reduce
gradient buckets that must agree between ranks), whatever a rank's batch holds. The backbone runs
its patch embedding and tokenizer even on zero rows, and the student passes masks to its global
crops and runs every head, possibly on zero rows: unused parts receive zero gradients.

The model knows nothing of DeepSpeed and this module knows nothing of it either: a sharded trainer
hands :meth:`SSLMetaArch.update_teacher` the student's full fp32 weights (gathered under ZeRO-3).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from histotx.batch import SSLBatch
from histotx.model import FusedViT, TranscriptBatch
from histotx.model.fused import BACKBONE_KEYS
from histotx.ssl.centering import Centering, sinkhorn_knopp
from histotx.ssl.config import SSLConfig
from histotx.ssl.heads import DINOHead, fp32
from histotx.ssl.losses import DINOLoss, KoLeoLoss, MaskedExpressionLoss, iBOTLoss
from histotx.ssl.terms import LOSS_TERMS, StepOutputs

EMA_CHUNK_NUMEL = 1 << 26  # parameters updated together by one fused (foreach) operation


class SSLNetwork(nn.Module):
    """Backbone + DINO head (+ an iBOT head of its own, + an expression head for the masked transcript tokens
    and a CLS expression head, each when its loss is on)."""

    def __init__(self, backbone: FusedViT, cfg: SSLConfig) -> None:
        super().__init__()
        h = cfg.head
        dim = backbone.config.embed_dim

        def head() -> DINOHead:
            return DINOHead(dim, h.out_dim, h.hidden_dim, h.bottleneck_dim, h.n_layers)

        self.backbone = backbone
        self.dino_head = head()
        self.ibot_head = head() if h.separate_ibot_head else None
        self.expression_head = (
            nn.Linear(dim, backbone.config.vocab_size) if cfg.loss.masked_expression_weight > 0 else None
        )
        self.cls_expression_head = (
            nn.Linear(dim, backbone.config.vocab_size) if cfg.loss.cls_expression_weight > 0 else None
        )

    def new_parameter_names(self) -> set[str]:
        """The parameters no image checkpoint provides (trained at ``optim.new_module_lr_mult``, without layer
        decay): those of every head a loss term declares (:data:`~histotx.ssl.terms.LOSS_TERMS`) and the
        backbone's parts outside the timm image backbone (the image mask token, the transcript branch)."""
        heads = {t.head for t in LOSS_TERMS if t.head is not None}
        names = set()
        for name, _ in self.named_parameters():
            top, _, inner = name.partition(".")
            if top == "backbone":
                if not inner.startswith(BACKBONE_KEYS):
                    names.add(name)
            elif top in heads:
                names.add(name)
            else:
                raise RuntimeError(f"SSLNetwork.{top} is neither the backbone nor a head a loss term declares")
        return names

    def _token_logits(self, cls: torch.Tensor, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """CLS rows through the DINO head, masked-token rows through the iBOT head (one call when shared)."""
        sizes = [t.shape[0] for t in tokens]
        if self.ibot_head is None:
            out = self.dino_head(torch.cat([cls, *tokens]))
            cls_logits, *token_logits = out.split([cls.shape[0], *sizes])
            return cls_logits, token_logits
        return self.dino_head(cls), list(self.ibot_head(torch.cat(tokens)).split(sizes))

    def forward(self, batch: SSLBatch) -> dict[str, torch.Tensor]:
        """The student's outputs: logits of every crop's CLS (global crops first), of the masked image
        patches and transcript tokens of the global crops, their pre-head global CLS, and the
        expression logits of the masked transcript tokens and of the global crops' CLS."""
        glob = self.backbone(**batch.student_global_inputs())
        cls = [glob.cls]
        local_inputs = batch.student_local_inputs()
        if local_inputs is not None:
            cls.append(self.backbone(**local_inputs).cls)
        patches = glob.patch[batch.image_mask]
        tokens = glob.transcript[batch.transcript_mask]
        cls_logits, (patch_logits, token_logits) = self._token_logits(torch.cat(cls), [patches, tokens])
        out = {
            "cls_logits": cls_logits,
            "cls_features": glob.cls,
            "patch_logits": patch_logits,
            "transcript_logits": token_logits,
        }
        if self.expression_head is not None:
            with fp32(tokens):
                out["expression_logits"] = self.expression_head(tokens.float())
        if self.cls_expression_head is not None:
            with fp32(glob.cls):
                out["cls_expression_logits"] = self.cls_expression_head(glob.cls.float())
        return out

    @torch.no_grad()
    def teacher_logits(self, batch: SSLBatch) -> dict[str, torch.Tensor]:
        """The teacher's logits for the global crops' CLS and for the student's masked positions."""
        out = self.backbone(**batch.teacher_inputs())
        patches = out.patch[batch.image_mask]
        tokens = out.transcript[batch.transcript_index[batch.transcript_mask]]
        cls_logits, (patch_logits, token_logits) = self._token_logits(out.cls, [patches, tokens])
        return {"cls": cls_logits, "patch": patch_logits, "transcript": token_logits}


@dataclass
class TeacherTargets:
    """Normalised teacher probabilities of one step, and the logits the centres will move towards."""

    cls: torch.Tensor  # [n_global · B, K]
    patch: torch.Tensor  # [masked patches, K]
    transcript: torch.Tensor  # [masked transcript tokens, K]
    logits: dict[str, torch.Tensor]


class SSLMetaArch(nn.Module):
    """The student, its fp32 EMA teacher, the teacher-output normalisation and the loss terms."""

    def __init__(self, backbone: FusedViT, cfg: SSLConfig) -> None:
        super().__init__()
        if backbone.transcript is None:
            raise ValueError("the SSL objective needs a model with a transcript branch (vocab_size > 0)")
        self.cfg = cfg
        self.student = SSLNetwork(backbone, cfg)
        self.teacher = copy.deepcopy(self.student).float()
        self.teacher.requires_grad_(False)
        self.teacher.eval()  # as DINOv2: no drop path (nor any dropout) on the targets, kept by train()
        k, momentum = cfg.head.out_dim, cfg.loss.center_momentum
        self.centers = nn.ModuleDict({name: Centering(k, momentum) for name in ("cls", "patch", "transcript")})
        temp = cfg.loss.student_temp
        self.dino_loss, self.ibot_loss = DINOLoss(temp), iBOTLoss(temp)
        self.koleo_loss, self.expression_loss = KoLeoLoss(), MaskedExpressionLoss()

    def train(self, mode: bool = True) -> "SSLMetaArch":
        """Only the student follows ``mode``: the teacher always computes deterministic targets."""
        super().train(mode)
        self.teacher.eval()
        return self

    def sequence_lengths(self, batch: SSLBatch) -> dict[str, torch.Tensor]:
        """Tokens per sequence of each forward pass of a step (for throughput and FLOP counts)."""
        cfg = self.student.backbone.config
        prefix = 1 + cfg.num_registers

        def lengths(images: torch.Tensor, present: torch.Tensor, transcripts: TranscriptBatch) -> torch.Tensor:
            patches = (images.shape[-2] // cfg.patch_size) * (images.shape[-1] // cfg.patch_size)
            return prefix + present.long().cpu() * patches + transcripts.lengths.cpu()

        out = {
            "teacher": lengths(
                batch.global_images,
                torch.ones(batch.global_images.shape[0], dtype=torch.bool),
                batch.teacher_transcripts,
            ),
            "student_global": lengths(
                batch.global_images, batch.student_global_image_present, batch.student_global_transcripts
            ),
        }
        if batch.local_images.shape[0]:
            out["student_local"] = lengths(
                batch.local_images, batch.student_local_image_present, batch.student_local_transcripts
            )
        return out

    def teacher_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps beside the student: the teacher's weights and the centres."""
        state = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        state.update({f"centers.{k}": v for k, v in self.centers.state_dict().items()})
        return state

    def load_teacher_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        teacher = {k[len("teacher.") :]: v for k, v in state.items() if k.startswith("teacher.")}
        centers = {k[len("centers.") :]: v for k, v in state.items() if k.startswith("centers.")}
        self.teacher.load_state_dict(teacher, strict=True)
        self.centers.load_state_dict(centers, strict=True)

    # ------------------------------------------------------------------ one step

    @torch.no_grad()
    def teacher_targets(self, batch: SSLBatch, temperature: float) -> TeacherTargets:
        logits = self.teacher.teacher_logits(batch)
        if self.cfg.loss.teacher_norm == "sinkhorn":
            n = self.cfg.loss.sinkhorn_iterations
            probs = {k: sinkhorn_knopp(v, temperature, n) for k, v in logits.items()}
        else:
            probs = {k: self.centers[k].softmax(v, temperature) for k, v in logits.items()}
        return TeacherTargets(probs["cls"], probs["patch"], probs["transcript"], logits)

    def losses(self, out: dict[str, torch.Tensor], targets: TeacherTargets, batch: SSLBatch) -> dict[str, torch.Tensor]:
        """Each loss term of :data:`~histotx.ssl.terms.LOSS_TERMS` and their weighted sum ``loss`` (a scalar
        tensor with a graph to the student)."""
        b = batch.batch_size
        n_global = targets.cls.shape[0] // b
        valid = batch.student_view_nonempty().to(out["cls_logits"].device)  # views without tokens left out
        step = StepOutputs(
            out, targets, batch, n_global, out["cls_logits"].shape[0] // b, valid, int(valid[: n_global * b].sum())
        )
        terms = {t.name: t.compute(self, step) for t in LOSS_TERMS}
        weights = {t.name: getattr(self.cfg.loss, t.weight) for t in LOSS_TERMS}
        total = sum(weights[k] * v for k, v in terms.items() if weights[k])
        return {"loss": total, **terms}

    @torch.no_grad()
    def dino_shuffled(self, out: dict[str, torch.Tensor], targets: TeacherTargets, batch: SSLBatch) -> torch.Tensor:
        """The negative control of the DINO term: the same loss with each tile's student crops paired with
        the teacher's crops of *another* tile of the batch (the teacher rows rolled by one tile). When the
        DINO loss does not fall clearly below this, the teacher's targets carry no information about the
        tile, and the term teaches nothing (it can still fall below ln K by matching the batch's average).
        A batch of one tile has no other tile: the real loss is returned (a gap of 0)."""
        b = batch.batch_size
        n_global = targets.cls.shape[0] // b
        n_crops = out["cls_logits"].shape[0] // b
        valid = batch.student_view_nonempty().to(out["cls_logits"].device).view(n_crops, b)
        teacher = targets.cls.view(n_global, b, -1)
        if b > 1:
            teacher = teacher.roll(1, dims=1)
        return self.dino_loss(out["cls_logits"].detach().view(n_crops, b, -1), teacher, valid)

    def expression_term(self, out: dict[str, torch.Tensor], batch: SSLBatch) -> torch.Tensor:
        logits = out.get("expression_logits")
        if logits is None:
            return out["cls_logits"].new_zeros(())
        teacher = batch.teacher_transcripts
        rows = batch.transcript_index[batch.transcript_mask]
        starts, ends = teacher.offsets[rows], teacher.offsets[rows + 1]
        counts = ends - starts
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        nnz = int(offsets[-1])
        entries = torch.repeat_interleave(starts - offsets[:-1], counts, output_size=nnz) + torch.arange(
            nnz, device=counts.device
        )
        gene = teacher.gene[entries]
        gene_mask = None
        if batch.gene_panel is not None:  # each token's sample panel: unmeasured genes out of the softmax
            crop = torch.repeat_interleave(
                torch.arange(teacher.batch_size, device=rows.device), teacher.lengths, output_size=teacher.n_tokens
            )
            panel = batch.gene_panel.to(logits.device)[crop[rows] % batch.batch_size]
            if panel.shape[1] > logits.shape[1]:
                raise ValueError(f"the shard vocabulary has {panel.shape[1]} genes, the model {logits.shape[1]}")
            gene_mask = F.pad(panel, (0, logits.shape[1] - panel.shape[1]))  # beyond the shard vocabulary: none
            token = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), counts, output_size=nnz)
            gene_mask[token, gene.long()] = True  # a gene with counts was measured, whatever the record says
        # token weights are log1p of normalised counts; the reconstruction target is the composition
        return self.expression_loss(logits, offsets, gene, torch.expm1(teacher.weight[entries]), gene_mask)

    def cls_expression_term(self, out: dict[str, torch.Tensor], batch: SSLBatch) -> torch.Tensor:
        """Each student global crop's CLS predicts the gene composition of all its crop's transcripts as
        the teacher sees them (every token's normalised counts summed), whatever the student saw; crops
        without transcripts are left out, and so are genes outside the crop's sample panel."""
        logits = out.get("cls_expression_logits")
        if logits is None:
            return out["cls_logits"].new_zeros(())
        teacher = batch.teacher_transcripts
        if teacher.batch_size != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} global crops' CLS, {teacher.batch_size} teacher crops")
        lengths = teacher.lengths.to(teacher.offsets.device)
        token_starts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        offsets = teacher.offsets[token_starts]  # [crops + 1]: the CSR rows of whole crops
        gene = teacher.gene[: teacher.offsets[-1]]
        gene_mask = None
        if batch.gene_panel is not None:
            panel = batch.gene_panel.to(logits.device)
            crop = torch.arange(teacher.batch_size, device=logits.device) % batch.batch_size
            if panel.shape[1] > logits.shape[1]:
                raise ValueError(f"the shard vocabulary has {panel.shape[1]} genes, the model {logits.shape[1]}")
            gene_mask = F.pad(panel[crop], (0, logits.shape[1] - panel.shape[1]))
            row = torch.repeat_interleave(torch.arange(teacher.batch_size, device=logits.device), offsets.diff())
            gene_mask[row, gene.long()] = True  # a gene with counts was measured, whatever the record says
        weight = torch.expm1(teacher.weight[: teacher.offsets[-1]])
        return self.expression_loss(logits, offsets, gene, weight, gene_mask)

    @torch.no_grad()
    def commit(self, targets: TeacherTargets) -> None:
        """Move the centres towards this step's teacher logits (call once the step was taken)."""
        if self.cfg.loss.teacher_norm == "centering":
            for name, logits in targets.logits.items():
                self.centers[name].update(logits)

    @torch.no_grad()
    def update_teacher(self, momentum: float, student_weights: Iterable[torch.Tensor] | None = None) -> None:
        """teacher ← momentum · teacher + (1 − momentum) · student, in fp32, parameter by parameter.

        ``student_weights`` yields the student's full weights in the order of
        ``self.student.parameters()``; by default the parameters themselves (unsharded training).
        """
        weights = student_weights if student_weights is not None else (p.detach() for p in self.student.parameters())
        teacher = list(self.teacher.parameters())
        n, chunk_t, chunk_s, chunk_numel = 0, [], [], 0

        def flush() -> None:
            torch._foreach_mul_(chunk_t, momentum)
            torch._foreach_add_(chunk_t, chunk_s, alpha=1.0 - momentum)
            chunk_t.clear()
            chunk_s.clear()

        for t, s in zip(teacher, weights, strict=True):
            if s.numel() != t.numel():
                raise RuntimeError(
                    f"student weight {n} has {s.numel()} elements, the teacher's {t.numel()}: "
                    "a sharded student must be gathered before the EMA"
                )
            chunk_t.append(t)
            chunk_s.append(s.reshape(t.shape).to(t.dtype))
            chunk_numel += t.numel()
            n += 1
            if chunk_numel >= EMA_CHUNK_NUMEL:  # bounds what a gathering (ZeRO-3) source holds at once
                flush()
                chunk_numel = 0
        if chunk_t:
            flush()
        if n != len(teacher):
            raise RuntimeError(f"the EMA got {n} student weights for {len(teacher)} teacher parameters")
