"""The Train tab: upload and caption images, set the training settings, start, watch, cancel and resume runs."""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path

import gradio as gr

from adapters.base import check_base_model, model_geometry, native_size_of, pick_device
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
from app.ui.library import name_note
from app.ui.settings import SettingsForm, page_words
from trainer.checkpoint import list_checkpoints
from trainer.dataset import IMAGE_EXTENSIONS, bucket_counts, bucket_stride, image_problem, upright_size, with_trigger
from trainer.optim import check_optimizer
from trainer.runs import RAW_COLOR, SMOOTHED_COLOR, SMOOTHING, check_log_with, smoothed

PROBLEMS_SHOWN = 3  # unreadable event-log lines named in the status; the rest are counted
RAW, SMOOTHED = "each step", f"smoothed (EMA {SMOOTHING})"  # the loss plot's two lines, as its legend names them
LOSS_CAPTION = (
    f"Faint: the loss of each step, noisy at small batches. Dark: the same smoothed as TensorBoard smooths it, an "
    f"exponential moving average with weight {SMOOTHING}. The run folder gets this plot as loss.png when it ends."
)


def loss_frame(losses: list[tuple[int, float]]):
    """The loss plot's data, the raw loss and its smoothed line (`series` tells them apart), typed as numbers even
    when empty: the browser keeps the axis types of the first data it gets, and an untyped empty frame would make
    every step and loss value a category label."""
    import pandas as pd

    steps, raw = [s for s, _ in losses], [v for _, v in losses]
    return pd.DataFrame(
        {
            "step": pd.Series(steps * 2, dtype="int64"),
            "loss": pd.Series(raw + smoothed(raw), dtype="float64"),
            "series": pd.Series([RAW] * len(raw) + [SMOOTHED] * len(raw), dtype="object"),
        }
    )


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


def plan_markdown(plan: dict) -> str:
    """A run's length and data in a small table, from its start event's keys (or `upload_plan`'s, the same)."""
    buckets = " · ".join(f"{size.replace('x', '×')}: {count}" for size, count in plan.get("buckets", {}).items())
    return (
        "| images | per epoch, with repeats | batch | steps per epoch | steps | epochs |\n|---|---|---|---|---|---|\n"
        f"| {plan['images']} | {plan['repeats']} | {plan['batch_size']} | {plan['steps_per_epoch']} | "
        f"{plan['steps']} | {plan['epochs']:g} |\n\n"
        f"Aspect-ratio buckets (width × height: images): {buckets}"
    )


@functools.lru_cache(maxsize=16)
def _geometry(base_model: str) -> tuple[int, int, int]:
    return model_geometry(base_model)  # a hub id's configs are fetched once, not at every change of the form


def _readable(path: Path) -> bool:
    try:
        upright_size(path)  # the header only: the plan is redone at every change of the form
    except Exception:
        return False
    return True


def upload_plan(paths, config, max_files: int = MAX_UPLOAD_FILES) -> dict:
    """What a run of these uploads would be, before Train: the start event's numbers, by the trainer's rules (an
    image whose header cannot be read is left out; the caption table flags it)."""
    uploads, _ = pair_uploads(paths or [], max_files)
    images = [u.path for u in uploads if _readable(u.path)]
    native, vae_scale, levels = _geometry((config.base_model or "").strip() or "builtin")
    resolution = config.resolution or native
    per_epoch = len(images) * config.repeats  # the page's upload is one flat folder: --repeats for each image
    steps_per_epoch, steps, epochs = config.run_length(per_epoch, config.num_processes)
    return dict(
        images=len(images),
        repeats=per_epoch,
        batch_size=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        steps=steps,
        epochs=epochs,
        buckets=bucket_counts(images, resolution, bucket_stride(resolution, vae_scale, levels), config.buckets),
    )


def common_first_tag(captions: list[str]) -> str:
    """The first comma-separated tag that every caption (two or more) starts with, else ""."""
    given = [c for c in captions if c.strip()]
    firsts = {c.split(",", 1)[0].strip() for c in given}
    return firsts.pop() if len(given) >= 2 and len(firsts) == 1 else ""


