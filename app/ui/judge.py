"""The Train tab's judge grid: a run's judge.json as a table of checkpoint x strength, the recommended pair marked."""

from __future__ import annotations

import html
from pathlib import Path

from trainer.checkpoint import checkpoint_adapter
from trainer.judge import JUDGE_DIR, read_judge

EXPLAINED = (
    "<b>style</b>: how far the pictures moved from the base model's toward the training images' style (feature "
    "Gram matrices and colours from the model's own VAE encoder): 0 = as the base model, 1 = the training set's "
    "average. <b>leak</b>: how close they come to copying a training image: 0 = as close as the base model's, 1 = a "
    "copy; above {limit:.2f} counts as leaking (⚠). ★ = {rule}"
)


def judge_html(run_dir: Path | None) -> str:
    """The grid for a run folder, or "" when the run has no judge.json (judge off, or nothing judged yet)."""
    record = read_judge(run_dir) if run_dir else {}
    rows = [r for r in record.get("checkpoints", []) if isinstance(r, dict) and r.get("cells")]
    if not rows:
        return ""
    best = record.get("recommended") or {}
    limit = float(record.get("leak_limit", 0.5))
    strengths = sorted({cell["strength"] for row in rows for cell in row["cells"]})
    head = "".join(f"<th>{s:g}{' (base)' if s == 0 else ''}</th>" for s in strengths)
    body = []
    for row in rows:
        cells = {cell["strength"]: cell for cell in row["cells"]}
        tds = []
        for strength in strengths:
            cell = cells.get(strength)
            if cell is None:
                tds.append("<td></td>")
                continue
            star = best.get("step") == row["step"] and best.get("strength") == strength
            leaks = cell["leak"] > limit
            text = f"style {cell['style']:.2f}<br>leak {cell['leak']:.2f}{' ⚠' if leaks else ''}"
            if cell.get("prompt_following") is not None:
                text += f"<br>prompt {cell['prompt_following']:.1f}"
            mark = " class='judge-best' style='background:#fff3bf;font-weight:bold'" if star else ""
            tds.append(f"<td{mark}>{'★ ' if star else ''}{text}</td>")
        body.append(f"<tr><th>step {row['step']}</th>{''.join(tds)}</tr>")
    if best:
        summary = (
            f"<b>Recommended: step {best['step']} at strength {best['strength']:g}</b> "
            f"(style {best['style']:.2f}, leak {best['leak']:.2f})."
        )
        latest = record.get("latest") or {}
        if latest.get("step") not in (None, best["step"]):
            kept = checkpoint_adapter(Path(run_dir) / "checkpoints" / f"step_{best['step']:06d}")
            summary += (
                f" Step {best['step']}'s adapter file is in its checkpoint, with this strength in its header: "
                "Generate's <i>Checkpoints of a run</i> tries and downloads it."
                if kept
                else f" Step {best['step']}'s checkpoint is no longer kept (Keep checkpoints keeps the newest)."
            )
            newest = latest.get("strength")
            summary += f" For step {latest['step']}, the newest judged, the judge recommends " + (
                "no strength." if newest is None else f"strength {newest:g}."
            )
    else:
        summary = f"<b>No recommendation</b>: {html.escape(str(record.get('not_recommended_because') or ''))}."
    following = record.get("prompt_following_skipped")
    prompts = "; ".join(f"{k}. “{html.escape(p)}”" for k, p in enumerate(record.get("prompts", []), 1))
    sheet_step = best.get("step", rows[-1]["step"])
    sheet = Path(run_dir) / JUDGE_DIR / f"step_{sheet_step:06d}.png"
    picture = (
        f"<div>Pictures at step {sheet_step} (rows: the held-out prompts, numbered in the order above; columns: "
        "the strengths):<br>"
        f"<img src='/gradio_api/file={html.escape(str(sheet))}' style='max-width:100%;image-rendering:pixelated'>"
        "</div>"
        if sheet.is_file()
        else ""
    )
    return (
        "<div id='judge-grid'><h4>Which checkpoint, which strength?</h4>"
        f"<p>{summary}</p>"
        f"<table><tr><th>checkpoint \\ strength</th>{head}</tr>{''.join(body)}</table>"
        f"<p style='font-size:0.9em'>{EXPLAINED.format(limit=limit, rule=html.escape(record.get('rule', '')))}"
        f"<br>Held-out prompts (fixed seeds): {prompts}."
        + (f"<br>Prompt following: {html.escape(following)}." if following else "")
        + f"</p>{picture}</div>"
    )
