"""The README's performance section is rendered from the committed benchmark JSONs
(benchmarks/readme_tables.py): it may not drift from them, and it states each goal's outcome."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["paired", "perf"])
def test_readme_blocks_equal_the_rendered_json(name):
    pt = _readme_tables()
    readme = (ROOT / "README.md").read_text()
    assert pt.block_of(readme, name) == pt.BLOCKS[name](), "run: .venv/bin/python benchmarks/readme_tables.py --write"


def test_rendered_rows_follow_the_json(tmp_path, monkeypatch):
    """A known scores.json gives the known ratios and goal outcomes."""
    pt = _readme_tables()
    rows = [
        {"score": "mds", "classes": 10, "ours_s": 0.2, "theirs_s": 1.0, "openood_s": 2.0},
        {"score": "vim", "classes": 10, "ours_s": 0.5, "theirs_s": 0.4, "openood_s": 0.8},
        {"score": "knn", "classes": 10, "ours_s": 9.0, "backend_": "torch", "theirs_s": 12.0, "openood_s": 8.0},
    ]
    d = {"meta": {"n_train": 100, "n_val": 10, "n_test": 20, "dim": 8, "date": "today"}, "rows": rows,
         "floors": {"10": {"mds_gemm_s": 0.1, "knn_faiss_search_s": 8.0, "knn_faiss_backend_s": 7.9, "K": 50}},
         "metrics": {"n": 1000, "ours_s": 0.1, "theirs_s": 0.2, "openood_s": 0.5, "sort_s": 0.05}}
    lines = "\n".join(pt.scores_section(d))
    assert "| mds | 10 | 0.200 | 1.000 (5.00x) | 2.000 (10.00x) | 0.100 (2.00x) | <= 0.3 s | yes |" in lines
    assert "| vim | 10 | 0.500 | 0.400 (0.80x) | 0.800 (1.60x) | - (-) | <= fastest peer | no |" in lines
    assert "| knn (torch backend) | 10 | 9.000 |" in lines and "<= 1.1x one faiss search | no |" in lines  # 9.0 > 8.8
    assert "| knn (faiss backend) | 10 | 7.900 | - | 8.000 (1.01x) | 8.000 (0.99x) | <= OpenOOD | yes |" in lines
    assert "| 0.050 (torch.sort; 2.00x) | <= fastest peer | yes |" in lines
    assert "in 1 of the 3 rows that have a peer" in lines  # mds only; vim and knn are slower than a peer
    assert "vim C=10 0.500 s vs 0.400 s" in lines and "knn C=10 9.000 s vs 8.000 s" in lines
    # a missing JSON is said, not skipped silently
    monkeypatch.setattr(pt, "RESULTS", tmp_path)
    (tmp_path / "scores.json").write_text(json.dumps(d))
    text = pt.render_perf()
    assert "Not measured yet: knn_sampling.json, train_step.json, train_step_speed.json, amp_quality.json, eval_profile.json." in text
