"""Evaluation reports: JSON, CSV and a per-round cIoU plot (drawn with Pillow)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image, ImageDraw

from segllm.eval.evaluate import EvalResult

COLOURS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233)]


def write_reports(results: list[EvalResult], out: str | Path, *, name: str = "eval", meta: dict | None = None) -> list[Path]:
    """Write ``{name}.json``, ``{name}.csv`` and ``{name}_ciou.png`` to ``out``; returns the paths.

    The JSON holds every result's per-round metrics and, where the data allowed them, its
    grounding diagnostics (``diagnostics``: per round, per question family, text-resolvable vs
    not; see :class:`segllm.eval.metrics.Diagnostics`); the CSV the per-round grounded rate and
    IoU given grounded beside cIoU, mIoU and P@0.5."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{name}.json"
    js.write_text(json.dumps({"meta": meta or {}, "results": [r.to_dict() for r in results]}, indent=2) + "\n")
    cs = out / f"{name}.csv"
    with cs.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["protocol", "round", "cIoU", "mIoU", "P@0.5", "n", "grounded", "IoU|grounded"])
        for r in results:
            for k, m in r.metrics.items():
                d = r.diagnostics.get("per_round", {}).get(k)
                g = [f"{d['grounded']:.2f}", f"{d['IoU|grounded']:.2f}"] if d else ["", ""]
                w.writerow([r.protocol, k, f"{m['cIoU']:.2f}", f"{m['mIoU']:.2f}", f"{m['P@0.5']:.2f}", m["n"], *g])
    png = out / f"{name}_ciou.png"
    plot_rounds({r.protocol: r for r in results}, png, title=name)
    return [js, cs, png]


def plot_rounds(series: dict[str, EvalResult], path: Path, *, title: str = "", metric: str = "cIoU") -> None:
    """A line per series: ``metric`` against the round number (0-100 on the y axis)."""
    values = {label: {int(k): m[metric] for k, m in r.metrics.items() if k != "all"} for label, r in series.items()}
    plot_series(values, path, title=f"{title} {metric}")


def plot_series(series: dict[str, dict[int, float]], path: Path, *, title: str = "", dashed: set[str] = frozenset()) -> None:
    """A line per series of (round -> value, 0-100) against the round number, as a PNG.

    A series in ``dashed`` is drawn dashed with hollow markers; one named ``"X (paper)"`` takes
    the colour of series ``"X"`` (published figures beside ours)."""
    W, H, L, R, T, B = 640, 360, 50, 190, 30, 40
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    rounds = sorted({k for s in series.values() for k in s}) or [1]
    x_of = lambda k: L + (W - L - R) * ((k - rounds[0]) / max(1, rounds[-1] - rounds[0]))  # noqa: E731
    y_of = lambda v: T + (H - T - B) * (1 - v / 100)  # noqa: E731
    for v in range(0, 101, 20):
        d.line([(L, y_of(v)), (W - R, y_of(v))], fill=(225, 225, 225))
        d.text((L - 28, y_of(v) - 6), f"{v:3d}", fill="black")
    for k in rounds:
        d.text((x_of(k) - 3, H - B + 8), str(k), fill="black")
    d.text((L + (W - L - R) // 2 - 20, H - 18), "round", fill="black")
    d.text((L, 8), f"{title} by round", fill="black")
    own = [label for label in series if not (label in dashed and label.endswith(" (paper)") and label[:-8] in series)]
    for i, label in enumerate(series):
        base = label[:-8] if label not in own else label
        c = COLOURS[own.index(base) % len(COLOURS)]
        pts = [(x_of(k), y_of(v)) for k, v in sorted(series[label].items()) if v == v]  # NaN: no point
        for a, b in zip(pts, pts[1:]):
            if label in dashed:  # Pillow draws no dashes: short pieces of the segment
                for t in range(0, 10, 2):
                    d.line([(a[0] + (b[0] - a[0]) * t / 10, a[1] + (b[1] - a[1]) * t / 10),
                            (a[0] + (b[0] - a[0]) * (t + 1) / 10, a[1] + (b[1] - a[1]) * (t + 1) / 10)], fill=c, width=2)
            else:
                d.line([a, b], fill=c, width=2)
        for x, y in pts:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), outline=c, fill="white" if label in dashed else c)
        y = T + 10 + 18 * i
        d.line([(W - R + 10, y), (W - R + 30, y)], fill=c, width=3 if label not in dashed else 1)
        d.text((W - R + 35, y - 6), label, fill="black")
    im.save(path)
