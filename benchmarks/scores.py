"""Speed benchmark: oaml post-hoc scores vs the matching pytorch-ood detectors and OpenOOD v1.5
postprocessors.

Feature scores: fit + score on synthetic, seeded data: N_train x D train features (fit split of
MDS/ViM/KNN), N_val x D ID-val features (fit split of ReAct/KLM), N_test x D test features
(half ID, half OOD), for every class count in --classes. Each side is timed end to end on the
same tensors (ours: ``create_score(...).fit(...).score(...)``; pytorch-ood:
``fit_features``/``fit_logits``/``fit_feature_maps`` + ``predict_features``/``predict_logits``/...).
As a correctness cross-check the table also gives the AUROC (ID half vs OOD half) of every
side (pytorch-ood's outlier scores are negated) and the Spearman correlation of ours with each.

OpenOOD v1.5 is not installed (it is a research repository, not a package): its postprocessors
for the feature scores (MSP, MLS, EBO, GEN, GradNorm, MDS, KLM, ReAct, ViM, KNN) are re-expressed
below in a few lines each, following ``openood/postprocessors/<name>_postprocessor.py`` (same
libraries and dtypes: sklearn ``EmpiricalCovariance``, ``np.linalg.eig``, faiss, scipy), applied
to the test features in batches of --openood-batch (OpenOOD's test loaders use 200), as
OpenOOD's evaluator calls ``postprocess`` per batch. Deviations are noted per score.

ODIN and Gram need a model: they are timed separately on a small CNN (3 conv blocks, randomly
initialised; speed does not depend on training) with --model-train 28x28 single-channel random
inputs for Gram's fit and --model-test inputs for scoring, batch 256, on the CPU.

If a pytorch-ood detector is projected to exceed --their-budget seconds (measured on a 1/10
subset of the test set first), its time is extrapolated linearly from the subset and marked
``"extrapolated": true`` in the JSON and with a ``~`` in the table.

Usage: python benchmarks/scores.py [--out benchmarks/results/scores.json] [--classes 10 100]
       python benchmarks/scores.py --small      # a quick check that every side runs (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
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
    info = {k: getattr(s, k) for k in ("precision_", "backend_") if hasattr(s, k)}
    return best, out, info


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


# ---------------------------------------------------------------------------- OpenOOD side


def openood_detector(name, C, head, tr, va):
    """Returns (fit_fn, predict_fn(features (B, D) float32, logits (B, C)) -> confidence, higher
    = ID) re-expressing OpenOOD v1.5's postprocessor ``name`` (None when it does not apply)."""
    import scipy.special

    W = head[0].detach().float().numpy()
    b = head[1].detach().float().numpy()
    st = {}

    def fc(feat):  # net.fc / forward_threshold's linear layer, float32
        return torch.from_numpy(feat) @ torch.from_numpy(W).T + torch.from_numpy(b)

    if name == "msp":  # base_postprocessor.py
        return (lambda: None), (lambda f, z: torch.softmax(z, dim=1).max(dim=1).values)
    if name == "mls":  # maxlogit_postprocessor.py
        return (lambda: None), (lambda f, z: z.max(dim=1).values)
    if name == "ebo":  # ebo_postprocessor.py, temperature 1
        return (lambda: None), (lambda f, z: 1.0 * torch.logsumexp(z / 1.0, dim=1))
    if name == "gen":  # gen_postprocessor.py, gamma 0.1, M 100

        def gen(f, z, gamma=0.1, M=100):
            probs_sorted = torch.sort(torch.softmax(z, dim=1), dim=1)[0][:, -M:]
            return -torch.sum(probs_sorted**gamma * (1 - probs_sorted) ** gamma, dim=1)

        return (lambda: None), gen
    if name == "gradnorm":  # gradnorm_postprocessor.py: one backward pass per sample

        def gradnorm(f, z):
            lin = nn.Linear(W.shape[1], W.shape[0])
            lin.weight.data[...] = torch.from_numpy(W)
            lin.bias.data[...] = torch.from_numpy(b)
            logsoftmax = nn.LogSoftmax(dim=-1)
            confs = []
            with torch.enable_grad():
                for i in torch.from_numpy(f).float():
                    targets = torch.ones((1, C))
                    lin.zero_grad()
                    loss = torch.mean(torch.sum(-targets * logsoftmax(lin(i[None])), dim=-1))
                    loss.backward()
                    confs.append(torch.sum(torch.abs(lin.weight.grad.data)).numpy())
            return np.array(confs)

        return (lambda: None), gradnorm
    if name == "mds":  # mds_postprocessor.py (v1.5: class means, sklearn covariance, float32)

        def fit():
            import sklearn.covariance

            feats, labels = tr.features.float(), tr.labels
            class_mean, centered = [], []
            for c in range(C):
                xs = feats[labels.eq(c)]
                class_mean.append(xs.mean(0))
                centered.append(xs - class_mean[c].view(1, -1))
            st["mean"] = torch.stack(class_mean)
            gl = sklearn.covariance.EmpiricalCovariance(assume_centered=False)
            gl.fit(torch.cat(centered).numpy().astype(np.float32))
            st["prec"] = torch.from_numpy(gl.precision_).float()

        def predict(f, z):
            feats = torch.from_numpy(f)
            class_scores = torch.zeros((feats.shape[0], C))
            for c in range(C):
                tensor = feats - st["mean"][c].view(1, -1)
                class_scores[:, c] = -torch.matmul(torch.matmul(tensor, st["prec"]), tensor.t()).diag()
            return torch.max(class_scores, dim=1)[0]

        return fit, predict
    if name == "klm":  # kl_matching_postprocessor.py: templates on the val split, python KL metric
        from sklearn.metrics import pairwise_distances_argmin_min

        def kl(p, q):
            return np.sum(np.where(p != 0, p * np.log(p / q), 0))

        def fit():
            feat = va.features.float().numpy()
            sm = scipy.special.softmax(feat @ W.T + b, axis=-1)
            pred = np.argmax(sm, axis=-1)
            # OpenOOD loops over range(1000) (ImageNet); classes never predicted give NaN rows
            st["mean"] = np.array([sm[pred == i].mean(axis=0) for i in range(C) if (pred == i).any()])

        def predict(f, z):
            sm = scipy.special.softmax((torch.from_numpy(f) @ torch.from_numpy(W).T + torch.from_numpy(b)).numpy(), axis=-1)
            return -pairwise_distances_argmin_min(sm, st["mean"], metric=kl)[1]

        return fit, predict
    if name == "react":  # react_postprocessor.py, percentile 90

        def fit():
            st["log"] = va.features.float().numpy()
            # OpenOOD recomputes this percentile in every postprocess() call; here once
            st["thr"] = np.percentile(st["log"].flatten(), 90)

        def predict(f, z):
            out = fc(np.clip(f, None, st["thr"]).astype(np.float32))
            return torch.logsumexp(out.data.cpu(), dim=1)

        return fit, predict
    if name == "vim":  # vim_postprocessor.py, dim 256 (D // 2 below 512 features)

        def fit():
            from sklearn.covariance import EmpiricalCovariance

            D = W.shape[1]
            dim = 256 if D >= 512 else D // 2
            feature_id_train = tr.features.float().numpy()
            logit_id_train = feature_id_train @ W.T + b
            st["u"] = -np.matmul(np.linalg.pinv(W), b)
            ec = EmpiricalCovariance(assume_centered=True)
            ec.fit(feature_id_train - st["u"])
            eig_vals, eigen_vectors = np.linalg.eig(ec.covariance_)
            st["NS"] = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T)
            vlogit_id_train = np.linalg.norm(np.matmul(feature_id_train - st["u"], st["NS"]), axis=-1)
            st["alpha"] = logit_id_train.max(axis=-1).mean() / vlogit_id_train.mean()

        def predict(f, z):
            logit_ood = fc(f)
            energy_ood = scipy.special.logsumexp(logit_ood.numpy(), axis=-1)
            vlogit_ood = np.linalg.norm(np.matmul(f - st["u"], st["NS"]), axis=-1) * st["alpha"]
            return -vlogit_ood + energy_ood

        return fit, predict
    if name == "knn":  # knn_postprocessor.py, K 50 (its normaliser adds 1e-10 to every entry)
        try:
            import faiss
        except ImportError:
            return None

        def normalizer(x):
            return x / np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10

        def fit():
            st["index"] = faiss.IndexFlatL2(tr.features.shape[1])
            st["index"].add(np.ascontiguousarray(normalizer(tr.features.float().numpy())))

        def predict(f, z):
            D_, _ = st["index"].search(np.ascontiguousarray(normalizer(f)), 50)
            return -D_[:, -1]

        return fit, predict
    return None


