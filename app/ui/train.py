"""The Train tab: upload and caption images, set the training settings, start, watch, cancel and resume runs."""

from __future__ import annotations

import html
import json
from pathlib import Path

import gradio as gr

from adapters.errors import UserError
from adapters.library import Library
from app.jobs import (
    MAX_UPLOAD_FILES,
    RunView,
    active_run,
    cancel_run,
    list_runs,
    pair_uploads,
    resume_run,
    stage_dataset,
    start_run,
    view_run,
)
from app.ui.settings import SettingsForm
from trainer.checkpoint import list_checkpoints
from trainer.dataset import IMAGE_EXTENSIONS

PROBLEMS_SHOWN = 3  # unreadable event-log lines named in the status; the rest are counted


def loss_frame(losses: list[tuple[int, float]]):
    """The loss plot's data, typed as numbers even when empty: the browser keeps the axis types of the first
    data it gets, and an untyped empty frame would make every step and loss value a category label."""
    import pandas as pd

    return pd.DataFrame(
        {
            "step": pd.Series([s for s, _ in losses], dtype="int64"),
            "loss": pd.Series([v for _, v in losses], dtype="float64"),
        }
    )


def progress_html(view: RunView | None) -> str:
    if view is None:
        return "<div id='train-progress'>No run selected.</div>"
    total = max(view.total, 1)
    eta = f"{int(view.eta_s // 60)}:{int(view.eta_s % 60):02d} left" if view.live and view.step else ""
    speed = f"{view.steps_per_s:.1f} steps/s" if view.steps_per_s else ""
    loss = f"loss {view.losses[-1][1]:.4f}" if view.losses else ""
    parts = " · ".join(p for p in (f"step {view.step}/{view.total}", speed, eta, loss) if p)
    return (
        f"<div id='train-progress'><progress value='{view.step}' max='{total}' style='width:100%'></progress>"
        f"<div id='train-progress-text'>{html.escape(parts)}</div></div>"
    )


def status_text(view: RunView | None) -> str:
    """The selected run's state in words, and a warning when lines of its event log could not be read."""
    if view is None:
        return ""
    words = {
        "starting": "Starting: loading the base model…",
        "running": "Training…",
        "done": f"Done. The adapter is in the library as **{view.library_name or view.name}**, ready in Generate.",
        "cancelled": f"Cancelled at step {view.step}; the adapter learned so far was saved.",
        "error": f"❌ Error: {view.message}",
        "interrupted": f"❌ Interrupted: {view.message}",
    }
    text = f"**{view.name}**: {words.get(view.status, view.status)}"
    if view.status in ("error", "interrupted"):
        saved = list_checkpoints(view.run_dir)
        text += (
            f"\n\nPress **Resume** to go on from its newest checkpoint, {saved[-1].name}."
            if saved
            else "\n\nIt saved no checkpoint, so it cannot be resumed; train it again."
        )
    if view.problems:
        named = "; ".join(f"`{p}`" for p in view.problems[:PROBLEMS_SHOWN])
        more = len(view.problems) - PROBLEMS_SHOWN
        text += f"\n\n⚠ events.jsonl has {len(view.problems)} unreadable line(s), left out of this view: {named}" + (
            f"; and {more} more" if more > 0 else ""
        )
    return text


def caption_rows(paths: list | None, max_files: int = MAX_UPLOAD_FILES) -> tuple[list[list[str]], str]:
    """The caption table's rows for an upload (thumbnail, file, caption) and the upload's problems, if any."""
    uploads, problems = pair_uploads(paths or [], max_files)
    rows = [[f"![{u.path.name}](/gradio_api/file={u.path})", u.path.name, u.caption] for u in uploads]
    note = ("❌ " + "; ".join(problems)) if problems else ""
    return rows, note


def typed_captions(rows) -> dict[str, str]:
    """File name -> caption as typed in the table (a DataFrame or a list of rows)."""
    rows = rows.values.tolist() if hasattr(rows, "values") else rows or []
    return {row[1]: row[2] for row in rows if len(row) > 2}


