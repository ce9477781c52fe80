"""A study's report: means and spreads over seeds, paired differences with intervals, plots, HTML and JSON.

Every comparison is paired by seed: a run and its matched control share the
seed (weights' initialisation, augmentations, batch order), so their
difference on each seed is one sample, and the interval is Student's t at 95 %
over those samples (none with one seed).
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_json
from .plan import EvalSet, StudyConfig

#: The comparisons read from each method and pair set: the run minus its control, both on the same seed.
COMPARISONS = (("semantic", "augment"), ("both", "augment"), ("both", "semantic"))
#: The supervised run (same backbone, pictures and epochs) minus each pair set's ``augment``, paired by seed: the
#: labels' own lead over the control at this budget, which bounds what any pairs can add to it.
SUPERVISED_LEAD = "supervised - augment"
#: The supervised runs' key among the runs (kind, pair set, method, mode, self-pair rate).
SUPERVISED_KEY = ("supervised", None, "supervised", "labels", 0.0)


def metric_names(cfg: StudyConfig) -> list[str]:
    return [f"knn@{k}" for k in cfg.ks] + ["linear"]


def value(evaluation: dict[str, Any], metric: str, pixels: bool = False) -> float:
    if metric == "linear":
        return evaluation["pixel_linear_top1" if pixels else "linear_top1"]
    k = metric.split("@", 1)[1]
    return evaluation["pixel_knn_top1_at" if pixels else "knn_top1_at"][k]


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, standard deviation over seeds (n - 1), and the 95 % t-interval of the mean."""
    n = len(values)
    mean = float(np.mean(values)) if n else float("nan")
    std = float(np.std(values, ddof=1)) if n > 1 else None
    low = high = None
    if n > 1:
        from scipy.stats import t

        half = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        low, high = mean - half, mean + half
    return {"mean": mean, "std": std, "n": n, "low": low, "high": high, "values": [float(v) for v in values]}


def summarise(cfg: StudyConfig, releases: dict[str, dict[str, Any]], runs: list[dict[str, Any]],
              eval_sets: list[EvalSet]) -> dict[str, Any]:
    metrics = metric_names(cfg)
    by = defaultdict(dict)  # (kind, pair_set, method, mode, self_pairs) -> seed -> record
    for r in runs:
        by[(r["kind"], r["pair_set"], r["method"], r["mode"], r["self_pairs"])][r["seed"]] = r
    table, paired, references, ablations = [], [], {}, []

    def values(key, set_name, metric, seeds=None):
        found = by.get(key, {})
        return {s: value(found[s]["evals"][set_name], metric) for s in sorted(found) if seeds is None or s in seeds}

    def difference(run_key, control_key, set_name, metric):
        a = values(run_key, set_name, metric)
        b = values(control_key, set_name, metric)
        common = sorted(set(a) & set(b))
        return spread([a[s] - b[s] for s in common])

    for es in eval_sets:
        name = es.name
        any_run = next((r for r in runs if name in r["evals"]), None)
        refs: dict[str, Any] = {"raw_pixels": {m: value(any_run["evals"][name], m, pixels=True) for m in metrics}
                                if any_run else {}}
        refs["single"] = {m: {metric: spread(list(values(("single", None, m, "augment", 0.0), name, metric).values()))
                              for metric in metrics} for m in cfg.methods if ("single", None, m, "augment", 0.0) in by}
        if SUPERVISED_KEY in by:
            refs["supervised"] = {metric: spread(list(values(SUPERVISED_KEY, name, metric).values()))
                                  for metric in metrics}
        references[name] = refs
        for pair_set in (p for p in releases if p in ("sampler", "label")):
            for method in cfg.methods:
                for mode in cfg.modes:
                    key = ("pairs", pair_set, method, mode, 0.0)
                    if key in by:
                        table.append({"eval": name, "pair_set": pair_set, "method": method, "mode": mode,
                                      **{metric: spread(list(values(key, name, metric).values()))
                                         for metric in metrics}})
                for run_mode, control in COMPARISONS:
                    run_key, control_key = (("pairs", pair_set, method, m, 0.0) for m in (run_mode, control))
                    if run_key in by and control_key in by:
                        paired.append({"eval": name, "pair_set": pair_set, "method": method,
                                       "comparison": f"{run_mode} - {control}",
                                       **{metric: difference(run_key, control_key, name, metric)
                                          for metric in metrics}})
                augment_key = ("pairs", pair_set, method, "augment", 0.0)
                if SUPERVISED_KEY in by and augment_key in by:
                    paired.append({"eval": name, "pair_set": pair_set, "method": method,
                                   "comparison": SUPERVISED_LEAD,
                                   **{metric: difference(SUPERVISED_KEY, augment_key, name, metric)
                                      for metric in metrics}})
        for ablation in cfg.ablations:
            chosen = [r for r in runs if r["ablation"] == ablation]
            if not chosen:
                continue
            r0 = chosen[0]
            both_key = ("pairs", r0["pair_set"], r0["method"], "both", r0["self_pairs"])
            own_control = ("pairs", r0["pair_set"], r0["method"], "augment", 0.0)
            base = base_of(r0["pair_set"])
            control = own_control if own_control in by else ("pairs", base, r0["method"], "augment", 0.0)
            ablations.append({"eval": name, "ablation": ablation, "pair_set": r0["pair_set"], "method": r0["method"],
                              **{metric: {"gain": difference(both_key, control, name, metric),
                                          "against_plain_both": difference(both_key,
                                                                           ("pairs", base, r0["method"], "both",
                                                                            0.0), name, metric)}
                                 for metric in metrics}})
    return {"metrics": metrics, "table": table, "paired": paired, "references": references, "ablations": ablations}


