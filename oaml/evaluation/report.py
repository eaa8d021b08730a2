"""Write evaluation results: ``results.json``, ``results.md`` (the paper's layout), ``results.csv``,
raw scores (``scores.npz``) and plots (score histograms ID vs each OOD set, ROC curves)."""

from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..utils.io import atomic_path, atomic_write_text, write_json

METRIC_NAMES = {
    "fpr95": "FPR@95 (OOD-positive: % of ID flagged OOD when 95% of OOD are caught; OpenOOD v1.5 / paper)",
    "fpr95_id_pos": "FPR@95 (ID-positive: % of OOD accepted when 95% of ID are kept; ODIN/Energy/KNN papers)",
    "auroc": "AUROC",
    "aupr_in": "AUPR with ID as positive",
    "aupr_out": "AUPR with OOD as positive",
    "detection_error": "minimum over thresholds of 0.5 (1 - TPR) + 0.5 FPR",
}


def markdown_table(results: Dict[str, Any], title: Optional[str] = None) -> str:
    """Rows = scores; columns = FPR@95 / AUROC per OOD set, near / far / all means, ID accuracy."""
    scores = results["scores"]
    if not scores:
        return ""
    first = next(iter(scores.values()))
    sets = list(first["datasets"])
    groups = [g for g in ("near", "far", "all") if g in first]
    head = ["score"] + [f"{s} ({first['datasets'][s]['group']})" for s in sets] + [f"{g} mean" for g in groups] + ["ID acc"]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in scores.items():
        cells = [name.upper()]
        for s in sets:
            d = entry["datasets"][s]
            cells.append(f"{d['fpr95']:.2f} / {d['auroc']:.2f}")
        for g in groups:
            cells.append(f"**{entry[g]['fpr95']:.2f} / {entry[g]['auroc']:.2f}**")
        cells.append(f"{results['id_accuracy']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Cells are FPR@95 (OOD-positive) / AUROC, in %. Lower FPR and higher AUROC are better."]
    return "\n".join(lines) + "\n"