def progress_html(view: RunView | None) -> str:
    if view is None:
        return "<div id='train-progress'>No run selected.</div>"
    total = max(view.total, 1)
    hours, rest = divmod(int(view.eta_s), 3600)
    eta = f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
    eta = f"{eta} left" if view.live and view.step else ""
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
    resumed = f" (resumed from step {view.resumed_from})" if view.resumed_from is not None else ""
    words = {
        "starting": ("Resuming" if view.resuming else "Starting") + ": loading the base model…",
        "running": f"Training…{resumed}",
        "done": f"Done. The adapter is in the library as **{view.library_name or view.name}**, ready in Generate.",
        "cancelled": _cancelled_words(view),
        "error": f"⚠ Error: {page_words(view.message)}",
        "interrupted": f"⚠ Interrupted: {page_words(view.message)}",
    }
    text = f"**{view.name}**: {words.get(view.status, view.status)}"
    if "steps_per_epoch" in view.plan:  # runs made before the start event said it have no plan to show
        text += "\n\n" + plan_markdown(view.plan)
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


def _cancelled_words(view: RunView) -> str:
    if not view.losses:
        return "Cancelled before training began: nothing was learned. **Resume** starts it again."
    kept = (
        f" The adapter learned so far is in the library as **{view.library_name}**: try it in Generate, download it "
        "or rename it in Adapters."
        if view.library_name
        else " The adapter learned so far was saved in the run folder."
    )
    go_on = f" **Resume** trains on from step {view.step}." if list_checkpoints(view.run_dir) else ""
    return f"Cancelled at step {view.step}.{kept}{go_on}"


def caption_rows(paths: list | None, max_files: int = MAX_UPLOAD_FILES) -> tuple[list[list[str]], str]:
    """The caption table's rows for an upload (thumbnail, file, caption, check) and the upload's problems, if any;
    each image is read as training will read it, so a file that is no picture is flagged as it arrives."""
    uploads, problems = pair_uploads(paths or [], max_files)
    rows = []
    for u in uploads:
        problem = image_problem(u.path)
        problems += [f"{u.path.name}: {problem}"] if problem else []
        rows.append([f"![{u.path.name}](/gradio_api/file={u.path})", u.path.name, u.caption, _flag(problem)])
    note = ("⚠ " + page_words("; ".join(problems))) if problems else ""
    return rows, note


