"""``codistill monitor snapshot``: the Grafana dashboard's panels as one PNG, no Grafana.

The dashboard file (``deploy/grafana/dashboards/codistill.json``, provisioned into
Grafana by docker-compose) is the single source of the monitoring queries: every
panel is plain ``codistill_*`` PromQL with ``[1m]`` windows (no recording rules, no
template variables), so this module can run the same queries against any Prometheus
through its HTTP API and draw them with matplotlib: a record of a run that needs no
browser, and a check that the dashboard's queries still return data.

The default dashboard is found relative to this file (``parents[2]`` of
``codistill/app/monitor.py`` is the repository root), i.e. it works from a source
checkout or an editable install; pass ``dashboard=`` / ``--dashboard`` otherwise.
Every PNG is written with a JSON file of the same stem holding the data it was drawn
from (figures only with the result file they come from).
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from codistill import console as cli

DEFAULT_DASHBOARD = (Path(__file__).resolve().parents[2]
                     / "deploy" / "grafana" / "dashboards" / "codistill.json")
_BY_VERSION = re.compile(r"\bby\s*\([^)]*\bmodel_version\b")
_LEGEND_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_ANNOTATION_COLORS = ("tab:orange", "tab:purple", "tab:red", "tab:cyan")


@dataclass(frozen=True)
class PanelQuery:
    """One target of one dashboard panel."""

    panel_id: int
    title: str
    expr: str
    legend: str
    grouped_by_version: bool
    panel_type: str = "timeseries"


@dataclass(frozen=True)
class AnnotationQuery:
    """A Prometheus annotation of the dashboard: an event wherever ``expr`` has samples."""

    name: str
    expr: str


@dataclass
class SnapshotResult:
    """What :func:`snapshot` wrote, and the per-panel summary it wrote into ``json_path``."""

    png_path: Path
    json_path: Path
    panels: list[dict[str, Any]] = field(default_factory=list)

    @property
    def series_counts(self) -> dict[int, int]:
        """Series returned per panel id (all targets together)."""
        return {p["id"]: p["series"] for p in self.panels}


class PrometheusError(RuntimeError):
    """Prometheus unreachable, or it answered a query with ``status != success``."""


def load_dashboard(path: Path | str | None = None) -> dict[str, Any]:
    """The dashboard JSON (default :data:`DEFAULT_DASHBOARD`)."""
    return json.loads(Path(path or DEFAULT_DASHBOARD).read_text(encoding="utf-8"))


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Non-row panels in order, including those inside collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            found.extend(p for p in panel.get("panels", []) if p.get("type") != "row")
        else:
            found.append(panel)
    return found


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every panel target that has an ``expr``, in dashboard order."""
    queries = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr:
                continue
            legend = target.get("legendFormat") or ""
            grouped = bool(_BY_VERSION.search(expr)) or "model_version" in _LEGEND_VAR.findall(legend)
            queries.append(PanelQuery(int(panel["id"]), str(panel.get("title", "")), expr, legend,
                                      grouped, str(panel.get("type", "timeseries"))))
    return queries


def annotation_queries(dashboard: dict[str, Any]) -> list[AnnotationQuery]:
    """The enabled annotations backed by a PromQL ``expr`` (not Grafana's built-in one)."""
    return [AnnotationQuery(str(a.get("name", "")), a["expr"])
            for a in dashboard.get("annotations", {}).get("list", [])
            if a.get("expr") and a.get("enable", True)]


def format_legend(legend: str, labels: dict[str, str]) -> str:
    """Grafana's ``legendFormat``: ``{{label}}`` replaced (missing: empty); none: the series.

    >>> format_legend("p99 {{ model_version }}", {"model_version": "b1"})
    'p99 b1'
    >>> format_legend("", {"__name__": "up", "job": "j"})
    'up{job="j"}'
    """
    if legend:
        return _LEGEND_VAR.sub(lambda m: labels.get(m.group(1), ""), legend).strip()
    rest = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return f"{labels.get('__name__', '')}{{{rest}}}" if rest else labels.get("__name__", "{}")


