"""OpenMax: unknown-class probability from per-class Weibull models of logit-space distances."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.stats import exponweib

from ..errors import ConfigError, DataError
from .base import SCORES, FeatureSet, Score, check_number

#: libMR's translation of the tail before the Weibull fit (kept by pytorch-ood's LibNotMR)
TRANSLATION = 10000.0


def fit_weibull_tail(dists: np.ndarray, tailsize: int) -> tuple[float, float, float]:
    """pytorch-ood's ``LibNotMR.fit_high``: the ``tailsize`` largest distances, shifted so that
    their minimum sits at 10000, fitted by ``scipy.stats.exponweib.fit(floc=0, f0=1)`` (a
    two-parameter Weibull, maximum likelihood by Nelder-Mead). Returns (min_val, shape, scale)."""
    tail = np.sort(np.asarray(dists, dtype=np.float64))[-tailsize:]
    min_val = float(tail.min())
    params = exponweib.fit(tail + TRANSLATION - min_val, floc=0, f0=1)
    return min_val, float(params[1]), float(params[3])


def weibull_cdf(d: np.ndarray, min_val: np.ndarray, shape: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``LibNotMR.w_score``: the Weibull CDF of the translated distance, 1 - exp(-(x/scale)^shape)
    (scipy's ``exponweib`` formula with a=1), 0 for x <= 0."""
    x = (d + TRANSLATION - min_val) / scale
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        w = -np.expm1(-np.power(np.maximum(x, 0.0), shape))
    return np.where(x > 0, w, 0.0)


