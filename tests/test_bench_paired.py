"""`oaml bench` v2: paired per-seed differences to a reference run, OE-disjoint / OE-overlap groups,
and the teacher row, on a hand-written bench ``--out`` folder (no training)."""

from __future__ import annotations

import json
import math

import pytest

from oaml.bench import METRICS, Bench, BenchConfig, paired_difference
from oaml.errors import ConfigError

# fmnist: Textures* shares a source family with the OE pool; MNIST and Gaussian do not
SETS = {"MNIST": "near", "Textures*": "far", "Gaussian": "far"}
SCORES = ("ebo", "knn")
SEEDS = (0, 1, 2)
OFFSET = (0.0, 30.0, 5.0)  # per set: the groups' means differ (OE-disjoint 2.5, OE-overlap 30, all 11.67)
WEIGHT = (1.0, 3.0, 1.0)  # per set: logitnorm's paired AUROC gain is (seed + 1) x WEIGHT
# WEIGHT averaged over each group's sets: the paired AUROC difference there is (seed + 1) x this
GROUP_WEIGHT = {"near": 1.0, "far": 2.0, "all": 5 / 3, "oe_disjoint": 1.0, "oe_overlap": 3.0}
ACC = {"vanilla-cont": [90.0, 91.0, 92.0], "logitnorm": [90.5, 91.6, 92.7]}  # deltas 0.5, 0.6, 0.7


def _auroc(method: str, seed: int, i: int, score: str) -> float:
    """AUROC of OOD set i; logitnorm's is vanilla-cont's (same seed) + (seed + 1) x WEIGHT[i]."""
    return 60.0 + OFFSET[i] + (5 if score == "knn" else 0) + seed + ((seed + 1) * WEIGHT[i] if method == "logitnorm" else 0)


def _eval(acc: float, auroc) -> dict:
    """A minimal evaluation results.json: auroc(set index, score); fpr95 = 100 - auroc."""
    scores = {}
    for s in SCORES:
        ds = {}
        for i, (name, group) in enumerate(SETS.items()):
            a = auroc(i, s)
            ds[name] = {**{m: a for m in METRICS}, "fpr95": 100.0 - a, "group": group}
        mean = lambda names: {m: sum(ds[n][m] for n in names) / len(names) for m in METRICS}  # noqa: E731
        scores[s] = {"datasets": ds, "near": mean(["MNIST"]), "far": mean(["Textures*", "Gaussian"]), "all": mean(list(SETS))}
    return {"id_accuracy": acc, "scores": scores}


def _cfg(**kw) -> BenchConfig:
    return BenchConfig.from_dict({
        "pipeline": {"eval": {"scores": list(SCORES), "plots": False}, "progress": False},
        "seeds": list(SEEDS), "main_scores": list(SCORES),
        "methods": {"vanilla-cont": {"method": {"name": "vanilla"}}, "logitnorm": {"method": {"name": "logitnorm"}}}, **kw,
    })


@pytest.fixture
def fake_out(tmp_path):
    for method in ACC:
        for k, seed in enumerate(SEEDS):
            base = tmp_path / "runs" / f"seed{seed}"
            (base / "eval" / method).mkdir(parents=True)
            (base / "students" / method).mkdir(parents=True)
            res = _eval(ACC[method][k], lambda i, s: _auroc(method, seed, i, s))
            (base / "eval" / method / "results.json").write_text(json.dumps(res))
            (base / "students" / method / "summary.json").write_text(json.dumps({"seconds_per_epoch": 1.0, "epochs": 2}))
    return tmp_path


def test_paired_difference_known_interval():
    d = paired_difference([11.0, 12.0, 13.0, 14.0, 15.0], [10.0] * 5)  # diffs 1..5
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert half == pytest.approx(1.9632, abs=1e-4)
    assert d["mean"] == pytest.approx(3.0) and d["n"] == 5 and d["excludes_zero"] is True
    assert d["ci95"] == pytest.approx([3.0 - half, 3.0 + half], abs=1e-4)
    # the same spread around 0 does not exclude it; a negative shift does (from below)
    assert paired_difference([-2.0, -1.0, 0.0, 1.0, 2.0], [0.0] * 5)["excludes_zero"] is False
    neg = paired_difference([0.0] * 5, [11.0, 12.0, 13.0, 14.0, 15.0])
    assert neg["mean"] == pytest.approx(-13.0) and neg["ci95"][1] < 0 and neg["excludes_zero"] is True


