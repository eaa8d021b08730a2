"""Gram: deviations of Gram-matrix statistics of intermediate feature maps (Sastry & Oza)."""

from __future__ import annotations

import warnings
from typing import Any, List

import numpy as np
import torch

from ..errors import ConfigError, ShapeError
from .base import SCORES, Score, check_choice, check_finite, check_number, model_device


#: float64 map bytes per chunk of samples in gram_features (cache-sized)
_GRAM_CHUNK_BYTES = 1 << 21


def gram_features(maps: List[torch.Tensor], powers: int) -> List[torch.Tensor]:
    """Per layer: (B, P, C_l) signed p-th roots of the row sums of G_p = F^p (F^p)^T, p=1..P.

    Row sums are computed as F^p @ (column sums of F^p), O(C·HW) instead of the O(C²·HW)
    Gram matrix (same value; float64, powers by repeated multiplication).
    """
    out = []
    for m in maps:
        if m.ndim < 3:
            raise ShapeError(f"gram: feature maps must be (B, C, ...), got shape {tuple(m.shape)}")
        M = m.detach().flatten(2)  # (B, C, HW)
        B, C, HW = M.shape
        res = torch.empty(B, powers, C, dtype=torch.float64, device=M.device)
        ones = torch.ones(1, C, dtype=torch.float64, device=M.device)
        # samples in chunks of about _GRAM_CHUNK_BYTES of float64 map, powers in place: two cache-sized buffers
        # instead of one batch-sized temporary per power (whose allocation and page faults cost more than the
        # arithmetic, and varied with the allocator's state: 0.75 to 1.33 s for the same benchmark row)
        step = max(1, _GRAM_CHUNK_BYTES // (8 * C * HW))
        for a in range(0, B, step):
            # row-major whatever the maps' layout (a channels-last map's flatten(2) is a strided view): the GEMMs
            # below then see standard strides (on strided chunks they took 1.5x as long)
            F = M[a : a + step].to(torch.float64, memory_format=torch.contiguous_format)
            Fp = F.clone() if powers > 1 else F
            for p in range(1, powers + 1):
                if p > 1:
                    Fp.mul_(F)
                colsum = torch.matmul(ones, Fp)  # (b, 1, HW), the sum over channels
                rs = torch.bmm(Fp, colsum.transpose(1, 2)).squeeze(2)  # (b, C)
                res[a : a + step, p - 1] = rs.sign() * rs.abs().pow(1.0 / p)
        out.append(res)  # (B, P, C)
    return out


@SCORES.register("gram")
class Gram(Score):
    r"""Gram-matrix deviation score (Sastry & Oza, "Detecting Out-of-Distribution Examples with
    Gram Matrices", ICML 2020).

    For each layer l of ``model.feature_maps(x)`` and power p = 1..``powers`` (default 5), the
    statistic :math:`g_{l,p} = \mathrm{sign}(r)|r|^{1/p}` with :math:`r` the row sums of
    :math:`F_l^p (F_l^p)^\top`. Fit on ID **train** (``fit_on="train"``): per class c,
    element-wise :math:`\min`/:math:`\max` of g over the fit samples assigned to c — kept as
    running min/max while streaming the loader (no train Gram features are stored). A seeded
    ``holdout`` fraction of the train stream (default 0.1) is not used for min/max; its mean
    per-layer deviation :math:`E_l` is the layer normaliser (these hold-out statistics are stored:
    ``sum_l C_l × powers`` floats per hold-out sample). Deviation of a value x against [lo, hi]:
    :math:`\mathrm{relu}(lo-x)/|lo+10^{-6}| + \mathrm{relu}(x-hi)/|hi+10^{-6}|`, summed over the
    layer's statistics. Score: :math:`s(x) = -\sum_l \delta_l(x)/E_l \,/\, \mathrm{MSP}(x)`, the
    class being the model's prediction.

    ``group_by="prediction"`` (default, the authors' code: train samples grouped by predicted
    class) or ``"label"`` (OpenOOD: true class; needs labels >= 0 from the loader). Every class
    must receive at least one fit sample (ConfigError otherwise).

    Differences from OpenOOD: OpenOOD hooks every Conv2d and ReLU, stores all train Gram
    features, draws its 10% normalisation split with an unseeded ``random.sample`` and computes
    the full C×C Gram matrix; here the layers are whatever ``feature_maps`` returns, the split is
    seeded (``seed``), and the maps and logits come from ``model.maps_and_logits(x)`` (one pass in
    oaml's ResNet; ``model.feature_maps(x)`` and ``model(x)`` for other models), in eval mode under
    ``torch.no_grad``.
    """

    name = "gram"
    fit_on = "train"
    requires_model = True

    def __init__(self, powers: int = 5, holdout: float = 0.1, group_by: str = "prediction", seed: int = 0):
        super().__init__()
        self.powers = check_number("powers", powers, low=1, integer=True, score=self.name)
        self.holdout = check_number("holdout", holdout, low=0.0, high=1.0, low_open=True, high_open=True, score=self.name)
        self.group_by = check_choice("group_by", group_by, ("prediction", "label"), self.name)
        self.seed = check_number("seed", seed, low=0, integer=True, score=self.name)

    # ---- helpers ------------------------------------------------------------------------------
    def _forward(self, model: Any, batch: Any, dev: torch.device):
        if isinstance(batch, (tuple, list)):
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        x = x.to(dev)
        check_finite(x, "gram: input batch")
        if hasattr(model, "maps_and_logits"):  # one pass where the model can (oaml's ResNet)
            maps, logits = model.maps_and_logits(x)
        else:
            maps, logits = model.feature_maps(x), model(x)
        logits = logits.detach().to("cpu", torch.float64)
        check_finite(logits, "gram: model logits")
        feats = [g.cpu() for g in gram_features(maps, self.powers)]
        for g in feats:
            check_finite(g, "gram: Gram statistics (feature maps)")
        return logits, feats, y

    def _deviation(self, feats: List[torch.Tensor], cls: torch.Tensor) -> torch.Tensor:
        """(B, L) per-layer deviations of samples against the bounds of class ``cls``."""
        devs = []
        for g, lo, hi in zip(feats, self.mins_, self.maxs_):
            lo_c, hi_c = lo[cls], hi[cls]
            d = torch.relu(lo_c - g) / (lo_c + 1e-6).abs() + torch.relu(g - hi_c) / (hi_c + 1e-6).abs()
            devs.append(d.flatten(1).sum(dim=1))
        return torch.stack(devs, dim=1)

    def _run(self, model: Any, loader: Any, fn) -> None:
        dev = model_device(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                n = 0
                for batch in loader:
                    fn(*self._forward(model, batch, dev))
                    n += 1
            if n == 0:
                raise ConfigError("gram: the loader yielded no batches")
        finally:
            model.train(was_training)

    # ---- fit / score --------------------------------------------------------------------------
    def _fit_model(self, model: Any, loader: Any) -> None:
        C = int(getattr(model, "num_classes", 0)) or None
        gen = torch.Generator().manual_seed(self.seed)
        state: dict = {"mins": None, "maxs": None, "count": None, "hold": [], "hold_cls": []}

        def step(logits, feats, y):
            if C is not None and logits.shape[1] != C:
                raise ShapeError(f"gram: model.num_classes={C} but logits have {logits.shape[1]} columns")
            nc = logits.shape[1]
            if self.group_by == "label":
                if y is None:
                    raise ConfigError("gram: group_by='label' needs a loader yielding (x, y)")
                cls = torch.as_tensor(y).long().cpu()
                if int(cls.min()) < 0 or int(cls.max()) >= nc:
                    raise ShapeError(f"gram: fit labels must be in [0, {nc - 1}]")
            else:
                cls = logits.argmax(dim=1)
            if state["mins"] is None:
                state["mins"] = [torch.full((nc, *g.shape[1:]), float("inf"), dtype=torch.float64) for g in feats]
                state["maxs"] = [torch.full((nc, *g.shape[1:]), float("-inf"), dtype=torch.float64) for g in feats]
                state["count"] = torch.zeros(nc, dtype=torch.long)
            hold = torch.rand(cls.shape[0], generator=gen) < self.holdout
            fit = ~hold
            if bool(hold.any()):
                state["hold"].append([g[hold] for g in feats])
                state["hold_cls"].append(cls[hold])
            if bool(fit.any()):
                cf = cls[fit]
                state["count"] += torch.bincount(cf, minlength=nc)
                with warnings.catch_warnings():  # index_reduce_ is flagged "beta" by torch
                    warnings.simplefilter("ignore", UserWarning)
                    for lo, hi, g in zip(state["mins"], state["maxs"], feats):
                        gf = g[fit]
                        lo.index_reduce_(0, cf, gf, "amin", include_self=True)
                        hi.index_reduce_(0, cf, gf, "amax", include_self=True)

        self._run(model, loader, step)
        empty = torch.nonzero(state["count"] == 0).flatten().tolist()
        if empty:
            raise ConfigError(
                f"gram: class(es) {empty} received no fit sample (group_by={self.group_by!r}); use a "
                "larger fit split, a smaller holdout, or group_by='label'"
            )
        if not state["hold"]:
            raise ConfigError(f"gram: the holdout={self.holdout} split is empty; use more data or a larger holdout")
        self.mins_, self.maxs_ = state["mins"], state["maxs"]
        hold = [torch.cat([h[i] for h in state["hold"]]) for i in range(len(self.mins_))]
        hold_cls = torch.cat(state["hold_cls"])
        E = self._deviation(hold, hold_cls).mean(dim=0)  # (L,)
        if not bool((E > 0).all()):
            zero = torch.nonzero(E <= 0).flatten().tolist()
            raise ConfigError(
                f"gram: the hold-out samples show zero deviation at layer(s) {zero}, so the layer "
                "normaliser is 0; use more hold-out data (larger holdout or fit split)"
            )
        self.normalisers_ = E

    def _score_model(self, model: Any, loader: Any) -> np.ndarray:
        out = []

        def step(logits, feats, y):
            if logits.shape[1] != self.mins_[0].shape[0]:
                raise ShapeError("gram: the model's class count differs from the one it was fitted with")
            p = torch.softmax(logits, dim=1)
            msp, pred = p.max(dim=1)
            total = (self._deviation(feats, pred) / self.normalisers_).sum(dim=1)
            out.append(-total / msp)

        self._run(model, loader, step)
        return torch.cat(out).numpy()
