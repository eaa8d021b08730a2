"""Speed benchmark: oaml post-hoc scores vs the matching pytorch-ood detectors.

Feature scores: fit + score on synthetic, seeded data: N_train x D train features (fit split of
MDS/ViM/KNN), N_val x D ID-val features (fit split of ReAct/KLM), N_test x D test features
(half ID, half OOD), for every class count in --classes. Each side is timed end to end on the
same tensors (ours: ``create_score(...).fit(...).score(...)``; pytorch-ood:
``fit_features``/``fit_logits``/``fit_feature_maps`` + ``predict_features``/``predict_logits``/...).
As a correctness cross-check the table also gives the AUROC (ID half vs OOD half) of both
sides (pytorch-ood's outlier scores are negated) and the Spearman correlation of the scores.

ODIN and Gram need a model: they are timed separately on a small CNN (3 conv blocks, randomly
initialised; speed does not depend on training) with --model-train 28x28 single-channel random
inputs for Gram's fit and --model-test inputs for scoring, batch 256, on the CPU.

If a pytorch-ood detector is projected to exceed --their-budget seconds (measured on a 1/10
subset of the test set first), its time is extrapolated linearly from the subset and marked
``"extrapolated": true`` in the JSON and with a ``~`` in the table.

Usage: python benchmarks/scores.py [--out benchmarks/results/scores.json] [--classes 10 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oaml.metrics import ood_metrics  # noqa: E402
from oaml.models.adapter import Classifier  # noqa: E402
from oaml.scores import FeatureSet, create_score  # noqa: E402

FEATURE_SCORES = ["msp", "mls", "ebo", "gen", "gradnorm", "mds", "klm", "react", "vim", "knn"]


# ------------------------------------------------------------------------------------- data


def make_data(C: int, D: int, n_train: int, n_val: int, n_test: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.relu(torch.randn(C, D, generator=g)) * 0.35
    W = (centers / centers.norm(dim=1, keepdim=True)) * 3.0
    b = 0.1 * torch.randn(C, generator=g)

    def id_set(n):
        y = torch.randint(0, C, (n,), generator=g)
        f = torch.relu(centers[y] + torch.randn(n, D, generator=g))
        return FeatureSet(f @ W.T + b, f, y)

    # OOD: samples around unseen "class" centres drawn like the ID ones (a near-OOD set)
    ood_centers = torch.relu(torch.randn(max(C, 10), D, generator=g)) * 0.35

    def ood_set(n):
        k = torch.randint(0, ood_centers.shape[0], (n,), generator=g)
        f = torch.relu(ood_centers[k] + torch.randn(n, D, generator=g))
        return FeatureSet(f @ W.T + b, f, torch.full((n,), -1))

    tr, va, te_id, te_ood = id_set(n_train), id_set(n_val), id_set(n_test // 2), ood_set(n_test - n_test // 2)
    te = FeatureSet(
        torch.cat([te_id.logits, te_ood.logits]),
        torch.cat([te_id.features, te_ood.features]),
        torch.cat([te_id.labels, te_ood.labels]),
    )
    return (W, b), tr, va, te, n_test // 2


# ------------------------------------------------------------------------------- our scores


def run_ours(name, C, D, head, tr, va, te, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        s = create_score(name)
        fit_data = {"train": tr, "val": va, "none": None}[s.fit_on]
        t0 = time.perf_counter()
        s.fit(fit_data, head=head)
        out = s.score(te)
        best = min(best, time.perf_counter() - t0)
    return best, out


# ------------------------------------------------------------------------- pytorch-ood side


def their_detector(name, C, head, tr, va):
    """Returns (fit_fn, predict_fn(featureset) -> outlier scores) for pytorch-ood."""
    import pytorch_ood.detector as pd

    W, b = head
    fc = nn.Linear(W.shape[1], C)
    with torch.no_grad():
        fc.weight.copy_(W)
        fc.bias.copy_(b)
    if name == "msp":
        d = pd.MaxSoftmax(None)
        return (lambda: None), (lambda fs: d.predict_logits(fs.logits))
    if name == "mls":
        d = pd.MaxLogit(None)
        return (lambda: None), (lambda fs: d.predict_logits(fs.logits))
    if name == "ebo":
        d = pd.EnergyBased(None)
        return (lambda: None), (lambda fs: d.predict_logits(fs.logits))
    if name == "gen":
        d = pd.GEN(None, gamma=0.1, M=min(100, C))
        return (lambda: None), (lambda fs: d.predict_logits(fs.logits))
    if name == "gradnorm":
        # Huang et al. GradNorm through per-sample vmap gradients of the last layer's weight
        d = pd.GradNorm(fc, param_filter=lambda n: n == "weight", micro_batch_size=256)
        return (lambda: None), (lambda fs: d.predict(fs.features))
    if name == "mds":
        d = pd.Mahalanobis(None)
        return (lambda: d.fit_features(tr.features, tr.labels)), (lambda fs: d.predict_features(fs.features))
    if name == "klm":
        d = pd.KLMatching(None)
        return (lambda: d.fit_logits(va.logits, va.labels)), (lambda fs: d.predict_logits(fs.logits))
    if name == "react":
        d = pd.ReAct(None, fc, percentile=0.9)
        return (lambda: d.fit_feature_maps(va.features, va.labels)), (lambda fs: d.predict_feature_maps(fs.features))
    if name == "vim":
        d = pd.ViM(None, d=256, w=W, b=b)
        return (lambda: d.fit_features(tr.features, tr.labels)), (lambda fs: d.predict_features(fs.features))
    if name == "knn":
        d = pd.KNN(None, k=50)
        return (lambda: d.fit_features(tr.features, tr.labels)), (lambda fs: d.predict_features(fs.features))
    raise KeyError(name)


def subset(fs: FeatureSet, n: int) -> FeatureSet:
    idx = torch.linspace(0, len(fs) - 1, n).long()  # spread over ID and OOD halves
    return FeatureSet(fs.logits[idx], fs.features[idx], fs.labels[idx])


def run_theirs(name, C, head, tr, va, te, budget):
    with torch.no_grad() if name != "gradnorm" else torch.enable_grad():
        fit, predict = their_detector(name, C, head, tr, va)
        t0 = time.perf_counter()
        fit()
        t_fit = time.perf_counter() - t0
        small = subset(te, max(1, len(te) // 10))
        t0 = time.perf_counter()
        predict(small)
        t_small = time.perf_counter() - t0
        projected = t_fit + t_small * len(te) / len(small)
        if projected > budget:
            return projected, None, True
        t0 = time.perf_counter()
        out = predict(te)
        t_pred = time.perf_counter() - t0
    return t_fit + t_pred, (-out.detach().double()).numpy(), False


# ----------------------------------------------------------------------------- model scores


class SmallCNN(Classifier):
    def __init__(self, C: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()),
                nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU()),
                nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU()),
            ]
        )
        self.fc = nn.Linear(64, C)
        self.pool_fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), self.fc)
        self.feature_dim, self.num_classes = 64, C

    def feature_maps(self, x):
        maps = []
        for blk in self.blocks:
            x = blk(x)
            maps.append(x)
        return maps

    def features(self, x):
        return self.feature_maps(x)[-1].mean(dim=(2, 3))

    def head(self, f):
        return self.fc(f)

    def fc_weights(self):
        return self.fc.weight, self.fc.bias


def run_model_scores(C, n_train, n_test, seed, budget, with_theirs):
    import pytorch_ood.detector as pd

    torch.manual_seed(seed)
    model = SmallCNN(C).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x_tr = torch.rand(n_train, 1, 28, 28, generator=g)
    y_tr = torch.arange(n_train) % C
    x_te = torch.rand(n_test, 1, 28, 28, generator=g)
    y_te = torch.zeros(n_test, dtype=torch.long)
    bs = 256
    tr_loader = [(x_tr[i : i + bs], y_tr[i : i + bs]) for i in range(0, n_train, bs)]
    te_loader = [(x_te[i : i + bs], y_te[i : i + bs]) for i in range(0, n_test, bs)]
    rows = []

    # ODIN
    t0 = time.perf_counter()
    ours = create_score("odin").fit().score(model=model, loader=te_loader)
    t_ours = time.perf_counter() - t0
    row = {"score": "odin", "classes": C, "ours_s": t_ours, "n_test": n_test}
    if with_theirs:
        det = pd.ODIN(model, eps=0.0014, temperature=1000.0)
        t0 = time.perf_counter()
        theirs = torch.cat([det.predict(x) for x, _ in te_loader]).detach()
        row["theirs_s"] = time.perf_counter() - t0
        row["spearman"] = spearman(ours, -theirs.double().numpy())
    rows.append(row)

    # Gram (grouped by label on both sides; pytorch-ood groups by label)
    t0 = time.perf_counter()
    s = create_score("gram", group_by="label").fit(model=model, loader=tr_loader)
    ours = s.score(model=model, loader=te_loader)
    t_ours = time.perf_counter() - t0
    row = {"score": "gram", "classes": C, "ours_s": t_ours, "n_train": n_train, "n_test": n_test}
    if with_theirs:
        det = pd.Gram(model.pool_fc, list(model.blocks), num_classes=C, num_poles_list=list(range(1, 6)))
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        det.fit(tr_loader)
        theirs = torch.cat([det.predict(x) for x, _ in te_loader]).detach()
        row["theirs_s"] = time.perf_counter() - t0
        row["spearman"] = spearman(ours, -theirs.double().numpy())
    rows.append(row)
    return rows


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/scores.json")
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--n-val", type=int, default=10_000)
    ap.add_argument("--n-test", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--model-train", type=int, default=3000)
    ap.add_argument("--model-test", type=int, default=2000)
    ap.add_argument("--scores", nargs="+", default=FEATURE_SCORES)
    ap.add_argument("--no-theirs", action="store_true", help="time only oaml")
    ap.add_argument("--their-budget", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="oaml side: best of this many runs")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not args.no_theirs:
        import logging

        import pytorch_ood

        logging.getLogger("pytorch_ood").setLevel(logging.ERROR)
        their_version = pytorch_ood.__version__
    else:
        their_version = None

    load_before = os.getloadavg()
    rows = []
    print(f"{'score':10s} {'C':>4s} {'ours s':>9s} {'theirs s':>10s} {'ratio':>8s} {'AUROC ours':>10s} {'AUROC theirs':>12s} {'spearman':>9s}")
    for C in args.classes:
        head, tr, va, te, n_id = make_data(C, args.dim, args.n_train, args.n_val, args.n_test, args.seed)
        for name in args.scores:
            t_ours, ours = run_ours(name, C, args.dim, head, tr, va, te, args.repeats)
            row = {
                "score": name,
                "classes": C,
                "ours_s": t_ours,
                "auroc_ours": ood_metrics(ours[:n_id], ours[n_id:])["auroc"],
            }
            if not args.no_theirs:
                t_theirs, theirs, extrap = run_theirs(name, C, head, tr, va, te, args.their_budget)
                row.update(theirs_s=t_theirs, extrapolated=extrap, ratio=t_theirs / t_ours)
                if theirs is not None:
                    row["auroc_theirs"] = ood_metrics(theirs[:n_id], theirs[n_id:])["auroc"]
                    row["spearman"] = spearman(ours, theirs)
            rows.append(row)
            print_row(row)
    for C in args.classes:
        for row in run_model_scores(C, args.model_train, args.model_test, args.seed, args.their_budget, not args.no_theirs):
            if "theirs_s" in row:
                row["ratio"] = row["theirs_s"] / row["ours_s"]
            rows.append(row)
            print_row(row)

    meta = {
        "n_train": args.n_train,
        "n_val": args.n_val,
        "n_test": args.n_test,
        "dim": args.dim,
        "model_train": args.model_train,
        "model_test": args.model_test,
        "seed": args.seed,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "pytorch_ood": their_version,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "device": "cpu",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "repeats_ours": args.repeats,
        "git_commit": _git_commit(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


def _git_commit():
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def print_row(r):
    th = r.get("theirs_s")
    th_s = "-" if th is None else (("~" if r.get("extrapolated") else "") + f"{th:.3f}")
    ratio = "-" if th is None else f"{th / r['ours_s']:.1f}x"
    f = lambda k: f"{r[k]:.4f}" if k in r else "-"  # noqa: E731
    print(
        f"{r['score']:10s} {r['classes']:4d} {r['ours_s']:9.3f} {th_s:>10s} {ratio:>8s} "
        f"{f('auroc_ours'):>10s} {f('auroc_theirs'):>12s} {f('spearman'):>9s}",
        flush=True,
    )


if __name__ == "__main__":
    main()
