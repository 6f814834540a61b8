"""`dpokit report RUN_DIR [RUN_DIR ...] [--output FILE.html]`: one self-contained HTML page of a run's curves.

A `dpokit sweep` output_dir (it holds sweep.json) stands for all its runs: they are compared on one page, as runs
given one by one are, with the sweep's table (sweep.md) and reward-KL frontier (frontier.png) above the curves.

The page holds one PNG per metric family (loss, reward accuracy, reward margin, log-probs, learning rate, tokens/s),
drawn from each run's `metrics.jsonl` with every run overlaid in its own colour, train records as solid lines and eval
records (`eval/` keys) dashed with markers. The images are embedded as base64 data URIs, so the file can be mailed,
attached to an issue or opened from a CI artifact with nothing beside it. Each run's `eval.md` (or, without one, its
`eval.json`) follows as HTML tables.

A figure is left out only when no run logged any of its metrics (an SFT run has no rewards or log-probs); the page
says which figures were left out and why, so a missing curve is never mistaken for a rendering bug.

Every file is read through `dpokit.fileio`: anything wrong with one is a one-line error naming it (and the line). The
two logs a run appends to, metrics.jsonl and warnings.jsonl, may end with a half-written line when the run was killed
while writing it (the line has no newline yet); that line is skipped, and the report says so in one line on stderr
and on the page. A bad line that was written whole (it ends with a newline), anywhere in the file, is an error.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from dpokit.errors import ConfigError, DataError
from dpokit.fileio import JsonLines, atomic_write_text, read_bytes, read_json, read_text, read_yaml, refuse_overlap


# --------------------------------------------------------------------------------------------------------------------
# What is plotted


@dataclass(frozen=True)
class Series:
    key: str        # the metrics.jsonl key
    label: str      # what the legend calls it after the run's name
    linestyle: str
    marker: Optional[str] = None


def _train_and_eval(key: str) -> tuple[Series, ...]:
    # Eval records are logged every eval_steps, far sparser than training logs: markers keep a two-point eval curve
    # visible next to a dense train one.
    return (Series(key, "train", "-"), Series(f"eval/{key}", "eval", "--", "o"))


@dataclass(frozen=True)
class PlotSpec:
    title: str
    ylabel: str
    series: tuple[Series, ...]

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.series]


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("Loss", "loss", _train_and_eval("loss")),
    PlotSpec("Reward accuracy", "rewards/accuracies", _train_and_eval("rewards/accuracies")),
    PlotSpec("Reward margin", "rewards/margins", _train_and_eval("rewards/margins")),
    PlotSpec("Log-probs of chosen and rejected", "log-prob (mean per sequence)", (
        Series("logps/chosen", "chosen (train)", "-"),
        Series("logps/rejected", "rejected (train)", ":"),
        Series("eval/logps/chosen", "chosen (eval)", "--", "o"),
        Series("eval/logps/rejected", "rejected (eval)", "-.", "s"),
    )),
    PlotSpec("Learning rate", "learning_rate", (Series("learning_rate", "train", "-"),)),
    PlotSpec("Throughput", "tokens/s", (Series("tokens_per_second", "train", "-"),)),
)


# --------------------------------------------------------------------------------------------------------------------
# Reading runs


@dataclass
class Run:
    path: Path
    label: str
    records: list[dict]
    eval_html: Optional[str] = None
    eval_source: Optional[str] = None
    warnings: list = field(default_factory=list)  # training-time safety warnings (warnings.jsonl)
    sweep: Optional[Path] = None  # the `dpokit sweep` output_dir the run was given as part of
    notes: list = field(default_factory=list)  # what the report skipped while reading (a half-written last line)

    def points(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of every record that logged `key`, in file order."""
        steps, values = [], []
        for r in self.records:
            if r.get(key) is not None:
                steps.append(r["step"])
                values.append(float(r[key]))
        return steps, values


