"""Seeds -> curves with 95% intervals, the issue's targets, the JSON and the figure.

Every number is a mean over seeds with a t interval over seeds (each seed is one
independent user stream; impressions within a seed are not independent, so they are
averaged first). A target holds when its mean passes; the interval says how sure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from codistill.app.experiment.run import BM25, FROZEN, TEACHER, SeedRun

WINDOW = 1000  # impressions of the "first 1,000" / "last 1,000 before the switch" targets
KD_FB, FB, KD = "kd+feedback", "feedback", "kd"


def interval(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, 95% t interval over seeds (None with one seed) and n."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if not len(x):
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(len(x))}


def _mean(x: np.ndarray, keep: np.ndarray) -> float:
    return float(x[keep].mean()) if keep.any() else math.nan


def phases(run: SeedRun) -> dict[str, np.ndarray]:
    """Boolean masks over impressions: all, before / after the switch."""
    n = len(run.first_seen)
    idx = np.arange(n)
    switch = run.switch_after if run.switch_after is not None else n
    return {"all": idx >= 0, "before": idx < switch, "after": idx >= switch}


def targets(runs: Sequence[SeedRun], first_seen: bool = False) -> dict[str, Any]:
    """The issue's three targets (and the distilled-start ratio), per seed then over seeds."""
    rows: dict[str, list[float]] = {k: [] for k in (
        "after_switch_kdfb_over_teacher", "auc1000_scratch_kdfb_over_feedback",
        "auc1000_distilled_kdfb_over_feedback", "last1000_scratch_kd_over_teacher")}
    for run in runs:
        n = len(run.first_seen)
        sel = run.first_seen if first_seen else np.ones(n, dtype=bool)
        switch = run.switch_after if run.switch_after is not None else n
        idx = np.arange(n)
        nd = run.ndcg
        after = sel & (idx >= switch)
        rows["after_switch_kdfb_over_teacher"].append(
            _ratio(nd, f"distilled/{KD_FB}", TEACHER, after))
        first = sel & (idx < min(WINDOW, n))
        for start in ("scratch", "distilled"):
            rows[f"auc1000_{start}_kdfb_over_feedback"].append(
                _ratio(nd, f"{start}/{KD_FB}", f"{start}/{FB}", first))
        last = sel & (idx >= max(0, switch - WINDOW)) & (idx < switch)
        rows["last1000_scratch_kd_over_teacher"].append(
            _ratio(nd, f"scratch/{KD}", TEACHER, last))
    thresholds = {"after_switch_kdfb_over_teacher": 1.10,
                  "auc1000_scratch_kdfb_over_feedback": 2.0,
                  "auc1000_distilled_kdfb_over_feedback": None,
                  "last1000_scratch_kd_over_teacher": 0.90}
    out: dict[str, Any] = {}
    for name, values in rows.items():
        ci = interval(values)
        need = thresholds[name]
        out[name] = {**ci, "target": need, "per_seed": values,
                     "holds": None if need is None or ci["mean"] is None else ci["mean"] >= need}
    return out


def _ratio(nd: dict[str, np.ndarray], a: str, b: str, keep: np.ndarray) -> float:
    """Mean NDCG (the area under the curve, per impression) of arm ``a`` over arm ``b``."""
    if a not in nd or b not in nd or not keep.any():
        return math.nan
    den = _mean(nd[b], keep)
    return _mean(nd[a], keep) / den if den > 0 else math.nan


