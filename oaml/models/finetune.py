"""Fine-tuning a teacher's head (and optionally its last stages) for the ID classes.

The paper fine-tuned ViT-B/16 on CIFAR-100 with Adam, head lr 1e-4, backbone lr 1e-6, cosine
schedule, 50 epochs. :func:`finetune_teacher` offers three regimes, all with Adam, a cosine
schedule stepped every iteration and model selection by best validation accuracy:

``head`` (``backbone_lr=None``, the default)
    The backbone is frozen, so its features are computed ONCE (eval mode, no augmentation) and
    the linear head is trained on the cached ``(N, D)`` features: an epoch costs milliseconds
    instead of a forward pass over the training set.
``partial`` (``backbone_lr`` set, ``train_blocks=k``)
    The last ``k`` backbone stages (plus the modules after them) are trained with
    ``backbone_lr``, the head with ``head_lr``. For sequential backbones (timm EfficientNet)
    the frozen prefix's output is computed once and cached (``cache=True``, float16 by
    default), so training only runs the trainable suffix: at 64 px the cached input of
    EfficientNet-Lite0's stage 5 is 80x4x4 per image.
``full`` (``backbone_lr`` set, ``train_blocks=None``)
    The whole backbone is trained (the paper's setting) with a full forward pass per step.

Frozen modules stay in eval mode (BatchNorm statistics are not updated by a frozen part).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import StrictModel
from ..data.base import stratified_subset
from ..errors import ConfigError, NonFiniteError
from ..utils.device import resolve_device, seed_everything
from .teachers import Teacher, TimmTeacher, dataset_labels, iter_batches, save_teacher_checkpoint

log = logging.getLogger(__name__)


class FinetuneConfig(StrictModel):
    epochs: int = 30
    batch_size: int = 256
    head_lr: float = 1e-3  # head-only on cached features; the paper's 1e-4 is for 50 full epochs
    backbone_lr: float | None = None  # None: head only (backbone frozen)
    train_blocks: int | None = None  # with backbone_lr: last k stages trained (None: all)
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    cache: bool = True  # cache frozen features / frozen-prefix activations
    cache_dtype: str = "float16"  # for cached prefix activations (features are kept float32)
    augment: bool = False  # random horizontal flip; only without a cache
    train_limit: int | None = None  # use a seeded, class-stratified subset of the training set
    feature_batch_size: int = 256
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    progress: bool = True


def _progress(iterable, total: int | None, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from ..utils.progress import progress_bar

    return progress_bar(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


#: the students' selection (oaml.training.build._limit): teacher and students share one subset
limited_indices = stratified_subset


def _sequential_stages(teacher: Teacher) -> list[nn.Module] | None:
    """The forward trunk as a list of modules applied in order, where that is exact."""
    model = teacher.model
    if not isinstance(model, TimmTeacher):
        return None
    try:
        from timm.models.efficientnet import EfficientNet
    except ImportError:  # pragma: no cover
        return None
    net = model.model
    if not isinstance(net, EfficientNet):
        return None
    return [net.conv_stem, net.bn1, *list(net.blocks.children()), net.conv_head, net.bn2]


def _trainable_split(teacher: Teacher, train_blocks: int | None) -> tuple[list[nn.Module], list[nn.Module]]:
    """(frozen stages, trainable stages) of the backbone for ``train_blocks``."""
    stages = teacher.model.backbone_stages()
    if train_blocks is None:
        return [], stages
    net = getattr(teacher.model, "model", None)
    blocks = list(net.blocks.children()) if net is not None and hasattr(net, "blocks") else None
    if blocks is None:
        if train_blocks > len(stages):
            raise ConfigError(f"train_blocks={train_blocks} but the backbone has {len(stages)} stages")
        cut = len(stages) - train_blocks
    else:
        if not 0 <= train_blocks <= len(blocks):
            raise ConfigError(f"train_blocks must be in 0..{len(blocks)} for this teacher, got {train_blocks}")
        first_trainable = blocks[len(blocks) - train_blocks] if train_blocks else None
        after_blocks = stages.index(blocks[-1]) + 1
        cut = stages.index(first_trainable) if first_trainable is not None else after_blocks
    return stages[:cut], stages[cut:]


@torch.no_grad()
def _run_cached(
    fn: Callable[[torch.Tensor], torch.Tensor], teacher: Teacher, dataset, indices, cfg: FinetuneConfig, desc: str, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    outs, labels = [], []
    n_batches = math.ceil(len(indices) / cfg.feature_batch_size)
    for x, y, _ in _progress(iter_batches(dataset, indices, cfg.feature_batch_size, cfg.num_workers), n_batches, desc, cfg.progress):
        outs.append(fn(teacher.prepare(x)).to("cpu", dtype))
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def _cosine(opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


@torch.no_grad()
def evaluate_teacher(teacher: Teacher, dataset, batch_size: int = 256, indices=None, progress: bool = False) -> float:
    """Top-1 accuracy of ``teacher`` on a labelled dataset (eval mode, its own preprocessing)."""
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    correct = total = 0
    n_batches = math.ceil(len(idx) / batch_size)
    for x, y, _ in _progress(iter_batches(dataset, idx, batch_size), n_batches, "evaluate", progress):
        logits, _ = teacher.outputs(x)
        correct += int((logits.argmax(1).cpu() == y).sum())
        total += int(y.numel())
    return correct / max(1, total)


def finetune_teacher(
    teacher: Teacher,
    train_dataset,
    val_dataset,
    cfg: FinetuneConfig | None = None,
    out_path: str | Path | None = None,
    num_classes: int | None = None,
    dataset_info: dict[str, Any] | None = None,
) -> Path | dict[str, Any]:
    """Fine-tune ``teacher`` for the ID classes and write a checkpoint to ``out_path``.

    The head is reset to ``num_classes`` (default: the number of distinct training labels)
    unless it already has that many outputs and was fine-tuned. The checkpoint (atomic) holds
    the weights of the best validation epoch, the preprocessing, the class count, the val
    accuracy, the history and timings. Returns the checkpoint path, or, with
    ``out_path=None``, the result dict (the teacher is updated in place either way).
    """
    cfg = cfg or FinetuneConfig()
    if cfg.augment and cfg.cache and (cfg.backbone_lr is None or cfg.train_blocks is not None):
        raise ConfigError("augment=True needs cache=False: cached features/activations are computed once without augmentation")
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    t_start = time.perf_counter()

    train_labels = dataset_labels(train_dataset)
    n_cls = num_classes or int(train_labels.max()) + 1
    if teacher.num_classes != n_cls or teacher.config.checkpoint is None:
        teacher.reset_head(n_cls)
    teacher.to(device)
    train_idx = limited_indices(train_labels, cfg.train_limit, cfg.seed)
    val_idx = np.arange(len(val_dataset))
    model = teacher.model
    head = model.head_module()

    # Which part trains, and what can be cached.
    if cfg.backbone_lr is None:
        frozen, trainable = model.backbone_stages(), []
    else:
        frozen, trainable = _trainable_split(teacher, cfg.train_blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    # full: every backbone parameter (ViT's cls_token/pos_embed live outside any stage module)
    bb = model.backbone_parameters() if (cfg.backbone_lr is not None and cfg.train_blocks is None) else [p for m in trainable for p in m.parameters()]
    for p in [*bb, *head.parameters()]:
        p.requires_grad_(True)

    seq = _sequential_stages(teacher)
    tta = teacher.config.tta == "hflip"  # validation (model selection) sees the outputs as they will be used
    Xva_flip = None  # cached val inputs of the mirrored images (tta with a cache)
    mode = "head" if cfg.backbone_lr is None else ("partial" if cfg.train_blocks is not None else "full")
    timings: dict[str, float] = {}
    model.eval()

    if mode == "head" and cfg.cache:
        t0 = time.perf_counter()
        Xtr, Ytr = _run_cached(model.features, teacher, train_dataset, train_idx, cfg, "features train", torch.float32)
        Xva, Yva = _run_cached(model.features, teacher, val_dataset, val_idx, cfg, "features val", torch.float32)
        if tta:
            Xva_flip, _ = _run_cached(lambda x: model.features(x.flip(-1)), teacher, val_dataset, val_idx, cfg, "features val (mirrored)", torch.float32)
        timings["cache_s"] = time.perf_counter() - t0

        def features_cached(x: torch.Tensor) -> torch.Tensor:
            return x

        cached = True
    elif mode == "partial" and cfg.cache and seq is not None:
        n_prefix = len(frozen)
        prefix, suffix = seq[:n_prefix], seq[n_prefix:]
        if [id(m) for m in suffix] != [id(m) for m in trainable]:
            raise ConfigError("internal: trainable stages do not match the sequential trunk")  # pragma: no cover
        dtype = getattr(torch, cfg.cache_dtype)

        def run_prefix(x: torch.Tensor) -> torch.Tensor:
            for m in prefix:
                x = m(x)
            return x

        t0 = time.perf_counter()
        Xtr, Ytr = _run_cached(run_prefix, teacher, train_dataset, train_idx, cfg, "prefix train", dtype)
        Xva, Yva = _run_cached(run_prefix, teacher, val_dataset, val_idx, cfg, "prefix val", dtype)
        if tta:
            Xva_flip, _ = _run_cached(lambda x: run_prefix(x.flip(-1)), teacher, val_dataset, val_idx, cfg, "prefix val (mirrored)", dtype)
        timings["cache_s"] = time.perf_counter() - t0
        log.info("cached frozen-prefix activations %s (%.0f MB)", tuple(Xtr.shape), Xtr.numel() * Xtr.element_size() / 1e6)

        def features_cached(x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            for m in suffix:
                x = m(x)
            return model.model.forward_head(x, pre_logits=True)

        cached = True
    else:
        cached = False
        Xtr = Xva = Ytr = Yva = None  # type: ignore[assignment]

    def forward_cached(x: torch.Tensor) -> torch.Tensor:
        return model.head(features_cached(x))

    groups = [{"params": [p for p in head.parameters()], "lr": cfg.head_lr}]
    if bb:
        groups.append({"params": bb, "lr": float(cfg.backbone_lr)})  # type: ignore[arg-type]
    opt = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    sched = _cosine(opt, cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))

    def set_train_mode(on: bool) -> None:
        model.eval()
        if on:
            for m in trainable:
                m.train()
            head.train()

    @torch.no_grad()
    def val_accuracy() -> float:
        set_train_mode(False)
        if cached:
            correct, bs = 0, cfg.feature_batch_size
            for s in range(0, len(Xva), bs):
                f = features_cached(Xva[s : s + bs].to(device))
                if Xva_flip is not None:  # tta: hflip, as FlipAveraged: the head on the mean features of both views
                    f = (f + features_cached(Xva_flip[s : s + bs].to(device))) * 0.5
                logits = model.head(f)
                correct += int((logits.argmax(1).cpu() == Yva[s : s + bs]).sum())
            return correct / max(1, len(Xva))
        return evaluate_teacher(teacher, val_dataset, cfg.feature_batch_size)

    history: list[dict[str, Any]] = []
    best_acc, best_state, best_epoch = -1.0, None, -1
    trainable_modules = nn.ModuleList([*trainable, head])
    rng = np.random.default_rng(cfg.seed)
    t_train = time.perf_counter()
    for epoch in range(cfg.epochs):
        set_train_mode(True)
        t0 = time.perf_counter()
        tot_loss = tot_correct = tot_n = 0.0
        if cached:
            perm = torch.from_numpy(rng.permutation(len(Xtr)))
            batches = ((Xtr[perm[s : s + cfg.batch_size]], Ytr[perm[s : s + cfg.batch_size]]) for s in range(0, len(Xtr), cfg.batch_size))
        else:
            order = train_idx[rng.permutation(len(train_idx))]
            batches = ((x, y) for x, y, _ in iter_batches(train_dataset, order, cfg.batch_size, cfg.num_workers))
        for x, y in _progress(batches, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress):
            y = y.to(device)
            if cached:
                logits = forward_cached(x.to(device))
            else:
                if cfg.augment:
                    flip = torch.from_numpy(rng.random(len(y)) < 0.5)
                    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x) if isinstance(x, torch.Tensor) else x
                logits = model(teacher.prepare(x))
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise NonFiniteError(f"teacher fine-tune loss became {loss.item()} at epoch {epoch + 1}; lower the learning rates")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(y)
            tot_correct += int((logits.argmax(1) == y).sum())
            tot_n += len(y)
        acc = val_accuracy()
        row = {"epoch": epoch + 1, "train_loss": tot_loss / tot_n, "train_acc": tot_correct / tot_n, "val_acc": acc, "time_s": time.perf_counter() - t0}
        history.append(row)
        log.info("teacher fine-tune epoch %d/%d: loss %.4f train acc %.4f val acc %.4f (%.1fs)", epoch + 1, cfg.epochs, row["train_loss"], row["train_acc"], acc, row["time_s"])
        if acc > best_acc:
            best_acc, best_epoch = acc, epoch + 1
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in (model if mode == "full" else trainable_modules).state_dict().items()})
    timings["train_s"] = time.perf_counter() - t_train
    if best_state is not None:
        (model if mode == "full" else trainable_modules).load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    timings["total_s"] = time.perf_counter() - t_start
    result = {
        "val_accuracy": best_acc,
        "best_epoch": best_epoch,
        "history": history,
        "timings": timings,
        "finetune": {**cfg.model_dump(mode="json"), "mode": mode, "cached": cached, "n_train": int(len(train_idx)), "n_val": int(len(val_idx))},
        "dataset": dict(dataset_info or {}),
    }
    teacher.info.update({"val_accuracy": best_acc, "finetune": result["finetune"]})
    if out_path is None:
        return result
    return save_teacher_checkpoint(teacher, out_path, **result)