def base_of(pair_set: str) -> str:
    return "label" if pair_set.startswith("label") else "sampler"


def write_report(folder: Path, cfg: StudyConfig, releases: dict[str, dict[str, Any]], runs: list[dict[str, Any]],
                 eval_sets: list[EvalSet]) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarise(cfg, releases, runs, eval_sets)
    steps = sorted({(r["kind"], r["steps"]) for r in runs})
    budget = ("matched in steps within each pair set: augment, semantic and both take the same batches of the "
              "same anchors for the same epochs (both sees three views a step, the others two); single-image and "
              "supervised runs take the same epochs over every picture: steps " +
              ", ".join(f"{kind} {n:,}" for kind, n in steps))
    study = {"settings": cfg.settings(), "budget": budget, "releases": list(releases.values()),
             "eval_sets": [e.__dict__ for e in eval_sets], **summary, "runs": runs}
    figures = _plots(folder, cfg, study, eval_sets)
    write_json(folder / "study.json", study)
    (folder / "index.html").write_text(_html(cfg, study, figures, eval_sets))
    study["report"] = str(folder / "index.html")
    return study


def _label(pair_set: str, mode: str) -> str:
    return f"{mode} ({pair_set} pairs)"


def _plots(folder: Path, cfg: StudyConfig, study: dict[str, Any], eval_sets: list[EvalSet]) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, list[str]] = {}
    for n, es in enumerate(eval_sets):
        names = []
        rows = [r for r in study["table"] if r["eval"] == es.name]
        groups = list(dict.fromkeys((r["pair_set"], r["mode"]) for r in rows))
        refs = study["references"][es.name]
        for metric in (study["metrics"][0], "linear"):
            fig, (ax, gx) = plt.subplots(1, 2, figsize=(11, 5), dpi=100)
            width = 0.8 / max(len(groups), 1)
            for g, (pair_set, mode) in enumerate(groups):
                xs, ys, es_ = [], [], []
                for i, method in enumerate(cfg.methods):
                    row = next((r for r in rows if (r["pair_set"], r["mode"], r["method"]) == (pair_set, mode, method)),
                               None)
                    if row:
                        xs.append(i - 0.4 + width * (g + 0.5))
                        ys.append(row[metric]["mean"])
                        es_.append(row[metric]["std"] or 0.0)
                ax.bar(xs, ys, width, yerr=es_, capsize=2, label=_label(pair_set, mode))
            if metric in refs.get("raw_pixels", {}):
                ax.axhline(refs["raw_pixels"][metric], color="black", linestyle="--", linewidth=1, label="raw pixels")
            if "supervised" in refs:
                ax.axhline(refs["supervised"][metric]["mean"], color="grey", linestyle=":", linewidth=1.5,
                           label="supervised")
            for i, method in enumerate(cfg.methods):
                single = refs.get("single", {}).get(method)
                if single:
                    ax.plot([i - 0.4, i + 0.4], [single[metric]["mean"]] * 2, color="black", linestyle="-.",
                            linewidth=1.5, label="single images" if i == 0 else None)
            lows = [r[metric]["mean"] for r in rows] + list(refs.get("raw_pixels", {}).values())
            if lows:
                ax.set_ylim(max(0.0, min(lows) - 0.1), min(1.0, max(lows) + 0.05))
            ax.set_xticks(range(len(cfg.methods)), cfg.methods)
            ax.set_ylabel(f"top-1 ({metric})")
            ax.set_title(f"{es.name}: {metric}, mean and std over seeds", fontsize=10)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
            comps = [p for p in study["paired"] if p["eval"] == es.name]
            kinds = list(dict.fromkeys((p["pair_set"], p["comparison"]) for p in comps))
            for c, (pair_set, comparison) in enumerate(kinds):
                for i, method in enumerate(cfg.methods):
                    p = next((p for p in comps if (p["pair_set"], p["comparison"], p["method"]) ==
                              (pair_set, comparison, method)), None)
                    if p is None:
                        continue
                    d = p[metric]
                    x = i - 0.3 + 0.6 * (c + 0.5) / max(len(kinds), 1)
                    err = None if d["low"] is None else [[100 * (d["mean"] - d["low"])], [100 * (d["high"] - d["mean"])]]
                    gx.errorbar([x], [100 * d["mean"]], yerr=err, fmt="o", capsize=3, color=f"C{c}",
                                label=f"{comparison} ({pair_set})" if i == 0 else None)
            gx.axhline(0, color="black", linewidth=0.8)
            gx.set_xticks(range(len(cfg.methods)), cfg.methods)
            gx.set_ylabel("points, paired by seed")
            gx.set_title("differences with 95 % intervals", fontsize=10)
            if kinds:
                gx.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
            fig.tight_layout()
            name = f"study-{n}-{metric.replace('@', '-at-')}.png"
            fig.savefig(folder / name)
            plt.close(fig)
            names.append(name)
        figures[es.name] = names
    return figures


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ms(s: dict[str, Any]) -> str:
    return _f(s["mean"]) + ("" if s["std"] is None else f" ± {s['std']:.4f}")


