"""What a user sees and waits for: plots, help texts, start-up time of the CLI, progress output, and
the package's layering (bench and scores read nothing from the layers above them)."""

import argparse
import ast
import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from oaml.cli.common import SCORE_HELP, scores_help
from oaml.cli.main import iter_parsers
from oaml.utils import progress

ROOT = Path(__file__).resolve().parents[1]


# -- plots ---------------------------------------------------------------------------------------

def _fake_results(n_scores: int, n_sets: int = 8, seed: int = 0):
    from oaml.metrics import ood_metrics

    rng = np.random.default_rng(seed)
    raw, res = {}, {"scores": {}}
    for i in range(n_scores):
        d = {"id_test": rng.normal(2, 1, 2000)}
        d["id_test"][:60] = 1e6  # 3% extreme tail: must neither stretch the axis nor pile up at its edge
        for j in range(n_sets):
            d[f"set{j}"] = rng.normal(1 - j * 0.3, 1.2, 500)
        raw[f"s{i}"] = d
        sets = {k: {"group": "near" if j < 2 else "far", "auroc": 100 * ood_metrics(d["id_test"], d[k])["auroc"]}
                for j, k in enumerate(k for k in d if k != "id_test")}
        res["scores"][f"s{i}"] = {"datasets": sets, "all": {"auroc": float(np.mean([v["auroc"] for v in sets.values()]))}}
    return raw, res


@pytest.mark.parametrize("n_scores", [1, 5, 12])
def test_histograms_are_one_readable_grid_with_a_panel_per_score(n_scores):
    from oaml.evaluation.report import score_histograms

    raw, res = _fake_results(n_scores)
    fig = score_histograms(raw, res)
    w, h = fig.get_size_inches() * 100  # the dpi _save writes with
    assert len(fig.axes) == n_scores
    assert 500 <= w <= 1600 and 300 <= h <= 1200 and 0.8 <= w / h <= 3.0, (w, h)  # not a 2304x252 strip
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        assert hi < 100, "an extreme tail stretched the axis"
        assert "AUROC" in ax.get_title(loc="left") and "off range" in ax.get_title(loc="right")
    assert any(ax.get_xlabel() for ax in fig.axes) and any(ax.get_ylabel() for ax in fig.axes)
    assert "not drawn" in fig._suptitle.get_text()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()][:2] == ["ID test", "set0 (near)"]


def test_hist_range_drops_tails_instead_of_clipping_them():
    from oaml.evaluation.report import hist_range

    a = np.r_[np.random.default_rng(0).normal(0, 1, 1000), np.full(40, 1e6)]
    lo, hi = hist_range([a, np.linspace(-2, 1, 100)])
    assert -4 < lo < -1.5 and 1.5 < hi < 10
    assert hist_range([np.ones(10)])[1] > 1  # a constant score still gets a range


def test_roc_legend_gives_every_auroc_and_plot_files_are_written(tmp_path):
    from PIL import Image

    from oaml.evaluation.report import plot_scores, roc_figure

    raw, res = _fake_results(2, n_sets=3)
    fig = roc_figure("s0", raw["s0"], res)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(texts) == 3 and all(re.fullmatch(r"set\d \(AUROC \d+\.\d\)", t) for t in texts), texts
    paths = plot_scores(tmp_path, raw, res)
    assert set(paths) == {"histograms", "roc_s0", "roc_s1"}
    w, h = Image.open(paths["histograms"]).size
    assert w / h < 3.5, (w, h)


# -- the CLI starts fast: no torch while building the parser or printing help --------------------

def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from oaml.cli.main import build_parser, main\n"
        "build_parser()\n"
        "cmds = [[], ['data', 'show'], ['teacher', 'finetune'], ['bank', 'features'], ['sample'], ['generate'],\n"
        "        ['analyze-outliers'], ['train'], ['eval'], ['run'], ['demo'], ['bench']]\n"
        "for cmd in cmds:\n"
        "    try:\n"
        "        main(cmd + ['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'matplotlib', 'oaml.training', 'oaml.scores') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


# -- help texts ----------------------------------------------------------------------------------

RAW = re.compile(r"``|:(func|class|mod|meth):|#|noqa|TODO|pragma")


@pytest.mark.parametrize("path", [p for p, _ in iter_parsers()], ids=" ".join)
def test_every_option_is_described_in_plain_text(path):
    parser = dict(iter_parsers())[path]
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        assert a.help and not RAW.search(a.help), (path, a.option_strings or a.dest, a.help)
    for text in (parser.description, parser.epilog):
        assert not text or not RAW.search(text), (path, text)


def test_the_score_list_for_help_is_the_registry():
    from oaml.scores import SCORES

    assert set(SCORE_HELP) == {SCORES.get(n).name for n in SCORES.names()} == set(SCORES.primary_names())
    assert all(name in scores_help() for name in SCORE_HELP)
    fit = {"train": "fits on ID train", "val": "fits on ID val", "none": "no fit"}
    assert all(fit[SCORES.get(n).fit_on] in text for n, text in SCORE_HELP.items())  # the help names each fit split


