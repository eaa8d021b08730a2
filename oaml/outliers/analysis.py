"""How far are outlier sets (C-OOD, D-OOD, real OOD features) from the ID features?

:func:`analyze_outliers` compares each set ``S`` with the ID feature set ``P``. All vectors are
L2-normalised first (``normalize=True``; the k-NN sampler works on the unit sphere), and every
set is reduced to at most ``max_samples`` rows by a seeded random subset. The ID rows are split
once (seeded) into a *reference* half, used as ``P`` everywhere, and a *query* half, which is
analysed like an outlier set under the name ``"id_heldout"``: it is the baseline every number
should be read against (an outlier set that looks like ``id_heldout`` is not out of
distribution). Definitions:

``kl_gauss``
    KL(N_S || N_P) in nats between Gaussian fits with full covariances estimated by Ledoit-Wolf
    shrinkage (scikit-learn), so that the estimate exists for n < D:
    ``0.5 * (tr(C_P^-1 C_S) + (m_P - m_S)^T C_P^-1 (m_P - m_S) - D + ln det C_P - ln det C_S)``.
    ``kl_gauss_rev`` is KL(N_P || N_S). Gaussian fits see only first and second moments.
``mmd2``
    Unbiased squared maximum mean discrepancy with the RBF kernel
    ``k(x, y) = exp(-||x - y||^2 / (2 h^2))``, bandwidth ``h`` = median pairwise distance of the
    pooled sample (median heuristic), on at most ``mmd_samples`` rows per side.
``knn``
    Distance from each vector of ``S`` to its ``k``-th nearest neighbour in ``P`` (Euclidean on
    the normalised vectors, exact), summarised by its mean and the quantiles
    ``0.05, 0.25, 0.5, 0.75, 0.95``; ``frac_beyond_id_q95`` is the fraction of ``S`` whose
    distance exceeds the 95% quantile of the ``id_heldout`` distances (~0.05 for ID-like data).
    This is the quantity the KNN OOD score and the k-NN sampler use.
``probe_auroc``
    Separability: a logistic-regression linear probe (features standardised, C=1) trained to tell
    ``S`` from ``P`` on a stratified 70/30 split of a class-balanced sample (equal counts),
    AUROC on the held-out 30%. 0.5 = indistinguishable, 1.0 = linearly separable.

Sets whose width differs from the ID features (e.g. Stable Diffusion latents, 16384-d, versus
768-d teacher features) cannot be compared with these distances; they are listed under
``skipped`` with the reason, never zero-padded (the authors' Fig. 4 padded and added constants).

Outputs of :func:`write_report`: ``analysis.json``, ``analysis.md`` (one table), and
``knn_distances.png`` (histograms of the k-NN distances) and ``pca.png`` (2-D PCA fitted on the
ID reference features, every set projected).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import ShapeError
from ..utils.io import atomic_path, atomic_write_text, write_json
from .bank import Bank

log = logging.getLogger(__name__)

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _load(x: Any, max_n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    if isinstance(x, (str, Path)):
        x = Bank.open(x)
    if isinstance(x, Bank):
        n = len(x)
        idx = np.sort(rng.choice(n, size=max_n, replace=False)) if n > max_n else np.arange(n)
        return x.gather(idx).astype(np.float64), {"source": str(x.path), "kind": x.kind, "count": n}
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ShapeError(f"feature sets must be 2-D (n, D), got shape {a.shape}")
    n = a.shape[0]
    if n > max_n:
        a = a[np.sort(rng.choice(n, size=max_n, replace=False))]
    return a, {"source": "array", "count": n}


def _normalize(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


class GaussianFit:
    """Mean, Ledoit-Wolf covariance, its Cholesky factor and log-determinant (float64)."""

    def __init__(self, x: np.ndarray):
        from sklearn.covariance import LedoitWolf

        self.mean = x.mean(0)
        self.cov = LedoitWolf().fit(x).covariance_
        self.chol = np.linalg.cholesky(self.cov)
        self.logdet = 2.0 * np.log(np.diag(self.chol)).sum()

    def kl_from(self, other: "GaussianFit") -> float:
        """KL(N_other || N_self) in nats."""
        from scipy.linalg import cho_solve

        d = self.mean.shape[0]
        tr = np.trace(cho_solve((self.chol, True), other.cov))
        diff = np.linalg.solve(self.chol, self.mean - other.mean)
        return float(0.5 * (tr + diff @ diff - d + self.logdet - other.logdet))


def gaussian_kl(s: np.ndarray | GaussianFit, p: np.ndarray | GaussianFit) -> tuple[float, float]:
    """(KL(N_S || N_P), KL(N_P || N_S)) with Ledoit-Wolf covariances; see module docstring."""
    fs = s if isinstance(s, GaussianFit) else GaussianFit(s)
    fp = p if isinstance(p, GaussianFit) else GaussianFit(p)
    return fp.kl_from(fs), fs.kl_from(fp)


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d, 0.0)


def mmd2_rbf(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Unbiased MMD^2 with an RBF kernel at the median-heuristic bandwidth; returns (mmd2, h)."""
    z = np.concatenate([x, y])
    dz = _sqdist(z, z)
    iu = np.triu_indices(len(z), 1)
    h = float(np.sqrt(np.median(dz[iu])))
    h = h if h > 0 else 1.0
    k = np.exp(-dz / (2 * h * h))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    mmd = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
           - 2 * kxy.mean())
    return float(mmd), h