def _diff(s: dict[str, Any]) -> str:
    if s["n"] == 0:
        return "-"
    text = f"{100 * s['mean']:+.2f}"
    if s["low"] is not None:
        text += f" [{100 * s['low']:+.2f}, {100 * s['high']:+.2f}]"
    return text


def _above(s: dict[str, Any]) -> str:
    return f"{sum(v > 0 for v in s['values'])}/{s['n']}"


def _html(cfg: StudyConfig, study: dict[str, Any], figures: dict[str, list[str]], eval_sets: list[EvalSet]) -> str:
    e = html.escape
    metrics = study["metrics"]
    parts = [f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Study: {e(cfg.source)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f4f4f4}}td:first-child,th:first-child,td.text{{text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>Semantic pairs against their matched controls: {e(cfg.source)}</h1>
<p>{len(study['runs'])} runs: {e(', '.join(cfg.methods))} &times; {e(', '.join(cfg.modes))} &times; {cfg.seeds} seed(s),
{cfg.backbone} at {cfg.image_size} px, {cfg.epochs} epochs, batch {cfg.batch_size}; evaluated by weighted kNN
(k = {e(', '.join(map(str, cfg.ks)))}) and a linear probe on {e(', '.join(s.name for s in eval_sets))}.</p>
<p><b>Budget:</b> {e(study['budget'])}.</p>
<p><b>Control:</b> <code>augment</code> trains on the same release's anchors with the partner unused (two augmentations of each
anchor), so it has the same pictures' class histogram and the same number of pairs and steps as <code>semantic</code> and
<code>both</code>; differences are paired by seed (same initialisation, augmentations and batch order).</p>
<h2>Releases</h2><table><tr><th>pair set</th><th>what</th><th>pairs</th><th>anchors</th><th>precision (labels)</th>
<th>false-neighbour rate</th></tr>"""]
    for r in study["releases"]:
        parts.append(f"<tr><td>{e(r['name'])}</td><td class='text'>{e(r['what'])}</td><td>{r['pairs']:,}</td>"
                     f"<td>{r['anchors']:,}</td><td>{_f(r['precision'])}</td><td>{_f(r['false_neighbour_rate'])}</td></tr>")
    parts.append("</table>")
    for es in eval_sets:
        refs = study["references"][es.name]
        parts.append(f"<h2>Evaluated on {e(es.name)}</h2>")
        for name in figures.get(es.name, []):
            parts.append(f'<p><img src="{e(name)}" alt="{e(es.name)} results"></p>')
        parts.append("<table><tr><th>run</th>" + "".join(f"<th>{e(m)}</th>" for m in metrics) + "</tr>")
        for row in (r for r in study["table"] if r["eval"] == es.name):
            parts.append(f"<tr><td>{e(row['method'])} {e(_label(row['pair_set'], row['mode']))}</td>" +
                         "".join(f"<td>{_ms(row[m])}</td>" for m in metrics) + "</tr>")
        for method, s in refs.get("single", {}).items():
            parts.append(f"<tr><td>{e(method)} on single images (reference)</td>" +
                         "".join(f"<td>{_ms(s[m])}</td>" for m in metrics) + "</tr>")
        if "supervised" in refs:
            parts.append("<tr><td>supervised, same backbone and budget (reference)</td>" +
                         "".join(f"<td>{_ms(refs['supervised'][m])}</td>" for m in metrics) + "</tr>")
        if refs.get("raw_pixels"):
            parts.append("<tr><td>raw pixels (reference)</td>" +
                         "".join(f"<td>{_f(refs['raw_pixels'][m])}</td>" for m in metrics) + "</tr>")
        parts.append("</table><h3>Paired differences (points; 95 % interval over seeds; seeds above zero)</h3><table>"
                     "<tr><th>method</th><th>pair set</th><th>false-neighbour rate</th><th>comparison</th>" +
                     "".join(f"<th>{e(m)}</th>" for m in metrics) + "</tr>")
        rates = {r["name"]: r["false_neighbour_rate"] for r in study["releases"]}
        for p in (p for p in study["paired"] if p["eval"] == es.name):
            parts.append(f"<tr><td>{e(p['method'])}</td><td>{e(p['pair_set'])}</td><td>{_f(rates.get(p['pair_set']))}"
                         f"</td><td>{e(p['comparison'])}</td>" +
                         "".join(f"<td>{_diff(p[m])} ({_above(p[m])})</td>" for m in metrics) + "</tr>")
        parts.append("</table>")
        if any(p["comparison"] == SUPERVISED_LEAD for p in study["paired"] if p["eval"] == es.name):
            parts.append(f"<p><code>{SUPERVISED_LEAD}</code> is the supervised run (labels, same backbone, pictures and "
                         "epochs) against the same control: what the labels themselves add at this budget, which no "
                         "pairs, label pairs included, can be expected to pass.</p>")
        chosen = [a for a in study["ablations"] if a["eval"] == es.name]
        if chosen:
            parts.append("<h3>Ablations (both minus its matched augment; and minus the plain both)</h3><table><tr>"
                         "<th>ablation</th><th>method</th>" + "".join(f"<th>{e(m)} gain</th><th>{e(m)} vs plain</th>"
                                                                    for m in metrics) + "</tr>")
            for a in chosen:
                parts.append(f"<tr><td>{e(a['ablation'])}</td><td>{e(a['method'])}</td>" +
                             "".join(f"<td>{_diff(a[m]['gain'])}</td><td>{_diff(a[m]['against_plain_both'])}</td>"
                                     for m in metrics) + "</tr>")
            parts.append("</table>")
    parts.append("<p>The numbers behind this page: <a href=\"study.json\">study.json</a>.</p></body></html>")
    return "\n".join(parts)