def run_openood(name, C, head, tr, va, te, budget, batch):
    det = openood_detector(name, C, head, tr, va)
    if det is None:
        return None
    fit, predict = det

    def pred_all(fs):
        f, z = fs.features.float().numpy(), fs.logits.float()
        return np.concatenate(
            [np.asarray(predict(f[i : i + batch], z[i : i + batch]), dtype=np.float64).reshape(-1)
             for i in range(0, len(fs), batch)]
        )

    with torch.no_grad():
        return _timed(fit, pred_all, te, budget, negate=False)


def _timed(fit, predict, te, budget, negate):
    """Fit + predict time; extrapolated from a 1/10 subset when projected over ``budget``.
    Returns (seconds, ID-higher float64 scores or None, extrapolated)."""
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
    out = np.asarray(out.detach().double() if isinstance(out, torch.Tensor) else out, dtype=np.float64)
    return t_fit + t_pred, (-out if negate else out), False


def subset(fs: FeatureSet, n: int) -> FeatureSet:
    idx = torch.linspace(0, len(fs) - 1, n).long()  # spread over ID and OOD halves
    return FeatureSet(fs.logits[idx], fs.features[idx], fs.labels[idx])


def run_theirs(name, C, head, tr, va, te, budget):
    with torch.no_grad() if name != "gradnorm" else torch.enable_grad():
        fit, predict = their_detector(name, C, head, tr, va)
        return _timed(fit, predict, te, budget, negate=True)


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
    ap.add_argument("--out", default=None, help="default benchmarks/results/scores.json (scores-small.json with --small)")
    ap.add_argument("--small", action="store_true",
                    help="tiny sizes (3000 train, 1000 val, 2000 test, D 128; 256/256 model inputs) to check that "
                    "everything runs; explicit size flags still win")
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--n-train", type=int, default=None, help="default 50000")
    ap.add_argument("--n-val", type=int, default=None, help="default 10000")
    ap.add_argument("--n-test", type=int, default=None, help="default 20000")
    ap.add_argument("--dim", type=int, default=None, help="default 512")
    ap.add_argument("--model-train", type=int, default=None, help="default 3000")
    ap.add_argument("--model-test", type=int, default=None, help="default 2000")
    ap.add_argument("--scores", nargs="+", default=FEATURE_SCORES)
    ap.add_argument("--no-theirs", action="store_true", help="time only oaml")
    ap.add_argument("--no-openood", action="store_true", help="skip the OpenOOD re-expressions")
    ap.add_argument("--openood-batch", type=int, default=200, help="OpenOOD postprocess batch size")
    ap.add_argument("--their-budget", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="oaml side: best of this many runs")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    args = ap.parse_args(argv)
    full = {"n_train": 50_000, "n_val": 10_000, "n_test": 20_000, "dim": 512, "model_train": 3000, "model_test": 2000}
    small = {"n_train": 3000, "n_val": 1000, "n_test": 2000, "dim": 128, "model_train": 256, "model_test": 256}
    for k, v in (small if args.small else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = "benchmarks/results/scores-small.json" if args.small else "benchmarks/results/scores.json"

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
    print_header()
    for C in args.classes:
        head, tr, va, te, n_id = make_data(C, args.dim, args.n_train, args.n_val, args.n_test, args.seed)
        for name in args.scores:
            t_ours, ours, info = run_ours(name, C, args.dim, head, tr, va, te, args.repeats)
            row = {
                "score": name,
                "classes": C,
                "ours_s": t_ours,
                "auroc_ours": ood_metrics(ours[:n_id], ours[n_id:])["auroc"],
                **info,
            }
            if not args.no_theirs:
                t_theirs, theirs, extrap = run_theirs(name, C, head, tr, va, te, args.their_budget)
                row.update(theirs_s=t_theirs, extrapolated=extrap, ratio=t_theirs / t_ours)
                if theirs is not None:
                    row["auroc_theirs"] = ood_metrics(theirs[:n_id], theirs[n_id:])["auroc"]
                    row["spearman"] = spearman(ours, theirs)
            if not args.no_openood:
                res = run_openood(name, C, head, tr, va, te, args.their_budget, args.openood_batch)
                if res is not None:
                    t_oo, oo, extrap = res
                    row.update(openood_s=t_oo, openood_extrapolated=extrap, openood_ratio=t_oo / t_ours)
                    if oo is not None:
                        row["auroc_openood"] = ood_metrics(oo[:n_id], oo[n_id:])["auroc"]
                        row["spearman_openood"] = spearman(ours, oo)
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
        "openood": None if args.no_openood else "v1.5 postprocessors re-expressed in this file",
        "openood_batch": args.openood_batch,
        "small": args.small,
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


def print_header():
    print(
        f"{'score':10s} {'C':>4s} {'ours s':>9s} {'pt-ood s':>10s} {'ratio':>7s} {'OpenOOD s':>10s} {'ratio':>7s} "
        f"{'AUROC ours':>10s} {'pt-ood':>8s} {'OpenOOD':>8s} {'rho pt-ood':>10s} {'rho OpenOOD':>11s}"
    )


def print_row(r):
    def peer(key, extrap_key):
        t = r.get(key)
        if t is None:
            return "-", "-"
        return ("~" if r.get(extrap_key) else "") + f"{t:.3f}", f"{t / r['ours_s']:.1f}x"

    th_s, th_r = peer("theirs_s", "extrapolated")
    oo_s, oo_r = peer("openood_s", "openood_extrapolated")
    f = lambda k, w=4: f"{r[k]:.{w}f}" if k in r else "-"  # noqa: E731
    print(
        f"{r['score']:10s} {r['classes']:4d} {r['ours_s']:9.3f} {th_s:>10s} {th_r:>7s} {oo_s:>10s} {oo_r:>7s} "
        f"{f('auroc_ours'):>10s} {f('auroc_theirs'):>8s} {f('auroc_openood'):>8s} "
        f"{f('spearman', 6):>10s} {f('spearman_openood', 6):>11s}",
        flush=True,
    )


if __name__ == "__main__":
    main()
