"""Outliers that reach the student: candidate images, the teacher's boundary test, the
teacher-selected image-outlier set, and the image_outliers / feature_outliers terms."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oaml.errors import ConfigError
from oaml.losses.distill import logit_kd
from oaml.losses.outlier import oe_loss
from oaml.outliers.bank import Bank, write_bank
from oaml.outliers.images import (
    ImageOutlierConfig,
    ImageOutlierSet,
    boundary_ratio,
    build_image_outliers,
    class_boundaries,
    make_candidates,
)
from oaml.outliers.knn import ClassBoundary, KNNSamplerConfig
from oaml.training.config import TrainConfig
from oaml.training.methods import MethodConfig, resolve_terms
from oaml.training.trainer import Trainer

from helpers import FakeTeacher, TinyImages


def _id_bank(tmp_path, data):
    path = tmp_path / "id_bank"
    if not path.exists():
        logits, feats = FakeTeacher().outputs(data.images)
        write_bank(path, feats.numpy(), data.labels.numpy(), kind="id_features", meta={"teacher": {"name": "fake"}})
    return Bank.open(path)


# ---------------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------------
def test_jigsaw_permutes_tiles_and_blur_smooths():
    data = TinyImages(16)
    g = torch.Generator().manual_seed(0)
    cfg = ImageOutlierConfig(grid=4)
    jig = make_candidates(data.images, data.labels, "jigsaw", cfg, g)
    assert jig.dtype == torch.uint8 and jig.shape == data.images.shape
    tiles = lambda x: x.reshape(16, 1, 4, 3, 4, 3).permute(0, 2, 4, 1, 3, 5).reshape(16, 16, -1)  # noqa: E731
    a, b = tiles(data.images), tiles(jig)
    for i in range(16):  # same multiset of tiles, in another order for most images
        assert sorted(map(tuple, a[i].tolist())) == sorted(map(tuple, b[i].tolist()))
    assert (jig != data.images).flatten(1).any(1).float().mean() > 0.8
    blur = make_candidates(data.images, data.labels, "blur", ImageOutlierConfig(blur=0.5), g)
    assert blur.float().std() < data.images.float().std()


def test_cutmix_pastes_one_square_from_another_class():
    data = TinyImages(32)
    g = torch.Generator().manual_seed(1)
    out = make_candidates(data.images, data.labels, "cutmix", ImageOutlierConfig(patch=0.5), g)
    changed = out != data.images
    for i in range(32):
        rows = changed[i, 0].any(1).nonzero().flatten()
        cols = changed[i, 0].any(0).nonzero().flatten()
        if rows.numel():  # everything changed lies inside one 6 x 6 square
            assert rows.max() - rows.min() < 6 and cols.max() - cols.min() < 6
    assert changed.flatten(1).any(1).float().mean() > 0.5


# ---------------------------------------------------------------------------------------------
# the boundary test (the sampler's criterion)
# ---------------------------------------------------------------------------------------------
def test_class_boundary_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    Z = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    Q = torch.randn(7, 6, generator=g)
    b = ClassBoundary(Z, KNNSamplerConfig(K=5, S=3, N=1, m=1))
    d = torch.cdist(Z.double(), Z.double())
    d.fill_diagonal_(float("inf"))
    own = d.kthvalue(5, dim=1).values
    assert b.radius == pytest.approx(float(own.topk(3).values[-1]), abs=1e-5)
    dq = torch.cdist(F.normalize(Q, dim=1).double(), Z.double()).kthvalue(5, dim=1).values
    assert torch.allclose(b.kth_distance(Q).double(), dq, atol=1e-5)


def test_outlier_set_keeps_only_candidates_beyond_every_boundary(tmp_path):
    data = TinyImages(64)
    bank = _id_bank(tmp_path, data)
    cfg = ImageOutlierConfig(candidates=60, K=5, S=3, kinds=["jigsaw", "blur", "noise"], threshold=1.0)
    out = build_image_outliers(FakeTeacher(), data, bank, tmp_path / "img", cfg, progress=False)
    s = ImageOutlierSet(out)
    assert len(s) == s.manifest["count"] == sum(s.manifest["kept"].values())
    assert 0 < len(s) < 60 and bool((s.ratio > 1.0).all())
    # the stored ratio is the criterion recomputed from the teacher's features of the stored images
    logits, feats = FakeTeacher().outputs(s.images)
    assert torch.allclose(boundary_ratio(feats, class_boundaries(bank, cfg)), s.ratio, atol=1e-5)
    assert torch.allclose(s.teacher_logits, logits)
    everything = build_image_outliers(FakeTeacher(), data, bank, tmp_path / "all", cfg.model_copy(update={"select": False}),
                                      progress=False)
    assert len(ImageOutlierSet(everything)) == 60
    with pytest.raises(ConfigError, match="no candidate image passed"):
        build_image_outliers(FakeTeacher(), data, bank, tmp_path / "none", cfg.model_copy(update={"threshold": 1e6}), progress=False)


# ---------------------------------------------------------------------------------------------
# the terms in the one loop
# ---------------------------------------------------------------------------------------------
def _cfg(method, epochs=1, **terms):
    return TrainConfig.from_dict({
        "data": {"batch_size": 16, "eval_batch_size": 32, "augment": {"flip": False, "crop_padding": 0}},
        "student": {"width": 0.125},
        "preprocess": {"channels": 1},
        "optim": {"lr": 0.02, "epochs": epochs},
        "method": {"name": method, "terms": terms},
        "tensorboard": False,
        "progress": False,
    })


def _trainer(tmp_path, cfg, name):
    data = TinyImages(64)
    bank = _id_bank(tmp_path, data)
    img = tmp_path / "img"
    if not img.exists():
        build_image_outliers(FakeTeacher(), data, bank, img, ImageOutlierConfig(candidates=60, K=5, S=3, threshold=0.5),
                             progress=False)
    rng = np.random.default_rng(0)
    if not (tmp_path / "cood").exists():
        write_bank(tmp_path / "cood", rng.normal(size=(40, 8)), np.repeat(np.arange(4), 10), kind="cood")
    banks = {"image_outliers": ImageOutlierSet(img), "cood": Bank.open(tmp_path / "cood")}
    return Trainer(cfg, data, TinyImages(32, seed=1), tmp_path / name, num_classes=4, in_channels=1,
                   teacher=FakeTeacher(), teacher_feature_dim=8, banks=banks)


def test_oaml_is_kd_plus_image_outliers_with_outlier_exposure():
    terms = resolve_terms(MethodConfig(name="oaml"))
    assert set(terms) == {"ce", "kd_logit", "image_outliers"}
    assert terms["image_outliers"]["kd"] == 0.0  # chosen on OOD-val: OE on the image outliers, no KD on them


def test_image_outliers_go_through_the_one_forward_pass_with_the_teachers_logits(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, _cfg("oaml", image_outliers={"ratio": 0.5, "kd": 2.0, "oe": 0.5}), "a")
    term = tr.terms["image_outliers"]
    sizes, seen = [], {}
    orig_fwd = tr.net.forward
    monkeypatch.setattr(tr.net, "forward", lambda x: (sizes.append(x.shape[0]), orig_fwd(x))[1])
    orig = term.forward

    def spy(s):
        value = orig(s)
        e = s.extras["image_outliers"]
        z, t = e["logits"], term.set.teacher_logits[e["info"]]
        seen["expected"] = 2.0 * logit_kd(z, t, tau=1.0) + 0.5 * oe_loss(z)
        seen["value"] = value
        return value

    monkeypatch.setattr(term, "forward", spy)
    tr._step(*tr.train.get(list(range(16))), torch.arange(16), torch.Generator().manual_seed(0))
    assert sizes == [16 + 8]  # ID batch + ratio * batch outliers, one pass
    assert torch.allclose(seen["value"], seen["expected"])


def test_image_outliers_train_and_validate_kinds(tmp_path):
    tr = _trainer(tmp_path, _cfg("oaml", epochs=1), "b")
    row = tr.fit()["history"][-1]
    assert np.isfinite(row["image_outliers"]) and np.isfinite(row["kd_logit"])
    with pytest.raises(ConfigError, match="not in the outlier set"):
        _trainer(tmp_path, _cfg("oaml", image_outliers={"kinds": ["noise"]}), "c")
    with pytest.raises(ConfigError, match="at least one of kd, oe, energy"):
        _trainer(tmp_path, _cfg("oaml", image_outliers={"kd": 0, "oe": 0}), "d")


def test_feature_outliers_fit_the_map_on_their_own_and_train_the_head(tmp_path):
    cfg = _cfg("oaml-kd", kd_feat={"weight": 0}, feature_outliers={"oe": 1.0, "map_lr": 0.01})
    tr = _trainer(tmp_path, cfg, "f")
    term = tr.terms["feature_outliers"]
    sgd = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in sgd for p in term.map.parameters())  # R has its own optimiser
    raw, labels = tr.train.get(list(range(16)))
    x = tr.preprocess(raw)

    def mse():
        with torch.no_grad():
            tr.model.eval()
            _, f = tr.net(x)
            return float(F.mse_loss(term.map(F.normalize(FakeTeacher().outputs(raw)[1], dim=1)), f))

    before = mse()
    head = tr.model.fc
    for i in range(30):
        tr._step(raw, labels, torch.arange(16), torch.Generator().manual_seed(i))
    assert mse() < before
    assert all(p.grad is not None for p in head.parameters())


def test_teacher_outputs_are_cached_by_teacher_and_image_content(tmp_path, monkeypatch):
    from oaml.training import build

    class Counting(FakeTeacher):
        calls = 0
        num_classes = 4

        def outputs(self, raw):
            Counting.calls += 1
            return super().outputs(raw)

        def eval(self):
            return self

    data = TinyImages(40)
    first = build.cached_teacher_outputs(Counting(), data, str(tmp_path), 16)
    n = Counting.calls
    again = build.cached_teacher_outputs(Counting(), data, str(tmp_path), 16)
    assert Counting.calls == n and all(torch.equal(a, b) for a, b in zip(first, again))  # read, not recomputed
    assert torch.allclose(first[1], Counting().outputs(data.images)[1])
    other = TinyImages(40, seed=3)  # same count and name, other images: never the old outputs
    fresh = build.cached_teacher_outputs(Counting(), other, str(tmp_path), 16)
    assert torch.allclose(fresh[1], FakeTeacher().outputs(other.images)[1])


def test_contrastive_is_infonce_with_outliers_and_other_classes_as_negatives(tmp_path):
    from oaml.training.state import StepState

    tr = _trainer(tmp_path, _cfg("oaml-kd", kd_feat={"weight": 0}, contrastive={"per_step": 6, "tau": 0.2}), "crd")
    term = tr.terms["contrastive"]
    sgd = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in sgd for p in term.proj.parameters())  # P trains with the student
    g = torch.Generator().manual_seed(0)
    f, t = torch.randn(6, tr.model.feature_dim, generator=g), torch.randn(6, 8, generator=g)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    s = StepState(images=None, labels=labels, logits=None, features=f, generator=torch.Generator().manual_seed(1),
                  epoch=0, step=0, teacher_features=t)
    value = term(s)
    # re-expressed: the same draw of outlier negatives, then -log softmax of the positive
    idx = torch.randint(0, term.outliers.shape[0], (6,), generator=torch.Generator().manual_seed(1))
    q, tn, o = F.normalize(term.proj(f), dim=1), F.normalize(t, dim=1), term.outliers[idx]
    expected = 0.0
    for i in range(6):
        negs = [q[i] @ o[j] for j in range(6)] + [q[i] @ tn[j] for j in range(6) if labels[j] != labels[i]]
        logits = torch.stack([q[i] @ tn[i]] + negs) / 0.2
        expected = expected - torch.log_softmax(logits, 0)[0] / 6
    assert torch.allclose(value, expected, atol=1e-5)
    row = tr.fit()["history"][-1]
    assert np.isfinite(row["contrastive"])
    with pytest.raises(ConfigError, match="needs negatives"):
        _trainer(tmp_path, _cfg("oaml-kd", contrastive={"per_step": 0, "other_classes": False}), "crd2")


def test_terms_require_the_banks_their_settings_name():
    from oaml.training.build import method_requirements

    assert method_requirements(MethodConfig(name="oaml", terms={"contrastive": {}})) >= {"teacher", "cood", "image_outliers"}
    assert "dood" in method_requirements(MethodConfig(name="oaml-kd", terms={"contrastive": {"banks": ["cood", "dood"]}}))
    assert "cood" not in method_requirements(MethodConfig(name="oaml-kd", terms={"contrastive": {"per_step": 0}}))
    assert "dood" in method_requirements(MethodConfig(name="oaml-kd", terms={"feature_outliers": {"banks": ["dood"]}}))
