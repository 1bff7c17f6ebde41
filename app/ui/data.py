"""The Train tab's data section: the data-set check shown on upload, with a Leave out / Keep button per finding, and
the captioner that fills empty captions from an image-to-text model.

Nothing here changes a file: leaving an image out keeps it in the upload box and in the person's own folder; the
run that Train starts is staged without it (`TrainTab.on_train` reads `dropped`).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from pathlib import Path

import gradio as gr

from adapters.base import model_geometry, pick_device
from adapters.errors import UserError
from adapters.runtime import model_calls
from app.jobs import MAX_UPLOAD_FILES, pair_uploads
from app.ui.settings import page_words
from trainer.datacheck import Finding, caption_findings, picture_findings, size_findings
from trainer.dataset import bucket_stride, upright_size

_LOCK = threading.Lock()  # one check or captioner at a time: they share the loaded models below
# (and `model_calls`: their models are not run while a background compile in this process traces)
_VAES: OrderedDict = OrderedDict()  # base model -> its VAE (or the UserError that loading it raised); the last 2
_PICTURES: OrderedDict = OrderedDict()  # (base model, files) -> picture findings and notes; the last 8
_CAPTIONERS: OrderedDict = OrderedDict()  # captioning model -> Captioner; the last 1


def _remember(cache: OrderedDict, key, make, size: int):
    if key not in cache:
        cache[key] = make()
        while len(cache) > size:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def _vae(base_model: str):
    """The base model's VAE, loaded once; None and the reason when it cannot be (the rest is still checked)."""

    def load():
        from adapters.base import load_vae

        try:
            return load_vae(base_model, device=pick_device())
        except UserError as exc:
            return exc

    vae = _remember(_VAES, base_model, load, 2)
    return (None, [str(vae)]) if isinstance(vae, UserError) else (vae, [])


def _rows(rows) -> list[list]:
    return rows.values.tolist() if hasattr(rows, "values") else [list(r) for r in rows or []]


def report_for(
    paths, rows, base_model, resolution, buckets, trigger_word, default_caption, max_files=MAX_UPLOAD_FILES
):
    """(findings, summary) for an upload as the caption table shows it: the pictures' findings come from a cache
    keyed by the base model and the files, so editing a caption re-checks the captions alone."""
    uploads, _ = pair_uploads(paths or [], max_files)
    if not uploads:
        return [], ""
    base_model = (base_model or "").strip() or "builtin"
    native, vae_scale, levels = model_geometry(base_model)
    resolution = int(resolution or 0) or native
    files = tuple((str(u.path), u.path.stat().st_mtime_ns, u.path.stat().st_size) for u in uploads)
    names = [u.path.name for u in uploads]

    def pictures():
        vae, notes = _vae(base_model)
        found, said = picture_findings([u.path for u in uploads], names, vae)
        return found, notes + said

    with _LOCK, model_calls():
        found, notes = _remember(_PICTURES, (base_model, files), pictures, 8)
    unreadable = {f.file for f in found if f.kind == "unreadable"}
    sizes = {u.path.name: upright_size(u.path) for u in uploads if u.path.name not in unreadable}
    small, bucket_of = size_findings(sizes, resolution, bucket_stride(resolution, vae_scale, levels), bool(buckets))
    typed = {row[1]: str(row[2] or "") for row in _rows(rows) if len(row) > 2}
    captions = {u.path.name: typed.get(u.path.name, u.caption) for u in uploads}
    findings = found + small + caption_findings(captions, (trigger_word or "").strip(), default_caption or "")
    order = {name: i for i, name in enumerate(names)}
    findings.sort(key=lambda f: order.get(f.file, len(order)))
    return [f.__dict__ | {"others": list(f.others)} for f in findings], _summary(
        len(uploads), resolution, len(findings), bucket_of, notes
    )


def _summary(images: int, resolution: int, count: int, bucket_of: dict, notes: list[str]) -> str:
    from trainer.datacheck import Report

    head = f"**Data check** ({images} images, training at {resolution} px): " + (
        f"{count} thing(s) to look at, below. Nothing is left out of the run unless you press *Leave out*, and your "
        "files are never changed."
        if count
        else "nothing found (no near-duplicates, style outliers, small images or caption problems)."
    )
    lines = Report([], bucket_of).bucket_lines()  # one bucket: the plan above says it
    buckets = ["Each image's bucket (width × height): " + " · ".join(lines)] if len(lines) > 1 else []
    return "\n\n".join([head, *buckets, *(f"⚠ {page_words(n)}" for n in notes)])


def _with(dropped, name):
    return sorted(set(dropped or []) | {name})


def _without(dropped, name):
    return [n for n in dropped or [] if n != name]