def knn_distances(query: np.ndarray, ref: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Exact Euclidean distance from each query row to its k-th nearest row of ``ref``."""
    k = min(k, len(ref))
    out = np.empty(len(query))
    rr = (ref * ref).sum(1)
    for i in range(0, len(query), chunk):
        q = query[i : i + chunk]
        d = np.maximum((q * q).sum(1)[:, None] + rr[None, :] - 2 * q @ ref.T, 0.0)
        out[i : i + chunk] = np.sqrt(np.partition(d, k - 1, axis=1)[:, k - 1])
    return out


def probe_auroc(s: np.ndarray, p: np.ndarray, seed: int) -> float:
    """Held-out AUROC of a logistic-regression probe separating ``s`` (positive) from ``p``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n = min(len(s), len(p))
    s = s[rng.choice(len(s), n, replace=False)]
    p = p[rng.choice(len(p), n, replace=False)]
    x = np.concatenate([s, p])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500))
    clf.fit(xtr, ytr)
    return float(roc_auc_score(yte, clf.decision_function(xte)))


def analyze_outliers(
    id_features: Any,
    sets: Mapping[str, Any],
    k: int = 50,
    max_samples: int = 5000,
    mmd_samples: int = 1500,
    normalize: bool = True,
    seed: int = 0,
    out_dir: str | Path | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Compare outlier sets with the ID features (see the module docstring for definitions).

    ``id_features`` and the values of ``sets`` are banks, bank paths, arrays or tensors.
    Returns a JSON-able dict ``{"settings", "id", "sets": {name: metrics}, "skipped"}`` and, with
    ``out_dir``, writes the JSON, Markdown and plots there (:func:`write_report`).
    ``num_threads`` caps the BLAS/OpenMP threads (threadpoolctl) during the analysis; None leaves
    them as they are (on a shared, oversubscribed machine 1 is much faster).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=num_threads):
        return _analyze(id_features, sets, k, max_samples, mmd_samples, normalize, seed, out_dir)


