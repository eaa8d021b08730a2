"""UDG (unsupervised dual grouping) in the one training loop: known-answer tests of its pieces
(k-means, cluster weights, ID filtering, the OE and reweighted CE losses), the generic per-epoch
term hook, a short training run and mid-epoch resume."""

import math

import numpy as np
import pytest
import torch

from oaml.errors import ConfigError
from oaml.training.config import TrainConfig
from oaml.training.methods import METHODS, Method, MethodConfig, register_method, resolve_terms
from oaml.training.terms import TERMS, Term
from oaml.training.trainer import Trainer
from oaml.training.udg import (
    _split_empty,
    cluster_features,
    cluster_weights,
    kmeans,
    reweighted_ce,
    udg_filter,
    udg_oe_loss,
)

from helpers import Killed, TinyImages, crash_at_step


# --------------------------------------------------------------------------------------------
# pieces with known answers
# --------------------------------------------------------------------------------------------
def _blobs():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(15)
    return torch.eye(6)[:4][y] * 20 + 0.5 * torch.randn(60, 6, generator=g), y


def _same_partition(assign, y):
    return len(assign.unique()) == len(y.unique()) and all(len(assign[y == c].unique()) == 1 for c in y.unique())


def test_kmeans_recovers_well_separated_blobs_and_is_seeded():
    x, y = _blobs()
    for seed in range(5):  # PCA-whitened to 3-d (the blobs' span) and L2-normalised, as UDG does
        assign, fell_back = cluster_features(x, 4, 3, 20, torch.Generator().manual_seed(seed))
        assert not fell_back and assign.dtype == torch.long and _same_partition(assign, y), seed
    raw = kmeans(x, 4, 20, torch.Generator().manual_seed(0))
    assert _same_partition(raw, y)
    again = kmeans(x, 4, 20, torch.Generator().manual_seed(0))
    assert torch.equal(raw, again)
    with pytest.raises(ConfigError, match="at least 61 samples"):
        kmeans(x, 61, 20, torch.Generator())


def test_pca_fallback_on_rank_deficient_features():
    x, y = _blobs()
    x = torch.cat([x, torch.zeros(60, 2)], 1)  # two dead dimensions: zero eigenvalues
    assign, fell_back = cluster_features(x, 4, 8, 20, torch.Generator().manual_seed(0))
    assert fell_back and _same_partition(assign, y)  # raw features, as OpenOOD's fallback


def test_empty_cluster_is_split_from_a_populated_one():
    c = torch.tensor([[1.0, 2.0], [9.0, 9.0], [5.0, 5.0]])
    _split_empty(c, torch.tensor([5, 0, 1]), torch.Generator().manual_seed(0))
    e = 1 / 1024  # only cluster 0 has size - 1 > 0
    assert torch.allclose(c[1], torch.tensor([1 * (1 + e), 2 * (1 - e)]))
    assert torch.allclose(c[0], torch.tensor([1 * (1 - e), 2 * (1 + e)]))
    assert torch.equal(c[2], torch.tensor([5.0, 5.0]))


def test_cluster_weights_inverse_sqrt_size_mean_one():
    w = cluster_weights(torch.tensor([0, 1, 1, 1, 1]), 3)  # sizes 1, 4, 0
    assert torch.allclose(w, torch.tensor([4 / 3, 2 / 3, 0.0]))