def test_paired_difference_small_and_degenerate_cases():
    assert paired_difference([], []) == {"mean": None, "ci95": None, "n": 0, "excludes_zero": False}
    assert paired_difference([3.0], [1.0]) == {"mean": 2.0, "ci95": None, "n": 1, "excludes_zero": False}
    # zero variance: the interval is the point; it excludes 0 unless the point is 0
    const = paired_difference([2.0, 3.0, 4.0], [1.5, 2.5, 3.5])
    assert const["ci95"] == pytest.approx([0.5, 0.5]) and const["excludes_zero"] is True
    assert paired_difference([1.0, 2.0], [1.0, 2.0])["excludes_zero"] is False
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_delta_vs_must_name_a_run():
    with pytest.raises(ConfigError, match="delta_vs 'nope'"):
        _cfg(delta_vs="nope")
    assert _cfg(delta_vs="vanilla").delta_vs == "vanilla"  # always in the grid
    assert _cfg(delta_vs=None).delta_vs is None


def test_aggregate_paired_block_oe_groups_and_report(fake_out):
    res = Bench(_cfg(), fake_out).report()
    agg = res["results"]
    assert agg["oe_groups"]["oe_overlap"] == ["Textures*", "Photos*"]
    assert "MNIST" in agg["oe_groups"]["oe_disjoint"] and "Textures*" not in agg["oe_groups"]["oe_disjoint"]

    # group means per seed, then mean over seeds: OE-disjoint = MNIST (i=0) and Gaussian (i=2)
    ebo = agg["methods"]["vanilla-cont"]["scores"]["ebo"]
    disjoint = [(_auroc("vanilla-cont", s, 0, "ebo") + _auroc("vanilla-cont", s, 2, "ebo")) / 2 for s in SEEDS]  # 62.5 + s
    assert ebo["oe_disjoint"]["auroc"]["mean"] == pytest.approx(sum(disjoint) / 3)
    assert ebo["oe_disjoint"]["auroc"]["n"] == 3
    assert ebo["oe_overlap"]["auroc"]["mean"] == pytest.approx(sum(_auroc("vanilla-cont", s, 1, "ebo") for s in SEEDS) / 3)
    assert ebo["oe_overlap"]["fpr95"]["mean"] == pytest.approx(100 - ebo["oe_overlap"]["auroc"]["mean"])

    # paired: logitnorm - vanilla-cont per seed; AUROC deltas (1, 2, 3) x group weight (mean 2, sd 1 before it)
    paired = agg["paired"]
    assert paired["delta_vs"] == "vanilla-cont" and set(paired["methods"]) == {"logitnorm"}
    ln = paired["methods"]["logitnorm"]
    half = 4.302653 / math.sqrt(3)
    for group, w in GROUP_WEIGHT.items():
        d = ln["scores"]["knn"][group]["auroc"]
        assert d["mean"] == pytest.approx(2.0 * w) and d["n"] == 3, group
        assert d["ci95"] == pytest.approx([w * (2.0 - half), w * (2.0 + half)], abs=1e-4) and d["excludes_zero"] is False
        assert ln["scores"]["knn"][group]["fpr95"]["mean"] == pytest.approx(-2.0 * w)
    assert set(ln["scores"]["ebo"]["all"]) == {"auroc", "fpr95", "fpr95_id_pos", "aupr_in", "aupr_out"}
    acc = ln["id_accuracy"]
    assert acc["mean"] == pytest.approx(0.6) and acc["n"] == 3 and acc["excludes_zero"] is True
    assert acc["ci95"] == pytest.approx([0.6 - 0.1 * half, 0.6 + 0.1 * half], abs=1e-4)
    assert json.loads((fake_out / "results.json").read_text())["paired"] == json.loads(json.dumps(paired))

    # results.md: the first table is the paired one, bold only where the interval excludes 0
    md = (fake_out / "results.md").read_text()
    first_table = md[md.index("\n|"):].split("\n\n")[0]
    assert "ID acc Δ" in first_table and "(OE-disjoint)" in first_table and "(all sets)" in first_table
    assert "vanilla-cont |" not in first_table  # the reference has no row of its own
    row = next(line for line in first_table.splitlines() if line.startswith("| logitnorm"))
    assert f"**+0.60 [{0.6 - 0.1 * half:+.2f}, {0.6 + 0.1 * half:+.2f}]**" in row
    w = GROUP_WEIGHT["all"]
    assert f"| +2.00 [{2 - half:+.2f}, {2 + half:+.2f}] | -2.00 [" in row  # EBO OE-disjoint: AUROC, FPR@95
    assert f"| {2 * w:+.2f} [{w * (2 - half):+.2f}, {w * (2 + half):+.2f}] |" in row and "**+2.00" not in row
    assert md.index("## Paired differences") < md.index("## Summary: OE-disjoint sets (MNIST, sklearn-digits, Gaussian")
    assert "sharing a source family with the OE pool (Textures*, Photos*)" in md
    assert "teacher" not in agg and "teacher (ceiling" not in md


