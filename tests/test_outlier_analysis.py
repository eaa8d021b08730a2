import json

import numpy as np
import pytest

from oaml.outliers.analysis import analyze_outliers, gaussian_kl, knn_distances, mmd2_rbf
from oaml.outliers.bank import write_bank


def _sets(seed=0, d=16):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(5, d))
    lab = rng.integers(0, 5, 1200)
    idf = centers[lab] + 0.3 * rng.normal(size=(1200, d))
    near = centers[rng.integers(0, 5, 400)] + 0.6 * rng.normal(size=(400, d))  # wider around the same modes
    far = rng.normal(size=(400, d)) * 1.5  # unrelated directions
    return idf, lab, near, far


def test_gaussian_kl_closed_form_and_mmd():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) + np.array([1.0, 0, 0])
    kl_ab, kl_ba = gaussian_kl(a, b)
    assert kl_ab == pytest.approx(0.5, abs=0.05) and kl_ba == pytest.approx(0.5, abs=0.05)  # ||dm||^2 / 2
    same, _ = gaussian_kl(a[:2000], a[2000:])
    assert abs(same) < 0.01
    m_same, h = mmd2_rbf(a[:500], a[500:1000])
    m_diff, _ = mmd2_rbf(a[:500], b[:500])
    assert abs(m_same) < 0.01 < m_diff and h > 0


def test_knn_distances_exact():
    ref = np.array([[0.0, 0], [1, 0], [3, 0]])
    q = np.array([[0.0, 0], [2, 0]])
    np.testing.assert_allclose(knn_distances(q, ref, 1), [0, 1])
    np.testing.assert_allclose(knn_distances(q, ref, 2), [1, 1])
    np.testing.assert_allclose(knn_distances(q, ref, 9), [3, 2])  # clamped to len(ref)


def test_analysis_orders_sets_and_writes_report(tmp_path):
    idf, lab, near, far = _sets()
    idb = write_bank(tmp_path / "id", idf, lab, kind="id_features")
    res = analyze_outliers(idb, {"near": near, "far": far, "latents": np.zeros((10, 64))}, k=10, seed=0,
                           out_dir=tmp_path / "out")
    s = res["sets"]
    assert list(s) == ["id_heldout", "near", "far"] and "latents" in res["skipped"]
    for key in ("kl_gauss", "mmd2", "probe_auroc", "frac_beyond_id_q95"):
        assert s["id_heldout"][key] < s["near"][key] < s["far"][key], key
    assert s["id_heldout"]["knn"]["q50"] < s["near"]["knn"]["q50"] < s["far"]["knn"]["q50"]
    assert s["id_heldout"]["probe_auroc"] < 0.65 and s["far"]["probe_auroc"] > 0.8
    assert abs(s["id_heldout"]["frac_beyond_id_q95"] - 0.05) < 0.02
    for f in ("analysis.json", "analysis.md", "knn_distances.png", "pca.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "analysis.json").read_text())["sets"]["far"] == s["far"]
    md = (tmp_path / "out" / "analysis.md").read_text()
    assert "| far |" in md and "Skipped `latents`" in md
    again = analyze_outliers(idb, {"near": near, "far": far}, k=10, seed=0)
    assert again["sets"] == {k: v for k, v in s.items()}