def test_udg_filter_purity_pseudo_labels_and_ood_enhancement():
    # (cluster, label) members; -1 = unlabelled / OOD
    spec = {
        0: [2] * 9 + [-1],        # class 2 share 0.9 > 0.85: pure ID cluster -> pseudo 2
        1: [0] * 2 + [-1] * 8,    # OOD share 0.8: not > 0.85, > 0.5 and label -1 -> enhanced
        2: [1] * 5 + [-1] * 5,    # no share > 0.5 -> OOD, weight 1
        3: [-1] * 10,             # OOD share 1 > 0.85: first branch, majority -1 -> OOD, weight 1 (OpenOOD)
        4: [3] * 6 + [-1] * 4,    # class 3 share 0.6 > 0.5 but not -1 -> OOD, weight 1
    }
    assign = torch.tensor([c for c, labs in spec.items() for _ in labs])
    labels = torch.tensor([lab for labs in spec.values() for lab in labs])
    pseudo, conf = udg_filter(assign, labels, 6, 4, 0.85, 0.5, 2.0)  # cluster 5 is empty
    assert pseudo.tolist() == [2, -1, -1, -1, -1, -1]
    assert conf.tolist() == [1.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    # OpenOOD's defaults (0.8 / 0.8): the enhancement branch cannot fire
    pseudo, conf = udg_filter(assign, labels, 6, 4, 0.8, 0.8, 2.0)
    assert pseudo.tolist() == [2, -1, -1, -1, -1, -1] and conf.tolist() == [1.0] * 6


def test_uniform_target_oe_loss_and_reweighted_ce_values():
    z = torch.tensor([[0.0, 0.0, math.log(2.0)], [1.0, 1.0, 1.0]])
    # CE(uniform, softmax z) = logsumexp(z) - mean(z): log 4 - log(2)/3, and log 3 for equal logits
    first, second = math.log(4) - math.log(2) / 3, math.log(3)
    assert float(udg_oe_loss(z, torch.ones(2))) == pytest.approx((first + second) / 2, rel=1e-6)
    assert float(udg_oe_loss(z, torch.tensor([2.0, 0.0]))) == pytest.approx(first, rel=1e-6)
    assert float(udg_oe_loss(z[:0], torch.ones(0))) == 0.0
    ce = reweighted_ce(z, torch.tensor([2, 0]), torch.tensor([0.5, 1.5]))
    assert float(ce) == pytest.approx((0.5 * (math.log(4) - math.log(2)) + 1.5 * math.log(3)) / 2, rel=1e-6)


# --------------------------------------------------------------------------------------------
# the generic per-epoch hook of the Term API
# --------------------------------------------------------------------------------------------
CALLS = []


@TERMS.register("_test_epoch_hook")
class _EpochHookTerm(Term):
    def on_epoch_start(self, ctx):
        logits, feats, labels = ctx.extract("train")
        CALLS.append({"epoch": ctx.epoch, "draw": float(torch.rand((), generator=ctx.generator)),
                      "training": ctx.model.training, "shapes": (tuple(logits.shape), tuple(feats.shape)),
                      "labels": labels.clone()})
        return {"hook_epoch": float(ctx.epoch)}

    def forward(self, state):
        return state.logits.new_zeros(())


register_method(Method("_test_epoch_hook_method", {"ce": {}, "_test_epoch_hook": {}}, "test"))


def _cfg(name, epochs=2, method=None, **kw):
    return TrainConfig.from_dict({
        "data": {"batch_size": 16, "eval_batch_size": 32, "augment": {"flip": True, "crop_padding": 1}},
        "student": {"width": 0.125},
        "preprocess": {"channels": 1},
        "optim": {"lr": 0.05, "epochs": epochs},
        "method": {"name": name, **(method or {})},
        "tensorboard": False,
        "progress": False,
        **kw,
    })


def _aux():
    ds = TinyImages(48, seed=9)  # ID-like images with hidden labels, as SC-OOD's unlabelled set has some
    ds.labels = ds._labels = torch.full_like(ds._labels, -1)
    return ds


def test_on_epoch_start_runs_once_per_epoch_in_eval_mode_and_is_seeded(tmp_path, monkeypatch):
    CALLS.clear()
    train = TinyImages(64)
    tr = Trainer(_cfg("_test_epoch_hook_method", checkpoint_every_steps=3), train, TinyImages(32, seed=1),
                 tmp_path / "a", num_classes=4, in_channels=1)
    tr.fit()
    assert [c["epoch"] for c in CALLS] == [0, 1] and not any(c["training"] for c in CALLS)
    assert CALLS[0]["shapes"] == ((64, 4), (64, tr.model.feature_dim)) and torch.equal(CALLS[0]["labels"], train.labels)
    assert [r["hook_epoch"] for r in tr.history] == [0.0, 1.0]
    draws = [c["draw"] for c in CALLS]
    # a run resumed in the middle of epoch 2 does not rerun that epoch's hook, and logs it the same
    CALLS.clear()
    crashed = Trainer(_cfg("_test_epoch_hook_method", checkpoint_every_steps=3), TinyImages(64), TinyImages(32, seed=1),
                      tmp_path / "b", num_classes=4, in_channels=1)
    crash_at_step(crashed, 8, monkeypatch)
    with pytest.raises(Killed):
        crashed.fit()
    resumed = Trainer(_cfg("_test_epoch_hook_method", checkpoint_every_steps=3), TinyImages(64), TinyImages(32, seed=1),
                      tmp_path / "b", num_classes=4, in_channels=1)
    resumed.fit(resume=True)
    assert [c["epoch"] for c in CALLS] == [0, 1] and [c["draw"] for c in CALLS] == draws
    assert [r["hook_epoch"] for r in resumed.history] == [0.0, 1.0]


# --------------------------------------------------------------------------------------------
# UDG in the loop
# --------------------------------------------------------------------------------------------
SMALL = {"udg": {"num_clusters": 8, "pca_dim": 16}}


def _udg(tmp_path, name, epochs=3, **kw):
    cfg = _cfg("udg", epochs=epochs, method={"terms": SMALL}, **kw)
    return Trainer(cfg, TinyImages(64), TinyImages(32, seed=1), tmp_path / name, num_classes=4, in_channels=1,
                   aux_set=_aux())


def test_udg_registered_with_defaults_of_openood():
    m = METHODS.get("udg")
    assert m.paper and m.description and set(resolve_terms(MethodConfig(name="udg"))) == {"udg"}
    cfg = TERMS.get("udg").config_cls()
    assert (cfg.num_clusters, cfg.pca_dim, cfg.purity_ind_thresh, cfg.purity_ood_thresh, cfg.oe_enhance_ratio,
            cfg.lambda_oe, cfg.lambda_aux) == (1000, 256, 0.8, 0.8, 2.0, 0.5, 0.1)


def test_udg_trains_and_resumes_mid_epoch_to_identical_weights(tmp_path, monkeypatch):
    ref = _udg(tmp_path, "ref", checkpoint_every_steps=3)
    summary = ref.fit()
    hist = summary["history"]
    for row in hist:
        for key in ("udg", "udg_cls", "udg_oe", "udg_aux", "udg_pseudo_id", "udg_id_clusters", "udg_pool_id",
                    "udg_pool_enhanced", "udg_pca_fallback", "total"):
            assert key in row and np.isfinite(row[key]), (key, row)
    assert hist[-1]["udg_cls"] < hist[0]["udg_cls"]
    assert hist[-1]["udg_id_clusters"] > 0  # the ID-like pool images end up in pure ID clusters
    term = ref.terms["udg"]
    assert bool(term.ready) and int(term.aux_pseudo.max()) >= 0
    assert set(term.train_cluster.unique().tolist()) <= set(range(8))
    state = torch.load(tmp_path / "ref" / "last.pt", weights_only=False)
    assert {"udg.head.weight", "udg.aux_pseudo", "udg.train_cluster"} <= set(state["terms"])

    crashed = _udg(tmp_path, "run", checkpoint_every_steps=3)
    crash_at_step(crashed, 8, monkeypatch)  # epoch 2 of 3, after the checkpoint at step 6
    with pytest.raises(Killed):
        crashed.fit()
    resumed = _udg(tmp_path, "run", checkpoint_every_steps=3)
    resumed.fit(resume=True)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for k, v in ref.term_modules.state_dict().items():
        assert torch.equal(v, resumed.term_modules.state_dict()[k]), k
    assert [r["val_acc"] for r in ref.history] == [r["val_acc"] for r in resumed.history]
    assert [r["udg_cls"] for r in ref.history] == pytest.approx([r["udg_cls"] for r in resumed.history], rel=1e-6)


def test_udg_needs_the_pool_and_enough_samples(tmp_path):
    with pytest.raises(ConfigError, match="auxiliary outlier images"):
        Trainer(_cfg("udg"), TinyImages(64), TinyImages(32), tmp_path / "x", 4, 1)
    tr = Trainer(_cfg("udg", method={"terms": {"udg": {"num_clusters": 500}}}), TinyImages(64), TinyImages(32),
                 tmp_path / "y", 4, 1, aux_set=_aux())
    with pytest.raises(ConfigError, match="num_clusters=500"):
        tr.fit()
