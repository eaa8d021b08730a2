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

Every score of ``oaml.scores.SCORES`` has a row. The feature scores added for pytorch-ood parity
(EXTRA_FEATURE_SCORES: entropy ... residual) are timed like the ten above against their
pytorch-ood 0.4.0 detectors (``-`` where pytorch-ood has none: relation, residual), with the
same hyperparameters on both sides (ours at its defaults; see their_detector for the mapping:
ASH/SCALE get the features as (B, D, 1, 1) maps, OpenMax is fitted on the correctly classified
train logits as our ``correct_only=True``, NNGuide on the same bank subset). ``mds_multi`` reads
FeatureSet.layers: the synthetic sets get three extra pooled "layers" (seeded random ReLU
projections of the features, D/8, D/4 and D/2 wide) plus ``layer4`` = the features; pytorch-ood's
``MultiMahalanobis.predict_structured`` is called per batch of 256 (a whole-set call builds
N x N matrices), pytorch-ood's ``GMM.predict_features`` per batch of 1,024 (a whole-set call builds
N x C x D tensors: 20,000 x 100 x 512 exhausted the machine's 24 GiB). OpenOOD v1.5 re-expressions are given for ash_p/b/s, scale, dice, she,
nnguide, nci, fdbd, relation and residual (OpenOOD fits Residual on the val split with dim 512;
here on train with our dim, to compare like with like).

Model scores (odin, gram, mds_odin, rankfeat, vra, grad_uncertainty, nac) need a model: they
are timed separately on a small CNN (3 conv blocks, randomly initialised; speed does not depend
on training) with --model-train 28x28 single-channel uniform random inputs for the fits and
--model-test inputs for scoring (first half uniform like the fit inputs, second half ``0.8 x +
0.1``: a narrower "OOD" half, so the AUROC cross-check is not trivial), batch 256, on the CPU;
each score and each side gets a freshly built copy of the same network. The inner-layer scores
name the CNN's modules (rankfeat and vra: the last block's map ``blocks.2``, pytorch-ood's
backbone/head split there; nac: ``blocks.0..2``); vra uses ``below="clip"`` (pytorch-ood's
rectification; the default ``"zero"`` costs the same).

