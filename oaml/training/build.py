"""Build a :class:`Trainer` from a :class:`TrainConfig`: data from the benchmark, outlier banks,
teacher (live or cached outputs), auxiliary outlier images. Shared by ``oaml train`` and the
pipeline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ..errors import ConfigError
from .config import TrainConfig
from .methods import MethodConfig, resolve_terms
from .terms import TERMS
from .trainer import Trainer

log = logging.getLogger(__name__)


def limited(dataset, limit: Optional[int], seed: int):
    if limit is None or len(dataset) <= limit:
        return dataset
    from ..data.base import stratified_subset

    return dataset.subset(stratified_subset(np.asarray(getattr(dataset, "labels")), limit, seed))


def method_requirements(method: MethodConfig) -> set:
    """What a method's terms need: ``teacher``, ``aux`` images, ``cood`` / ``dood`` banks."""
    req: set = set()
    for name, settings in resolve_terms(method).items():
        req |= set(TERMS.get(name).requirements(settings))
    return req


def build_trainer(cfg: TrainConfig, out_dir: str | Path, teacher: Any = None) -> Trainer:
    """``teacher``: an already loaded teacher function (the pipeline passes one); otherwise the
    config's ``teacher.checkpoint`` is loaded when the method needs a teacher."""
    from ..data import get_benchmark
    from ..outliers.bank import Bank

    bench = get_benchmark(cfg.data.benchmark)
    skip = cfg.data.skip_bad
    subset_seed = cfg.seed if cfg.data.subset_seed is None else cfg.data.subset_seed
    train = limited(bench.id_train(cfg.data.root, skip_bad=skip), cfg.data.train_limit, subset_seed)
    val = limited(bench.id_val(cfg.data.root, skip_bad=skip), cfg.data.val_limit, cfg.seed + 1)
    req = method_requirements(cfg.method)
    banks: Dict[str, Any] = {}
    for kind in ("cood", "dood"):
        path = getattr(cfg.outliers, f"{kind}_bank")
        if kind in req:
            if not path:
                raise ConfigError(f"method {cfg.method.name!r} needs a {kind.upper()} bank: set outliers.{kind}_bank")
            banks[kind] = Bank.open(path)
    if "image_outliers" in req:
        if not cfg.outliers.image_outliers:
            raise ConfigError(f"method {cfg.method.name!r} needs a teacher-selected image-outlier set: set outliers.image_outliers")
        from ..outliers.images import ImageOutlierSet

        banks["image_outliers"] = ImageOutlierSet(cfg.outliers.image_outliers)
    aux = bench.oe_dataset(cfg.data.root, skip_bad=skip) if "aux" in req else None
    teacher_fn, teacher_dim = None, None
    if "teacher" in req:
        if teacher is None:
            if not cfg.teacher.checkpoint:
                raise ConfigError(f"method {cfg.method.name!r} distils from a teacher: set teacher.checkpoint")
            from ..models.teachers import load_teacher_checkpoint

            teacher = load_teacher_checkpoint(cfg.teacher.checkpoint, device=cfg.device)
        for bank in banks.values():  # before computing any teacher output
            check_bank_teacher(bank, teacher)
        teacher_fn, teacher_dim = make_teacher_fn(teacher, train, cfg)
    return Trainer(
        cfg, train, val, out_dir, num_classes=bench.num_classes, in_channels=bench.channels,
        teacher=teacher_fn, teacher_feature_dim=teacher_dim, aux_set=aux, banks=banks,
    )


def check_bank_teacher(bank: Any, teacher: Any) -> None:
    """A bank made from another teacher's features is refused (its vectors live in another space).

    A C-OOD bank lives in the teacher's feature space, so its width must be the teacher's feature
    width (D-OOD banks may have another width: Stable Diffusion latents)."""
    width = getattr(teacher, "feature_dim", None)
    if bank.kind == "cood" and width is not None and bank.dim != width:
        from ..errors import ShapeError

        raise ShapeError(
            f"C-OOD bank {bank.path} holds {bank.dim}-d vectors but the teacher's features are {width}-d; the bank "
            "was made from another teacher: rebuild it with this teacher (oaml bank features, then oaml sample)"
        )
    import json

    ident = json.loads(json.dumps(teacher.identity(), default=str))  # as it reads back from a manifest
    made_by = bank.meta.get("teacher") or bank.meta.get("source", {}).get("meta", {}).get("teacher")
    if made_by is not None and made_by != ident:
        from ..errors import BankError

        raise BankError(
            f"bank {bank.path} was made from teacher {_teacher_summary(made_by)}, but this run's teacher is "
            f"{_teacher_summary(ident)}{_teacher_diff(made_by, ident)}; rebuild the bank with this teacher "
            "(oaml bank features / oaml sample)"
        )


def _teacher_summary(ident: Any) -> str:
    if not isinstance(ident, dict):
        return repr(ident)
    sha = ident.get("checkpoint_sha256") or ident.get("weights_sha256")
    return f"{ident.get('name')!r}" + (f" (weights sha256 {str(sha)[:12]})" if sha else "")


def _teacher_diff(a: Any, b: Any) -> str:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return ""
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return f" (they differ in {', '.join(keys)})" if keys else ""


def cached_teacher_outputs(teacher: Any, train_set: Any, cache_dir: Optional[str], batch_size: int):
    """The teacher's (logits, features) for every training image. With ``cache_dir`` they are kept
    there as a :class:`~oaml.outliers.features.TeacherOutputCache` whose folder name is a hash of
    the teacher's identity and the dataset's content fingerprint, so a later run with the same
    teacher and the same images reads them instead of running the teacher again."""
    import hashlib
    import json

    import torch

    from ..data.fingerprint import dataset_fingerprint
    from ..models.teachers import compute_teacher_outputs
    from ..outliers.features import TeacherOutputCache

    data_key = dataset_fingerprint(train_set) if cache_dir else None
    if data_key is None:
        return compute_teacher_outputs(teacher, train_set, batch_size=batch_size)
    ident = json.dumps(teacher.identity(), sort_keys=True, default=str)
    path = Path(cache_dir) / f"train-{hashlib.sha256((ident + data_key).encode()).hexdigest()[:24]}"
    cache = TeacherOutputCache.build(teacher, train_set, path, in_memory=True, batch_size=batch_size, progress=False)
    cache.require(teacher)
    return cache.lookup(torch.arange(len(cache)))


def make_teacher_fn(teacher: Any, train_set: Any, cfg: TrainConfig):
    """Live teacher, or cached outputs when the ID images are not augmented and caching is on."""
    import torch

    augment = cfg.data.augment.flip or cfg.data.augment.crop_padding
    if cfg.teacher.cache and not augment:
        logits, feats = cached_teacher_outputs(teacher, train_set, cfg.teacher.cache_dir, cfg.data.eval_batch_size)
        from ..utils.device import resolve_device

        device = resolve_device(cfg.device)
        if device.type == "cuda" and (logits.numel() + feats.numel()) * 4 <= cfg.teacher.device_cache_mb * 2**20:
            logits, feats = logits.float().to(device), feats.float().to(device)  # one copy, no transfer per step

        from ..utils.device import to_device_async

        def cached(raw: torch.Tensor, idx: torch.Tensor):
            i = to_device_async(idx, logits.device)
            return logits[i], feats[i]

        cached.cached = True  # type: ignore[attr-defined]
        return cached, feats.shape[1]

    def live(raw: torch.Tensor, idx: torch.Tensor):
        return teacher.forward_raw(raw)

    return live, teacher.feature_dim