@SCORES.register("openmax")
class OpenMax(Score):
    r"""OpenMax (Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016): log-odds of the
    known classes against OpenMax's unknown class,

    .. math:: s(x) = \log \sum_{c} e^{\hat z_c} - \hat z_0
              = \log \frac{1 - P(\text{unknown} \mid x)}{P(\text{unknown} \mid x)},

    a strictly decreasing function of pytorch-ood's score :math:`P(\text{unknown})`, so every
    ranking metric is the same (the log-odds keeps full float64 resolution at both ends, where
    :math:`1 - P` would round to 1 for confident ID samples). The revised activations: for the
    top-:math:`\alpha` classes :math:`c_1, \dots, c_\alpha` of the logits :math:`z` (descending),
    :math:`\omega_{c_i} = 1 - \frac{\alpha + 1 - i}{\alpha} w_{c_i}(x)` (1 for other classes),
    :math:`\hat z_c = z_c \omega_c`, :math:`\hat z_0 = \sum_c z_c (1 - \omega_c)`, where
    :math:`w_c(x)` is the Weibull CDF of the distance of :math:`z` to the mean activation vector
    (MAV) of class c: ``(1 - euclid_weight) * cosine + euclid_weight * euclidean``.

    Fit on ID **train** logits and labels (``fit_on="train"``): per class, the MAV and a Weibull
    fitted to the ``tailsize`` largest distances to it, exactly as pytorch-ood's ``LibNotMR``
    (translation to 10000, ``scipy.stats.exponweib.fit(floc=0, f0=1)``, ~30 ms per class).
    ``correct_only=True`` (default) uses only the train samples the model classifies correctly,
    as the paper and OpenOOD; pytorch-ood uses every labelled sample (``correct_only=False``).
    A class with no fit sample gets no Weibull model and counts as :math:`w_c = 1` when it is
    among the top :math:`\alpha` (pytorch-ood's behaviour; a warning names such classes).
    Defaults are pytorch-ood 0.4.0's: ``tailsize=25``, ``alpha=10`` (capped at C),
    ``euclid_weight=1.0`` (pure Euclidean). OpenOOD's ``openmax`` uses libMR, ``tailsize=20``,
    ``alpha=3``, Euclidean distance, and returns the whole probability vector as ``conf``.

    Differences from pytorch-ood 0.4.0 (same Weibull fits and the same formula otherwise):
    (1) its ``predict`` computes distances only to the MAVs of classes that are the top-1
    prediction of some sample **in the same batch** and uses distance 0 for the others, so a
    sample's score depends on the rest of its batch; here every top-:math:`\alpha` class gets its
    true distance (identical when every class is some sample's top-1); (2) it works in the logits'
    dtype, and in float32 the translated tail (values near 10000) is quantised to ~1e-3; float64
    here; (3) it clips revised activations at 709 before ``exp`` (overflow guard), here the
    log-odds come from ``logsumexp`` (exact for logits ~1e4); (4) its cosine distance is NaN for
    an all-zero logit vector, here the cosine similarity is taken as 0. The refit bug of its
    numpy ``OpenMax`` (pytorch-ood PR #160: state and a mutated ``alpha`` kept across fits) has
    no counterpart: every ``fit`` builds its state afresh from the hyperparameters.
    """

    name = "openmax"
    fit_on = "train"
    needs_fit_labels = True
    uses = ("logits",)

    def __init__(self, tailsize: int = 25, alpha: int = 10, euclid_weight: float = 1.0, correct_only: bool = True):
        super().__init__()
        self.tailsize = check_number("tailsize", tailsize, low=1, integer=True, score=self.name)
        self.alpha = check_number("alpha", alpha, low=1, integer=True, score=self.name)
        self.euclid_weight = check_number("euclid_weight", euclid_weight, low=0.0, high=1.0, score=self.name)
        if not isinstance(correct_only, bool):
            raise ConfigError(f"openmax: correct_only must be True or False, got {correct_only!r}")
        self.correct_only = correct_only

    # -- distances (pytorch-ood's ``_get_dists_to_center``, for the gathered MAVs) -----------------
    def _dists(self, x: np.ndarray, centers: np.ndarray) -> np.ndarray:
        """x (N, C), centers (N, k, C) or (C,) broadcastable: distances (N, k) or (N,)."""
        ew, cw = self.euclid_weight, 1.0 - self.euclid_weight
        xb = x[:, None, :] if centers.ndim == 3 else x
        eu = np.linalg.norm(xb - centers, axis=-1) if ew != 0 else 0.0
        if cw == 0:
            return eu
        dot = (xb * centers).sum(axis=-1)
        den = np.linalg.norm(xb, axis=-1) * np.linalg.norm(centers, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = 1.0 - np.where(den > 0, dot / np.where(den > 0, den, 1.0), 0.0)
        if ew == 0:
            return cos
        return cw * cos + ew * eu

    def _fit(self, data: FeatureSet, W, b) -> None:
        x = data.logits.detach().to("cpu", torch.float64).numpy()
        y = data.labels.detach().cpu().numpy().astype(np.int64)
        N, C = x.shape
        if self.correct_only:
            keep = x.argmax(axis=1) == y
            x, y = x[keep], y[keep]
        self.alpha_ = min(C, self.alpha)
        self.centers_ = np.zeros((C, C))
        self.has_model_ = np.zeros(C, dtype=bool)
        self.min_val_ = np.zeros(C)
        self.shape_ = np.ones(C)
        self.scale_ = np.ones(C)
        for c in np.unique(y):
            xc = x[y == c]
            center = xc.mean(axis=0)
            self.centers_[c] = center
            m, k, s = fit_weibull_tail(self._dists(xc, center), self.tailsize)
            self.min_val_[c], self.shape_[c], self.scale_[c] = m, k, s
            self.has_model_[c] = True
        if not self.has_model_.any():
            raise DataError(
                "openmax: no train sample to fit on"
                + (" (the model classifies none of them correctly; correct_only=False uses all)" if self.correct_only else "")
            )
        missing = np.flatnonzero(~self.has_model_)
        if missing.size:
            warnings.warn(
                f"openmax: {missing.size} class(es) have no {'correctly classified ' if self.correct_only else ''}"
                f"train sample and no Weibull model (treated as w=1 when in the top alpha): {missing[:20].tolist()}",
                RuntimeWarning,
                stacklevel=3,
            )

    def _score(self, data: FeatureSet) -> np.ndarray:
        x_all = data.logits.detach().to("cpu", torch.float64).numpy()
        a = self.alpha_
        weights = (a + 1 - np.arange(1, a + 1)) / float(a)  # ((alpha + 1) - i) / alpha, i = 1..alpha
        out = []
        for i in range(0, x_all.shape[0], 4096):
            x = x_all[i : i + 4096]
            top = np.argsort(x, axis=1)[:, -a:][:, ::-1]  # as pytorch-ood (same tie order)
            d = self._dists(x, self.centers_[top])  # (n, a)
            w = weibull_cdf(d, self.min_val_[top], self.shape_[top], self.scale_[top])
            w = np.where(self.has_model_[top], w, 1.0)
            xt = np.take_along_axis(x, top, axis=1)
            wscores = 1.0 - w * weights[None, :]
            revised = x.copy()
            np.put_along_axis(revised, top, xt * wscores, axis=1)
            v0 = (xt * (1.0 - wscores)).sum(axis=1)
            r = torch.from_numpy(revised)
            out.append((torch.logsumexp(r, dim=1).numpy() - v0))
        return np.concatenate(out)