def test_teacher_row_and_missing_reference(fake_out):
    teacher = fake_out / "shared" / "eval" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "results.json").write_text(json.dumps(_eval(95.0, lambda i, s: 99.0 - OFFSET[i] / 10)))  # 99, 96, 98.5
    res = Bench(_cfg(), fake_out).report()
    t = res["results"]["teacher"]
    assert t["seeds"] == [0] and t["id_accuracy"] == {"mean": 95.0, "std": 0.0, "n": 1}
    assert t["scores"]["ebo"]["oe_disjoint"]["auroc"]["mean"] == pytest.approx(98.75)
    assert t["scores"]["ebo"]["oe_overlap"]["auroc"]["mean"] == pytest.approx(96.0)
    md = res["report"]
    summary = md[md.index("## Summary"):].split("\n\n")[2]
    assert "| teacher (ceiling, n=1) | 1 | - | - | 95.00 | 1.25 | 98.75 |" in summary
    assert "teacher" not in md[md.index("## Paired"):md.index("## Summary")]

    # a reference without finished runs gives n=0 entries, no paired table; delta_vs None: no block
    res = Bench(_cfg(delta_vs="vanilla"), fake_out).report()["results"]
    assert res["paired"]["methods"]["logitnorm"]["id_accuracy"]["n"] == 0
    assert "## Paired" not in (fake_out / "results.md").read_text()
    assert "paired" not in Bench(_cfg(delta_vs=None), fake_out).aggregate()


def test_ood_val_groups_and_paired_selection_table(tmp_path):
    """OOD-val sets split like the test sets (Textures*-val shares the OE pool's family), and the
    paired OOD-val differences a method is chosen on: all sets and OE-disjoint sets."""
    val_sets = {"MNIST-val": 0.0, "Blobs-val": 4.0, "Textures*-val": 10.0}  # logitnorm's gain per set x (seed + 1)
    for method in ACC:
        for k, seed in enumerate(SEEDS):
            base = tmp_path / "runs" / f"seed{seed}"
            (base / "eval" / method).mkdir(parents=True)
            (base / "students" / method).mkdir(parents=True)
            res = _eval(ACC[method][k], lambda i, s: _auroc(method, seed, i, s))
            vs = {}
            for s in SCORES:
                ds = {n: {**{m: 70.0 + seed + ((seed + 1) * g if method == "logitnorm" else 0) for m in METRICS}, "group": "val"}
                      for n, g in val_sets.items()}
                vs[s] = {"datasets": ds, "all": {m: sum(d[m] for d in ds.values()) / 3 for m in METRICS}}
            res["ood_val"] = {"scores": vs}
            (base / "eval" / method / "results.json").write_text(json.dumps(res))
            (base / "students" / method / "summary.json").write_text(json.dumps({"seconds_per_epoch": 1.0, "epochs": 2}))
    agg = Bench(_cfg(), tmp_path).report()["results"]
    v = agg["paired"]["methods"]["logitnorm"]["ood_val"]["ebo"]
    assert v["all"]["auroc"]["mean"] == pytest.approx(2.0 * 14 / 3) and v["all"]["auroc"]["n"] == 3
    assert v["oe_disjoint"]["auroc"]["mean"] == pytest.approx(2.0 * 2.0)  # MNIST-val and Blobs-val only
    assert agg["methods"]["vanilla-cont"]["ood_val_oe_disjoint"]["ebo"]["auroc"]["mean"] == pytest.approx(71.0)
    md = (tmp_path / "results.md").read_text()
    table = md[md.index("### Paired differences to `vanilla-cont` on OOD-val"):]
    assert "(OE-disjoint OOD-val sets)" in table
    assert "| logitnorm | 3 | " in table and "+9.33 [" in table and "+4.00 [" in table


