"""The README's result tables, rendered from the committed benchmark JSONs (never typed by hand).

    .venv/bin/python benchmarks/readme_tables.py           # print every block
    .venv/bin/python benchmarks/readme_tables.py --write   # replace them in README.md (between their markers)

Blocks (README.md holds each between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``):
  paired  "Does OAML help?": per benchmark (benchmarks/results/fmnist.json, fmnist-openset.json) the
          paired differences of every method to ``vanilla-cont`` (mean [95% t-interval], bold where the
          interval excludes 0), the absolute EBO AUROC of vanilla-cont, oaml and the teacher, and the
          OOD-val table `oaml` was chosen on.
  ratio   "Does OAML help?", the outlier-ratio grids (benchmarks/results/fmnist-ratio.json,
          fmnist-openset-ratio.json): paired differences to ``vanilla-cont`` and the grids' contrasts.
  perf    "Performance": benchmarks/results/{scores,knn_sampling,train_step,train_step_speed,amp_quality,
          eval_profile}.json; a missing file is said, not skipped. Every figure is a ratio to a peer
          measured in the same run (pytorch-ood 0.4.0, OpenOOD v1.5 re-expressed, the authors' sampler)
          or to a floor (the GEMMs or the one faiss call the arithmetic needs, one torch.sort), with the
          goal of the performance issue beside it.
tests/test_readme_tables.py keeps README.md equal to this output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# the scores the performance issue names with a goal (their rows and goals: scores_section)
NAMED = ("mds", "vim", "react", "knn")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _block(name: str, parts: List[List[str]]) -> str:
    """A README block: its markers around the parts (lists of lines), a blank line between parts."""
    start, end = _markers(name)
    body = "\n\n".join("\n".join(p) for p in parts)
    return f"{start}\n{body}\n{end}"


def _load(name: str) -> Optional[Dict[str, Any]]:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.is_file() else None


def _s(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _x(a: Optional[float], b: Optional[float]) -> str:
    """a / b as 'N.NNx' (how many times ours fits into the other: > 1 = we are faster)."""
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _load_note(meta: Dict[str, Any], before: str, after: str) -> str:
    lb, la = meta.get(before), meta.get(after)
    first = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731
    if lb is None:
        return ""
    return f"load average {first(lb):.2f} before" + (f", {first(la):.2f} after" if la is not None else "")


def scores_section(d: Dict[str, Any]) -> List[str]:
    meta, rows, floors = d["meta"], d["rows"], d.get("floors") or {}
    out = [
        f"**Scores** (`benchmarks/scores.py --threads 2`, `benchmarks/results/scores.json`, "
        f"{', '.join(x for x in (meta.get('date'), _load_note(meta, 'loadavg_before', 'loadavg_after')) if x)}): "
        f"fit + score seconds on seeded features "
        f"({meta['n_train']:,} x {meta['dim']} train, {meta['n_val']:,} val, {meta['n_test']:,} test), "
        "each side on the same tensors; a ratio is the peer's time over ours (> 1: we are faster)."
        + (f" {meta['timing'][0].upper()}{meta['timing'][1:]}." if meta.get("timing") else ""),
        "",
        "| score | C | oaml s | pytorch-ood s (ratio) | OpenOOD s (ratio) | floor s (ours / floor) | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["score"], r["classes"]): r for r in rows if "ours_kwargs" not in r or r["score"] == "nnguide"}
    for name in NAMED:
        for C in sorted({r["classes"] for r in rows}):
            r = by.get((name, C))
            if r is None:
                continue
            fl = floors.get(str(C), {})
            peers = [t for t in (r.get("theirs_s"), r.get("openood_s")) if t is not None]
            fastest = min(peers) if peers else None
            floor, goal, met = None, "", None
            if name == "mds":
                floor, goal = fl.get("mds_gemm_s"), "<= 0.3 s"
                met = r["ours_s"] <= 0.3
            elif name in ("vim", "react"):
                goal = "<= fastest peer"
                met = fastest is not None and r["ours_s"] <= fastest
            elif name == "knn":
                floor, goal = fl.get("knn_faiss_search_s"), "<= 1.1x one faiss search"
                met = floor is not None and r["ours_s"] <= 1.1 * floor
            label = f"{name} ({r['backend_']} backend)" if r.get("backend_") else name
            out.append(f"| {label} | {C} | {_s(r['ours_s'])} | {_s(r.get('theirs_s'))} ({_x(r.get('theirs_s'), r['ours_s'])}) "
                       f"| {_s(r.get('openood_s'))} ({_x(r.get('openood_s'), r['ours_s'])}) "
                       f"| {_s(floor)} ({_x(r['ours_s'], floor)}) | {goal} | {'yes' if met else 'no' if met is not None else '-'} |")
            if name == "knn" and fl.get("knn_faiss_backend_s") is not None:
                t = fl["knn_faiss_backend_s"]
                oo = r.get("openood_s")
                out.append(f"| knn (faiss backend) | {C} | {_s(t)} | - | {_s(oo)} ({_x(oo, t)}) | {_s(floor)} ({_x(t, floor)}) "
                           f"| <= OpenOOD | {'yes' if oo is not None and t <= oo else 'no'} |")
    m = d.get("metrics")
    if m:
        peers = [t for t in (m.get("theirs_s"), m.get("openood_s")) if t is not None]
        out.append(f"| metrics (AUROC, FPR@95, AUPR) of {m['n']:,} scores | - | {_s(m['ours_s'])} | {_s(m.get('theirs_s'))} "
                   f"({_x(m.get('theirs_s'), m['ours_s'])}) | {_s(m.get('openood_s'))} ({_x(m.get('openood_s'), m['ours_s'])}) "
                   f"| {_s(m['sort_s'])} (torch.sort; {_x(m['ours_s'], m['sort_s'])}) | <= fastest peer "
                   f"| {'yes' if peers and m['ours_s'] <= min(peers) else 'no'} |")
    # every row with a peer: where are we slower than the fastest one?
    with_peer = [r for r in rows if r.get("theirs_s") is not None or r.get("openood_s") is not None]
    slower = []
    for r in with_peer:
        fastest = min(t for t in (r.get("theirs_s"), r.get("openood_s")) if t is not None)
        if r["ours_s"] > fastest:
            slower.append((r["ours_s"] - fastest, r, fastest))
    slower.sort(key=lambda t: -t[0])
    out += ["", f"Every score ({len({r['score'] for r in rows})} scores x {len({r['classes'] for r in rows})} class counts): "
            f"ours at or under the fastest peer in {len(with_peer) - len(slower)} of the {len(with_peer)} rows that have a peer."]
    if slower:
        def pair(a: float, b: float) -> str:  # milliseconds below 10 ms (seconds would print 0.000 vs 0.000)
            return f"{1e3 * a:.2f} ms vs {1e3 * b:.2f} ms" if b < 0.01 else f"{_s(a)} s vs {_s(b)} s"

        worst = ", ".join(f"{r['score']} C={r['classes']} {pair(r['ours_s'], f)}" for _, r, f in slower[:8])
        out.append(f"Slower than a peer in {len(slower)} (largest gaps first): {worst}"
                   + (f", and {len(slower) - 8} more within {slower[8][0] * 1000:.1f} ms." if len(slower) > 8 else "."))
    return out


def knn_section(d: Dict[str, Any]) -> List[str]:
    out = [
        f"**k-NN boundary sampler** (`benchmarks/knn_sampling.py --sizes ref,large`, `benchmarks/results/knn_sampling.json`; "
        f"K 300, S 50, N 1,500, m 2; each contender in a fresh process, torch threads: {d['machine'].get('torch_threads')}; "
        f"load average {d['machine']['load_avg_start'][0]:.2f} at the start): wall seconds, speed-up over the authors' "
        "algorithm (faiss flat index, their driver loop) and the ratio to the float32 GEMM roofline of the candidates' "
        "distances (1.0 = every cycle a float32 GEMM at the peak measured in the same process)"
        + ("; oaml-torch decided most candidates on a bfloat16 GEMM (this CPU has native bfloat16), with the same "
           "output, so it can run under that roofline." if any(r.get("bf16_screen") for r in d["runs"]) else "."),
        "",
        "| size | R | authors s | oaml-torch s (speed-up) | oaml-faiss s (speed-up) | oaml-torch / fp32 roofline | goals: >= 5x, <= 1.5x roofline |",
        "|---|---|---|---|---|---|---|",
    ]
    runs: Dict[str, Dict[str, Any]] = {}
    for r in d["runs"]:
        runs.setdefault(r["size"], {})[r["contender"]] = r
    for size in ("ref", "large"):
        rs = runs.get(size)
        if not rs or "authors" not in rs:
            continue
        a, t, f = rs["authors"], rs.get("oaml-torch"), rs.get("oaml-faiss")
        sp = lambda r: f"{_s(r['seconds'])} ({r['speedup_vs_authors']:.2f}x)" if r else "-"  # noqa: E731
        roof = t.get("roofline_ratio") if t else None
        met = t is not None and t["speedup_vs_authors"] >= 5 and roof is not None and roof <= 1.5
        shape = f"{a['classes']} x {a['n_per_class']:,} x {a['dim']}"
        out.append(f"| {size} ({shape}) | {a['R']} | {_s(a['seconds'])} | {sp(t)} | {sp(f)} | "
                   f"{'-' if roof is None else f'{roof:.2f}x'} | {'yes' if met else 'no'} |")
    return out


def training_section(step: Optional[Dict[str, Any]], speed: Optional[Dict[str, Any]], amp: Optional[Dict[str, Any]]) -> List[str]:
    out: List[str] = []
    if step:
        r = step["ratio_to_vanilla"]
        out += [f"**Training step** (`benchmarks/train_step.py --threads 2`, `benchmarks/results/train_step.json`, {step['date']}, "
                f"load average {step['loadavg_1min_at_start']:.2f} at the start; demo student, batch 128): `oaml` with cached "
                f"teacher outputs takes {r['oaml-cached']:.2f}x a vanilla step (goal <= 1.5x: "
                f"{'met' if r['oaml-cached'] <= 1.5 else 'not met'}), {r.get('oaml-live', float('nan')):.2f}x with the teacher "
                f"run every step; `oaml-paper` {r.get('oaml-paper-cached', float('nan')):.2f}x cached"
                + (f"; `oaml` at its previous outlier ratio 0.5 (64 outlier images per 128 ID images instead of 32) "
                   f"{r['oaml-cached-r0.5']:.2f}x" if "oaml-cached-r0.5" in r else "") + ".", ""]
    if speed:
        ref = speed["setup"]["variants"][0]
        out += [f"**Training options** (`benchmarks/results/train_step_speed.json`, {speed['date']}, load average "
                f"{speed['loadavg_1min_at_start']:.2f} at the start): ID images per second and the speed-up over `{ref}` "
                "(goal >= 1.5x for vanilla and `oaml`).", "",
                "| variant | vanilla images/s (speed-up) | oaml images/s (speed-up) | oaml / vanilla step | numerics |",
                "|---|---|---|---|---|"]
        for v, res in speed["variants"].items():
            c, sp = res["contenders"], res["speedup_vs_" + ref]
            num = "bfloat16 activations" if res.get("changes_numerics") else "float32 (equal to rounding)"
            if res.get("changes_optimisation"):
                num += "; another batch size"
            out.append(f"| {v} | {c['vanilla']['id_images_per_s']:.0f} ({sp['vanilla']:.2f}x) | "
                       f"{c['oaml-cached']['id_images_per_s']:.0f} ({sp['oaml-cached']:.2f}x) | {res['ratio_to_vanilla']['oaml-cached']:.2f}x | {num} |")
    if amp:
        p = amp["paired"]
        f = lambda d: (f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else f"{d['mean']:+.2f}")  # noqa: E731
        sc = ", ".join(f"{s.upper()} AUROC {f(v['auroc'])}" for s, v in p["scores"].items())
        st = amp["setup"]
        out += ["", f"bfloat16 vs float32 on trained students (`benchmarks/amp_quality.py`, `benchmarks/results/amp_quality.json`: "
                f"vanilla, {st['train_limit']:,} images, {st['epochs']} epochs, seeds {st['seeds']}, paired by seed, "
                f"bfloat16 - float32, mean [95% t-interval]): ID test accuracy {f(p['id_accuracy'])}, {sc}; "
                f"an epoch {amp['epoch_speedup_bf16']['mean']:.2f}x faster ({amp['machine'].split(', ')[-1]}, load average "
                f"{amp['loadavg_1min_at_start']:.2f} at the start)."]
    return out


def eval_section(d: Dict[str, Any]) -> List[str]:
    prof = d["profile_seconds"]
    per = prof["per_score"]
    model_scores = [s for s in per if s in ("odin", "gram")]
    feat = sum(v["fit"] + v["score"] + v["metrics"] for s, v in per.items() if s not in model_scores)
    model = sum(v["fit"] + v["score"] + v["metrics"] for s, v in per.items() if s in model_scores)
    total = d["wall_seconds"]
    each = ", ".join(f"{s.upper()} {sum(per[s].values()):.1f}" for s in model_scores)
    return [f"**Evaluation** (`benchmarks/eval_profile.py`, `benchmarks/results/eval_profile.json`; {d['checkpoint']}, "
            f"the default {len(per)} scores): {total:.0f} s in all; feature extraction {sum(prof['features'].values()):.1f} s; "
            f"the {len(per) - len(model_scores)} feature scores' fit + score + metrics {feat:.1f} s ({100 * feat / total:.1f}% of the "
            f"evaluation); {' and '.join(s.upper() for s in model_scores)}, which pass images through the model "
            f"again, {model:.1f} s ({each}); fit + score + metrics of all {len(per)} scores {100 * d['scoring_fraction']:.1f}% "
            f"(goal < 10%: {'met' if d['met'] else 'not met'}); plots {prof.get('plots', 0):.1f} s."]


# ------------------------------------------------------------------------------------ paired

# the benchmarks quoted in "Does OAML help?": (bench, display name -> name in the JSON where a
# method was renamed after its grid, the row of the method that is `oaml` today). The fmnist grid of
# 2026-12-02 ran today's `oaml` (outlier ratio 0.25); the fmnist-openset grid of 2026-12-01 ran it at
# ratio 0.5, its default then (today's `oaml` there: the outlier-ratio grid, RATIO_RENAMES).
BENCHES = (
    ("fmnist", {}, "oaml"),
    ("fmnist-openset", {"oaml at ratio 0.5": "oaml"}, "oaml at ratio 0.5"),
)
HEADLINES = tuple(headline for _, _, headline in BENCHES)
# the OAML variants shown on fmnist's OOD-val (what settings are chosen on)
CANDIDATES = ("oaml", "oaml-kdoe", "oaml-crd")


def _ci(d: Optional[Dict[str, Any]]) -> str:
    if not d or d.get("mean") is None:
        return "-"
    txt = f"{d['mean']:+.1f}" + (f" [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d.get("ci95") else "")
    return f"**{txt}**" if d.get("excludes_zero") else txt


def _label(display: str, renames: Dict[str, str]) -> str:
    name = f"**{display}**" if display == "oaml" else display
    ran = renames.get(display, display)
    return name + (f" (run as `{ran}`)" if ran != display else "")


def _order(methods: List[str]) -> List[str]:
    """oaml (or the full grids' row of it) first, then its variants and ablations, then the baselines,
    each in the grid's order."""
    first = [m for m in methods if m in HEADLINES]
    own = [m for m in methods if m.startswith("oaml") and m not in first]
    return first + own + [m for m in methods if not m.startswith("oaml")]


def paired_section(bench: str, d: Dict[str, Any], renames: Dict[str, str], title: Optional[str] = None,
                   headline: str = "oaml") -> List[str]:
    ref = d["paired"]["delta_vs"]
    back = {v: k for k, v in renames.items()}  # JSON name -> display name
    shown = {back.get(m, m): m for m in d["paired"]["methods"] if m not in ("vanilla", ref)}
    out = [f"**{title or f'`{bench}`'}** (paired differences to `{ref}`, percentage points, mean [95% t-interval]; bold: the interval excludes 0)",
           "",
           "| method | n | ID acc Δ | EBO ΔAUROC | EBO ΔFPR@95 | GEN ΔAUROC | EBO ΔAUROC, OE-disjoint sets | EBO ΔAUROC, near sets |",
           "|---|---|---|---|---|---|---|---|"]
    for disp in _order(list(shown)):
        m = d["paired"]["methods"][shown[disp]]
        ebo, gen = m["scores"]["ebo"], m["scores"]["gen"]
        out.append(f"| {_label(disp, renames)} | {m['id_accuracy']['n']} | {_ci(m['id_accuracy'])} | {_ci(ebo['all']['auroc'])} "
                   f"| {_ci(ebo['all']['fpr95'])} | {_ci(gen['all']['auroc'])} | {_ci(ebo.get('oe_disjoint', {}).get('auroc'))} "
                   f"| {_ci(ebo.get('near', {}).get('auroc'))} |")
    meth = d["methods"]
    ours = meth.get(renames.get(headline, headline))
    base = meth.get(ref)
    if ours and base:
        a = lambda x: x["scores"]["ebo"]["all"]["auroc"]  # noqa: E731
        line = (f"Absolute, all OOD sets: `{ref}` EBO AUROC {a(base)['mean']:.1f} ± {a(base)['std']:.1f}, `{headline}` "
                f"{a(ours)['mean']:.1f} ± {a(ours)['std']:.1f} (n = {a(ours)['n']}), ID accuracy {base['id_accuracy']['mean']:.2f} vs "
                f"{ours['id_accuracy']['mean']:.2f}")
        t = d.get("teacher")
        if t:
            line += (f"; the teacher as a detector on its own features (the ceiling, n = 1): EBO AUROC {a(t)['mean']:.1f}, "
                     f"ID accuracy {t['id_accuracy']['mean']:.2f}")
        tm = d.get("teacher_margin")
        if tm:
            v = tm["vanilla_val_accuracy"]
            line += (f"; on ID val the teacher ({tm['teacher_val_accuracy']:.2f}%) is {tm['margin']:+.2f} points above the converged "
                     f"vanilla student ({v['mean']:.2f} ± {v['std']:.2f}%, epoch {tm['vanilla_epoch']})")
        out += ["", line + "."]
    return out


def ood_val_section(bench: str, d: Dict[str, Any], renames: Dict[str, str]) -> List[str]:
    ref = d["paired"]["delta_vs"]
    out = [f"**`{bench}`, OOD-val only** (paired to `{ref}`; OOD-val is what settings are chosen on, never the test sets)", "",
           "| candidate | n | EBO ΔAUROC, all OOD-val sets | EBO ΔAUROC, OE-disjoint OOD-val | EBO ΔFPR@95, all OOD-val | ID acc Δ |",
           "|---|---|---|---|---|---|"]
    for disp in CANDIDATES:
        m = d["paired"]["methods"].get(renames.get(disp, disp))
        if not m or "ood_val" not in m:
            continue
        v = m["ood_val"]["ebo"]
        out.append(f"| {_label(disp, renames)} | {m['id_accuracy']['n']} | {_ci(v['all']['auroc'])} "
                   f"| {_ci(v.get('oe_disjoint', {}).get('auroc'))} | {_ci(v['all']['fpr95'])} | {_ci(m['id_accuracy'])} |")
    return out


# the outlier-ratio grids (configs/bench/*-ratio.yaml): display name -> name in the JSON
RATIO_BENCHES = ("fmnist", "fmnist-openset")
RATIO_RENAMES = {"oaml": "oaml-oe-r025", "oaml at ratio 0.5": "oaml-oe-r050"}


def contrast_section(rows: List[tuple]) -> List[str]:
    """Paired a − b rows (bench, display label, contrast entry of a results.json): test and OOD-val."""
    out = ["| benchmark | contrast | n | ID acc Δ | EBO ΔAUROC | EBO ΔAUROC, OE-disjoint sets | EBO ΔAUROC, OOD-val | "
           "EBO ΔAUROC, OE-disjoint OOD-val |", "|---|---|---|---|---|---|---|---|"]
    for bench, label, c in rows:
        ebo, val = c["scores"]["ebo"], c.get("ood_val", {}).get("ebo", {})
        out.append(f"| `{bench}` | {label} | {c['id_accuracy']['n']} | {_ci(c['id_accuracy'])} | {_ci(ebo['all']['auroc'])} "
                   f"| {_ci(ebo.get('oe_disjoint', {}).get('auroc'))} | {_ci(val.get('all', {}).get('auroc'))} "
                   f"| {_ci(val.get('oe_disjoint', {}).get('auroc'))} |")
    return out


def render_ratio() -> str:
    parts: List[List[str]] = []
    back = {v: k for k, v in RATIO_RENAMES.items()}
    contrasts = []
    for bench in RATIO_BENCHES:
        d = _load(f"{bench}-ratio.json")
        if d is None:
            parts.append([f"Not measured yet: {bench}-ratio.json."])
            continue
        parts.append(paired_section(bench, d, RATIO_RENAMES, title=f"`{bench}`, outlier-ratio grid"))
        contrasts += [(bench, f"{back.get(c['a'], c['a'])} − {back.get(c['b'], c['b'])}", c) for c in d.get("contrasts", [])]
    if contrasts:
        parts.append(["**Contrasts** (paired per-seed differences a − b in the same grids; the first row per benchmark is "
                      "the selection rule's, on OOD-val)", ""] + contrast_section(contrasts))
    return _block("ratio", parts)


def render_paired() -> str:
    parts: List[List[str]] = []
    for bench, renames, headline in BENCHES:
        d = _load(f"{bench}.json")
        parts.append(paired_section(bench, d, renames, headline=headline) if d else [f"Not measured yet: {bench}.json."])
    d = _load("fmnist.json")
    if d:
        parts.append(ood_val_section("fmnist", d, BENCHES[0][1]))
    return _block("paired", parts)


# ------------------------------------------------------------------------------------ README


def render_perf() -> str:
    parts: List[List[str]] = []
    missing = []
    for name, fn in (("scores.json", scores_section), ("knn_sampling.json", knn_section)):
        d = _load(name)
        if d is None:
            missing.append(name)
        else:
            parts.append(fn(d))
    step, speed, amp = _load("train_step.json"), _load("train_step_speed.json"), _load("amp_quality.json")
    missing += [n for n, d in (("train_step.json", step), ("train_step_speed.json", speed), ("amp_quality.json", amp)) if d is None]
    if step or speed or amp:
        parts.append(training_section(step, speed, amp))
    ev = _load("eval_profile.json")
    if ev is None:
        missing.append("eval_profile.json")
    else:
        parts.append(eval_section(ev))
    if missing:
        parts.append([f"Not measured yet: {', '.join(missing)}."])
    return _block("perf", parts)


BLOCKS = {"paired": render_paired, "ratio": render_ratio, "perf": render_perf}


def block_of(text: str, name: str) -> str:
    """The ``name`` block of a README text, markers included (ValueError if it has none)."""
    start, end = _markers(name)
    if start not in text or end not in text:
        raise ValueError(f"README.md has no {start} ... {end} block: add the two markers where the section goes")
    return text[text.index(start): text.index(end) + len(end)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="replace the blocks in README.md")
    args = ap.parse_args()
    blocks = {name: fn() for name, fn in BLOCKS.items()}
    if not args.write:
        print("\n\n".join(blocks.values()))
        return 0
    readme = ROOT / "README.md"
    s = readme.read_text()
    for name, text in blocks.items():
        try:
            s = s.replace(block_of(s, name), text)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    readme.write_text(s)
    print(f"wrote the {', '.join(blocks)} blocks of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