def comparison_table(runs: Dict[str, Dict[str, Any]], scores: Sequence[str], group: str = "all") -> str:
    """Methods side by side: one row per (method, score) with FPR@95 / AUROC of ``group`` and ID acc."""
    lines = [
        f"| method | score | FPR@95 (OOD+) ↓ | FPR@95 (ID+) ↓ | AUROC ↑ | AUPR-in ↑ | AUPR-out ↑ | ID acc ↑ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, res in runs.items():
        for s in scores:
            if s not in res["scores"]:
                continue
            m = res["scores"][s][group]
            lines.append(
                f"| {method} | {s.upper()} | {m['fpr95']:.2f} | {m['fpr95_id_pos']:.2f} | {m['auroc']:.2f} | "
                f"{m['aupr_in']:.2f} | {m['aupr_out']:.2f} | {res['id_accuracy']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, results: Dict[str, Any], raw_scores: Optional[Dict[str, Dict[str, np.ndarray]]] = None, plots: bool = True) -> Dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "csv": out / "results.csv"}
    write_json(paths["json"], results)
    md = [f"# OOD evaluation: {results.get('benchmark', '')}", ""]
    if results.get("checkpoint"):
        md += [f"Checkpoint: `{results['checkpoint']}`", ""]
    md += [f"ID accuracy: **{results['id_accuracy']:.2f}%**", "", markdown_table(results), "", "Metrics:", ""]
    md += [f"- `{k}`: {v}" for k, v in METRIC_NAMES.items()]
    if "ood_sets" in results:
        md += ["", "OOD sets: " + ", ".join(f"{o['name']} ({o['group']}, n={o['count']})" for o in results["ood_sets"])]
    atomic_write_text(paths["md"], "\n".join(md) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["score", "dataset", "group", *METRIC_NAMES, "id_accuracy"])
    for score, entry in results["scores"].items():
        for name, d in entry["datasets"].items():
            w.writerow([score, name, d["group"], *[f"{d[k]:.4f}" for k in METRIC_NAMES], f"{results['id_accuracy']:.4f}"])
        for g in ("near", "far", "all"):
            if g in entry:
                w.writerow([score, f"mean_{g}", g, *[f"{entry[g][k]:.4f}" for k in METRIC_NAMES], f"{results['id_accuracy']:.4f}"])
    atomic_write_text(paths["csv"], buf.getvalue())
    if raw_scores:
        flat = {f"{s}/{k}": v for s, d in raw_scores.items() for k, v in d.items()}
        with atomic_path(out / "scores.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **flat)
        paths["scores"] = out / "scores.npz"
        if plots:
            paths.update(plot_scores(out / "plots", raw_scores, results))
    return paths


def plot_scores(out_dir: Path, raw_scores: Dict[str, Dict[str, np.ndarray]], results: Dict[str, Any]) -> Dict[str, Path]:
    """``histograms.png`` (one panel per score, ID test vs each OOD set, the paper's figure 6)
    and ``roc_<score>.png`` (one curve per OOD set, AUROC in the legend)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"histograms": _save(score_histograms(raw_scores, results), out_dir / "histograms.png")}
    for score, sets in raw_scores.items():
        paths[f"roc_{score}"] = _save(roc_figure(score, sets, results), out_dir / f"roc_{score}.png")
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


HIST_QUANTILES = (1.0, 99.0)  # histogram x range: at most from the sets' lowest 1% to their highest 99% quantile
HIST_FENCE = 3.0  # ... and at most this many interquartile ranges beyond each set's quartiles


def hist_range(arrays: Sequence[np.ndarray]) -> tuple:
    """The x range of a histogram: every set's bulk, not its extreme tail (a tail would squeeze
    the bulk into a few bins, or pile up in the edge bin if clipped). Per set the range is its
    1%-99% quantiles, cut at 3 interquartile ranges beyond the quartiles; then the union."""
    lo, hi = np.inf, -np.inf
    for a in arrays:
        q_lo, q1, q3, q_hi = np.percentile(a, [HIST_QUANTILES[0], 25, 75, HIST_QUANTILES[1]])
        lo = min(lo, max(q_lo, q1 - HIST_FENCE * (q3 - q1)))
        hi = max(hi, min(q_hi, q3 + HIST_FENCE * (q3 - q1)))
    return float(lo), float(hi if hi > lo else lo + max(abs(lo), 1.0) * 1e-3)


def score_histograms(raw_scores: Dict[str, Dict[str, np.ndarray]], results: Dict[str, Any]):
    """A grid with one panel per score: ID test filled, each OOD set as a line (near solid, far
    dashed), one legend for the figure. Values outside :func:`hist_range` are not drawn."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    names = list(raw_scores)
    ood = list(dict.fromkeys(k for sets in raw_scores.values() for k in sets if k != "id_test"))  # colour by set
    nrows = -(-len(names) // 4)  # at most 4 panels a row, rows filled evenly
    ncols = -(-len(names) // nrows)
    width = max(3.6 * ncols, 6.5)
    lo_q, hi_q = HIST_QUANTILES
    title = textwrap.wrap(f"ID test vs each OOD set (AUROC: mean over the sets, %). x range: each set's {lo_q:g}%-{hi_q:g}% "
                          f"quantiles, at most {HIST_FENCE:g} IQR beyond its quartiles; values outside are not drawn "
                          "(their share: top right of each panel).", int(width * 13))
    legend_cols = min(len(ood) + 1, int(width // 2.0))
    legend_h = 0.25 * -(-(len(ood) + 1) // legend_cols) + 0.15  # inches below the panels
    title_h = 0.2 * len(title) + 0.1
    height = 2.7 * nrows + title_h + legend_h
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    colors = plt.get_cmap("tab10" if len(ood) <= 10 else "tab20").colors
    for i, (ax, score) in enumerate(zip(axes.flat, names)):
        sets = raw_scores[score]
        info = results["scores"][score]
        lo, hi = hist_range(list(sets.values()))
        bins = np.linspace(lo, hi, 41)
        outside = sum(int(((a < lo) | (a > hi)).sum()) for a in sets.values()) / sum(a.size for a in sets.values())
        ax.hist(sets["id_test"], bins=bins, density=True, color="0.6", alpha=0.6, label="ID test")
        for j, name in enumerate(ood):
            if name not in sets:
                continue
            far = info["datasets"][name]["group"] == "far"
            ax.hist(sets[name], bins=bins, density=True, histtype="step", lw=1.3, color=colors[j % len(colors)],
                    ls="--" if far else "-", label=f"{name} ({info['datasets'][name]['group']})")
        auroc = f", AUROC {info['all']['auroc']:.1f}" if "all" in info else ""
        ax.set_title(f"{score.upper()}{auroc}", fontsize=9.5, loc="left")
        ax.set_title(f"{100 * outside:.1f}% off range", fontsize=7, loc="right", color="0.35")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.tick_params(labelsize=7)
        if i % ncols == 0:
            ax.set_ylabel("density", fontsize=8)
        if i + ncols >= len(names):
            ax.set_xlabel("score (higher = more ID)", fontsize=8)
    for ax in axes.flat[len(names):]:
        fig.delaxes(ax)
    legend = {lab: h for ax in fig.axes for h, lab in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=legend_cols, fontsize=8, frameon=False)
    fig.suptitle("\n".join(title), fontsize=9)
    fig.tight_layout(rect=(0, legend_h / height, 1, 1))  # tight_layout leaves room for the suptitle
    return fig


def roc_figure(score: str, sets: Dict[str, np.ndarray], results: Dict[str, Any]):
    """ROC curves of one score, ID positive, one per OOD set (far sets dashed); the legend gives each AUROC."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for name in (k for k in sets if k != "id_test"):
        fpr, tpr = _roc(sets["id_test"], sets[name])
        d = results["scores"][score]["datasets"][name]
        ax.plot(fpr, tpr, lw=1.3, ls="--" if d["group"] == "far" else "-", label=f"{name} (AUROC {d['auroc']:.1f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("FPR: fraction of OOD accepted as ID")
    ax.set_ylabel("TPR: fraction of ID accepted")
    ax.set_title(f"ROC of {score.upper()} (ID positive)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _roc(id_s: np.ndarray, ood_s: np.ndarray):
    """ROC with ID as positive; thresholds at distinct score values (ties handled as one step)."""
    s = np.concatenate([id_s, ood_s])
    y = np.concatenate([np.ones_like(id_s), np.zeros_like(ood_s)])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[distinct]
    fp = np.cumsum(1 - y)[distinct]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


# ------------------------------------------------------------------------------------------------
# oaml bench: methods x seeds, mean +- std
# ------------------------------------------------------------------------------------------------


def _ms(agg: Optional[Dict[str, float]], digits: int = 2) -> str:
    if agg is None:
        return "-"
    if agg["n"] > 1:
        return f"{agg['mean']:.{digits}f} ± {agg['std']:.{digits}f}"
    return f"{agg['mean']:.{digits}f}"


GROUP_TITLES = {"oe_disjoint": "OE-disjoint", "oe_overlap": "OE-overlap", "all": "all sets"}
DELTA_TITLES = {"auroc": "ΔAUROC ↑", "fpr95": "ΔFPR@95 ↓"}  # the column titles of paired differences


def _delta(d: Optional[Dict[str, Any]]) -> str:
    """A paired difference: ``+2.31 [+0.80, +3.82]``, bold when the interval excludes 0."""
    if d is None or not d["n"]:
        return "-"
    if d["ci95"] is None:
        return f"{d['mean']:+.2f} (n=1)"
    cell = f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
    return f"**{cell}**" if d["excludes_zero"] else cell


def _paired_table(ref: str, paired: Dict[str, Any], main_scores: Sequence[str], groups: Sequence[str],
                  title: Optional[str] = None) -> List[str]:
    """One row per method with a paired seed: ID accuracy and each score's AUROC / FPR@95 differences to
    ``ref`` (``title``: another heading, for rows that are already differences a − b)."""
    cols = [(s, g, m) for s in main_scores for g in groups for m in ("auroc", "fpr95")]
    lines = [title or f"## Paired differences to `{ref}` (same seed)", "",
             "| method | n | ID acc Δ ↑ | " + " | ".join(f"{s.upper()} {DELTA_TITLES[m]} ({GROUP_TITLES[g]})" for s, g, m in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for name, m in paired.items():
        cells = [name, str(m["id_accuracy"]["n"]), _delta(m["id_accuracy"])]
        cells += [_delta(m["scores"].get(s, {}).get(g, {}).get(k)) for s, g, k in cols]
        lines.append("| " + " | ".join(cells) + " |")
    if title is None:
        lines += ["", f"Paired per-seed differences, method − `{ref}`, in percentage points: each seed's run against `{ref}` of the same "
                  "seed (same seed, so the same starting vanilla checkpoint for `init: vanilla` runs); mean [95% Student-t interval "
                  "over the n seeds both finished]. **Bold**: the interval excludes 0; otherwise the difference is noise at this "
                  "number of seeds. n=1 has no interval."]
    return lines


def _ood_val_paired_table(title: str, paired: Dict[str, Any], main_scores: Sequence[str]) -> List[str]:
    """Paired OOD-val differences (all OOD-val sets and the OE-disjoint ones) of the rows that have them."""
    val = {n: m["ood_val"] for n, m in paired.items() if m.get("ood_val")}
    if not val:
        return []
    groups = [g for g in ("all", "oe_disjoint") if any(g in v.get(s, {}) for v in val.values() for s in main_scores)]
    cols = [(s, g, k) for s in main_scores for g in groups for k in ("auroc", "fpr95")]
    names = {"all": "all OOD-val sets", "oe_disjoint": "OE-disjoint OOD-val sets"}
    lines = ["", title, "", "| method | n | " + " | ".join(f"{s.upper()} {DELTA_TITLES[k]} ({names[g]})" for s, g, k in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for n, v in val.items():
        lines.append("| " + " | ".join([n, str(paired[n]["id_accuracy"]["n"])] + [_delta(v.get(s, {}).get(g, {}).get(k)) for s, g, k in cols]) + " |")
    return lines


def bench_markdown(agg: Dict[str, Any], main_scores: Sequence[str], notes: Sequence[str] = (), plots: Optional[Dict[str, Path]] = None) -> str:
    """The paper's layout for a grid: paired differences to the reference run first, then per
    score FPR@95 / AUROC over the OE-disjoint, OE-overlapping, all, near and far sets and per
    OOD set, ID accuracy and seconds per epoch, each as mean ± std over seeds."""
    methods = agg["methods"]
    cfg = agg.get("config", {})
    bench = cfg.get("pipeline", {}).get("benchmark", "?")
    oe = agg.get("oe_groups", {})
    lines = [f"# `oaml bench` on `{bench}`", ""]
    lines += [f"- Command: `{agg.get('command', 'oaml bench')}`", f"- Machine: {agg.get('machine', '?')}", f"- Date: {agg.get('date', '?')}",
              f"- Seeds: {cfg.get('seeds')}; below the paired table every cell is mean ± std (sample std, ddof 1) over the seeds that finished (n per method)."]
    lines += [f"- {n}" for n in notes]
    lines += ["", "FPR@95 is OOD-positive (OpenOOD v1.5 / the paper), in %; lower is better. AUROC in %, higher is better.", ""]
    if not methods:
        return "\n".join(lines + ["No (method, seed) run has finished yet."]) + "\n"
    paired = {n: m for n, m in agg.get("paired", {}).get("methods", {}).items() if m["id_accuracy"]["n"]}
    if paired:
        lines += _paired_table(agg["paired"]["delta_vs"], paired, main_scores, [g for g in ("oe_disjoint", "all") if g == "all" or g in oe]) + [""]
    contrasts = {f"{c['a']} − {c['b']}": c for c in agg.get("contrasts", []) if c["id_accuracy"]["n"]}
    if contrasts:
        lines += _paired_table("", contrasts, main_scores, [g for g in ("oe_disjoint", "all") if g == "all" or g in oe],
                               title="## Contrasts: paired differences a − b between two runs (same seed)")
        lines += _ood_val_paired_table("### Contrasts on OOD-val (what a setting is chosen on)", contrasts, main_scores) + [""]
    rows = dict(methods)
    if "teacher" in agg:
        rows["teacher (ceiling, n=1)"] = agg["teacher"]
    groups = [g for g in ("oe_disjoint", "oe_overlap") if g in oe] or ["all"]
    if "oe_disjoint" in oe:
        lines += [f"## Summary: OE-disjoint sets ({', '.join(oe['oe_disjoint'])})", ""]
        if "oe_overlap" in oe:
            lines += [f"Beside it, marked OE-overlap: the sets sharing a source family with the OE pool ({', '.join(oe['oe_overlap'])}), "
                      "whose distribution outlier-exposure methods have trained on.", ""]
    else:
        lines += ["## Summary: all OOD sets", ""]
    cols = [(s, g) for g in groups for s in main_scores]
    lines += ["| method | n | init | epochs | ID acc ↑ | " + " | ".join(f"{s.upper()} FPR@95 ↓ ({GROUP_TITLES[g]}) | {s.upper()} AUROC ↑ ({GROUP_TITLES[g]})" for s, g in cols) + " | s/epoch |",
              "|---|---|---|---|---|" + "---|---|" * len(cols) + "---|"]
    for name, m in rows.items():
        cells = [name, str(m["id_accuracy"]["n"]), m.get("init", "-"), str(m.get("epochs", "-")), _ms(m["id_accuracy"])]
        for s, g in cols:
            a = m["scores"].get(s, {}).get(g)
            cells += [_ms(a["fpr95"]) if a else "-", _ms(a["auroc"]) if a else "-"]
        cells.append(_ms(m.get("seconds_per_epoch"), 1))
        lines.append("| " + " | ".join(cells) + " |")
    for group, title in (("all", "All OOD sets (mean of every set)"), ("near", "Near OOD (mean of the near sets)"), ("far", "Far OOD (mean of the far sets)")):
        if group == "all" and groups == ["all"]:
            continue
        lines += ["", f"## {title}", ""]
        lines += _fpr_auroc_table({n: {s: e.get(group) for s, e in m["scores"].items()} for n, m in rows.items()}, main_scores)
    if any("ood_val" in m for m in methods.values()):
        lines += ["", "## OOD-val (what defaults are chosen on; never the test sets)", ""]
        lines += _fpr_auroc_table({n: m["ood_val"] for n, m in methods.items() if "ood_val" in m}, main_scores)
        for s in main_scores:
            ranked = sorted(((m["ood_val"][s]["auroc"]["mean"], n) for n, m in methods.items() if "ood_val" in m and s in m["ood_val"]), reverse=True)
            if ranked:
                lines.append(f"\nBest on OOD-val by {s.upper()} AUROC: **{ranked[0][1]}** ({ranked[0][0]:.2f}).")
        lines += _ood_val_paired_table(f"### Paired differences to `{agg['paired']['delta_vs']}` on OOD-val (what a method is chosen on)",
                                       paired, main_scores)
    for s in main_scores:
        first = next((m["scores"][s] for m in methods.values() if s in m["scores"]), None)
        if first is None:
            continue
        sets = list(first["datasets"])
        lines += ["", f"## {s.upper()} per OOD set (FPR@95 / AUROC)", "",
                  "| method | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
        for name, m in methods.items():
            d = m["scores"].get(s, {}).get("datasets", {})
            lines.append("| " + " | ".join([name] + [f"{_ms(d[x]['fpr95'])} / {_ms(d[x]['auroc'])}" if x in d else "-" for x in sets]) + " |")
    every = list(next(iter(methods.values()))["scores"])
    if len(every) > len([s for s in every if s in main_scores]):
        cols = list(methods)
        best = {n: max((m["scores"][s]["all"]["auroc"]["mean"] for s in every if s in m["scores"]), default=None) for n, m in methods.items()}
        lines += ["", "## Every score (AUROC over all OOD sets, mean ± std): which score suits which method", "",
                  "Bold: the best score of each method (column).", "",
                  "| score | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for s in every:
            cells = []
            for n in cols:
                a = methods[n]["scores"].get(s, {}).get("all", {}).get("auroc")
                cell = _ms(a) if a else "-"
                cells.append(f"**{cell}**" if a and a["mean"] == best[n] else cell)
            lines.append(f"| {s.upper()} | " + " | ".join(cells) + " |")
    curve = methods.get("vanilla", {}).get("val_curve") or []
    if curve:
        lines += ["", "## Vanilla convergence (ID validation accuracy per epoch, mean ± std over seeds)", "",
                  "| epoch | " + " | ".join(str(c["epoch"]) for c in curve) + " |", "|---|" + "---|" * len(curve),
                  "| val acc | " + " | ".join(_ms(c, 2) for c in curve) + " |"]
    tm = agg.get("teacher_margin")
    if tm:
        v = tm["vanilla_val_accuracy"]
        lines += ["", f"Teacher: {tm['teacher_val_accuracy']:.2f}% ID val accuracy (its checkpoint), the converged vanilla student "
                      f"{v['mean']:.2f} ± {v['std']:.2f}% (epoch {tm['vanilla_epoch']}, n = {v['n']}): the teacher is "
                      f"{tm['margin']:+.2f} points above it."]
    lines += ["", "## Methods", ""]
    for name, m in methods.items():
        terms = m["method"].get("terms") or {}
        extra = f", term overrides {terms}" if terms else ""
        lines.append(f"- `{name}`: method `{m['method']['name']}`{extra}; init {m['init']}; seeds {m['seeds']}")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}]({p})" for k, p in plots.items()]
    return "\n".join(lines) + "\n"


def _fpr_auroc_table(rows: Dict[str, Dict[str, Any]], scores: Sequence[str]) -> List[str]:
    """Markdown rows: one per method, FPR@95 and AUROC (mean ± std) of each score; ``rows`` maps
    method -> {score: {metric: AGG} or None}."""
    lines = ["| method | " + " | ".join(f"{s.upper()} FPR@95 ↓ | {s.upper()} AUROC ↑" for s in scores) + " |",
             "|---|" + "---|---|" * len(scores)]
    for name, per_score in rows.items():
        cells = [name]
        for s in scores:
            v = per_score.get(s)
            cells += [_ms(v["fpr95"]) if v else "-", _ms(v["auroc"]) if v else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def bench_plots(out_dir: Path, agg: Dict[str, Any], main_scores: Sequence[str]) -> Dict[str, Path]:
    """One bar chart per metric (AUROC, FPR@95): methods x main scores, error bars = std over seeds."""
    plt = _pyplot()
    methods = agg["methods"]
    if not methods:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(methods)
    paths: Dict[str, Path] = {}
    for metric, label in (("auroc", "AUROC (%) ↑"), ("fpr95", "FPR@95 (%) ↓")):
        fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) * len(main_scores) / 2), 3.6))
        width = 0.8 / max(len(main_scores), 1)
        x = np.arange(len(names))
        for i, s in enumerate(main_scores):
            vals = [methods[n]["scores"].get(s, {}).get("all", {}).get(metric) for n in names]
            mean = [v["mean"] if v else np.nan for v in vals]
            std = [v["std"] if v else 0.0 for v in vals]
            ax.bar(x + (i - (len(main_scores) - 1) / 2) * width, mean, width, yerr=std, capsize=2, label=s.upper())
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel(label)
        if metric == "auroc":
            lo = np.nanmin([methods[n]["scores"][s]["all"]["auroc"]["mean"] for n in names for s in main_scores if s in methods[n]["scores"]])
            ax.set_ylim(max(0.0, lo - 5), 100)
        ax.legend(fontsize=8)
        ax.set_title("all OOD sets, mean ± std over seeds", fontsize=9)
        fig.tight_layout()
        paths[metric] = _save(fig, out_dir / f"{metric}.png")
    return paths