Timing: every side of a row (ours, pytorch-ood, OpenOOD) is built afresh and run once, in turn; a side
whose run takes under --repeat-under seconds (default 2) counts it as a warm-up and is timed --repeats
more times (default 3), the sides taking turns (ours, theirs, OpenOOD, ours, ...) so that a drift of
the machine's speed hits all alike, and the median reported; else the one run is. The JSON records
the timed runs per side (ours_runs, theirs_runs, openood_runs). Sub-second rows are otherwise at the
mercy of cold starts (the first model score of a run paid the network's first-call costs; the peers'
timed pass followed the untimed 1/10 subset of their projection, ours did not) and of drift (each
side's runs used to follow one another).

If a pytorch-ood detector is projected to exceed --their-budget seconds (measured on a 1/10
subset of the test set, or of the model-test batches, first), its time is extrapolated linearly
from the subset and marked ``"extrapolated": true`` in the JSON and with a ``~`` in the table.
Rows whose oaml score ran with non-default arguments record them as ``ours_kwargs``.

Floors (``"floors"`` in the JSON, per class count; :func:`time_floors`): the float32 GEMMs a
Mahalanobis score needs when done as one whitening (MDS's goal is stated against them) and one faiss
flat search of the test set against the train bank (KNN's), plus our KNN with the faiss backend.
Metrics (``"metrics"``; :func:`time_metrics`): AUROC/FPR@95/AUPR of --metrics-n scores by ours,
pytorch-ood's ``OODMetrics`` and OpenOOD's ``auc_and_fpr_recall``, against one ``torch.sort``.

Usage: python benchmarks/scores.py [--out benchmarks/results/scores.json] [--classes 10 100]
       python benchmarks/scores.py --small      # a quick check that every side runs (under a minute)
       python benchmarks/scores.py --scores mds knn --model-scores   # a subset, no model scores
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
from oaml.scores import SCORES, FeatureSet, create_score  # noqa: E402

FEATURE_SCORES = ["msp", "mls", "ebo", "gen", "gradnorm", "mds", "klm", "react", "vim", "knn"]
# the scores added for pytorch-ood parity (logits / features / head, and mds_multi on FeatureSet.layers)
EXTRA_FEATURE_SCORES = [
    "entropy", "webo", "tscaling", "lts", "gmm", "openmax", "rmd", "pnml", "ash_p", "ash_b", "ash_s", "scale",
    "dice", "she", "nnguide", "nci", "fdbd", "relation", "residual", "mds_multi",
]
MODEL_SCORES = ["odin", "gram", "mds_odin", "rankfeat", "vra", "grad_uncertainty", "nac"]
LAYERS = ("layer1", "layer2", "layer3", "layer4")  # synthetic FeatureSet.layers for mds_multi
THEIR_LAYER_BATCH = 256  # pytorch-ood MultiMahalanobis.predict_structured batch
THEIR_GMM_BATCH = 1024  # pytorch-ood GMM.predict_features batch (it materialises (N, C, D))


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


def with_layers(sets, seed: int):
    """The FeatureSets with ``layers``: three pooled "inner layers" (ReLU of seeded random
    projections of the features plus noise, D/8, D/4 and D/2 wide: they inherit the class and
    OOD structure) and ``layer4`` = the features (as a ResNet's pooled last stage). A separate
    generator, so the other rows' data do not change."""
    g = torch.Generator().manual_seed(seed + 7)
    D = sets[0].feature_dim
    proj = [torch.randn(D, max(2, D // k), generator=g) / D**0.5 for k in (8, 4, 2)]
    out = []
    for fs in sets:
        f = fs.features
        layers = {n: torch.relu(f @ P + 0.3 * torch.randn(len(fs), P.shape[1], generator=g))
                  for n, P in zip(LAYERS, proj)}
        layers[LAYERS[-1]] = f
        out.append(FeatureSet(fs.logits, f, fs.labels, layers=layers))
    return out


# ------------------------------------------------------------------------------- our scores


def ours_kwargs(name, n_train) -> dict:
    """Non-default arguments of our score in this benchmark (the defaults otherwise)."""
    if name == "nnguide" and round(0.01 * n_train) < 100:
        # K=100 needs a bank of >= 100 train samples; the default 1% bank is too small below 10000
        return {"bank_fraction": min(1.0, 200 / n_train)}
    return {}


#: every side of a row: a warm-up run, then REPEATS timed runs (median), when one run takes under REPEAT_UNDER seconds (set by main)
REPEATS, REPEAT_UNDER = 3, 2.0


def interleaved_medians(sides):
    """``sides``: {name: run_once() -> (seconds, scores, extrapolated)}. Every side is run once, in turn; the sides
    whose run took under REPEAT_UNDER seconds and was not extrapolated count that run as a warm-up (the process's
    first call of a code path pays for its allocations, oneDNN primitives and caches) and are then run REPEATS more
    times, taking turns (A, B, C, A, B, C, ...), so that a drift of the machine's speed hits every side alike.
    Returns {name: (median seconds, last scores, extrapolated, timed runs)}. Each call builds its detector afresh
    (no state carried between runs); the same rule holds for every side."""
    last = {k: f() for k, f in sides.items()}
    again = [k for k, (t, _, extrap) in last.items() if not extrap and t < REPEAT_UNDER]
    times = {k: [] if k in again else [last[k][0]] for k in sides}
    for _ in range(REPEATS if again else 0):
        for k in again:
            last[k] = sides[k]()
            times[k].append(last[k][0])
    return {k: (float(np.median(times[k])), last[k][1], last[k][2], len(times[k])) for k in sides}


def ours_once(name, head, tr, va, te, kw=None):
    """(run_once for :func:`interleaved_medians`, state: the last fitted score under "s")."""
    state = {}

    def once():
        s = create_score(name, **(kw or {}))
        fit_data = {"train": tr, "val": va, "none": None}[s.fit_on]
        t0 = time.perf_counter()
        s.fit(fit_data, head=head)
        out = s.score(te)
        state["s"] = s
        return time.perf_counter() - t0, out, False

    return once, state


# ------------------------------------------------------------------------- pytorch-ood side


def their_detector(name, C, head, tr, va, kw=None):
    """Returns (fit_fn, predict_fn(featureset) -> outlier scores) for pytorch-ood, or None."""
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
    return extra_their_detector(name, C, fc, head, tr, va, kw or {})


def nnguide_bank(tr, kw):
    """Indices of our NNGuide's bank (its seeded subset of the train split, as in
    oaml/scores/nnguide.py ``_fit``), so that the peers search the same bank."""
    s = create_score("nnguide", **kw)
    if s.bank_fraction >= 1.0:
        return torch.arange(len(tr))
    m = max(1, int(round(s.bank_fraction * len(tr))))
    return torch.randperm(len(tr), generator=torch.Generator().manual_seed(s.seed))[:m].sort().values


def extra_their_detector(name, C, fc, head, tr, va, kw):
    """pytorch-ood 0.4.0 detectors of EXTRA_FEATURE_SCORES at our defaults (as in the agreement
    tests tests/test_scores_{logit_extra,feature_extra,inner}.py); None where it has none."""
    import pytorch_ood.detector as pd

    W, b = head
    flat_head = lambda x: fc(x.flatten(1))  # noqa: E731  ASH/SCALE/SHE/NNGuide call head(features or maps)
    maps = lambda fs: fs.features[:, :, None, None]  # noqa: E731  pooled features as (B, D, 1, 1) maps
    none = lambda: None  # noqa: E731
    if name == "entropy":
        d = pd.Entropy(None)
        return none, (lambda fs: d.predict_logits(fs.logits))
    if name == "webo":  # our default weights (None) = all ones = EBO
        d = pd.WeightedEBO(None, torch.ones(1, C))
        return none, (lambda fs: d.predict_logits(fs.logits))
    if name == "tscaling":  # L-BFGS on T (needs gradients): theirs_once enables them
        d = pd.TemperatureScaling(None)
        return (lambda: d.fit_logits(va.logits, va.labels)), (lambda fs: d.predict_logits(fs.logits))
    if name == "lts":
        d = pd.LTS(None, head=fc, p=0.05)
        return none, (lambda fs: d.predict_features(fs.features))
    if name == "gmm":  # predicted in batches: one call builds (N, C, D) tensors (20,000 x 100 x 512 ran out of 24 GiB)
        d = pd.GMM(None, reg=1e-6)
        return (lambda: d.fit_features(tr.features, tr.labels)), (lambda fs: torch.cat(
            [d.predict_features(fs.features[i : i + THEIR_GMM_BATCH]) for i in range(0, fs.features.shape[0], THEIR_GMM_BATCH)]))
    if name == "openmax":  # ours: correct_only=True, i.e. fit on the correctly classified train logits

        d = pd.OpenMax(None, tailsize=25, alpha=10, euclid_weight=1.0)

        def fit():
            ok = tr.logits.argmax(1) == tr.labels
            d.fit_logits(tr.logits[ok], tr.labels[ok])

        return fit, (lambda fs: d.predict_logits(fs.logits))
    if name == "rmd":
        d = pd.RMD(None)
        return (lambda: d.fit_features(tr.features, tr.labels)), (lambda fs: d.predict_features(fs.features))
    if name == "pnml":
        d = pd.PNML(None, head=fc)
        return (lambda: d.fit_features(tr.features, tr.labels)), (lambda fs: d.predict_features(fs.features))
    if name in ("ash_p", "ash_b", "ash_s"):
        d = pd.ASH(backbone=None, head=flat_head, variant="ash-" + name[-1], percentile=0.90)
        return none, (lambda fs: d.predict_feature_maps(maps(fs)))
    if name == "scale":
        d = pd.SCALE(backbone=None, head=flat_head, percentile=0.85)
        return none, (lambda fs: d.predict_feature_maps(maps(fs)))
    if name == "dice":
        d = pd.DICE(None, W, b, p=0.90)
        return (lambda: d.fit_features(tr.features, tr.labels)), (lambda fs: d.predict_features(fs.features))
    if name == "she":
        d = pd.SHE(None, head=flat_head)
        return (lambda: d.fit_features(tr.features, tr.labels)), (lambda fs: d.predict_features(fs.features))
    if name == "nnguide":  # the same bank subset as ours, K = our K
        s = create_score("nnguide", **kw)
        d = pd.NNGuide(None, head=flat_head, k=s.K)

        def fit():
            idx = nnguide_bank(tr, kw)
            d.fit_features(tr.features[idx], tr.labels[idx])

        return fit, (lambda fs: d.predict_features(fs.features))
    if name == "nci":
        d = pd.NCI(None, fc, alpha=1e-4)
        return (lambda: d.fit_features(tr.features)), (lambda fs: d.predict_features(fs.features))
    if name == "fdbd":
        d = pd.fDBD(None, fc)
        return (lambda: d.fit_features(tr.features)), (lambda fs: d.predict_features(fs.features))
    if name == "mds_multi":  # fit/predict_structured on the pooled layers, per batch (see the docstring)
        d = pd.MultiMahalanobis([nn.Identity() for _ in LAYERS])

        def predict(fs):
            zs = [fs.layers[n] for n in LAYERS]
            return torch.cat([d.predict_structured([z[i : i + THEIR_LAYER_BATCH] for z in zs])
                              for i in range(0, len(fs), THEIR_LAYER_BATCH)])

        return (lambda: d.fit_structured([tr.layers[n] for n in LAYERS], tr.labels)), predict
    return None  # relation, residual: no pytorch-ood detector


# ---------------------------------------------------------------------------- OpenOOD side


def openood_detector(name, C, head, tr, va, kw=None):
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
    return extra_openood_detector(name, C, head, tr, va, kw or {})


def extra_openood_detector(name, C, head, tr, va, kw):
    """OpenOOD v1.5 re-expressions for EXTRA_FEATURE_SCORES (as in
    tests/test_scores_feature_extra.py), at OpenOOD's config values where they equal our
    defaults; None where not re-expressed. Same calling convention as openood_detector."""
    W = head[0].detach().float()
    b = head[1].detach().float()
    st = {}

    def fc(feat):
        return torch.as_tensor(feat) @ W.T + b

    def energy(z):
        return torch.logsumexp(z, dim=1)

    if name in ("ash_p", "ash_b", "ash_s", "scale"):
        # networks/ash_net.py ash_b/ash_p/ash_s and networks/scale_net.py scale on the (B, D, 1, 1)
        # view of the pooled feature, then ash/scale_postprocessor.py: energy of net.fc
        percentile = 85 if name == "scale" else 90

        def predict(f, z):
            x = torch.from_numpy(f).clone().view(f.shape[0], -1, 1, 1)
            n = x.shape[1:].numel()
            k = n - int(np.round(n * percentile / 100.0))
            t = x.view(x.shape[0], n)
            s1 = x.sum(dim=[1, 2, 3])
            v, i = torch.topk(t, k, dim=1)
            if name == "scale":
                x = x * torch.exp(s1 / v.sum(1))[:, None, None, None]
            else:
                if name == "ash_b":
                    v = (s1 / k).unsqueeze(1).expand(v.shape)
                t.zero_().scatter_(dim=1, index=i, src=v)
                if name == "ash_s":
                    x = x * torch.exp(s1 / x.sum(dim=[1, 2, 3]))[:, None, None, None]
            return energy(fc(x.view(x.shape[0], -1)))

        return (lambda: None), predict
    if name == "dice":  # dice_postprocessor.py, p 90: mask from the mean train feature

        def fit():
            mean_act = tr.features.float().numpy().mean(0)
            contrib = mean_act[None, :] * W.numpy()
            st["w"] = W * torch.Tensor(contrib > np.percentile(contrib, 90))

        def predict(f, z):
            return energy((torch.from_numpy(f)[:, None, :] * st["w"]).sum(2) + b)

        return fit, predict
    if name == "she":  # she_postprocessor.py, inner_product: mean train features of correct predictions

        def fit():
            pred = tr.logits.argmax(1)
            st["pat"] = torch.stack([tr.features[(tr.labels == c) & (pred == c)].float().mean(0) for c in range(C)])

        def predict(f, z):
            return (torch.from_numpy(f) * st["pat"][z.argmax(1)]).sum(1)

        return fit, predict
    if name == "nnguide":  # nnguide_postprocessor.py (faiss IndexFlatIP) on our bank subset, K = our K
        try:
            import faiss
        except ImportError:
            return None
        K = create_score("nnguide", **kw).K

        def normalizer(x):
            return x / np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10

        def fit():
            idx = nnguide_bank(tr, kw)
            f, z = tr.features[idx].float().numpy(), tr.logits[idx].float()
            bank = normalizer(f) * energy(z).numpy()[:, None]
            st["index"] = faiss.IndexFlatIP(bank.shape[1])
            st["index"].add(np.ascontiguousarray(bank, dtype=np.float32))

        def predict(f, z):
            D_, _ = st["index"].search(np.ascontiguousarray(normalizer(f), dtype=np.float32), K)
            return D_.mean(axis=1) * energy(z).numpy()

        return fit, predict
    if name == "nci":  # nci_postprocessor.py, alpha 1e-4

        def fit():
            st["mu"] = tr.features.float().mean(0)

        def predict(f, z):
            f = torch.from_numpy(f)
            c = f - st["mu"]
            return (W[z.argmax(1)] * c).sum(1) / torch.norm(c, dim=1) + 1e-4 * torch.norm(f, p=1, dim=1)

        return fit, predict
    if name == "fdbd":  # fdbd_postprocessor.py, distance_as_normalizer True (no 1/(C-1): same ranking)

        def fit():
            st["mu"] = tr.features.float().mean(0)
            w = W.numpy()
            denom = np.stack([np.linalg.norm(w - w[p], axis=1) for p in range(C)])
            denom[np.arange(C), np.arange(C)] = 1
            st["denom"] = torch.as_tensor(denom, dtype=torch.float32)

        def predict(f, z):
            values, idx = z.max(1)
            num = torch.sum(torch.abs(z - values[:, None]) / st["denom"][idx], dim=1)
            return num / torch.norm(torch.from_numpy(f) - st["mu"], dim=1)

        return fit, predict
    if name == "relation":  # relation_postprocessor.py, pow 1, threshold 0.03, bank = all train, chunks of 50

        def normalize(x):
            return x / torch.sqrt((x**2).sum(-1) + 1e-10).reshape(-1, 1)

        def fit():
            st["f"] = normalize(tr.features.float())
            st["p"] = torch.softmax(tr.logits.float(), dim=1)

        def predict(f, z):
            feat, prob = normalize(torch.from_numpy(f)), torch.softmax(z, dim=1)
            out = []
            for i in range(0, len(feat), 50):
                rel = torch.clamp(feat[i : i + 50] @ st["f"].T, min=0.0) * (prob[i : i + 50] @ st["p"].T)
                rel = (rel.abs() > 0.03) * rel
                out.append((rel.sign() * rel.abs() ** 1).sum(-1))
            return torch.cat(out)

        return fit, predict
    if name == "residual":  # residual_postprocessor.py, fitted on train with our dim (see the docstring)

        def fit():
            from sklearn.covariance import EmpiricalCovariance

            D = W.shape[1]
            dim = 256 if D >= 512 else D // 2
            feats = tr.features.float().numpy()
            st["u"] = -np.matmul(np.linalg.pinv(W.numpy()), b.numpy())
            ec = EmpiricalCovariance(assume_centered=True)
            ec.fit(feats - st["u"])
            eig_vals, eigen_vectors = np.linalg.eig(ec.covariance_)
            st["NS"] = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T)

        def predict(f, z):
            return -np.linalg.norm(np.matmul(f - st["u"], st["NS"]), axis=-1)

        return fit, predict
    return None


def openood_once(name, C, head, tr, va, te, budget, batch, kw=None):
    """run_once of the OpenOOD re-expression for :func:`interleaved_medians`, or None where there is none."""
    if openood_detector(name, C, head, tr, va, kw) is None:
        return None

    def once():
        fit, predict = openood_detector(name, C, head, tr, va, kw)

        def pred_all(fs):
            f, z = fs.features.float().numpy(), fs.logits.float()
            return np.concatenate(
                [np.asarray(predict(f[i : i + batch], z[i : i + batch]), dtype=np.float64).reshape(-1)
                 for i in range(0, len(fs), batch)]
            )

        with torch.no_grad():
            return _timed(fit, pred_all, te, budget, negate=False)

    return once


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
    layers = None if fs.layers is None else {k: v[idx] for k, v in fs.layers.items()}
    return FeatureSet(fs.logits[idx], fs.features[idx], fs.labels[idx], layers)


def theirs_once(name, C, head, tr, va, te, budget, kw=None):
    """run_once of the pytorch-ood detector for :func:`interleaved_medians`, or None without one."""
    grad = name in ("gradnorm", "tscaling")
    with torch.no_grad():
        if their_detector(name, C, head, tr, va, kw) is None:
            return None

    def once():
        with torch.enable_grad() if grad else torch.no_grad():
            fit, predict = their_detector(name, C, head, tr, va, kw)
            return _timed(fit, predict, te, budget, negate=True)

    return once


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

    def maps_and_logits(self, x):  # one pass, as pytorch-ood's hooks see it
        maps = self.feature_maps(x)
        return maps, self.fc(maps[-1].mean(dim=(2, 3)))

    def head(self, f):
        return self.fc(f)

    def fc_weights(self):
        return self.fc.weight, self.fc.bias


def run_model_scores(C, n_train, n_test, seed, budget, with_theirs, names=MODEL_SCORES):
    def fresh_model():  # the same weights for every score and side (none sees another's hooks or state)
        torch.manual_seed(seed)
        return SmallCNN(C).eval()

    g = torch.Generator().manual_seed(seed + 1)
    x_tr = torch.rand(n_train, 1, 28, 28, generator=g)
    y_tr = torch.arange(n_train) % C
    x_te = torch.rand(n_test, 1, 28, 28, generator=g)
    n_id = n_test // 2
    x_te[n_id:] = 0.8 * x_te[n_id:] + 0.1  # the "OOD" half: the same mean, a narrower range
    y_te = torch.zeros(n_test, dtype=torch.long)
    bs = 256
    tr_loader = [(x_tr[i : i + bs], y_tr[i : i + bs]) for i in range(0, n_train, bs)]
    te_loader = [(x_te[i : i + bs], y_te[i : i + bs]) for i in range(0, n_test, bs)]
    rows = []
    for name in names:
        kw = MODEL_KWARGS.get(name, {})
        def once():
            s = create_score(name, **kw)
            model = fresh_model()
            t0 = time.perf_counter()
            if s.fit_on != "none":
                s.fit(model=model, loader=tr_loader)
            out = s.score(model=model, loader=te_loader)
            return time.perf_counter() - t0, out, False

        def once_theirs():
            fit, predict, grad = their_model_detector(name, fresh_model(), C, seed, tr_loader)
            return _timed_model(fit, predict, te_loader, budget, grad)

        res = interleaved_medians({"ours": once, **({"theirs": once_theirs} if with_theirs else {})})
        t_ours, ours, _, runs = res["ours"]
        s = create_score(name, **kw)
        row = {"score": name, "classes": C, "ours_s": t_ours, "ours_runs": runs}
        if s.fit_on != "none":
            row["n_train"] = n_train
        row.update(n_test=n_test, auroc_ours=ood_metrics(ours[:n_id], ours[n_id:])["auroc"])
        if kw:
            row["ours_kwargs"] = kw
        if with_theirs:
            t_theirs, theirs, extrap, runs = res["theirs"]
            row.update(theirs_s=t_theirs, extrapolated=extrap, theirs_runs=runs)
            if theirs is not None:
                row["auroc_theirs"] = ood_metrics(theirs[:n_id], theirs[n_id:])["auroc"]
                row["spearman"] = spearman(ours, theirs)
        rows.append(row)
    return rows


# our arguments for the small CNN (its modules: blocks.0, blocks.1, blocks.2, fc)
MODEL_KWARGS = {
    "gram": {"group_by": "label"},  # pytorch-ood groups by label
    "rankfeat": {"layers": "blocks.2"},  # pytorch-ood's single backbone/head split at the last map
    "vra": {"layer": "blocks.2", "below": "clip"},  # pytorch-ood clips below the lower threshold
    "nac": {"layers": ["blocks.0", "blocks.1", "blocks.2"]},
}


def their_model_detector(name, model, C, seed, tr_loader):
    """(fit_fn, predict_fn(x batch) -> outlier scores, needs gradients) of pytorch-ood 0.4.0."""
    import pytorch_ood.detector as pd

    backbone = lambda x: model.feature_maps(x)[-1]  # noqa: E731
    head = lambda m: model.fc(m.mean(dim=(2, 3)))  # noqa: E731
    if name == "odin":
        d = pd.ODIN(model, eps=0.0014, temperature=1000.0)
        return (lambda: None), d.predict, True
    if name == "gram":
        d = pd.Gram(model.pool_fc, list(model.blocks), num_classes=C, num_poles_list=list(range(1, 6)))

        def fit():
            torch.manual_seed(seed)
            d.fit(tr_loader)

        return fit, d.predict, True
    if name == "mds_odin":  # our noise 0.0014, std None (no per-channel division)
        d = pd.MahalanobisODIN(model.features, eps=0.0014)
        return (lambda: d.fit(tr_loader)), d.predict, True
    if name == "rankfeat":
        d = pd.RankFeat(backbone=backbone, head=head)
        return (lambda: None), d.predict, False
    if name == "vra":
        d = pd.VRA(backbone=backbone, head=head, lower_percentile=0.01, upper_percentile=0.99)
        return (lambda: d.fit(tr_loader)), d.predict, False
    if name == "grad_uncertainty":
        # pytorch-ood 0.4.0's GradUncertainty leaves functorch-wrapped parameters on a model that registers
        # a module twice (SmallCNN's fc, also in pool_fc): from the 4th batch on torch fails with "wrapper ==
        # nullptr INTERNAL ASSERT". Each batch gets a fresh copy of the model (its cost is in their time).
        import copy

        return (lambda: None), (lambda x: pd.GradUncertainty(copy.deepcopy(model)).predict(x)), True
    if name == "nac":
        d = pd.NACUE(model, layers=list(model.blocks))
        return (lambda: d.fit(tr_loader)), d.predict, True
    raise KeyError(name)


def _timed_model(fit, predict, loader, budget, grad):
    """``_timed`` for a model detector: fit, then the first 1/10 of the batches; extrapolated
    linearly when projected over ``budget``. Returns (seconds, ID-higher scores or None, extrapolated)."""
    import logging
    import warnings

    logging.getLogger("pytorch_ood").setLevel(logging.ERROR)
    with torch.enable_grad() if grad else torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        fit()
        t_fit = time.perf_counter() - t0
        k = max(1, len(loader) // 10)
        t0 = time.perf_counter()
        for x, _ in loader[:k]:
            predict(x)
        t_small = time.perf_counter() - t0
        n, n_small = sum(len(x) for x, _ in loader), sum(len(x) for x, _ in loader[:k])
        projected = t_fit + t_small * n / n_small
        if projected > budget:
            return projected, None, True
        t0 = time.perf_counter()
        out = torch.cat([predict(x).detach().reshape(-1) for x, _ in loader])
        t_pred = time.perf_counter() - t0
    return t_fit + t_pred, -out.double().numpy(), False


def _secs(v) -> str:
    """Seconds for the printed lines; '-' for a figure not measured (e.g. no faiss)."""
    return "-" if v is None else f"{v:.3f}"


def _best(fn, n=3) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def time_floors(C, head, tr, va, te, K=50) -> dict:
    """What the arithmetic of MDS and KNN needs at this size, timed on the same tensors and threads
    (best of 3; one call for the faiss search), and our KNN with the faiss backend:
      mds_gemm_s          the float32 GEMMs of a Mahalanobis score done as one whitening: the train
                          features' D x D second moment (N_train x D x D), the test features whitened
                          (N_test x D x D) and their products with the C whitened class means
      knn_faiss_search_s  one faiss IndexFlatL2 search of the L2-normalised test features against the
                          normalised train bank, K neighbours (what KNN scoring cannot go below with
                          a flat index on the CPU)
      knn_faiss_backend_s our ``knn`` with backend="faiss": fit + score, like the table's rows
    Without faiss installed the two faiss entries are None."""
    D = tr.features.shape[1]
    X, T = tr.features.float().contiguous(), te.features.float().contiguous()
    g = torch.Generator().manual_seed(1)
    W, M = torch.randn(D, D, generator=g), torch.randn(C, D, generator=g)
    out = {"mds_gemm_s": _best(lambda: (X.T @ X, (T @ W) @ M.T)), "K": K}
    try:
        import faiss
    except ImportError:
        return {**out, "knn_faiss_search_s": None, "knn_faiss_backend_s": None}
    faiss.omp_set_num_threads(torch.get_num_threads())
    Xn = torch.nn.functional.normalize(X, dim=1).numpy()
    Tn = torch.nn.functional.normalize(T, dim=1).numpy()
    index = faiss.IndexFlatL2(D)
    index.add(Xn)
    out["knn_faiss_search_s"] = _best(lambda: index.search(Tn, K), n=1)
    out["knn_faiss_backend_s"] = interleaved_medians({"ours": ours_once("knn", head, tr, va, te, {"backend": "faiss", "K": K})[0]})["ours"][0]
    return out


def time_metrics(n: int, seed: int, peers: bool) -> dict:
    """AUROC / FPR@95 / AUPR of n scores (half ID, half OOD): ours (``oaml.metrics.ood_metrics``, one
    sort), pytorch-ood 0.4.0's ``OODMetrics`` (outlier scores = -ours, OOD labelled -1) and OpenOOD
    v1.5's ``auc_and_fpr_recall`` (openood/evaluators/metrics.py: sklearn roc_curve and two
    precision_recall_curve calls) re-expressed; the floor is one ``torch.sort`` of the n scores.
    Best of 3 each; the AUROCs are reported as a cross-check."""
    g = torch.Generator().manual_seed(seed)
    h = n // 2
    x = torch.cat([torch.randn(h, generator=g, dtype=torch.float64) + 1.0, torch.randn(n - h, generator=g, dtype=torch.float64)])
    xi, xo = x[:h].numpy(), x[h:].numpy()
    res = {"n": n, "sort_s": _best(lambda: torch.sort(x)), "ours_s": _best(lambda: ood_metrics(xi, xo)),
           "auroc_ours": ood_metrics(xi, xo)["auroc"]}
    if not peers:
        return res
    from pytorch_ood.metrics import OODMetrics
    from sklearn import metrics as skm

    labels = torch.cat([torch.zeros(h, dtype=torch.long), -torch.ones(n - h, dtype=torch.long)])

    def theirs():
        return OODMetrics().update(-x, labels).compute()

    conf, label = x.numpy(), labels.numpy()

    def openood():  # auc_and_fpr_recall(conf, label, 0.95)
        ood_indicator = np.zeros_like(label)
        ood_indicator[label == -1] = 1
        fpr_list, tpr_list, _ = skm.roc_curve(ood_indicator, -conf)
        fpr = fpr_list[np.argmax(tpr_list >= 0.95)]
        precision_in, recall_in, _ = skm.precision_recall_curve(1 - ood_indicator, conf)
        precision_out, recall_out, _ = skm.precision_recall_curve(ood_indicator, -conf)
        return skm.auc(fpr_list, tpr_list), skm.auc(recall_in, precision_in), skm.auc(recall_out, precision_out), fpr

    res.update(theirs_s=_best(theirs), auroc_theirs=float(theirs()["AUROC"]), openood_s=_best(openood), auroc_openood=float(openood()[0]))
    return res


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
    ap.add_argument("--scores", nargs="*", default=FEATURE_SCORES + EXTRA_FEATURE_SCORES,
                    help="feature scores (default: all of them)")
    ap.add_argument("--model-scores", nargs="*", default=MODEL_SCORES,
                    help="model scores on the small CNN (default: all; none with a bare --model-scores)")
    ap.add_argument("--no-theirs", action="store_true", help="time only oaml")
    ap.add_argument("--no-openood", action="store_true", help="skip the OpenOOD re-expressions")
    ap.add_argument("--openood-batch", type=int, default=200, help="OpenOOD postprocess batch size")
    ap.add_argument("--their-budget", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3,
                    help="every side of a row: after a warm-up run, the median of this many runs when one run takes under --repeat-under s")
    ap.add_argument("--repeat-under", type=float, default=2.0, help="seconds (see --repeats)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    ap.add_argument("--metrics-n", type=int, default=None,
                    help="scores in the metrics comparison (default 1,000,000; 100,000 with --small; 0: skip it)")
    args = ap.parse_args(argv)
    global REPEATS, REPEAT_UNDER
    REPEATS, REPEAT_UNDER = args.repeats, args.repeat_under
    if args.metrics_n is None:
        args.metrics_n = 100_000 if args.small else 1_000_000
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
    rows, floors = [], {}
    print_header()
    for C in args.classes:
        head, tr, va, te, n_id = make_data(C, args.dim, args.n_train, args.n_val, args.n_test, args.seed)
        layered = None
        for name in args.scores:
            if name == "mds_multi":  # the only score that reads FeatureSet.layers
                layered = layered or with_layers((tr, va, te), args.seed)
                sets = layered
            else:
                sets = (tr, va, te)
            kw = ours_kwargs(name, args.n_train)
            once, state = ours_once(name, head, *sets, kw)
            sides = {"ours": once}
            if not args.no_theirs and (f := theirs_once(name, C, head, *sets, args.their_budget, kw)) is not None:
                sides["theirs"] = f
            if not args.no_openood and (f := openood_once(name, C, head, *sets, args.their_budget, args.openood_batch, kw)):
                sides["openood"] = f
            res = interleaved_medians(sides)
            t_ours, ours, _, runs = res["ours"]
            info = {k: getattr(state["s"], k) for k in ("precision_", "backend_") if hasattr(state["s"], k)}
            info["ours_runs"] = runs
            row = {
                "score": name,
                "classes": C,
                "ours_s": t_ours,
                "auroc_ours": ood_metrics(ours[:n_id], ours[n_id:])["auroc"],
                **info,
            }
            if kw:
                row["ours_kwargs"] = kw
            # the peers' columns: seconds, extrapolated, ratio, runs, AUROC, Spearman to ours
            for side, keys in (("theirs", ("theirs_s", "extrapolated", "ratio", "theirs_runs", "auroc_theirs", "spearman")),
                               ("openood", ("openood_s", "openood_extrapolated", "openood_ratio", "openood_runs",
                                            "auroc_openood", "spearman_openood"))):
                if side in res:
                    t, out, extrap, runs = res[side]
                    row.update(zip(keys[:4], (t, extrap, t / t_ours, runs)))
                    if out is not None:
                        row.update(zip(keys[4:], (ood_metrics(out[:n_id], out[n_id:])["auroc"], spearman(ours, out))))
            rows.append(row)
            print_row(row)
        if "mds" in args.scores or "knn" in args.scores:
            floors[str(C)] = fl = time_floors(C, head, tr, va, te)
            print(f"floors C={C}: MDS GEMMs {_secs(fl['mds_gemm_s'])} s, one faiss flat search (K={fl['K']}) "
                  f"{_secs(fl['knn_faiss_search_s'])} s, our knn with backend=faiss {_secs(fl['knn_faiss_backend_s'])} s", flush=True)
    metrics = None
    if args.metrics_n:
        metrics = time_metrics(args.metrics_n, args.seed, not args.no_theirs)
        print(f"metrics of {args.metrics_n} scores: ours {_secs(metrics['ours_s'])} s, pytorch-ood {_secs(metrics.get('theirs_s'))} s, "
              f"OpenOOD {_secs(metrics.get('openood_s'))} s, torch.sort {_secs(metrics['sort_s'])} s", flush=True)
    for C in args.classes if args.model_scores else []:
        for row in run_model_scores(C, args.model_train, args.model_test, args.seed, args.their_budget,
                                    not args.no_theirs, args.model_scores):
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
        "model_test_ood": "second half of the model-test inputs: 0.8 x + 0.1 (x uniform, like the first half)",
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
        "repeats": args.repeats,
        "repeat_under_s": args.repeat_under,
        "timing": f"every side: when one run takes under {args.repeat_under} s, it is a warm-up and the median of "
                  f"{args.repeats} more runs is reported, the sides of a row taking turns; else the one run",
        "not_benchmarked": sorted(set(SCORES.primary_names()) - set(args.scores) - set(args.model_scores)),
        "git_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "floors": floors, "metrics": metrics}, indent=2))
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
        f"{'score':16s} {'C':>4s} {'ours s':>9s} {'pt-ood s':>10s} {'ratio':>7s} {'OpenOOD s':>10s} {'ratio':>7s} "
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
        f"{r['score']:16s} {r['classes']:4d} {r['ours_s']:9.3f} {th_s:>10s} {th_r:>7s} {oo_s:>10s} {oo_r:>7s} "
        f"{f('auroc_ours'):>10s} {f('auroc_theirs'):>8s} {f('auroc_openood'):>8s} "
        f"{f('spearman', 6):>10s} {f('spearman_openood', 6):>11s}",
        flush=True,
    )


if __name__ == "__main__":
    main()