class PrometheusClient:
    """The two calls of the Prometheus HTTP API the snapshot needs (stdlib only)."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url, self.timeout = base_url.rstrip("/"), timeout

    def _get(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # a bad query: 400/422 with a JSON error body
            try:
                body = json.load(exc)
            except ValueError:
                raise PrometheusError(f"Prometheus {self.base_url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PrometheusError(f"cannot reach Prometheus at {self.base_url}: {reason}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"Prometheus rejected {params.get('query')!r}: "
                                  f"{body.get('errorType', 'error')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self._get("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float,
                    step: float) -> list[dict[str, Any]]:
        """Range query: ``[{"metric": {...}, "values": [[t, "v"], ...]}, ...]``."""
        data = self._get("/api/v1/query_range",
                         {"query": expr, "start": start, "end": end, "step": step})
        return list(data["result"])


def _color(i: int) -> str:
    return _ANNOTATION_COLORS[i % len(_ANNOTATION_COLORS)]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _event_times(series: list[dict[str, Any]], step: float) -> list[float]:
    """Start of every run of samples: ``changes(x[1m]) > 0`` holds for a minute per event."""
    times: set[float] = set()
    for s in series:
        previous = None
        for t, _ in s["values"]:
            if previous is None or float(t) - previous > 1.5 * step:
                times.add(float(t))
            previous = float(t)
    return sorted(times)


def _query_panels(client: PrometheusClient, dashboard: dict[str, Any], start: float,
                  end: float, step: float) -> list[dict[str, Any]]:
    """Per panel: its queries and their series (labels, legend, points); errors kept."""
    panels: dict[int, dict[str, Any]] = {}
    for q in panel_queries(dashboard):
        panel = panels.setdefault(q.panel_id, {"id": q.panel_id, "title": q.title,
                                               "type": q.panel_type, "series": 0, "queries": []})
        entry: dict[str, Any] = {"expr": q.expr, "legend": q.legend,
                                 "grouped_by_version": q.grouped_by_version, "error": None,
                                 "series": []}
        try:
            result = client.query_range(q.expr, start, end, step)
        except PrometheusError as exc:
            entry["error"] = str(exc)
            result = []
        for s in result:
            points = [(float(t), float(v)) for t, v in s["values"]]
            entry["series"].append({
                "labels": s["metric"], "legend": format_legend(q.legend, s["metric"]),
                "points": len(points), "last": [points[-1][0], _finite(points[-1][1])],
                "_values": points})
        panel["series"] += len(result)
        panel["queries"].append(entry)
    return list(panels.values())


def _render(panels: list[dict[str, Any]], annotations: list[dict[str, Any]], out_png: Path,
            suptitle: str, columns: int, span: tuple[float, float]) -> None:
    """One subplot per panel, annotations as dashed vertical lines on each (Agg, no pyplot)."""
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure

    rows = max(1, math.ceil(len(panels) / columns))
    fig = Figure(figsize=(6.0 * columns, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    xlim = [datetime.fromtimestamp(t, UTC) for t in span]
    for ax, panel in zip(axes, panels, strict=False):
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlim(*xlim)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        drawn = 0
        for query in panel["queries"]:
            for s in query["series"]:
                times = [datetime.fromtimestamp(t, UTC) for t, _ in s["_values"]]
                ax.plot(times, [v for _, v in s["_values"]], linewidth=1,
                        label=s["legend"] or "(series)")
                drawn += 1
        errors = [q["error"] for q in panel["queries"] if q["error"]]
        if not drawn:
            ax.text(0.5, 0.5, "query error" if errors else "no data", ha="center",
                    va="center", transform=ax.transAxes, color="grey")
        for i, a in enumerate(annotations):
            for t in a["times"]:
                ax.axvline(datetime.fromtimestamp(t, UTC), color=_color(i), linestyle="--",
                           linewidth=0.8)
        if drawn:
            handles, labels = ax.get_legend_handles_labels()
            ax.legend(handles[:8], labels[:8], fontsize=6, loc="upper left")
        ax.tick_params(labelsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    key = ", ".join(f"{a['name']} ({_color(i).removeprefix('tab:')})"
                    for i, a in enumerate(annotations))
    fig.suptitle(suptitle + (f"\ndashed lines: {key}" if key else ""), fontsize=11)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80, format="png")


def snapshot(prometheus_url: str, out_png: Path | str,
             dashboard: Path | str | dict[str, Any] | None = None, minutes: float = 15,
             step: float | None = None, columns: int = 3,
             end: float | None = None) -> SnapshotResult:
    """Query every dashboard panel over the last ``minutes`` and draw them into ``out_png``.

    Writes ``out_png`` and ``<stem>.json`` (per panel: exprs, series labels, point
    counts, last values; annotation times). A query Prometheus rejects is recorded
    in the JSON and drawn as "query error"; an unreachable Prometheus raises
    :class:`PrometheusError` before anything is written.
    """
    if minutes <= 0 or columns < 1:
        raise ValueError("minutes must be > 0 and columns >= 1")
    board = dashboard if isinstance(dashboard, dict) else load_dashboard(dashboard)
    client = PrometheusClient(prometheus_url)
    client.query("vector(1)")  # fail fast and clearly when Prometheus is not there
    end = time.time() if end is None else end
    start = end - 60.0 * minutes
    step = step or max(1.0, round(60.0 * minutes / 240))  # ~240 points per series
    panels = _query_panels(client, board, start, end, step)
    annotations = []
    for a in annotation_queries(board):
        try:
            times = _event_times(client.query_range(a.expr, start, end, step), step)
            annotations.append({"name": a.name, "expr": a.expr, "times": times, "error": None})
        except PrometheusError as exc:
            annotations.append({"name": a.name, "expr": a.expr, "times": [], "error": str(exc)})
    out_png = Path(out_png)
    fmt = "%Y-%m-%d %H:%M:%S"
    span = (f"{datetime.fromtimestamp(start, UTC).strftime(fmt)} to "
            f"{datetime.fromtimestamp(end, UTC).strftime('%H:%M:%S')} UTC")
    title = f"{board.get('title', 'dashboard')}: {span}, step {step:g}s, {prometheus_url}"
    _render(panels, annotations, out_png, title, columns, (start, end))
    for panel in panels:  # every point drawn is in the JSON: the figure's numbers
        for query in panel["queries"]:
            for s in query["series"]:
                s["values"] = [[int(t), None if v is None else float(f"{v:.5g}")]
                               for t, v in ((t, _finite(v)) for t, v in s.pop("_values"))]
    json_path = out_png.with_suffix(".json")
    json_path.write_text(json.dumps({
        "prometheus": prometheus_url, "dashboard": board.get("uid"), "png": out_png.name,
        "start": start, "end": end, "step": step, "annotations": annotations,
        "panels": panels}, indent=2) + "\n", encoding="utf-8")
    return SnapshotResult(out_png, json_path, panels)


monitor_app = typer.Typer(help="Monitoring: the Grafana dashboard's queries, without Grafana.",
                          no_args_is_help=True)


@monitor_app.command("snapshot")
def snapshot_command(
    prometheus: Annotated[str, typer.Option(envvar="CODISTILL_PROMETHEUS_URL",
                                            help="Prometheus base URL")] = "http://127.0.0.1:9090",
    out: Annotated[Path | None, typer.Option(help="PNG path (default HOME/monitor/"
                                             "snapshot.png; the JSON goes next to it)")] = None,
    minutes: Annotated[float, typer.Option(min=0.1, help="time range, ending now")] = 15,
    dashboard: Annotated[Path | None, typer.Option(help="dashboard JSON (default deploy/"
                                                   "grafana/dashboards/codistill.json)")] = None,
) -> None:
    """Draw every dashboard panel over the last MINUTES into a PNG (+ its data as JSON)."""
    from rich.table import Table

    out = out or cli.settings().home / "monitor" / "snapshot.png"
    try:
        result = snapshot(prometheus, out, dashboard, minutes=minutes)
    except (PrometheusError, OSError, ValueError) as exc:
        raise cli.fail(exc) from None
    table = Table(title=f"{len(result.panels)} panels from {prometheus}")
    for column in ("id", "panel", "series", "errors"):
        table.add_column(column, justify="right" if column in ("id", "series") else "left")
    for p in result.panels:
        errors = sum(1 for q in p["queries"] if q["error"])
        table.add_row(str(p["id"]), p["title"], str(p["series"]), str(errors) if errors else "")
    cli.out.print(table)
    cli.out.print(str(result.png_path))
    cli.out.print(str(result.json_path))