class DataPanel:
    """The report and the captioner, made where they are built (under the caption table)."""

    def __init__(self, max_upload_files: int = MAX_UPLOAD_FILES):
        self.max_upload_files = max_upload_files
        with gr.Accordion("Caption with a model…", open=False):
            self.captioner = gr.Textbox(
                label="Captioning model: a Hugging Face id or a local folder",
                placeholder="Salesforce/blip-image-captioning-base",
                elem_id="captioner-model",
            )
            self.overwrite = gr.Checkbox(label="Replace captions already written", value=False)
            self.caption_button = gr.Button("Caption the images without one", elem_id="caption-button")
        self.summary = gr.Markdown(elem_id="data-check")
        self.report = gr.State([])  # the findings, as dicts (Finding's fields)
        self.dropped = gr.State([])  # names of the images left out of the run
        self.kept = gr.State([])  # the findings the person chose to keep, by key

        @gr.render(inputs=[self.report, self.dropped, self.kept])
        def findings(report, dropped, kept):
            with gr.Column(elem_id="data-findings"):
                for finding in report:
                    self._finding_row(Finding(**{**finding, "others": tuple(finding["others"])}), dropped, kept)

    def _finding_row(self, finding: Finding, dropped: list[str], kept: list[str]) -> None:
        key = f"{finding.kind}|{finding.file}|{','.join(finding.others)}"
        left_out = [n for n in (finding.file, *finding.others) if n in (dropped or [])]
        with gr.Row(elem_classes=["data-finding"], equal_height=False):
            state = f" — *{' and '.join(left_out)} left out of this run*" if left_out else ""
            state = state or (" — *kept*" if key in (kept or []) else "")
            with gr.Column(scale=3):
                gr.Markdown(f"⚠ **{finding.file}**: {page_words(finding.message)}{state}")
            with gr.Column(scale=1, min_width=160):
                if left_out:
                    for name in left_out:
                        gr.Button(f"Put back {name}", size="sm").click(
                            functools.partial(_without, name=name), self.dropped, self.dropped
                        )
                elif key in (kept or []):
                    gr.Button("Undo", size="sm").click(functools.partial(_without, name=key), self.kept, self.kept)
                else:
                    for name in (finding.file, *finding.others) if finding.kind == "duplicate" else (finding.file,):
                        gr.Button(f"Leave out {name}", size="sm", variant="stop").click(
                            functools.partial(_with, name=name), self.dropped, self.dropped
                        )
                    gr.Button("Keep", size="sm").click(functools.partial(_with, name=key), self.kept, self.kept)

    def wire(self, files, table, controls: dict, message, changed: dict) -> None:
        """Re-check on upload (the table is filled), on a caption edit, and when a setting the check reads
        changes (after the one listener of that change, `changed[name]`: see TrainTab.wire); the captioner's
        button fills the table."""
        inputs = [files, table, *(controls[n] for n in ("base_model", "resolution", "buckets", "trigger_word"))]
        inputs += [controls["default_caption"], self.dropped]
        outputs = [self.report, self.summary, self.dropped]
        base = controls["base_model"]
        check = dict(concurrency_id="data-check", show_progress="minimal")
        for trigger in (table.change, base.blur, base.submit):
            trigger(self.on_check, inputs, outputs, **check)
        for name in ("resolution", "buckets", "trigger_word", "default_caption"):
            changed[name].then(self.on_check, inputs, outputs, trigger_mode="always_last", **check)
        self.caption_button.click(
            self.on_caption,
            [files, table, self.captioner, self.overwrite, controls["trigger_word"]],
            [table, message],
            concurrency_id="data-check",
        )

    def on_check(self, paths, rows, base_model, resolution, buckets, trigger_word, default_caption, dropped):
        """The report for what is on screen, and the left-out list without images no longer uploaded."""
        try:
            report, summary = report_for(
                paths, rows, base_model, resolution, buckets, trigger_word, default_caption, self.max_upload_files
            )
        except UserError as exc:  # a base model that cannot be read: the Native size line says so too
            return [], f"⚠ The data check needs the base model: {page_words(str(exc))}", dropped
        present = {Path(p).name for p in paths or []}
        return report, summary, [n for n in dropped or [] if n in present]

    def on_caption(self, paths, rows, model, overwrite, trigger_word, progress=gr.Progress()):
        """Fill the table's empty captions (every caption, with `overwrite`) from the captioning model."""
        from trainer.captions import Captioner

        rows = _rows(rows)
        uploads, _ = pair_uploads(paths or [], self.max_upload_files)
        images = {u.path.name: u.path for u in uploads}
        todo = [r for r in rows if r[1] in images and (overwrite or not str(r[2] or "").strip())]
        if not todo:
            return gr.skip(), "Every image has a caption; tick *Replace captions already written* to redo them."
        try:
            with _LOCK, model_calls():
                captioner = _remember(_CAPTIONERS, model.strip(), lambda: Captioner(model, device=pick_device()), 1)
                for row in progress.tqdm(todo, desc="Captioning"):
                    row[2] = captioner.caption(images[row[1]], (trigger_word or "").strip())
        except UserError as exc:
            return gr.skip(), f"⚠ {page_words(str(exc))}"
        return rows, (
            f"Captioned {len(todo)} image(s) with {model.strip()}: read and edit them in the table before training."
        )