def read_metrics(path: Path, notes: Optional[list] = None) -> list[dict]:
    """Parse metrics.jsonl; any line that is not a JSON object with an integer step and numeric plotted metrics
    raises DataError naming file:line, except a half-written last line (a run killed while writing it), which is
    skipped and described in `notes`."""
    plotted = {s.key for p in PLOTS for s in p.series}
    records = []
    lines = JsonLines(path, appended=True)
    for lineno, record in lines:
        where = f"{path}:{lineno}"
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise DataError(f"{where}: 'step' must be an integer, got {step!r}")
        for key in plotted & record.keys():
            value = record[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise DataError(f"{where}: {key!r} must be a number, got {value!r}")
        records.append(record)
    _note_cut_short(lines, notes)
    if not records:
        raise DataError(f"{path}: no records (has the run logged its first step yet?)")
    return records


def read_warnings(path: Path, notes: Optional[list] = None) -> list[dict]:
    """The training-time warnings of warnings.jsonl (a half-written last line skipped, as in `read_metrics`)."""
    lines = JsonLines(path, appended=True)
    warnings = [record for _, record in lines]
    _note_cut_short(lines, notes)
    return warnings


def _note_cut_short(lines: JsonLines, notes: Optional[list]) -> None:
    if lines.cut_short is not None and notes is not None:
        notes.append(f"{lines.name}:{lines.cut_short}: last line is incomplete (the run was stopped while writing "
                     "it); skipped")


def _labels(paths: Sequence[Path]) -> list[str]:
    # Runs are named by their config's `run_name`, else their directory; two runs with the same name (a/out, b/out)
    # get their paths as given instead, since a legend with the same name twice cannot be read.
    names = [_run_name(p) or p.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def _run_name(path: Path) -> Optional[str]:
    config = path / "dpokit_config.yaml"  # rundir.RUN_MARKER (not imported: the report needs no torch)
    if not config.is_file():
        return None
    name = read_yaml(config).get("run_name")
    return str(name) if name else None


def is_sweep(path: Path) -> bool:
    """A `dpokit sweep` output_dir: its sweep.json lists the runs (a run directory has its own metrics.jsonl)."""
    return (path / "sweep.json").is_file() and not (path / "metrics.jsonl").is_file()


def sweep_runs(root: Path) -> list[Path]:
    """The run directories of a sweep, in its order: each sweep.json run's directory inside the sweep's root (found
    there by name, so a sweep started from another directory, or moved, still reads)."""
    where = root / "sweep.json"
    summary = read_json(where)
    runs = summary.get("runs") if isinstance(summary, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("run"), str) for r in runs):
        raise DataError(f"{where}: expected an object whose 'runs' is a list of objects with a 'run' path "
                        "(as `dpokit sweep` writes it)")
    if not runs:
        raise DataError(f"{where}: the sweep lists no runs")
    return [root / Path(r["run"]).name for r in runs]


def load_runs(run_dirs: Sequence) -> list[Run]:
    if not run_dirs:
        raise ConfigError("dpokit report: give at least one run directory")
    paths, sweeps = [], []
    for d in map(Path, run_dirs):
        sweep = d if is_sweep(d) else None
        trials = sweep_runs(d) if sweep is not None else [d]
        paths += trials
        sweeps += [sweep] * len(trials)
    runs = []
    for path, label, sweep in zip(paths, _labels(paths), sweeps):
        if not path.is_dir():
            raise ConfigError(f"run directory {str(path)!r} does not exist (or is not a directory)")
        metrics = path / "metrics.jsonl"
        if not metrics.is_file():
            of = f" (a run of the sweep {str(sweep)!r})" if sweep is not None else ""
            raise ConfigError(f"run directory {str(path)!r}{of} has no metrics.jsonl (is it a dpokit sft/dpo/sweep "
                              "output_dir?)")
        run = Run(path, label, [], sweep=sweep)
        run.records = read_metrics(metrics, run.notes)
        if (path / "warnings.jsonl").is_file():
            run.warnings = read_warnings(path / "warnings.jsonl", run.notes)
        # eval.md is what `dpokit eval` wrote for people to read; eval.json is the fallback for a run that has only it.
        if (path / "eval.md").is_file():
            run.eval_html = markdown_to_html(read_text(path / "eval.md"), heading_offset=2)
            run.eval_source = "eval.md"
        elif (path / "eval.json").is_file():
            run.eval_html = json_to_html(read_json(path / "eval.json"))
            run.eval_source = "eval.json"
        runs.append(run)
    return runs


# --------------------------------------------------------------------------------------------------------------------
# Figures


@dataclass
class Figures:
    drawn: list = field(default_factory=list)     # (PlotSpec, matplotlib Figure)
    omitted: list = field(default_factory=list)   # (PlotSpec, reason)


def build_figures(runs: Sequence[Run]) -> Figures:
    """One matplotlib Figure per PlotSpec that at least one run has data for."""
    # Figure + savefig without pyplot: no global backend switch (matplotlib.use) inside a library, no figure
    # registry to leak from, and it works with no display whatever MPLBACKEND says.
    from matplotlib.figure import Figure

    colours = [f"C{i % 10}" for i in range(len(runs))]
    out = Figures()
    for spec in PLOTS:
        if not any(r.points(k)[0] for r in runs for k in spec.keys):
            out.omitted.append((spec, f"no run logged {' or '.join(spec.keys)}"))
            continue
        fig = Figure(figsize=(9, 4.2), dpi=100)
        ax = fig.add_subplot()
        for run, colour in zip(runs, colours):
            for s in spec.series:
                steps, values = run.points(s.key)
                if steps:
                    ax.plot(steps, values, color=colour, linestyle=s.linestyle, marker=s.marker, markersize=4,
                            linewidth=1.6, label=f"{run.label} — {s.label}")
        ax.set_title(spec.title)
        ax.set_xlabel("step")
        ax.set_ylabel(spec.ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        out.drawn.append((spec, fig))
    return out


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------------------------------
# Tables: a small markdown converter (headers, pipe tables, paragraphs: what eval.md holds) and eval.json as tables


def _inline(text: str) -> str:
    escaped = html.escape(text, quote=False)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _cells(row: str) -> list[str]:
    # Split on pipes that are not escaped (eval.md escapes `|` inside sample text as `\|`).
    body = row.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


_SEPARATOR = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")


def markdown_to_html(text: str, heading_offset: int = 0) -> str:
    """Headers, pipe tables and paragraphs; `heading_offset` demotes headers to nest them under the page's own."""
    lines = text.splitlines()
    out, para, i = [], [], 0

    def flush():
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        header = re.match(r"^(#{1,6})\s+(.*)$", line)
        if header:
            flush()
            level = min(len(header.group(1)) + heading_offset, 6)
            out.append(f"<h{level}>{_inline(header.group(2).strip())}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1]):
            flush()
            head = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            parts = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
            parts += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows]
            parts.append("</table>")
            out.append("\n".join(parts))
        elif not line.strip():
            flush()
            i += 1
        else:
            para.append(line.strip())
            i += 1
    flush()
    return "\n".join(out)


def _scalar(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def json_to_html(data) -> str:
    """eval.json as tables: scalars as key/value rows (nested dicts by dotted key), lists of objects as own tables."""
    rows, lists = [], []

    def walk(prefix: str, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lists.append((prefix, value))
        else:
            rows.append((prefix, json.dumps(value) if isinstance(value, list) else _scalar(value)))

    walk("", data)
    parts = ["<table>", "<tr><th>key</th><th>value</th></tr>"]
    parts += [f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows]
    parts.append("</table>")
    for name, items in lists:
        columns = list(dict.fromkeys(k for item in items for k in item))
        parts += [f"<h4>{html.escape(name)}</h4>", "<table>",
                  "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{html.escape(_scalar(item.get(c, '')))}</td>" for c in columns) + "</tr>"
                  for item in items]
        parts.append("</table>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# The page


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1000px; }
figure { margin: 16px 0; }
figure img { width: 100%; max-width: 900px; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
code { background: #f3f3f3; padding: 0 3px; }
.omitted { color: #8a5a00; }
"""


def render_html(runs: Sequence[Run], figures: Figures) -> str:
    esc = html.escape
    title = "dpokit report: " + ", ".join(r.label for r in runs)
    parts = ["<!DOCTYPE html>", f"<html><head><meta charset=\"utf-8\">{GENERATOR}", f"<title>{esc(title)}</title>",
             f"<style>{_CSS}</style>", "</head><body>", f"<h1>{esc(title)}</h1>", "<ul>"]
    for r in runs:
        train = sum(1 for rec in r.records if any(not k.startswith("eval/") and k != "step" for k in rec))
        evals = sum(1 for rec in r.records if any(k.startswith("eval/") for k in rec))
        parts.append(f"<li><b>{esc(r.label)}</b>: <code>{esc(str(r.path))}</code> — {train} train records, "
                     f"{evals} eval records</li>")
    parts.append("</ul>")
    notes = [(r, n) for r in runs for n in r.notes]
    if notes:
        parts.append("<p class=\"omitted\">Skipped while reading: "
                     + "; ".join(f"{esc(r.label)}: {esc(n)}" for r, n in notes) + ".</p>")
    if figures.omitted:
        parts.append("<p class=\"omitted\">Omitted plots: "
                     + "; ".join(f"{esc(spec.title)} ({esc(reason)})" for spec, reason in figures.omitted)
                     + ".</p>")
    warned = [(r, w) for r in runs for w in r.warnings]
    if warned:
        parts.append("<h2>Warnings</h2><ul>")
        parts += [f"<li><b>{esc(r.label)}</b>, step {esc(str(w.get('step')))}: {esc(str(w.get('message')))}</li>"
                  for r, w in warned]
        parts.append("</ul>")
    for root in dict.fromkeys(r.sweep for r in runs if r.sweep is not None):
        parts.append(f"<h2>Sweep <code>{esc(str(root))}</code></h2>")
        if (root / "sweep.md").is_file():
            parts.append(markdown_to_html(read_text(root / "sweep.md"), heading_offset=2))
        if (root / "frontier.png").is_file():
            png = base64.b64encode(read_bytes(root / "frontier.png", str(root / "frontier.png"))).decode("ascii")
            parts.append(f"<figure><img alt=\"reward-KL frontier\" src=\"data:image/png;base64,{png}\">"
                         "<figcaption>reward-KL frontier: one point per run</figcaption></figure>")
    parts.append("<h2>Training curves</h2>")
    for spec, fig in figures.drawn:
        parts.append(f"<figure><img alt=\"{esc(spec.title)}\" src=\"data:image/png;base64,{_png_base64(fig)}\">"
                     f"<figcaption>{esc(spec.title)}: solid = train, dashed with markers = eval</figcaption></figure>")
    with_eval = [r for r in runs if r.eval_html is not None]
    if with_eval:
        parts.append("<h2>Evaluation</h2>")
        for r in with_eval:
            parts += [f"<h3>{esc(r.label)} <small>({esc(r.eval_source)})</small></h3>", r.eval_html]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dirs: list, output: str | None = None) -> Path:
    """Write the report for `run_dirs` (run directories, or sweep output_dirs) to `output` (default:
    `<first RUN_DIR>/report.html`) and return its path."""
    return _write(load_runs(run_dirs), output, Path(run_dirs[0]))


REPORT = "report.html"  # the default output, in the first run directory
GENERATOR = '<meta name="generator" content="dpokit report">'  # marks a page as one this command wrote


def is_report(path: Path) -> bool:
    """Whether `path` is a page `dpokit report` wrote (which a new report may replace): report.html, or a file whose
    head carries the generator mark."""
    if path.name == REPORT:
        return True
    try:
        with open(path, "rb") as f:
            return GENERATOR.encode() in f.read(512)
    except OSError:
        return False


def _write(runs: Sequence[Run], output: str | None, first: Path) -> Path:
    out = Path(output) if output is not None else first / REPORT
    # The report goes beside the runs' files, never over one of them (their logs, weights, configs) and never over
    # a directory that holds a run; report.html is its own, rewritten each time.
    hosts = {"the run": [run.path for run in runs], "the sweep": [run.sweep for run in runs if run.sweep]}
    refuse_overlap({"--output": out}, {}, hosts=hosts, own=is_report)
    if out.is_dir():
        raise ConfigError(f"--output {str(out)!r} is a directory; give a file path such as "
                          f"{str(out / 'report.html')!r}")
    figures = build_figures(runs)
    page = render_html(runs, figures)
    atomic_write_text(out, page)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    from dpokit.options import Parser

    parser = Parser(
        prog="dpokit report",
        description="Write a self-contained HTML page of training curves (metrics.jsonl) and eval tables; "
                    "several run directories are overlaid.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a dpokit sft/dpo output_dir, or a dpokit sweep output_dir (all its runs)")
    parser.add_argument("--output", metavar="FILE.html", help="where to write (default: <first RUN_DIR>/report.html)")
    args = parser.parse_args(argv)
    runs = load_runs(args.run_dirs)
    for note in (n for r in runs for n in r.notes):
        print(f"dpokit report: note: {note}", file=sys.stderr)
    print(f"wrote {_write(runs, args.output, Path(args.run_dirs[0]))}")
    return 0
