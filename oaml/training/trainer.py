"""The one training loop that every method (vanilla, OAML, OE, ...) runs in.

Per step: sample the ID batch (and auxiliary outlier images when the method uses them),
augment the raw uint8 images, preprocess them for the student, run ID and auxiliary images
through the student in ONE forward pass, get teacher outputs (live or cached), let terms do
their pre-step work (e.g. fit a CLUB estimator), sum ``weight * term`` and take an SGD step with
a per-iteration schedule. Before an epoch's first step, terms with an ``on_epoch_start`` hook
run it (e.g. UDG clusters the features of the whole ID training set and outlier pool).

Determinism and resume: the epoch's sample order comes from ``DistributedSampler`` with
``set_epoch`` (one process or many), and every random draw inside an epoch uses one
``torch.Generator`` seeded from (seed, epoch). Checkpoints store the model, term modules,
optimisers, schedulers, scaler, generator and global RNG states, the position inside the epoch
and the history, written atomically; ``resume=True`` continues from ``last.pt`` and reaches the
same weights as an uninterrupted run.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import ConfigError, NonFiniteError, ShapeError
from ..models.checkpoint import save_student
from ..models.preprocess import Preprocess
from ..models.resnet import create_model, load_weights
from ..utils.device import amp_dtype, amp_enabled, resolve_device, rng_state, set_rng_state
from ..utils.distributed import average_gradients, broadcast_module
from ..utils.io import atomic_path, check_writable, write_json
from .config import TrainConfig
from .methods import method_warmup_steps, resolve_terms
from .state import StepState
from .terms import TERMS, BuildContext, EpochContext, Term, build_term

log = logging.getLogger(__name__)

TeacherFn = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
"""(raw uint8 ID batch, dataset indices) -> (teacher logits, teacher features)."""


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------
class BatchFetcher:
    """Fetch raw ``(uint8 images, labels)`` for a list of dataset indices.

    Datasets that expose ``images`` (uint8 ``(N, C, H, W)``) and ``labels`` tensors are indexed
    directly (no per-item Python); any other map-style dataset goes through a DataLoader.
    """

    def __init__(self, dataset: Dataset, num_workers: int = 0):
        self.dataset = dataset
        self.num_workers = num_workers
        imgs = getattr(dataset, "images", None)
        labs = getattr(dataset, "labels", None)
        self.fast = isinstance(imgs, torch.Tensor) and isinstance(labs, torch.Tensor) and imgs.dtype == torch.uint8

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(self, batches: Sequence[Sequence[int]]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self.fast:
            for idx in batches:
                t = torch.as_tensor(idx, dtype=torch.long)
                yield self.dataset.images[t], self.dataset.labels[t].long()  # type: ignore[attr-defined]
            return
        loader = DataLoader(self.dataset, batch_sampler=[list(b) for b in batches], num_workers=self.num_workers, collate_fn=_collate)
        yield from loader

    def in_order(self, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The whole dataset in index order, ``batch_size`` at a time (evaluation, extraction)."""
        n = len(self)
        return self.batches([range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)])

    def get(self, idx: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        return next(iter(self.batches([idx])))


def _collate(items: List[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    imgs = torch.stack([torch.as_tensor(it[0]) for it in items])
    labels = torch.as_tensor([int(it[1]) for it in items], dtype=torch.long)
    return imgs, labels


def augment_batch(x: torch.Tensor, flip: bool, pad: int, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and pad-``pad`` random crop of a uint8 batch, vectorised."""
    b, c, h, w = x.shape
    if flip:
        mask = torch.rand(b, generator=g) < 0.5
        x = torch.where(mask.view(b, 1, 1, 1), x.flip(-1), x)
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=g)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None].expand(b, c, h, w)
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :].expand(b, c, h, w)
        x = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    return x


def _seed_for(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 12345) % (2**63 - 1)


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------
class _FeatureForward(nn.Module):
    """Makes ``forward`` return ``(logits, features)`` so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_features(x)


class Trainer:
    """Train one student with one method.

    Parameters
    ----------
    cfg: the run's :class:`TrainConfig`.
    train_set, val_set: map-style datasets yielding ``(uint8 (C,H,W), label)``.
    out_dir: where ``last.pt``, ``best.pt``, ``log.csv`` and ``summary.json`` go.
    teacher: ``(raw uint8 batch, dataset indices) -> (logits, features)``, required by methods
        with distillation terms; ``teacher_feature_dim`` its feature width.
    aux_set: auxiliary outlier images for OE-style methods.
    banks: outlier banks by name (``cood``, ``dood``) for MI / virtual-outlier terms.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        train_set: Dataset,
        val_set: Dataset,
        out_dir: str | Path,
        num_classes: int,
        in_channels: int,
        teacher: Optional[TeacherFn] = None,
        teacher_feature_dim: Optional[int] = None,
        aux_set: Optional[Dataset] = None,
        banks: Optional[Dict[str, Any]] = None,
    ):
        self.cfg = cfg
        self.out_dir = check_writable(out_dir)
        self.device = resolve_device(cfg.device)
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.train = BatchFetcher(train_set, cfg.data.num_workers)
        self.val = BatchFetcher(val_set, cfg.data.num_workers)
        self.aux = BatchFetcher(aux_set, cfg.data.num_workers) if aux_set is not None else None
        self.teacher = teacher

        torch.manual_seed(cfg.seed)
        self.model = create_model(
            cfg.student.name, num_classes=num_classes, in_channels=in_channels, width=cfg.student.width, stem=cfg.student.stem
        )
        if cfg.student.init_checkpoint:
            load_weights(self.model, cfg.student.init_checkpoint)
            log.info("student initialised from %s", cfg.student.init_checkpoint)
        self.model.to(self.device)
        if cfg.channels_last:  # conv weights NHWC; _fmt puts the input batches in the same format
            self.model.to(memory_format=torch.channels_last)
        # last.pt (weights, momentum, the copy written while it is replaced) and best.pt
        check_writable(self.out_dir, need_bytes=20 * sum(p.numel() for p in self.model.parameters()))
        self.preprocess = Preprocess.from_config(cfg.preprocess).to(self.device)
        if cfg.preprocess.channels != in_channels:
            raise ConfigError(
                f"preprocess.channels={cfg.preprocess.channels} but the student is built for {in_channels} input "
                "channels; set preprocess.channels to match the data"
            )

        ctx = BuildContext(
            num_classes=num_classes,
            feature_dim=self.model.feature_dim,
            device=self.device,
            teacher_feature_dim=teacher_feature_dim,
            banks=banks or {},
            aux_available=aux_set is not None,
            num_train=len(self.train),
            num_aux=len(self.aux) if self.aux is not None else None,
            preprocess=self.preprocess,
        )
        self.term_cfgs = resolve_terms(cfg.method)
        self.terms: Dict[str, Term] = {}
        for name, tcfg in self.term_cfgs.items():
            missing = self._missing_requirements(TERMS.get(name).requirements(tcfg), ctx)
            if missing:
                raise ConfigError(f"loss term {name!r} of method {cfg.method.name!r} needs {missing}")
            self.terms[name] = build_term(name, tcfg, ctx).to(self.device)
        self.term_modules = nn.ModuleDict(self.terms)
        if self.distributed:
            broadcast_module(self.term_modules.to(self.device))
        if self.teacher_needed and self.teacher is None:
            raise ConfigError(f"method {cfg.method.name!r} uses a teacher but none was given (teacher.checkpoint)")
        if self.teacher_needed and getattr(teacher, "cached", False) and (cfg.data.augment.flip or cfg.data.augment.crop_padding):
            raise ConfigError(
                "cached teacher outputs belong to the un-augmented images, but data.augment is on; set "
                "teacher.cache: false (run the teacher every step) or turn augmentation off"
            )

        self.net: nn.Module = _FeatureForward(self.model)
        if self.distributed:
            if self.device.type == "cuda":  # BatchNorm statistics over the global batch
                self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
                self.model = self.net.model  # type: ignore[assignment]
            else:  # torch's SyncBatchNorm needs GPUs: on CPU each process normalises its own batch
                log.warning("distributed training on CPU: BatchNorm statistics are per process (SyncBatchNorm needs CUDA)")
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        # what each training step runs: compiled when cfg.compile. self.model stays the plain module
        # that checkpoints (no ``_orig_mod.`` keys), evaluation, the warm-up and the terms use.
        self.step_net: nn.Module = _compiled(self.net, self.device) if cfg.compile else self.net

        groups: List[Dict[str, Any]] = [{"params": list(self.model.parameters())}]
        for term in self.terms.values():
            groups += term.student_param_groups()
        o = cfg.optim
        self.optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)
        n_train = len(self.train)
        self.steps_per_epoch = n_train // (cfg.data.batch_size * self.world)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"training set has {n_train} images, fewer than one batch of {cfg.data.batch_size} x {self.world} processes; "
                "lower data.batch_size"
            )
        total = self.steps_per_epoch * o.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _lr_factor(s, total, o.warmup_steps, o.schedule))
        self.use_amp = amp_enabled(self.device, cfg.amp)
        self.amp_dtype = amp_dtype(self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.sampler = DistributedSampler(
            range(n_train), num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_acc = -1.0
        self.history: List[Dict[str, Any]] = []
        self._gen_state: Optional[torch.Tensor] = None
        # running sums of the step logs and seconds of the epoch in progress (checkpointed, so a
        # resumed epoch logs the same means as an uninterrupted one)
        self._epoch_sums: Dict[str, float] = {}
        self._epoch_seconds = 0.0
        self._epoch_hook_logs: Dict[str, float] = {}  # what the terms' on_epoch_start returned
        self._tb = None

    # ---------------------------------------------------------------------------------------
    @property
    def teacher_needed(self) -> bool:
        return any("teacher" in t.requires for t in self.terms.values())

    @staticmethod
    def _missing_requirements(requires: frozenset, ctx: BuildContext) -> Optional[str]:
        if "aux" in requires and not ctx.aux_available:
            return "auxiliary outlier images (the benchmark's outlier-exposure pool)"
        for bank in ("cood", "dood"):
            if bank in requires and bank not in ctx.banks:
                return f"a {bank[0].upper()}-OOD bank (outliers.{bank}_bank)"
        if "teacher" in requires and ctx.teacher_feature_dim is None:
            return "a teacher (teacher.checkpoint)"
        return None

    # ---------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "terms": self.term_modules.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "term_optimizers": {k: t.own_optimizer.state_dict() for k, t in self.terms.items() if t.own_optimizer is not None},
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_acc": self.best_acc,
            "history": self.history,
            "generator": self._gen_state,  # one state per process (a list) under torchrun
            "world_size": self.world,
            "epoch_sums": dict(self._epoch_sums),
            "epoch_seconds": self._epoch_seconds,
            "epoch_hook_logs": {k: float(v) for k, v in self._epoch_hook_logs.items()},  # no numpy scalars (weights_only)
            "rng": _plain_rng_state(rng_state()),
            "config": self.cfg.model_dump(mode="json"),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("config", {}).get("method") != self.cfg.model_dump(mode="json")["method"]:
            raise ConfigError(
                f"the checkpoint in {self.out_dir} was made by method {state.get('config', {}).get('method')}, "
                f"not {self.cfg.method.model_dump()}; use another output folder or --overwrite"
            )
        for what, module, key in (("student", self.model, "model"), ("loss-term modules", self.term_modules, "terms")):
            try:
                module.load_state_dict(state[key])
            except RuntimeError as exc:  # size mismatch / missing keys: another architecture, teacher or bank
                first = str(exc).strip().splitlines()
                raise ShapeError(
                    f"the checkpoint {self.out_dir / 'last.pt'} does not fit this run's {what} "
                    f"({first[1].strip() if len(first) > 1 else first[0]}): the student architecture, class count, "
                    "teacher feature width or outlier banks changed since the run started; use another output folder "
                    "or --overwrite"
                ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        for k, s in state["term_optimizers"].items():
            self.terms[k].own_optimizer.load_state_dict(s)  # type: ignore[union-attr]
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if state["step_in_epoch"] and state.get("world_size", 1) != self.world:
            raise ConfigError(
                f"the checkpoint {self.out_dir / 'last.pt'} was written in the middle of an epoch by "
                f"{state.get('world_size', 1)} process(es); resume it with the same number of processes (this run "
                f"has {self.world}), or from an end-of-epoch checkpoint"
            )
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.best_acc = state["best_acc"]
        self.history = state["history"]
        self._gen_state = state["generator"]
        self._epoch_sums = dict(state.get("epoch_sums", {}))
        self._epoch_seconds = float(state.get("epoch_seconds", 0.0))
        self._epoch_hook_logs = dict(state.get("epoch_hook_logs", {}))
        set_rng_state(_native_rng_state(state["rng"]))

    def save(self, name: str = "last.pt") -> None:
        if self.rank != 0:
            return
        with atomic_path(self.out_dir / name) as tmp:
            torch.save(self.state_dict(), tmp)

    def try_resume(self) -> bool:
        path = self.out_dir / "last.pt"
        if not path.exists():
            return False
        # on the CPU first: RNG states must stay CPU ByteTensors; load_state_dict moves the rest.
        # Only tensors and plain containers are stored, so nothing in the file can run code.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            raise ConfigError(
                f"{path} holds {found.group(1) if found else 'objects'} besides tensors and plain values: it was written "
                "by an older oaml or is not a training state, and is never loaded unsafely. Continue it with the oaml "
                "that wrote it, or start again with --overwrite"
            ) from None
        self.load_state_dict(state)
        log.info("resumed from %s at epoch %d step %d", path, self.epoch, self.step_in_epoch)
        return True

    # ---------------------------------------------------------------------------------------
    def _teacher_outputs(self, raw: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        assert self.teacher is not None
        with torch.no_grad():
            t_logits, t_feats = self.teacher(raw, idx)
        return t_logits.to(self.device).float(), t_feats.to(self.device).float()

    def _fmt(self, x: torch.Tensor) -> torch.Tensor:
        """A student input batch in the student's memory format (``channels_last`` or as is)."""
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last and x.dim() == 4 else x

    def _step(self, raw: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> Dict[str, float]:
        cfg = self.cfg
        self.model.train()
        self.term_modules.train()
        aug = cfg.data.augment
        raw_aug = augment_batch(raw, aug.flip, aug.crop_padding, g) if (aug.flip or aug.crop_padding) else raw
        x = self.preprocess(raw_aug.to(self.device, non_blocking=True))
        labels_cpu, labels = labels, labels.to(self.device)
        n_id = x.shape[0]
        aux_x = aux_idx = None
        if self.aux is not None and any("aux" in t.requires for t in self.terms.values()):
            nb = cfg.data.aux_batch_size or n_id
            aux_idx = torch.randint(0, len(self.aux), (nb,), generator=g)
            aux_raw, _ = self.aux.get(aux_idx.tolist())
            if aug.flip or aug.crop_padding:
                aux_raw = augment_batch(aux_raw, aug.flip, aug.crop_padding, g)
            aux_x = self.preprocess(aux_raw.to(self.device))
        # terms may add images built from this batch (e.g. MixOE's ID/outlier mixtures) to the same pass
        extra_in: Dict[str, Tuple[torch.Tensor, Any]] = {}
        for name, term in self.terms.items():
            made = term.extra_inputs(x, labels, aux_x, g)
            if made is not None:
                extra_in[name] = made
        fwd_aux = aux_x is not None and any("aux" in t.requires and t.forward_aux for t in self.terms.values())
        n_aux = aux_x.shape[0] if fwd_aux else 0  # type: ignore[union-attr]
        parts = [x] + ([aux_x] if fwd_aux else []) + [e[0] for e in extra_in.values()]
        inputs = self._fmt(torch.cat(parts) if len(parts) > 1 else x)  # ONE forward pass for ID + outliers
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            logits_all, feats_all = self.step_net(inputs)
        logits_all, feats_all = logits_all.float(), feats_all.float()
        state = StepState(
            images=x,
            labels=labels,
            labels_cpu=labels_cpu,
            logits=logits_all[:n_id],
            features=feats_all[:n_id],
            generator=g,
            epoch=self.epoch,
            step=self.global_step,
            aux_images=aux_x,
            aux_logits=logits_all[n_id : n_id + n_aux] if fwd_aux else None,
            aux_features=feats_all[n_id : n_id + n_aux] if fwd_aux else None,
            model=self.model,
            indices=idx,
            aux_indices=aux_idx,
        )
        off = n_id + n_aux
        for name, (imgs, info) in extra_in.items():
            n = imgs.shape[0]
            state.extras[name] = {"logits": logits_all[off : off + n], "features": feats_all[off : off + n], "info": info}
            off += n
        if self.teacher_needed:
            state.teacher_logits, state.teacher_features = self._teacher_outputs(raw_aug, idx)
        logs: Dict[str, Any] = {}  # floats or 0-d tensors: read back in ONE device sync below
        for term in self.terms.values():
            logs.update(term.pre_step(state))
        total = torch.zeros((), device=self.device)
        for name, term in self.terms.items():
            value = term(state)
            logs[name] = value.detach()
            total = total + term.weight * value
        logs["total"] = total.detach()
        logs["train_acc"] = (state.logits.argmax(1) == labels).float().mean()
        logs = _read_back(logs)
        for name in self.terms:  # before any weight changes
            if not math.isfinite(logs[name]):
                raise NonFiniteError(
                    f"loss term {name!r} became {logs[name]} at epoch {self.epoch} step {self.global_step}; "
                    f"the last good checkpoint is {self.out_dir / 'last.pt'}. Lower optim.lr or the term's weight, "
                    "or check the inputs"
                )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.distributed:  # DDP averaged the student's gradients; the terms' own modules are averaged here
            average_gradients(self.term_modules.parameters())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        for term in self.terms.values():
            term.post_step(state)
        return logs

    @torch.no_grad()
    def evaluate(self, fetcher: Optional[BatchFetcher] = None) -> float:
        fetcher = fetcher or self.val
        self.model.eval()
        n = len(fetcher)
        correct = 0
        for raw, labels in fetcher.in_order(self.cfg.data.eval_batch_size):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                logits = self.model(self._fmt(self.preprocess(raw.to(self.device))))
            correct += int((logits.argmax(1).cpu() == labels).sum())
        return correct / max(n, 1)

    @torch.no_grad()
    def extract(self, which: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, features, labels) of the whole ID training set (``"train"``) or outlier pool
        (``"aux"``) in dataset order: eval mode, un-augmented images, float32 on the device."""
        fetcher = {"train": self.train, "aux": self.aux}.get(which)
        if fetcher is None:
            raise ConfigError(f"extract: no {which!r} set in this run (use 'train' or 'aux')")
        self.model.eval()
        logits, feats, labels = [], [], []
        for raw, lab in fetcher.in_order(self.cfg.data.eval_batch_size):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                lo, fe = self.model.forward_features(self._fmt(self.preprocess(raw.to(self.device))))
            logits.append(lo.float())
            feats.append(fe.float())
            labels.append(torch.as_tensor(lab).long())
        return torch.cat(logits), torch.cat(feats), torch.cat(labels)

    def _epoch_start(self) -> Dict[str, float]:
        """Run the terms' ``on_epoch_start`` hooks (only terms that define one) with one generator
        seeded from (seed, epoch), the same on every process."""
        logs: Dict[str, float] = {}
        hooked = [t for t in self.terms.values() if type(t).on_epoch_start is not Term.on_epoch_start]
        if not hooked:
            return logs
        ctx = EpochContext(
            epoch=self.epoch,
            generator=torch.Generator().manual_seed((_seed_for(self.cfg.seed, self.epoch) + 104_729) % (2**63 - 1)),
            model=self.model,
            device=self.device,
            extract=self.extract,
        )
        for term in hooked:
            logs.update(term.on_epoch_start(ctx))
        return logs

    def _warm_up_terms(self, steps: int) -> None:
        """Fit the terms' own modules (transfer MLP, CLUB q, ...) for ``steps`` batches with the
        student FROZEN (eval mode, no gradient, BatchNorm statistics untouched), so that a short
        schedule does not start them far from their fitted state. The terms' student-optimised
        parameters take Adam steps on their own loss; estimators fit in their ``post_step``."""
        if steps <= 0:
            return
        own = {n: [p for grp in t.student_param_groups() for p in grp["params"]] for n, t in self.terms.items()}
        trained = [n for n, ps in own.items() if ps]  # terms with parameters of their own in the student's optimiser
        opt = torch.optim.Adam([p for n in trained for p in own[n]], lr=1e-3) if trained else None
        g = torch.Generator().manual_seed((_seed_for(self.cfg.seed, 0) + 7919) % (2**63 - 1))
        n, bs = len(self.train), self.cfg.data.batch_size
        self.model.eval()
        self.term_modules.train()
        for _ in range(steps):
            idx = torch.randint(0, n, (bs,), generator=g)
            raw, labels = self.train.get(idx.tolist())
            with torch.no_grad():
                logits, feats = self.net(self._fmt(self.preprocess(raw.to(self.device))))
            state = StepState(images=raw, labels=labels.to(self.device), labels_cpu=labels, logits=logits.float(),
                              features=feats.float(), generator=g, epoch=0, step=0, model=self.model, indices=idx)
            if self.teacher_needed:
                state.teacher_logits, state.teacher_features = self._teacher_outputs(raw, idx)
            for term in self.terms.values():
                term.pre_step(state)
            if opt is not None:
                loss = sum(self.terms[k].weight * self.terms[k](state) for k in trained)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for term in self.terms.values():
                term.post_step(state)
        log.info("warmed up the terms' own modules (%s) for %d steps with the student frozen", ", ".join(self.terms), steps)

    def fit(self, resume: bool = False) -> Dict[str, Any]:
        cfg = self.cfg
        if resume:
            self.try_resume()
        elif (self.out_dir / "last.pt").exists():
            raise ConfigError(f"{self.out_dir} already holds a training run; pass --resume to continue it or --overwrite")
        bs = cfg.data.batch_size
        from ..utils.progress import progress_bar

        if self.global_step == 0 and self.step_in_epoch == 0:
            self._warm_up_terms(method_warmup_steps(cfg.method))
        while self.epoch < cfg.optim.epochs:
            self.sampler.set_epoch(self.epoch)
            order = list(self.sampler)
            batches = [order[i * bs : (i + 1) * bs] for i in range(self.steps_per_epoch)]
            g = torch.Generator().manual_seed(_seed_for(cfg.seed, self.epoch) + self.rank)
            if self.step_in_epoch and self._gen_state is not None:
                g.set_state(self._gen_state[self.rank] if isinstance(self._gen_state, list) else self._gen_state)
            if not self.step_in_epoch:
                self._epoch_sums, self._epoch_seconds = {}, 0.0
            sums = self._epoch_sums
            t0 = time.time() - self._epoch_seconds
            if not self.step_in_epoch:  # a run resumed mid-epoch keeps the hooks' checkpointed state
                self._epoch_hook_logs = self._epoch_start()
            bar = progress_bar(
                total=self.steps_per_epoch,
                initial=self.step_in_epoch,
                desc=f"{cfg.method.name} epoch {self.epoch + 1}/{cfg.optim.epochs}",
                disable=not cfg.progress or self.rank != 0,
                mininterval=2.0,
                leave=False,
            )
            todo = batches[self.step_in_epoch :]
            for idx, (raw, labels) in zip(todo, self.train.batches(todo)):
                logs = self._step(raw, labels, torch.as_tensor(idx), g)
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                self.step_in_epoch += 1
                self.global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{logs['total']:.3f}", refresh=False)
                if cfg.checkpoint_every_steps and self.global_step % cfg.checkpoint_every_steps == 0 and self.step_in_epoch < self.steps_per_epoch:
                    self._gen_state = self._generator_states(g)
                    self._epoch_seconds = time.time() - t0
                    self.save()
            bar.close()
            done_steps = self.step_in_epoch
            val_acc = self.evaluate()
            row = {
                "epoch": self.epoch + 1,
                "lr": self.optimizer.param_groups[0]["lr"],
                **{k: v / max(done_steps, 1) for k, v in sums.items()},
                **self._epoch_hook_logs,
                "val_acc": val_acc,
                "seconds": time.time() - t0,
                "steps": done_steps,
            }
            self.history.append(row)
            self.epoch += 1
            self.step_in_epoch = 0
            self._gen_state = None
            self._epoch_sums, self._epoch_seconds = {}, 0.0
            self._epoch_hook_logs = {}
            if val_acc >= self.best_acc:  # ties go to the later epoch, as the authors' selection
                self.best_acc = val_acc
                self._save_best(val_acc)
            self.save()
            self._log(row)
            log.info(
                "%s epoch %d/%d: loss %.4f val_acc %.4f (%.1fs)",
                cfg.method.name, self.epoch, cfg.optim.epochs, row.get("total", float("nan")), val_acc, row["seconds"],
            )
        summary = {
            "method": cfg.method.name,
            "best_val_accuracy": self.best_acc,
            "epochs": cfg.optim.epochs,
            "seconds_per_epoch": float(np.mean([r["seconds"] for r in self.history])) if self.history else None,
            "history": self.history,
            "terms": self.term_cfgs,
        }
        if self.rank == 0:
            write_json(self.out_dir / "summary.json", summary)
        return summary

    def _generator_states(self, g: torch.Generator) -> Any:
        """This process's generator state, or every process's (a list by rank) under torchrun."""
        if not self.distributed:
            return g.get_state()
        states: List[Any] = [None] * self.world
        dist.all_gather_object(states, g.get_state())
        return states

    def _save_best(self, val_acc: float) -> None:
        if self.rank != 0:
            return
        save_student(
            self.out_dir / "best.pt",
            self.model,
            arch={"name": self.cfg.student.name, "width": self.cfg.student.width, "stem": self.cfg.student.stem,
                  "num_classes": self.num_classes, "in_channels": self.in_channels},
            preprocess=self.preprocess.config(),
            meta={"epoch": self.epoch, "val_accuracy": val_acc, "method": self.cfg.method.name,
                  "config": self.cfg.model_dump(mode="json")},
        )

    def _log(self, row: Dict[str, Any]) -> None:
        if self.rank != 0:
            return
        path = self.out_dir / "log.csv"
        rows = self.history
        keys: List[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            if self._tb is None:
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self._tb.add_scalar(k, v, row["epoch"])
            self._tb.flush()


def _compiled(net: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` (inductor, static shapes: one graph per batch shape and train/eval mode)."""
    try:
        supported = hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()
    except Exception:  # noqa: BLE001 - an import error inside torch._dynamo means the same
        supported = False
    if not supported:
        raise ConfigError(f"compile: true needs torch.compile, which torch {torch.__version__} does not support on this "
                          "Python/platform; set compile: false")
    if device.type == "cpu" and not (os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++"))):
        raise ConfigError("compile: true on the CPU needs a C++ compiler (g++ or clang++, or CXX set) for inductor's "
                          "kernels; install one or set compile: false")
    return torch.compile(net, dynamic=False)


def _plain_rng_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`rng_state` in what ``torch.load(weights_only=True)`` reads: tensors, lists, numbers."""
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    numpy = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    return {**state, "python": [version, list(internal), gauss], "numpy": numpy}


def _native_rng_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`_plain_rng_state`, as :func:`set_rng_state` takes it."""
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    numpy = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    return {**state, "python": (version, tuple(internal), gauss), "numpy": numpy}


def _read_back(logs: Dict[str, Any]) -> Dict[str, float]:
    """Tensor values (0-d, any device) to floats with one transfer instead of one sync each."""
    keys = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in logs.items() if not isinstance(v, torch.Tensor)}
    if keys:
        vals = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, vals))
    return {k: out[k] for k in logs}


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))