def test_every_score_table_marks_each_methods_best_score(fake_out):
    Bench(_cfg(main_scores=["ebo"]), fake_out).report()
    md = (fake_out / "results.md").read_text()
    table = md[md.index("## Every score"):].split("\n\n")[2]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"EBO", "KNN"}
    # knn's AUROC is ebo's + 5 for every method and seed: KNN is each method's best score
    assert rows["KNN"].count("**") == 2 * 2 and "**" not in rows["EBO"]


def test_contrasts_between_two_runs(fake_out):
    """contrasts: [a, b] gives the paired a - b statistics; here logitnorm - vanilla-cont must equal
    the delta_vs block, and the reversed contrast its negation (known inputs, known interval)."""
    with pytest.raises(ConfigError, match=r"contrasts entry \[logitnorm, nope\]"):
        _cfg(contrasts=[["logitnorm", "nope"]])
    with pytest.raises(ConfigError, match="compares a run with itself"):
        _cfg(contrasts=[["logitnorm", "logitnorm"]])
    res = Bench(_cfg(contrasts=[["logitnorm", "vanilla-cont"], ["vanilla-cont", "logitnorm"]]), fake_out).report()
    agg = res["results"]
    fwd, back = agg["contrasts"]
    assert (fwd["a"], fwd["b"]) == ("logitnorm", "vanilla-cont")
    assert fwd["scores"] == agg["paired"]["methods"]["logitnorm"]["scores"]
    half = 4.302653 / math.sqrt(3)
    d = back["scores"]["knn"]["all"]["auroc"]
    w = GROUP_WEIGHT["all"]
    assert d["mean"] == pytest.approx(-2.0 * w) and d["ci95"] == pytest.approx([-w * (2.0 + half), -w * (2.0 - half)], abs=1e-4)
    assert back["id_accuracy"]["mean"] == pytest.approx(-0.6) and back["id_accuracy"]["excludes_zero"] is True
    md = res["report"]
    table = md[md.index("## Contrasts: paired differences a − b"):].split("\n\n")[1]
    assert "| logitnorm − vanilla-cont | 3 | **+0.60 [" in table and "| vanilla-cont − logitnorm | 3 | **-0.60 [" in table
    assert md.index("## Paired differences") < md.index("## Contrasts") < md.index("## Summary")
    assert "contrasts" not in Bench(_cfg(), fake_out).aggregate()


def test_teacher_margin_over_the_converged_vanilla(fake_out):
    """The teacher's checkpoint val accuracy minus the vanilla students' last-epoch val accuracy (mean over seeds)."""
    from oaml.bench import _teacher_margin

    curve = [{"epoch": 1, "mean": 80.0, "std": 1.0, "n": 3}, {"epoch": 2, "mean": 90.25, "std": 0.5, "n": 3}]
    m = _teacher_margin(92.5, curve)
    assert m["margin"] == pytest.approx(2.25) and m["vanilla_epoch"] == 2 and m["vanilla_val_accuracy"]["n"] == 3
    assert _teacher_margin(None, curve) is None and _teacher_margin(92.5, []) is None

    for k, seed in enumerate(SEEDS):  # vanilla students with a validation history: last epochs 89, 90, 91
        d = fake_out / "runs" / f"seed{seed}" / "students" / "vanilla"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"epochs": 2, "history": [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.89 + 0.01 * k}]}))
        (fake_out / "runs" / f"seed{seed}" / "eval" / "vanilla").mkdir(parents=True)
        (fake_out / "runs" / f"seed{seed}" / "eval" / "vanilla" / "results.json").write_text(json.dumps(_eval(90.0, lambda i, s: 70.0)))
    teacher = fake_out / "shared" / "eval" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "results.json").write_text(json.dumps({**_eval(95.0, lambda i, s: 99.0), "checkpoint_meta": {"val_accuracy": 92.5}}))
    res = Bench(_cfg(), fake_out).report()
    tm = res["results"]["teacher_margin"]
    assert tm["vanilla_val_accuracy"]["mean"] == pytest.approx(90.0) and tm["margin"] == pytest.approx(2.5)
    assert "the teacher is +2.50 points above it" in res["report"]