def _analyze(id_features: Any, sets: Mapping[str, Any], k: int, max_samples: int, mmd_samples: int,
             normalize: bool, seed: int, out_dir: str | Path | None) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    idf, id_info = _load(id_features, 2 * max_samples, rng)
    if len(idf) < 4:
        raise ShapeError(f"need at least 4 ID vectors, got {len(idf)}")
    if normalize:
        idf = _normalize(idf)
    perm = rng.permutation(len(idf))
    ref, held = idf[perm[: len(idf) // 2]], idf[perm[len(idf) // 2 :]]
    id_knn = knn_distances(held, ref, k)
    ref_fit = GaussianFit(ref)
    q95 = float(np.quantile(id_knn, 0.95))
    result: dict[str, Any] = {
        "settings": {"k": min(k, len(ref)), "max_samples": max_samples, "mmd_samples": mmd_samples,
                     "normalize": normalize, "seed": seed, "quantiles": list(QUANTILES)},
        "id": dict(id_info, dim=int(idf.shape[1]), reference_rows=len(ref), heldout_rows=len(held)),
        "sets": {},
        "skipped": {},
    }
    knn_all = {"id_heldout": id_knn}
    pca_pts: dict[str, np.ndarray] = {}
    items: list[tuple[str, Any]] = [("id_heldout", held)] + list(sets.items())
    for name, data in items:
        if name == "id_heldout":
            x, info = held, {"source": "held-out half of the ID features", "count": len(held)}
        else:
            x, info = _load(data, max_samples, rng)
            if x.shape[1] != idf.shape[1]:
                reason = (f"width {x.shape[1]} differs from the ID features' {idf.shape[1]}; distances between "
                          "different spaces are undefined (no zero-padding)")
                result["skipped"][name] = dict(info, reason=reason)
                log.warning("analysis: skipping %s: %s", name, reason)
                continue
            if normalize:
                x = _normalize(x)
            if len(x) < 4:
                result["skipped"][name] = dict(info, reason=f"only {len(x)} vectors")
                continue
        d = knn_all[name] if name == "id_heldout" else knn_distances(x, ref, k)
        knn_all[name] = d
        kl_sp, kl_ps = gaussian_kl(x, ref_fit)
        ms, ns = min(mmd_samples, len(x)), min(mmd_samples, len(ref))
        mmd, h = mmd2_rbf(x[rng.choice(len(x), ms, replace=False)], ref[rng.choice(len(ref), ns, replace=False)])
        result["sets"][name] = dict(
            info,
            rows_used=len(x),
            kl_gauss=kl_sp,
            kl_gauss_rev=kl_ps,
            mmd2=mmd,
            mmd_bandwidth=h,
            knn={"mean": float(d.mean()), **{f"q{int(q * 100):02d}": float(np.quantile(d, q)) for q in QUANTILES}},
            frac_beyond_id_q95=float((d > q95).mean()),
            probe_auroc=probe_auroc(x, ref, seed),
        )
        pca_pts[name] = x
    result["_knn"] = knn_all
    result["_pca"] = (ref, pca_pts)
    if out_dir is not None:
        write_report(result, out_dir)
    return {k2: v for k2, v in result.items() if not k2.startswith("_")}


def markdown_table(result: Mapping[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"ID features: {result['id'].get('source')} (dim {result['id']['dim']}, reference "
        f"{result['id']['reference_rows']} rows); k = {s['k']}; vectors L2-normalised: {s['normalize']}; seed {s['seed']}.",
        "",
        "| set | n | KL(S‖ID) | KL(ID‖S) | MMD² | kNN mean | kNN q05 | kNN q50 | kNN q95 | >ID q95 | probe AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["sets"].items():
        kn = m["knn"]
        lines.append(
            f"| {name} | {m['rows_used']} | {m['kl_gauss']:.3f} | {m['kl_gauss_rev']:.3f} | {m['mmd2']:.4f} | "
            f"{kn['mean']:.4f} | {kn['q05']:.4f} | {kn['q50']:.4f} | {kn['q95']:.4f} | "
            f"{m['frac_beyond_id_q95']:.3f} | {m['probe_auroc']:.3f} |"
        )
    for name, m in result.get("skipped", {}).items():
        lines.append(f"\nSkipped `{name}`: {m['reason']}.")
    lines += [
        "",
        "KL: Gaussian fits with Ledoit-Wolf covariances (nats). MMD²: unbiased, RBF kernel at the median "
        "bandwidth. kNN: distance to the k-th nearest ID reference vector. >ID q95: fraction beyond the 95% "
        "quantile of held-out ID distances. Probe AUROC: logistic regression, 30% held out. `id_heldout` is "
        "the ID baseline.",
    ]
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``analysis.json``, ``analysis.md``, ``knn_distances.png`` and ``pca.png`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in result.items() if not k.startswith("_")}
    write_json(out / "analysis.json", clean)
    atomic_write_text(out / "analysis.md", markdown_table(clean))

    knn_all: dict[str, np.ndarray] = result.get("_knn", {})
    if knn_all:
        fig, ax = plt.subplots(figsize=(7, 4))
        lo = min(float(v.min()) for v in knn_all.values())
        hi = max(float(v.max()) for v in knn_all.values())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 60)
        for name, d in knn_all.items():
            ax.hist(d, bins=bins, density=True, histtype="step", linewidth=1.5, label=name)
        ax.set_xlabel(f"distance to the k={clean['settings']['k']}-th nearest ID feature")
        ax.set_ylabel("density")
        ax.legend()
        fig.tight_layout()
        with atomic_path(out / "knn_distances.png") as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
    if "_pca" in result:
        ref, pts = result["_pca"]
        pca = PCA(n_components=2, random_state=clean["settings"]["seed"]).fit(ref)
        fig, ax = plt.subplots(figsize=(6, 6))
        rng = np.random.default_rng(clean["settings"]["seed"])
        show = ref[rng.choice(len(ref), min(len(ref), 2000), replace=False)]
        p = pca.transform(show)
        ax.scatter(p[:, 0], p[:, 1], s=3, alpha=0.4, label="ID (reference)")
        for name, x in pts.items():
            if name == "id_heldout":
                continue
            sel = x[rng.choice(len(x), min(len(x), 2000), replace=False)]
            q = pca.transform(sel)
            ax.scatter(q[:, 0], q[:, 1], s=3, alpha=0.4, label=name)
        ev = pca.explained_variance_ratio_
        ax.set_xlabel(f"PC1 ({ev[0]:.1%} of ID variance)")
        ax.set_ylabel(f"PC2 ({ev[1]:.1%})")
        ax.legend(markerscale=4)
        fig.tight_layout()
        with atomic_path(out / "pca.png") as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
    return out