def test_scores_all_and_default_and_the_aps_grids():
    from oaml.evaluation.evaluator import DEFAULT_SCORES, default_grids, resolve_scores
    from oaml.scores import SCORES

    assert resolve_scores(None) == resolve_scores("default") == list(DEFAULT_SCORES)
    every = resolve_scores(["all"])
    assert sorted(every) == SCORES.primary_names() and len(every) == len(set(every)) and "energy" not in every  # no aliases
    assert resolve_scores(["knn", "all"])[0] == "knn" and len(resolve_scores(["knn", "all"])) == len(every)
    grids = default_grids(every)
    assert grids["react"] == {"percentile": [85, 90, 95, 99]} and "ash_p" in grids and "dice" in grids
    assert not any(SCORES.get(n).requires_model for n in grids)  # the search refuses model scores
    assert all(grids[n] for n in grids)


def test_eval_help_lists_the_scores():
    text = dict(iter_parsers())[("oaml", "eval")].format_help()
    assert all(name in text for name in SCORE_HELP)


LONG = [("data", "prepare"), ("teacher", "finetune"), ("bank", "features"), ("bank", "teacher-cache"), ("sample",),
        ("generate",), ("train",), ("eval",), ("run",), ("demo",), ("bench",)]


@pytest.mark.parametrize("cmd", LONG, ids=" ".join)
def test_long_commands_take_no_progress(cmd):
    parser = dict(iter_parsers())[("oaml",) + cmd]
    (flag,) = [a for a in parser._actions if "--no-progress" in a.option_strings]
    assert flag.dest == "progress" and flag.const is False  # what main() passes to progress.set_enabled


# -- progress ------------------------------------------------------------------------------------

def test_progress_bar_without_a_terminal_writes_plain_lines(monkeypatch):
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)
    out = io.StringIO()
    bar = progress.progress_bar(4, desc="epoch 1/2", file=out, mininterval=0, leave=False)
    for _ in range(4):
        bar.update(1)
        bar.set_postfix(loss="0.5", refresh=False)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) <= 6 and max(map(len, lines)) < 120, lines
    assert re.search(r"epoch 1/2: 4/4 \(100%\), \d+s elapsed, loss=0.5$", lines[-1]), lines[-1]
    # a short bar that was never shown and is not kept says nothing; a kept one says where it ended
    out = io.StringIO()
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 1e9)
    list(progress.progress_bar(range(3), desc="quick", file=out, leave=False))
    assert out.getvalue() == ""
    list(progress.progress_bar(range(3), desc="kept", file=out))
    assert out.getvalue().endswith("kept: 3/3 (100%), 0s elapsed\n")


def test_no_progress_silences_bars_and_stages(caplog):
    out = io.StringIO()
    progress.set_enabled(False)
    try:
        list(progress.progress_bar(range(3), desc="x", file=out))
        with caplog.at_level(logging.INFO):
            progress.Stages(2).start("a")
    finally:
        progress.set_enabled(True)
    assert out.getvalue() == "" and not caplog.records


def test_stages_log_position_elapsed_and_eta(caplog, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="oaml.utils.progress"):
        st = progress.Stages(4)
        st.start("teacher")
        now[0] = 130.0
        st.skip("bank")
        st.start("train oaml")
        now[0] = 200.0
        st.start("eval")
        now[0] = 230.0
        st.finish()
    assert [r.getMessage() for r in caplog.records] == [
        "stage 1/4: teacher (elapsed 0s)",
        "stage 2/4: bank (done earlier, skipped)",
        "stage 3/4: train oaml (elapsed 2m10s, ETA ~4m20s)",  # two stages left at 130 s per stage run
        "stage 4/4: eval (elapsed 3m20s, ETA ~1m40s)",  # one left at the mean of 130 s and 70 s
        "4 stages done in 3m50s",
    ]


# -- layering: the package reads top-down as the pipeline runs --------------------------------------

def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


@pytest.mark.parametrize("path, banned", [
    ("oaml/bench.py", r"(\.|oaml\.)cli\b"),
    ("oaml/pipeline.py", r"(\.|oaml\.)cli\b"),
    ("oaml/scores/search.py", r"(\.\.|oaml\.)evaluation\b"),
    ("oaml/config.py", r"(\.|oaml\.)cli\b"),
])
def test_lower_layers_do_not_import_higher_ones(path, banned):
    bad = [m for m in _imports(ROOT / path) if re.match(banned, m)]
    assert not bad, (path, bad)


def test_moved_helpers_are_the_same_objects():
    import oaml.evaluation.metrics as old
    from oaml import config, metrics

    assert old.ood_metrics is metrics.ood_metrics and old.METRIC_KEYS is metrics.METRIC_KEYS
    assert config.apply_overrides({"a": {"b": 1}}, ["a.b=2", "c=[1, 2]"]) == {"a": {"b": 2}, "c": [1, 2]}


def test_readme_score_table_lists_every_score_with_its_fit_split():
    from pathlib import Path

    from oaml.scores import SCORES

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    split = {"none": "none", "train": "ID train", "val": "ID val"}
    for n in SCORES.primary_names():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{n}` |")), None)
        assert row is not None, f"README's score table lacks {n}"
        assert row.split("|")[3].strip() == split[SCORES.get(n).fit_on], n
    assert f"holds {len(SCORES.primary_names())} scores" in text