class TrainTab:
    """The tab's controls (made where it is built, inside the app's Blocks) and its handlers."""

    def __init__(
        self,
        runs_root: Path,
        library: Library,
        preload_files: list[str] | None,
        max_upload_files: int = MAX_UPLOAD_FILES,
    ):
        self.runs_root, self.library, self.preload_files = runs_root, library, preload_files
        self.max_upload_files = max_upload_files
        with gr.Tab("Train", id="train"):
            with gr.Row():
                with gr.Column(scale=3):
                    self.files = gr.File(
                        label="Style images (.png, .jpg, .webp, .gif) and their .txt captions",
                        file_count="multiple",
                        file_types=[*IMAGE_EXTENSIONS, ".txt"],
                        type="filepath",
                        value=preload_files,
                        height=220,
                        elem_id="upload",
                    )
                    self.table = gr.Dataframe(
                        headers=["image", "file", "caption"],
                        datatype=["markdown", "str", "str"],
                        column_count=(3, "fixed"),
                        interactive=True,
                        label="Captions: type or edit one per image",
                        elem_id="captions",
                        static_columns=[0, 1],
                    )
                with gr.Column(scale=2):
                    self.settings = SettingsForm()
                    with gr.Accordion("Equivalent command line and config file", open=False):
                        self.command = gr.Code(language="shell", label="CLI", elem_id="cli-command")
                        self.config_json = gr.Code(language="json", label="config.json")
            with gr.Row():
                self.train_button = gr.Button("Train", variant="primary", elem_id="train-button")
                self.cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
                self.resume_button = gr.Button("Resume", elem_id="resume-button")
            # What the last button press or upload did, and, below it, the selected run's live state: two places,
            # so the once-a-second run refresh never wipes a message the person has not read yet.
            self.message = gr.Markdown(elem_id="train-message")
            self.status = gr.Markdown(elem_id="train-status")
            self.run_picker = gr.Dropdown(
                label="Runs (running and past)", choices=self.run_choices(), elem_id="run-picker"
            )
            self.progress = gr.HTML(progress_html(None))
            with gr.Row():
                self.loss_plot = gr.LinePlot(x="step", y="loss", label="Loss", height=260, elem_id="loss-plot")
                self.previews = gr.Gallery(
                    label="Previews as training goes", columns=4, height=260, elem_id="previews"
                )
            self.timer = gr.Timer(1.0)
            self.shown_choices = gr.State([])  # the run list as last sent to the browser

    def wire(self, app: gr.Blocks) -> None:
        settings = self.settings.inputs
        run_view = [self.progress, self.loss_plot, self.previews, self.status]
        self.files.change(self.caption_rows, self.files, [self.table, self.message])
        for control in settings:
            control.change(self.show_command, settings, [self.command, self.config_json])
        self.train_button.click(self.on_train, [self.files, self.table, *settings], [self.message, self.run_picker])
        self.cancel_button.click(self.on_cancel, self.run_picker, self.message)
        self.resume_button.click(self.on_resume, self.run_picker, self.message)
        self.timer.tick(self.refresh, self.run_picker, run_view)
        self.timer.tick(
            self.refresh_choices, [self.run_picker, self.shown_choices], [self.run_picker, self.shown_choices]
        )
        self.run_picker.change(self.refresh, self.run_picker, run_view)
        app.load(self.on_load, None, self.run_picker)
        app.load(self.show_command, settings, [self.command, self.config_json])
        if self.preload_files:
            app.load(self.caption_rows, self.files, [self.table, self.message])

    def caption_rows(self, paths):
        return caption_rows(paths, self.max_upload_files)

    def run_choices(self) -> list[tuple[str, str]]:
        return [(f"{v.run_dir.name} · {v.status}", v.run_dir.name) for v in list_runs(self.runs_root)]

    def show_command(self, *settings):
        try:
            config = self.settings.config(settings)
        except UserError as exc:
            return f"# {exc}", ""
        config.data = "<your images folder>"
        return config.cli_command(), json.dumps(config.to_dict(), indent=2)

    def on_train(self, paths, rows, *settings):
        try:
            config = self.settings.config(settings)
            uploads, problems = pair_uploads(paths or [], self.max_upload_files)
            if problems:
                raise UserError("the upload has problems:\n  " + "\n  ".join(problems))
            typed = typed_captions(rows)
            for up in uploads:
                if str(typed.get(up.path.name, "") or "").strip():
                    up.caption = str(typed[up.path.name]).strip()
            staged = stage_dataset(uploads, config.default_caption)
            if not config.preview_prompt:  # previews default to the first caption, with the trigger word
                first = next((u.caption for u in uploads if u.caption), "")
                config.preview_prompt = first or config.default_caption
            run_dir = start_run(config, staged, self.runs_root, self.library.root)
        except UserError as exc:
            message = str(exc).replace("\n", "<br>")
            return f"❌ Nothing started: {message}", gr.Dropdown(choices=self.run_choices())
        return f"Started run **{run_dir.name}**.", gr.Dropdown(choices=self.run_choices(), value=run_dir.name)

    def on_cancel(self, name):
        if not name or not cancel_run(self.runs_root / name):
            return "No running training to cancel."
        return f"Cancelling **{name}**: the adapter learned so far will be saved."

    def on_resume(self, name):
        if not name:
            return "Choose a run to resume."
        try:
            resume_run(self.runs_root / name, self.runs_root)
        except UserError as exc:
            return f"❌ {exc}"
        return f"Resuming **{name}** from its newest checkpoint."

    def refresh(self, name):
        run_dir = self.runs_root / name if name else None
        view = view_run(run_dir) if run_dir and run_dir.is_dir() else None
        losses = loss_frame(view.losses if view else [])
        pictures = [(path, f"step {step}") for path, step in (view.previews if view else [])]
        return progress_html(view), losses, pictures, status_text(view)

    def refresh_choices(self, name, shown):
        """Keep each run's state in the run list current (a run shown as starting reads done when it ends);
        the list is only re-sent when it changed, so an open dropdown is not closed under the user."""
        runs = self.run_choices()
        if [list(c) for c in runs] == [list(c) for c in shown or []]:
            return gr.skip(), shown
        if not name:  # a tick sent before Train's answer came back must not clear the new run from the picker
            live = active_run(self.runs_root)
            name = live.run_dir.name if live else None
        return gr.Dropdown(choices=runs, value=name), runs

    def on_load(self):
        live = active_run(self.runs_root)
        runs = self.run_choices()
        value = live.run_dir.name if live else (runs[0][1] if runs else None)
        return gr.Dropdown(choices=runs, value=value)
