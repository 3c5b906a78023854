"""Run plots as standalone SVG files (no plotting dependency; MLflow's UI shows SVG artifacts).

- ``fitness_svg``: every trial's fitness in completion order (dots; failures as red ticks at
  the bottom) and the best so far (a step line), with the sources' search fitness as dashed
  reference lines.
- ``coefficients_svg`` (PS): the best recipe's parameters as a heatmap, one row per
  (model, parameter), one column per tensor group (embeddings, each block, head).
- ``path_svg`` (DFS): the best layer path, one box per position, coloured by donor model,
  labelled with the layer index and the scale of the hidden state entering it.

``write_plots`` writes them into a run dir's ``plots/``.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Mapping, Optional, Sequence

from evomerge.run_dir import plots_dir

PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


def _svg(width: int, height: int, body: list[str], title: str) -> str:
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.0f}" y="20" text-anchor="middle" font-size="15">{escape(title)}</text>',
        *body, "</svg>", ""])


def fitness_svg(trials: Sequence[Mapping], baselines: Mapping[str, float], title: str = "fitness over trials") -> str:
    """``trials``: ledger trial records in completion order."""
    w, h, left, right, top, bottom = 760, 420, 60, 150, 40, 50
    values = [t["fitness"] for t in trials if t.get("state") == "complete"]
    ys = values + list(baselines.values())
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = max(len(trials), 2)

    def x(i: float) -> float:
        return left + (w - left - right) * i / (n - 1)

    def y(v: float) -> float:
        return top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))

    body = [f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>',
            f'<text x="{(left + w - right) / 2:.0f}" y="{h - 12}" text-anchor="middle">trial (completion order)</text>',
            f'<text x="14" y="{(top + h - bottom) / 2:.0f}" text-anchor="middle" '
            f'transform="rotate(-90 14 {(top + h - bottom) / 2:.0f})">fitness</text>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        body.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
        body.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{w - right}" y2="{y(v):.1f}" stroke="#eee"/>')
    for k in range(5):
        i = (n - 1) * k / 4
        body.append(f'<text x="{x(i):.1f}" y="{h - bottom + 16}" text-anchor="middle">{round(i)}</text>')
    for j, (name, v) in enumerate(sorted(baselines.items())):
        color = PALETTE[(j + 3) % len(PALETTE)]
        body.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{w - right}" y2="{y(v):.1f}" stroke="{color}" '
                    f'stroke-dasharray="5,4"/>')
        body.append(f'<text x="{w - right + 6}" y="{y(v) + 4:.1f}" fill="{color}">{escape(name)} {v:.3f}</text>')
    best: Optional[float] = None
    steps = []
    for i, t in enumerate(trials):
        if t.get("state") != "complete":
            body.append(f'<line x1="{x(i):.1f}" y1="{h - bottom - 6}" x2="{x(i):.1f}" y2="{h - bottom}" stroke="red"/>')
            continue
        v = t["fitness"]
        body.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5" fill="{PALETTE[0]}" fill-opacity="0.6"/>')
        best = v if best is None else max(best, v)
        steps.append((x(i), y(best)))
    if steps:
        pts = [f"{steps[0][0]:.1f},{steps[0][1]:.1f}"]
        for (x0, y0), (x1, y1) in zip(steps, steps[1:]):
            pts += [f"{x1:.1f},{y0:.1f}", f"{x1:.1f},{y1:.1f}"]
        body.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{PALETTE[1]}" stroke-width="2"/>')
        body.append(f'<text x="{w - right + 6}" y="{top + 10}" fill="{PALETTE[1]}">best so far {best:.3f}</text>')
        body.append(f'<text x="{w - right + 6}" y="{top + 26}" fill="{PALETTE[0]}">each trial</text>')
    return _svg(w, h, body, title)


def _color(v: float, lo: float, hi: float) -> str:
    """White (low) to dark blue (high)."""
    u = 0.0 if hi - lo < 1e-12 else (v - lo) / (hi - lo)
    r, g, b = (int(255 + (c - 255) * u) for c in (33, 102, 172))
    return f"#{r:02x}{g:02x}{b:02x}"


def coefficients_svg(recipe: Mapping, title: str = "best recipe: coefficients per tensor group") -> str:
    """``recipe``: a PS recipe dict (``models[].parameters``: a value or a per-group list)."""
    rows = []
    for m in recipe["models"]:
        for name, v in m["parameters"].items():
            vals = list(v) if isinstance(v, (list, tuple)) else [v]
            if all(isinstance(x, (int, float)) for x in vals):  # gradients and filters are not drawn
                rows.append((f"{m['model']}.{name}", [float(x) for x in vals]))
    for name, v in (recipe.get("parameters") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append((f"global.{name}", [float(v)]))
    if not rows:
        return _svg(400, 80, ['<text x="200" y="55" text-anchor="middle">no numeric parameters</text>'], title)
    groups = max(len(v) for _, v in rows)
    labels = ["all"] if groups == 1 else ["embed", *(str(i) for i in range(groups - 2)), "head"]
    cell_w, cell_h, left, top = max(18, min(48, 640 // groups)), 26, 170, 50
    w, h = left + cell_w * groups + 20, top + cell_h * len(rows) + 40
    body = []
    for j, (name, vals) in enumerate(rows):
        lo, hi = min(vals + [0.0]), max(vals + [1.0])
        body.append(f'<text x="{left - 8}" y="{top + cell_h * j + 17}" text-anchor="end">{escape(name)}</text>')
        for i in range(groups):
            v = vals[i] if len(vals) > 1 else vals[0]
            fill = _color(v, lo, hi)
            text = "white" if (v - lo) / max(hi - lo, 1e-12) > 0.55 else "black"
            body.append(f'<rect x="{left + cell_w * i}" y="{top + cell_h * j}" width="{cell_w}" height="{cell_h}" '
                        f'fill="{fill}" stroke="white"><title>{escape(name)} [{labels[i]}] = {v:.4f}</title></rect>')
            if cell_w >= 36:
                body.append(f'<text x="{left + cell_w * i + cell_w / 2:.0f}" y="{top + cell_h * j + 17}" '
                            f'text-anchor="middle" font-size="10" fill="{text}">{v:.2f}</text>')
    for i, label in enumerate(labels):
        body.append(f'<text x="{left + cell_w * i + cell_w / 2:.0f}" y="{top + cell_h * len(rows) + 16}" '
                    f'text-anchor="middle" font-size="10">{label}</text>')
    return _svg(w, h, body, title)


def path_svg(recipe: Mapping, title: str = "best recipe: layer path") -> str:
    """``recipe``: a DFS recipe dict (``layers[]``: model, layer, scale; ``embed_from``)."""
    steps = recipe["layers"]
    donors = sorted({s["model"] for s in steps} | {recipe["embed_from"]})
    color = {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(donors)}
    per_row, box_w, box_h, gap, left, top = 12, 54, 40, 8, 20, 70
    rows = max(1, -(-len(steps) // per_row))
    w = left * 2 + per_row * (box_w + gap)
    h = top + rows * (box_h + 30) + 40
    body = [f'<text x="{left}" y="50">embeddings and head: {escape(recipe["embed_from"])}; '
            f'{len(steps)} layers on the path</text>']
    for k, s in enumerate(steps):
        r, c = divmod(k, per_row)
        x0, y0 = left + c * (box_w + gap), top + r * (box_h + 30)
        body.append(f'<rect x="{x0}" y="{y0}" width="{box_w}" height="{box_h}" rx="4" fill="{color[s["model"]]}">'
                    f'<title>position {k}: {escape(s["model"])} layer {s["layer"]}, scale {s["scale"]:.3f}</title></rect>')
        body.append(f'<text x="{x0 + box_w / 2:.0f}" y="{y0 + 17}" text-anchor="middle" fill="white">L{s["layer"]}</text>')
        body.append(f'<text x="{x0 + box_w / 2:.0f}" y="{y0 + 32}" text-anchor="middle" fill="white" '
                    f'font-size="10">x{s["scale"]:.2f}</text>')
    y_leg = top + rows * (box_h + 30) + 10
    for i, d in enumerate(donors):
        body.append(f'<rect x="{left + 150 * i}" y="{y_leg}" width="12" height="12" fill="{color[d]}"/>')
        body.append(f'<text x="{left + 150 * i + 16}" y="{y_leg + 11}">{escape(d)}</text>')
    return _svg(w, h, body, title)


def write_plots(run_dir: Path, run_id: str, trials: list[dict], baselines: dict[str, float],
                best: Optional[tuple[int, dict]]) -> list[Path]:
    """The run's plots (``plots/*.svg``): fitness over trials, and the best recipe's
    coefficients (PS) or layer path (DFS). ``best``: (trial id, recipe dict)."""
    folder = plots_dir(run_dir)
    folder.mkdir(exist_ok=True)
    out = [folder / "fitness.svg"]
    out[0].write_text(fitness_svg(trials, baselines, title=f"{run_id}: fitness over trials"))
    if best is not None:
        trial_id, recipe = best
        if recipe.get("kind", "ps") == "ps":
            out.append(folder / "coefficients.svg")
            out[-1].write_text(coefficients_svg(recipe, title=f"best recipe (trial {trial_id}): coefficients"))
        else:
            out.append(folder / "layer_path.svg")
            out[-1].write_text(path_svg(recipe, title=f"best recipe (trial {trial_id}): layer path"))
    return out