def curves(runs: Sequence[SeedRun], bin_size: int, metric: str = "ndcg",
           first_seen: bool = False) -> dict[str, Any]:
    """Per arm: the bin means over seeds with their 95% bands, x = bin end (impressions)."""
    n = len(runs[0].first_seen)
    edges = list(range(0, n, bin_size)) + [n]
    out: dict[str, Any] = {"x": edges[1:], "arms": {}}
    for arm in getattr(runs[0], metric):
        mean, low, high, count = [], [], [], []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            per_seed = []
            for run in runs:
                keep = np.zeros(n, dtype=bool)
                keep[lo:hi] = True
                if first_seen:
                    keep &= run.first_seen
                per_seed.append(_mean(getattr(run, metric)[arm], keep))
            ci = interval(per_seed)
            mean.append(ci["mean"])
            low.append(ci["low"])
            high.append(ci["high"])
            count.append(ci["n"])
        out["arms"][arm] = {"mean": mean, "low": low, "high": high, "seeds": count}
    return out


def phase_table(runs: Sequence[SeedRun], first_seen: bool = False) -> dict[str, Any]:
    """Per arm and phase: mean NDCG@10 and MRR over seeds, with intervals."""
    table: dict[str, Any] = {}
    for arm in runs[0].ndcg:
        table[arm] = {}
        for phase in ("before", "after", "all"):
            for metric in ("ndcg", "rr"):
                values = []
                for run in runs:
                    keep = phases(run)[phase] & (run.first_seen if first_seen else True)
                    values.append(_mean(getattr(run, metric)[arm], keep))
                table[arm][f"{metric}_{phase}"] = interval(values)
    return table


STYLE = {TEACHER: ("black", "-"), BM25: ("grey", ":"), FROZEN: ("tab:purple", "--"),
         "distilled/kd+feedback": ("tab:red", "-"), "distilled/kd": ("tab:blue", "-"),
         "distilled/feedback": ("tab:green", "-"), "scratch/kd+feedback": ("tab:red", "--"),
         "scratch/kd": ("tab:blue", "--"), "scratch/feedback": ("tab:green", "--"),
         "stack/kd+feedback": ("tab:orange", "-.")}


def plot(result: dict[str, Any], path: Path) -> Path:
    """NDCG@10 and gold MRR over impressions (bands: 95% over seeds); the gain curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result.get("strength_sweep") or []
    cols = 3 if sweep else 2
    fig, axes = plt.subplots(1, cols, figsize=(6.2 * cols, 4.6))
    switch = result["config"]["switch_after"]
    for ax, (metric, label) in zip(axes, (("ndcg", "NDCG@10 (true grades)"),
                                          ("rr", "MRR@10 of the gold")), strict=False):
        c = result["curves"][metric]
        for arm, series in c["arms"].items():
            color, ls = STYLE.get(arm, (None, "-"))
            y = np.array(series["mean"], dtype=float)
            ax.plot(c["x"], y, ls, color=color, label=arm, lw=1.6)
            lo = np.array([np.nan if v is None else v for v in series["low"]], dtype=float)
            hi = np.array([np.nan if v is None else v for v in series["high"]], dtype=float)
            ax.fill_between(c["x"], lo, hi, color=color, alpha=0.12, lw=0)
        if switch is not None:
            ax.axvline(switch, color="k", lw=0.8, ls="-.")
            ax.text(switch, ax.get_ylim()[0], " drift switch", fontsize=8, va="bottom")
        ax.set_xlabel("impressions")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2, loc="lower right")
    if sweep:
        ax = axes[2]
        xs = [p["strength"] for p in sweep]
        g = [p["gain_after_switch"] for p in sweep]
        ax.errorbar(xs, [v["mean"] for v in g],
                    yerr=[[v["mean"] - (v["low"] if v["low"] is not None else v["mean"]) for v in g],
                          [(v["high"] if v["high"] is not None else v["mean"]) - v["mean"]
                           for v in g]], marker="o", capsize=3)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("preference strength")
        ax.set_ylabel("kd+feedback / teacher NDCG@10 after the switch")
        ax.grid(alpha=0.3)
    cfg = result["config"]
    fig.suptitle(f"online experiment: {cfg['click_model']} clicks, strength {cfg['strength']}, "
                 f"{cfg['preference']} -> {cfg['switch_to']}, {cfg['seeds']} seeds "
                 f"(size {result['data']['size']})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
