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
    W, H, L, R, T, B = 560, 360, 50, 130, 30, 40
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    rounds = sorted({int(k) for r in series.values() for k in r.metrics if k != "all"}) or [1]
    x_of = lambda k: L + (W - L - R) * ((k - rounds[0]) / max(1, rounds[-1] - rounds[0]))  # noqa: E731
    y_of = lambda v: T + (H - T - B) * (1 - v / 100)  # noqa: E731
    for v in range(0, 101, 20):
        d.line([(L, y_of(v)), (W - R, y_of(v))], fill=(225, 225, 225))
        d.text((L - 28, y_of(v) - 6), f"{v:3d}", fill="black")
    for k in rounds:
        d.text((x_of(k) - 3, H - B + 8), str(k), fill="black")
    d.text((L + (W - L - R) // 2 - 20, H - 18), "round", fill="black")
    d.text((L, 8), f"{title} {metric} by round", fill="black")
    for i, (label, r) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        pts = [(x_of(int(k)), y_of(m[metric])) for k, m in sorted(r.metrics.items(), key=lambda t: (t[0] == "all", t[0].zfill(4))) if k != "all" and m[metric] == m[metric]]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for x, y in pts:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=c)
        d.line([(W - R + 10, T + 10 + 18 * i), (W - R + 30, T + 10 + 18 * i)], fill=c, width=3)
        d.text((W - R + 35, T + 4 + 18 * i), label, fill="black")
    im.save(path)