def _flag(problem: str) -> str:
    return f"⚠ {problem}" if problem else ""


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
                        headers=["image", "file", "caption", "check"],
                        datatype=["markdown", "str", "str", "str"],
                        column_count=(4, "fixed"),
                        interactive=True,
                        label="Captions: type or edit one per image",
                        elem_id="captions",
                        static_columns=[0, 1, 3],
                    )
                    self.data_plan = gr.Markdown(elem_id="data-plan")
                with gr.Column(scale=2):
                    self.settings = SettingsForm()
                    self.name_note = gr.Markdown(self.name_note_text(""), elem_id="name-note")
                    self.native_size = gr.Markdown(elem_id="native-size")
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
                self.loss_plot = gr.LinePlot(
                    x="step",
                    y="loss",
                    color="series",
                    color_map={RAW: _hex(RAW_COLOR), SMOOTHED: _hex(SMOOTHED_COLOR)},
                    caption=LOSS_CAPTION,
                    label="Loss",
                    height=260,
                    elem_id="loss-plot",
                )
                with gr.Column():
                    self.previews = gr.Gallery(
                        label="Previews as training goes", columns=4, height=260, elem_id="previews"
                    )
                    self.preview_prompt = gr.Markdown(elem_id="preview-prompt")
            # Polls once a second while a run is live, and not at all otherwise (an idle page costs nothing).
            self.timer = gr.Timer(1.0, active=False)
            self.shown_choices = gr.State([])  # the run list as last sent to the browser

    @staticmethod
    def native_size_text(base_model: str) -> str:
        """The base model's native size (what resolution 0 trains at), read from its configs; or what is wrong."""
        try:
            size = native_size_of((base_model or "").strip() or "builtin")
        except UserError as exc:
            return f"⚠ {page_words(str(exc))}"
        return f"Native size of this base model: **{size}×{size} px** (resolution 0 trains at it)."

    def wire(self, app: gr.Blocks) -> None:
        settings = self.settings.inputs
        run_view = [self.progress, self.loss_plot, self.previews, self.status, self.preview_prompt]
        listing = [self.run_picker, self.shown_choices, self.timer]
        trigger, name = self.settings.controls["trigger_word"], self.settings.controls["name"]
        self.files.change(self.on_upload, [self.files, trigger], [self.table, self.message, trigger])
        for control in settings:
            control.change(self.show_command, settings, [self.command, self.config_json])
        base = self.settings.controls["base_model"]
        for changed in [self.files.change, base.blur, base.submit] + [c.change for c in settings if c is not base]:
            changed(self.show_plan, [self.files, *settings], self.data_plan)
        name.change(self.name_note_text, name, self.name_note)
        for done_typing in (base.blur, base.submit):  # not per keystroke: a hub id's configs are fetched
            done_typing(self.native_size_text, base, self.native_size)
        app.load(self.native_size_text, base, self.native_size)
        train = self.train_button.click(
            self.on_train, [self.files, self.table, *settings], [self.message, self.run_picker]
        )
        cancel = self.cancel_button.click(self.on_cancel, self.run_picker, [self.message, self.run_picker])
        resume = self.resume_button.click(self.on_resume, self.run_picker, self.message)
        for pressed in (train, cancel, resume):  # polling starts with a run (and its own ticks stop it after)
            after = pressed.then(self.poll_state, None, self.timer)
            after.then(self.refresh, self.run_picker, run_view)  # a trainer may have ended before any tick
            after.then(self.refresh_choices, [self.run_picker, self.shown_choices], listing)
        self.timer.tick(self.refresh, self.run_picker, run_view)
        self.timer.tick(self.refresh_choices, [self.run_picker, self.shown_choices], listing)
        self.run_picker.change(self.refresh, self.run_picker, run_view)
        self.run_picker.focus(self.refresh_choices, [self.run_picker, self.shown_choices], listing)
        loaded = app.load(self.on_load, None, self.run_picker).then(self.poll_state, None, self.timer)
        loaded.then(self.refresh, self.run_picker, run_view)  # the picked run may be the one built in: no change
        app.load(self.show_command, settings, [self.command, self.config_json])
        app.load(self.show_plan, [self.files, *settings], self.data_plan)
        if self.preload_files:
            app.load(self.on_upload, [self.files, trigger], [self.table, self.message, trigger])

    def caption_rows(self, paths):
        return caption_rows(paths, self.max_upload_files)

    def on_upload(self, paths, trigger):
        """The caption table for an upload, and the trigger word: the first tag every caption starts with is
        proposed when the box is empty."""
        rows, note = self.caption_rows(paths)
        tag = common_first_tag([row[2] for row in rows]) if not str(trigger or "").strip() else ""
        if not tag:
            return rows, note, gr.skip()
        said = f"Trigger word set to **{tag}**: every caption starts with it. Change it if you like."
        return rows, "\n\n".join(n for n in (note, said) if n), gr.Textbox(value=tag)

    def name_note_text(self, typed):
        return name_note(self.library, typed, "Saved in the library under the run folder's name (date and time).")

    def poll_state(self):
        """The run view's timer: ticking while a run is live, stopped otherwise."""
        return gr.Timer(active=active_run(self.runs_root) is not None)

    def run_choices(self, views: list[RunView] | None = None) -> list[tuple[str, str]]:
        views = list_runs(self.runs_root) if views is None else views
        return [(f"{v.run_dir.name} · {v.status}", v.run_dir.name) for v in views]

    def show_command(self, *settings):
        try:
            config = self.settings.config(settings)
        except UserError as exc:
            return f"# {exc}", ""
        config.data = "<your images folder>"
        return config.cli_command(), json.dumps(config.to_dict(), indent=2)

    def show_plan(self, paths, *settings):
        """Before Train: what the uploaded images would make with these settings (images, buckets, steps)."""
        if not paths:
            return ""
        try:
            plan = upload_plan(paths, self.settings.config(settings), self.max_upload_files)
        except UserError as exc:
            return f"⚠ {page_words(str(exc))}"
        return "**If trained now:**\n\n" + plan_markdown(plan)

    def on_train(self, paths, rows, *settings):
        """Check everything (settings, adapter name, base model, optimiser, upload) before any work, then stage the
        upload and start the run."""
        try:
            config = self.settings.config(settings)
            if config.name:
                config.name = self.library.new_name(config.name)  # the cleaned name, or refused now if taken
            check_base_model(config.base_model, None if config.prediction_type == "auto" else config.prediction_type)
            check_optimizer(config, pick_device())
            check_log_with(config.log_with)
            uploads, problems = pair_uploads(paths or [], self.max_upload_files)
            if problems:
                raise UserError("the upload has problems:\n  " + "\n  ".join(problems))
            typed = typed_captions(rows)
            for up in uploads:
                if str(typed.get(up.path.name, "") or "").strip():
                    up.caption = str(typed[up.path.name]).strip()
            staged = stage_dataset(uploads, config.default_caption, into=self.runs_root)
            if not config.preview_prompt:  # the first caption, as training sees it: with the trigger word
                first = next((u.caption for u in uploads if u.caption), "") or config.default_caption
                config.preview_prompt = (with_trigger(first, config.trigger_word),)
            run_dir = start_run(config, staged, self.runs_root, self.library.root)
        except UserError as exc:
            message = page_words(str(exc)).replace("\n", "<br>")
            return f"⚠ Nothing started: {message}", gr.Dropdown(choices=self.run_choices())
        saved = f"**{config.name}**" if config.name else "the run folder's name"
        return (
            f"Started run **{run_dir.name}**; the adapter will be saved in the library as {saved}.",
            gr.Dropdown(choices=self.run_choices(), value=run_dir.name),
        )

    def on_cancel(self, name):
        """Stop the training that runs, whichever run the picker shows (there is at most one), and show it."""
        live = active_run(self.runs_root)
        if live is None or not cancel_run(live.run_dir):
            return "No training is running.", gr.skip()
        return (
            f"Cancelling **{live.run_dir.name}**: it saves a checkpoint (so **Resume** can go on from there) and "
            "puts the adapter learned so far in the library as *name*-partial.",
            gr.Dropdown(choices=self.run_choices(), value=live.run_dir.name),
        )

    def on_resume(self, name):
        if not name:
            return "Choose a run to resume."
        try:
            resume_run(self.runs_root / name, self.runs_root)
        except UserError as exc:
            return f"⚠ {page_words(str(exc))}"
        return f"Resuming **{name}** from its newest checkpoint."

    def refresh(self, name):
        run_dir = self.runs_root / name if name else None
        view = view_run(run_dir) if run_dir and run_dir.is_dir() else None
        losses = loss_frame(view.losses if view else [])
        pictures = [
            (path, f"step {step} · {prompt}" + ("" if seed is None else f" (seed {seed})"))
            for path, step, prompt, seed in (view.previews if view else [])
        ]
        said = "; ".join(f"“{html.escape(p)}”" for p in view.preview_prompt) if view else ""
        prompt = f"Preview prompt{'s' if len(view.preview_prompt) > 1 else ''}: {said}" if said else ""
        return progress_html(view), losses, pictures, status_text(view), prompt

    def refresh_choices(self, name, shown):
        """Keep each run's state in the run list current (a run shown as starting reads done when it ends), and
        the timer ticking while a run is live (and one tick more, so its last state is shown). The list is only
        re-sent when it changed, so an open dropdown is not closed under the user; the picked run is never sent
        back, since a tick asked before Train's answer would carry the run picked before it."""
        views = list_runs(self.runs_root)
        runs = self.run_choices(views)
        was_live = any(label.endswith(("· starting", "· running")) for label, _ in shown or [])
        timer = gr.Timer(active=any(v.live for v in views) or was_live)
        if [list(c) for c in runs] == [list(c) for c in shown or []]:
            return gr.skip(), shown, timer
        if not name:  # nothing picked: follow the live run, if any
            live = next((v for v in views if v.live), None)
            return gr.Dropdown(choices=runs, value=live.run_dir.name if live else None), runs, timer
        return gr.Dropdown(choices=runs), runs, timer

    def on_load(self):
        live = active_run(self.runs_root)
        runs = self.run_choices()
        value = live.run_dir.name if live else (runs[0][1] if runs else None)
        return gr.Dropdown(choices=runs, value=value)
