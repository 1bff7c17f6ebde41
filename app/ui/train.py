"""The Train tab: upload and caption images, set the training settings, start, watch, cancel and resume runs."""

from __future__ import annotations

import functools
import html
import json
import secrets
from pathlib import Path

import gradio as gr

from adapters.base import check_base_model, model_geometry, native_size_of, pick_device
from adapters.errors import UserError
from adapters.formats import write_atomic
from adapters.library import Library, sanitize_name
from app.jobs import (
    MAX_UPLOAD_FILES,
    QUEUED_FILE,
    RunView,
    active_run,
    cancel_run,
    delete_run,
    list_runs,
    new_run_label,
    pair_uploads,
    read_log,
    rename_run,
    resume_run,
    run_folder,
    set_hidden,
    stage_dataset,
    start_run,
    view_run,
)
from app.ui.data import DataPanel
from app.ui.judge import judge_html
from app.ui.library import name_note
from app.ui.settings import SettingsForm, page_words
from trainer.checkpoint import list_checkpoints
from trainer.config import TrainConfig
from trainer.dataset import IMAGE_EXTENSIONS, bucket_counts, bucket_stride, image_problem, upright_size, with_trigger
from trainer.optim import check_optimizer
from trainer.plan import NO_STEPS, Plan, check, duration, estimate, mib
from trainer.runs import (
    PARTIAL_SUFFIX,
    RAW_COLOR,
    SMOOTHED_COLOR,
    SMOOTHING,
    EventLog,
    check_log_with,
    smoothed,
)

# page-only listeners repeated per setting: kept out of /info (it was 4.6 MB, and every API client reads it first)
QUIET = "undocumented"
PROBLEMS_SHOWN = 3  # unreadable event-log lines named in the status; the rest are counted
DATACHECK_JSON = "datacheck.json"  # a page run's data check at Train: findings, what was left out and kept
RAW, SMOOTHED = "each step", f"smoothed (EMA {SMOOTHING})"  # the loss plot's two lines, as its legend names them
LOSS_CAPTION = (
    f"Faint: the loss of each step, noisy at small batches. Dark: the same smoothed as TensorBoard smooths it, an "
    f"exponential moving average with weight {SMOOTHING}. The run folder gets this plot as loss.png when it ends."
)


def loss_frame(losses: list[tuple[int, float]]):
    """The loss plot's data, the raw loss and its smoothed line (`series` tells them apart), typed as numbers (the
    browser keeps the axis types of the first data it gets: untyped, every step and loss value would be a category
    label); None when there is no loss yet, which clears the plot. Not an empty frame: after one, gradio's plot
    (6.31) drew every later frame's axes but its lines without a colour, so no curve showed."""
    import pandas as pd

    if not losses:
        return None
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
        f"{plan['steps']} | {round(plan['epochs'], 1):g} |\n\n"
        f"Aspect-ratio buckets (width × height: images): {buckets}"
    )


def machine_markdown(plan: Plan) -> str:
    """The run's plan on this machine (trainer/plan.py) in the page's words: what it needs, what it turns on,
    and, when it does not fit, the settings that would."""
    lines = [f"**On this machine** ({plan.device}):"]
    if plan.gpu_gib:
        lines.append(f"GPU memory about {plan.need_gib:.1f} GiB at its peak, of {plan.gpu_available_gib:.1f} GiB")
    lines.append(f"system memory {plan.system_gib:.1f} GiB · disk {mib(plan.disk_mib)}")
    if plan.steps:
        lines.append(
            f"about {duration(plan.total_seconds)} ({plan.step_seconds:.2f} s a step; previews, judging and saves "
            "not counted)"
        )
    else:
        lines.append(f"{plan.step_seconds:.2f} s a step; {page_words(NO_STEPS)} (upload them)")
    lines += [f"turns on {page_words(what)}" for what in plan.turned_on]
    if plan.torch_compile:  # minutes before the first step: said, with why (the time above counts them)
        lines.append(f"compiles the UNet's blocks first ({page_words(plan.torch_compile_why)})")
    lines += [page_words(what) for what in plan.notes]
    text = " · ".join(lines[:1]) + " " + " · ".join(lines[1:])
    if not plan.fits:
        text += f"\n\n<span id='plan-refusal'>⚠ Would not fit: {page_words(plan.advice)}</span>"
    return text


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
    unreadable = [u.path.name for u in uploads if u.path not in images]
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
        unreadable=unreadable,
    )


def unreadable_note(names: list[str]) -> str:
    """Below the plan: the uploaded images training would refuse, which the plan does not count."""
    if not names:
        return ""
    return (
        f"\n\n⚠ {', '.join(names)} cannot be read, so the counts above leave "
        f"{'it' if len(names) == 1 else 'them'} out; Train refuses to start until you press *Leave out* beside "
        f"{'it' if len(names) == 1 else 'each'} in the data check below the caption table (or take "
        f"{'it' if len(names) == 1 else 'them'} out of the upload)."
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
        "queued": f"Queued (position {view.queue_position}): it starts when the run before it ends. **Cancel** takes "
        "it out of the queue.",
        "starting": ("Resuming" if view.resuming else "Starting") + ": loading the base model…",
        "running": f"Training…{resumed}",
        "done": f"Done. The adapter is in the library as **{view.library_name or view.name}**, ready in Generate."
        + _replaced_words(view),
        "cancelled": _cancelled_words(view),
        "error": f"⚠ Error: {page_words(view.message)}",
        "interrupted": f"⚠ Interrupted: {page_words(view.message)}",
    }
    text = f"**{view.label or view.name}**: {words.get(view.status, view.status)}"
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


def _replaced_words(view: RunView) -> str:
    if not view.library_replaced:
        return ""
    names = " and ".join(f"**{n}**" for n in view.library_replaced)
    return f" It replaces {names}, the adapter its cancelled attempt put there."


def _cancelled_words(view: RunView) -> str:
    if not view.losses:
        return "Cancelled before training began: nothing was learned. **Resume** starts it again."
    kept = (
        f" The adapter learned so far is in the library as **{view.library_name}**: try it in Generate, download it"
        + (
            ", or press **Keep partial adapter** to keep it under its own name (resuming to the end replaces it)."
            if view.library_name.endswith(PARTIAL_SUFFIX)
            else "."
        )
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
                    self.data = DataPanel(max_upload_files)  # the data check and the captioner (app/ui/data.py)
                with gr.Column(scale=2):
                    self.settings = SettingsForm()
                    self.name_note = gr.Markdown(self.name_note_text(""), elem_id="name-note")
                    self.native_size = gr.Markdown(elem_id="native-size")
                    with gr.Accordion("Equivalent command line and config file", open=False):
                        self.command = gr.Code(language="shell", label="CLI", elem_id="cli-command")
                        self.config_json = gr.Code(language="json", label="config.json")
            # what the run would need on this machine, beside the button that starts it (trainer/plan.py)
            self.machine_plan = gr.Markdown(elem_id="machine-plan")
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
            self._build_run_tools()
            self.progress = gr.HTML(progress_html(None))
            with gr.Row():
                self.loss_plot = gr.LinePlot(
                    x="step",
                    y="loss",
                    color="series",
                    color_map={RAW: _hex(RAW_COLOR), SMOOTHED: _hex(SMOOTHED_COLOR)},
                    caption=LOSS_CAPTION,
                    label="Loss",
                    elem_id="loss-plot",  # no fixed height: with one, the legend and the caption were cut off
                )
                with gr.Column():
                    self.previews = gr.Gallery(
                        label="Previews as training goes", columns=4, height=260, elem_id="previews"
                    )
                    self.preview_prompt = gr.Markdown(elem_id="preview-prompt")
            self._build_log()
            self.judge = gr.HTML(elem_id="judge")  # the judge's checkpoint x strength grid (app/ui/judge.py)
            # Polls once a second while a run is live, and not at all otherwise (an idle page costs nothing).
            self.timer = gr.Timer(1.0, active=False)
            self.shown_choices = gr.State([])  # the run list as last sent to the browser
            self._build_session()

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
        run_view = [self.progress, self.loss_plot, self.previews, self.status, self.judge, self.preview_prompt]
        listing = [self.run_picker, self.shown_choices, self.timer]
        choosing = [self.run_picker, self.shown_choices, self.show_hidden]
        trigger, name = self.settings.controls["trigger_word"], self.settings.controls["name"]
        plans = [self.data_plan, self.machine_plan]
        # One listener per change of a field: gradio's page sends a change again when a listener of it that was held
        # back (it was still running) ends, and it sends it to every listener of that change. Two slow listeners of
        # one field, held back in turn, thus sent each other again without end, a few requests a second for as long
        # as the page stayed open. What else a change starts runs after that one listener (`.then`).
        uploaded = self.files.change(self.on_upload, [self.files, trigger], [self.table, self.message, trigger])
        uploaded.then(
            self.show_plans, [self.files, *settings], plans, trigger_mode="always_last", api_visibility=QUIET
        )
        base = self.settings.controls["base_model"]
        changed = {}  # field name: its change's one listener, for what runs after it
        for key, control in self.settings.controls.items():
            if control is base:  # per keystroke only the command: a hub id's configs are fetched on blur/submit
                fn, outputs = self.show_command, [self.command, self.config_json]
            elif control is name:
                fn, outputs = self.on_name_changed, [self.command, self.config_json, *plans, self.name_note]
            else:
                fn, outputs = self.on_setting_changed, [self.command, self.config_json, *plans]
            inputs = settings if control is base else [self.files, *settings]
            changed[key] = control.change(fn, inputs, outputs, api_visibility=QUIET)
        for done_typing in (base.blur, base.submit):  # not per keystroke: a hub id's configs are fetched
            done_typing(self.show_plans, [self.files, *settings], plans, api_visibility=QUIET)
            done_typing(self.native_size_text, base, self.native_size)
        app.load(self.native_size_text, base, self.native_size)
        app.load(self.show_machine_plan, [self.files, *settings], self.machine_plan)
        self.data.wire(self.files, self.table, self.settings.controls, self.message, changed)
        train = self.train_button.click(
            self.on_train_pressed,
            [self.files, self.table, self.data.dropped, self.data.report, self.data.kept, *settings],
            [self.message, self.run_picker],
        )
        cancel = self.cancel_button.click(self.on_cancel, self.run_picker, [self.message, self.run_picker])
        resume = self.resume_button.click(self.on_resume, self.run_picker, self.message)
        ticked = [*listing, *run_view, self.log]
        for pressed in (train, cancel, resume):  # polling starts with a run (and its own ticks stop it after)
            pressed.then(self.tick, choosing, ticked)  # a trainer may have ended before any tick
        self.timer.tick(self.tick, choosing, ticked)
        self.run_picker.focus(self.refresh_choices, choosing, listing)
        loaded = app.load(self.on_load, None, self.run_picker).then(self.poll_state, None, self.timer)
        loaded.then(self.refresh, self.run_picker, run_view)  # the picked run may be the one built in: no change
        app.load(self.show_command, settings, [self.command, self.config_json])
        app.load(self.show_plan, [self.files, *settings], self.data_plan)
        self._wire_run_tools(run_view)
        self._wire_session(app, uploaded)

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
        """The run view's timer: ticking while a run is live or waits in the queue, stopped otherwise."""
        return gr.Timer(active=any(v.live or v.status == "queued" for v in list_runs(self.runs_root)))

    def run_choices(self, views: list[RunView] | None = None, show_hidden: bool = False) -> list[tuple[str, str]]:
        """The run list: each run by its shown name and state; hidden runs only when `show_hidden`."""
        views = list_runs(self.runs_root) if views is None else views
        return [
            (f"{v.shown_name}{' (hidden)' if v.hidden else ''} · {v.status}", v.run_dir.name)
            for v in views
            if show_hidden or not v.hidden
        ]

    def show_command(self, *settings):
        try:
            config = self.settings.config(settings)
        except UserError as exc:
            return f"# {exc}", ""
        config.data = "<your images folder>"
        return config.cli_command(), json.dumps(config.to_dict(), indent=2)

    def on_setting_changed(self, paths, *settings):
        """What a changed setting changes on the page: the command and its config, and both plans."""
        return *self.show_command(*settings), *self.show_plans(paths, *settings)

    def on_name_changed(self, paths, *settings):
        """As any setting, and the note on the name the adapter will be saved under."""
        typed = settings[list(self.settings.controls).index("name")]
        return *self.on_setting_changed(paths, *settings), self.name_note_text(typed)

    def show_plans(self, paths, *settings):
        return self.show_plan(paths, *settings), self.show_machine_plan(paths, *settings)

    def on_pick_run(self, name):
        """The picked run's view, its trainer log and the label of its Hide button."""
        return *self.refresh(name), self.refresh_log(name), self.hide_label(name)

    def show_plan(self, paths, *settings):
        """Before Train: what the uploaded images would make with these settings (images, buckets, steps)."""
        if not paths:
            return ""
        try:
            config = self.settings.config(settings)
            plan = upload_plan(paths, config, self.max_upload_files)
        except UserError as exc:
            return f"⚠ {page_words(str(exc))}"
        counted = (
            f"\n\nThe steps come from *Epochs* ({config.epochs} × {plan['steps_per_epoch']}): the *Steps* box "
            f"({config.steps}) is not used; set *Epochs* to 0 to count the run in steps."
            if config.epochs
            else ""
        )
        return "**If trained now:**\n\n" + plan_markdown(plan) + counted + unreadable_note(plan["unreadable"])

    def show_machine_plan(self, paths, *settings):
        """Beside Train: what a run with these settings would need here (with uploads, their epochs' steps)."""
        try:
            config = self.settings.config(settings)
            check_optimizer(config, pick_device())  # what Train would refuse, said before it is pressed
            uploads, _ = pair_uploads(paths or [], self.max_upload_files)
            pictures = [u.path for u in uploads]
            plan = estimate(config, device=pick_device(), images=len(uploads) * config.repeats, pictures=pictures)
        except UserError as exc:
            return f"⚠ {page_words(str(exc))}"
        return machine_markdown(plan)

    def on_train_pressed(self, paths, rows, dropped, report, kept, *settings):
        return self.on_train(paths, rows, *settings, dropped=dropped, report=report, kept=kept)

    def on_train(self, paths, rows, *settings, dropped=(), report=None, kept=()):
        """Check everything (settings, adapter name, base model, optimiser, upload, fit) before any work, then stage
        the upload, less the images the data check's *Leave out* left out (`dropped`), and start the run."""
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
            left_out = [u.path.name for u in uploads if u.path.name in set(dropped or [])]
            uploads = [u for u in uploads if u.path.name not in left_out]
            # a run its plan says will not fit is refused here, with the settings that would (as `train` does)
            check(estimate(config, device=pick_device(), images=len(uploads) * config.repeats))
            typed = typed_captions(rows)
            for up in uploads:
                if str(typed.get(up.path.name, "") or "").strip():
                    up.caption = str(typed[up.path.name]).strip()
            staged = stage_dataset(uploads, config.default_caption, into=self.runs_root)
            if not config.preview_prompt:  # the first caption, as training sees it: with the trigger word
                first = next((u.caption for u in uploads if u.caption), "") or config.default_caption
                config.preview_prompt = (with_trigger(first, config.trigger_word),)
            run_dir = start_run(config, staged, self.runs_root, self.library.root)
            if report is not None:  # the data check as it stood at Train, beside the run's plan and scores
                checked = {"findings": list(report), "left_out": left_out, "kept": list(kept or [])}
                write_atomic(run_dir / DATACHECK_JSON, json.dumps(checked, indent=1).encode())
        except UserError as exc:
            message = page_words(str(exc)).replace("\n", "<br>")
            return f"⚠ Nothing started: {message}", gr.Dropdown(choices=self.run_choices())
        saved = f"**{config.name}**" if config.name else "the run folder's name"
        view = view_run(run_dir)
        without = f" Left out of this run: {', '.join(left_out)}." if left_out else ""
        said = (
            f"Queued (position {view.queue_position}): run **{run_dir.name}** starts when the run before it ends"
            if view.status == "queued"
            else f"Started run **{run_dir.name}**"
        )
        return (
            f"{said}; the adapter will be saved in the library as {saved}.{without}",
            gr.Dropdown(choices=self.run_choices(), value=run_dir.name),
        )

    def on_cancel(self, name):
        """Take the picked run out of the queue if it waits there; else stop the training that runs, whichever run
        the picker shows (there is at most one), and show it."""
        if name and (self.runs_root / name / QUEUED_FILE).is_file() and cancel_run(self.runs_root / name):
            return f"Took **{name}** out of the queue: it will not start.", gr.skip()
        live = active_run(self.runs_root)
        if live is None or not cancel_run(live.run_dir):
            return "No training is running.", gr.skip()
        return (
            f"Cancelling **{live.run_dir.name}**: it saves a checkpoint (so **Resume** can go on from there) and "
            f"puts the adapter learned so far in the library as **{sanitize_name(live.name)}{PARTIAL_SUFFIX}** "
            "(the finished adapter replaces it if the run is resumed to the end; rename it to keep it).",
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
        previews = view.previews if view else []
        # a thumbnail's caption holds a dozen characters: the step, and the prompt's number when there are several
        # (the prompts are listed in full under the pictures)
        number = {p: i + 1 for i, p in enumerate(dict.fromkeys(prompt for _, _, prompt, _ in previews))}
        several = len(number) > 1
        pictures = [
            (path, f"step {step}" + (f" · #{number[prompt]}" if several else ""))
            for path, step, prompt, _ in previews
        ]
        shown = view.preview_prompt if view else []
        said = "; ".join(f"{f'#{i + 1} ' if len(shown) > 1 else ''}“{html.escape(p)}”" for i, p in enumerate(shown))
        prompt = f"Preview prompt{'s' if len(shown) > 1 else ''}: {said}" if said else ""
        return progress_html(view), losses, pictures, status_text(view), judge_html(run_dir if view else None), prompt

    def tick(self, name, shown, show_hidden=False):
        """One timer tick: the run list and the timer (`refresh_choices`), then the picked run's view and log.
        One handler, so the tick that stops the timer also draws the run's last state: gradio skips a listener's
        tick while its previous one still runs, and with the view drawn by a listener of its own, a slow view (a
        loaded machine) missed its last tick and the page kept showing a cancelled run as "Cancelling"."""
        listing = self.refresh_choices(name, shown, show_hidden)
        return (*listing, *self.refresh(name), self.refresh_log(name))

    def refresh_choices(self, name, shown, show_hidden=False):
        """Keep each run's state in the run list current (a run shown as starting reads done when it ends), and
        the timer ticking while a run is live (and one tick more, so its last state is shown). The list is only
        re-sent when it changed, so an open dropdown is not closed under the user; the picked run is never sent
        back, since a tick asked before Train's answer would carry the run picked before it."""
        views = list_runs(self.runs_root)
        runs = self.run_choices(views, show_hidden)
        was_live = any(label.endswith(("· starting", "· running", "· queued")) for label, _ in shown or [])
        timer = gr.Timer(active=any(v.live or v.status == "queued" for v in views) or was_live)
        if [list(c) for c in runs] == [list(c) for c in shown or []]:
            return gr.skip(), shown, timer
        if name and name not in [value for _, value in runs]:  # deleted or hidden: the picker may not keep it
            return gr.Dropdown(choices=runs, value=None), runs, timer
        if not name:  # nothing picked: follow the live run, if any
            live = next((v for v in views if v.live), None)
            return gr.Dropdown(choices=runs, value=live.run_dir.name if live else None), runs, timer
        return gr.Dropdown(choices=runs), runs, timer

    def on_load(self):
        live = active_run(self.runs_root)
        runs = self.run_choices()
        value = live.run_dir.name if live else (runs[0][1] if runs else None)
        return gr.Dropdown(choices=runs, value=value)

    # -- Runs: their log, rename, hide, delete, load their settings ------------------------------------------------

    def _build_run_tools(self) -> None:
        with gr.Row():
            self.show_hidden = gr.Checkbox(label="Show hidden runs", value=False, elem_id="show-hidden")
            self.load_settings_button = gr.Button("Load its settings", elem_id="load-settings")
            self.hide_button = gr.Button("Hide", elem_id="hide-run")
            self.keep_partial_button = gr.Button("Keep partial adapter", elem_id="keep-partial")
            self.delete_run_button = gr.Button("Delete run", variant="stop", elem_id="delete-run")
        with gr.Row():
            with gr.Column(scale=3):
                self.run_new_name = gr.Textbox(label="New name for this run", elem_id="run-rename-to")
                self.run_name_note = gr.Markdown(elem_id="run-name-note")
            self.rename_run_button = gr.Button("Rename run", elem_id="rename-run")
        with gr.Row(visible=False) as self.confirm_run_row:
            gr.Markdown(
                "Delete this run's folder for good (its copy of the images, checkpoints, previews and log)? The "
                "adapter it put in the library stays there."
            )
            self.confirm_delete_run = gr.Button("Yes, delete the run", variant="stop", elem_id="confirm-delete-run")
            self.keep_run = gr.Button("Keep it", elem_id="keep-run")

    def _build_log(self) -> None:
        with gr.Accordion("Trainer log", open=False, elem_id="train-log-box"):
            self.log = gr.Textbox(
                label="What the trainer of this run wrote (its output and errors), newest last",
                lines=12,
                max_lines=12,
                interactive=False,
                autoscroll=True,
                buttons=["copy"],
                elem_id="train-log",
            )

    def _wire_run_tools(self, run_view: list) -> None:
        picker, listing = self.run_picker, [self.run_picker, self.shown_choices]
        picker.change(self.on_pick_run, picker, [*run_view, self.log, self.hide_button])  # one listener (see wire)
        self.show_hidden.change(
            self.refresh_choices, [picker, self.shown_choices, self.show_hidden], [*listing, self.timer]
        )
        self.hide_button.click(self.on_hide, [picker, self.show_hidden], [self.message, *listing, self.hide_button])
        self.delete_run_button.click(lambda: gr.Row(visible=True), None, self.confirm_run_row)
        self.keep_run.click(lambda: gr.Row(visible=False), None, self.confirm_run_row)
        self.confirm_delete_run.click(
            self.on_delete_run, [picker, self.show_hidden], [self.message, *listing, self.confirm_run_row]
        )
        self.run_new_name.change(self.run_name_note_text, [picker, self.run_new_name], self.run_name_note)
        renamed = self.rename_run_button.click(
            self.on_rename_run, [picker, self.run_new_name, self.show_hidden], [self.message, *listing]
        )
        renamed.then(self.refresh, picker, run_view)  # the status names the run by its new name
        self.load_settings_button.click(self.on_load_settings, picker, [self.message, *self.settings.inputs])
        kept = self.keep_partial_button.click(self.on_keep_partial, picker, self.message)
        kept.then(self.refresh, picker, run_view)  # the status names the adapter by its new name

    def on_keep_partial(self, name):
        """A cancelled run's `<name>-partial` adapter, renamed `<name>-step<N>` in the library: its own adapter from
        then on, which resuming the run to the end no longer replaces (the run's log records the new name)."""
        try:
            view = view_run(run_folder(self.runs_root, name))
            partial = view.library_name
            if view.status != "cancelled" or not partial.endswith(PARTIAL_SUFFIX):
                raise UserError(
                    "Keep partial adapter is for a cancelled run whose adapter is in the library as <name>-partial; "
                    f"run {view.shown_name} is {view.status}"
                )
            if not self.library.taken(partial):
                raise UserError(f"the library has no adapter named {partial!r} any more (renamed or deleted?)")
            new = self.library.new_name(f"{partial.removesuffix(PARTIAL_SUFFIX)}-step{view.step}")
            self.library.rename(partial, new)
        except UserError as exc:
            return f"⚠ {page_words(str(exc))}"
        EventLog(view.run_dir).emit("library", name=new, library=str(self.library.root), partial=False, kept=partial)
        return f"Kept: **{partial}** is now **{new}** in the library, and resuming the run no longer replaces it."

    def refresh_log(self, name):
        """The picked run's trainer log (the newest lines), or what it waits for."""
        run_dir = self.runs_root / name if name else None
        if run_dir is None or not run_dir.is_dir():
            return ""
        if (run_dir / QUEUED_FILE).is_file():
            return "Waiting in the queue: its trainer has not started yet."
        return read_log(run_dir) or "The trainer has written nothing yet."

    def hide_label(self, name):
        hidden = bool(name) and (self.runs_root / name / "hidden").is_file()
        return gr.Button("Unhide" if hidden else "Hide")

    def _listing(self, show_hidden: bool, picked: str | None):
        """The run list as sent after a change to a run, keeping `picked` when it is still in it."""
        runs = self.run_choices(show_hidden=show_hidden)
        value = picked if picked in [value for _, value in runs] else None
        return gr.Dropdown(choices=runs, value=value), runs

    def on_hide(self, name, show_hidden):
        """Hide the picked run (failed or cancelled only) from the run list, or bring a hidden one back."""
        try:
            view = view_run(run_folder(self.runs_root, name))
            set_hidden(view.run_dir, not view.hidden)
        except UserError as exc:
            return f"⚠ {page_words(str(exc))}", gr.skip(), gr.skip(), gr.skip()
        said = (
            f"**{view.shown_name}** is back in the run list."
            if view.hidden
            else f"Hid **{view.shown_name}** from the run list; tick *Show hidden runs* to see it again."
        )
        return said, *self._listing(show_hidden, name), self.hide_label(name)

    def on_delete_run(self, name, show_hidden):
        """Delete the picked run's folder (never its adapter in the library); refused while it trains or waits."""
        try:
            view = view_run(run_folder(self.runs_root, name))
            delete_run(view.run_dir)
        except UserError as exc:
            return f"⚠ {page_words(str(exc))}", gr.skip(), gr.skip(), gr.Row(visible=False)
        kept = f" The adapter **{view.library_name}** stays in the library." if view.library_name else ""
        return f"Deleted run **{view.shown_name}**.{kept}", *self._listing(show_hidden, None), gr.Row(visible=False)

    def run_name_note_text(self, name, typed):
        """Under the new-name box: the name the run will be shown under (cleaned as adapter names are), or why not."""
        if not name or not str(typed or "").strip():
            return ""
        try:
            return f"Shown as **{new_run_label(self.runs_root, run_folder(self.runs_root, name), typed)}**."
        except UserError as exc:
            return f"⚠ {page_words(str(exc))}"

    def on_rename_run(self, name, typed, show_hidden):
        """Give the picked run the name the page shows for it; its folder and its adapter keep theirs."""
        try:
            run_dir = run_folder(self.runs_root, name)
            old = view_run(run_dir).shown_name
            label = rename_run(self.runs_root, run_dir, str(typed or ""))
        except UserError as exc:
            return f"⚠ {page_words(str(exc))}", gr.skip(), gr.skip()
        return f"Renamed run **{old}** to **{label}**.", *self._listing(show_hidden, name)

    def on_load_settings(self, name):
        """Put the picked run's settings (its config.json) back into the form."""
        skip = [gr.skip()] * len(self.settings.inputs)
        try:
            run_dir = run_folder(self.runs_root, name)
            config = TrainConfig.from_file(run_dir / "config.json")
        except UserError as exc:
            return f"⚠ {page_words(str(exc))}", *skip
        said = f"Loaded the settings of run **{view_run(run_dir).shown_name}** into the form."
        if config.name and self.library.taken(config.name):
            said += f" The library already has **{config.name}**: change *Name* before **Train**."
        return said, *self.settings.values_of(config)

    # -- The session: a reload keeps the uploads, captions and settings --------------------------------------------
    # They are kept in the browser (localStorage, through gr.BrowserState); the uploaded files themselves stay in
    # gradio's cache, which deletes them a day after upload and when the app stops, as any upload.

    def _build_session(self) -> None:
        # files None: nothing uploaded yet. The uploads under a secret of this run of the app (gradio's default):
        # its files are gone once it stops. The settings under the workspace's own secret: they outlive a restart.
        self.kept_uploads = gr.BrowserState({"files": None, "captions": {}}, storage_key=UPLOADS_KEY)
        self.kept_settings = gr.BrowserState(
            {}, storage_key=SETTINGS_KEY, secret=browser_secret(self.runs_root.parent)
        )
        self.restore_note = gr.State("")

    def _wire_session(self, app: gr.Blocks, uploaded) -> None:
        settings, trigger = self.settings.inputs, self.settings.controls["trigger_word"]
        base = self.settings.controls["base_model"]
        kept = [self.files, self.table, self.kept_uploads]
        # Kept by the browser itself, as each value changes: no server round trip that a busy queue could hold back
        # until after the user reloads (the values would then be the ones before the edit).
        gr.on([c.change for c in settings], None, settings, self.kept_settings, js=self.keep_settings_js())
        # Past the queue for the same reason (quick functions; the queue may be busy with the previews of a run):
        # the captions are kept as typed, and those kept for an upload come back at once, before the user can type
        # one that a late answer would then overwrite.
        self.table.input(self.keep_captions, [self.files, self.table], self.kept_uploads, queue=False)
        uploaded.then(self.apply_kept_captions, kept, [self.table, self.kept_uploads], queue=False)
        restored = app.load(
            self.restore,
            [self.files, self.kept_uploads, self.kept_settings],
            [self.files, *settings, self.restore_note],
            queue=False,  # before the user can change a setting that a late answer would put back
        )
        restored = restored.then(self.on_upload, [self.files, trigger], [self.table, self.message, trigger])
        restored = restored.then(self.apply_kept_captions, kept, [self.table, self.kept_uploads], queue=False)
        restored.then(self.say_restored, [self.restore_note, self.message], self.message)
        restored.then(self.native_size_text, base, self.native_size)

    def keep_settings_js(self) -> str:
        """The browser function that makes `{field: value}` of the setting controls' values (in their order)."""
        names = json.dumps(list(self.settings.controls))
        return f"(...values) => Object.fromEntries({names}.map((name, i) => [name, values[i]]))"

    def keep_captions(self, paths, rows):
        keys = _caption_keys(paths)
        return {
            "files": list(paths or []),
            "captions": {keys[n]: c for n, c in typed_captions(rows).items() if n in keys},
        }

    def apply_kept_captions(self, paths, rows, kept):
        """After an upload (or a reload): the captions typed for these very files (same image, same .txt) before;
        then keep what the table now holds."""
        keys, captions = _caption_keys(paths), (kept or {}).get("captions") or {}
        rows = rows.values.tolist() if hasattr(rows, "values") else [list(r) for r in rows or []]
        changed = False
        for row in rows:
            key = keys.get(row[1])
            if key in captions and captions[key] != row[2]:
                row[2], changed = captions[key], True
        state = {"files": list(paths or []), "captions": {keys[r[1]]: r[2] for r in rows if r[1] in keys}}
        return (rows if changed else gr.skip()), state

    def restore(self, current, kept_uploads, kept_settings):
        """The files and settings this browser had before the reload. A file is put back only if it is still in
        gradio's upload folder (a day after upload, or once the app restarted, it is gone: the page says so)."""
        files, note = (kept_uploads or {}).get("files"), ""
        if files is None:
            shown = gr.skip()
        else:
            usable = [p for p in files if isinstance(p, str) and _uploaded_file(p)]
            if len(usable) < len(files):
                note = (
                    f"⚠ {len(files) - len(usable)} file(s) uploaded before the page was reloaded are no longer on "
                    "the server (uploads are kept for a day, and not when the app restarts): upload them again."
                )
            shown = gr.skip() if usable == list(current or []) else (usable or None)
        values = self.settings.usable(kept_settings if isinstance(kept_settings, dict) else {})
        return shown, *[values.get(name, gr.skip()) for name in self.settings.controls], note

    @staticmethod
    def say_restored(note, message):
        return "\n\n".join(m for m in (note, message) if m) if note else gr.skip()


UPLOADS_KEY, SETTINGS_KEY = "lora-studio:train-uploads", "lora-studio:train-settings"  # in the browser's storage
SECRET_FILE = ".browser-secret"


def browser_secret(workspace: Path) -> str:
    """The key the browser's copy of the settings is encrypted with, kept in the workspace (`.browser-secret`) so
    that a restarted app on the same workspace reads them back; made on first use. A workspace that cannot be
    written gets one for this run of the app only."""
    path = Path(workspace) / SECRET_FILE
    try:
        kept = path.read_text().strip()
        if len(kept) >= 16:
            return kept
    except OSError:
        pass
    made = secrets.token_hex(16)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, made.encode())
    except OSError:
        pass
    return made


def _caption_keys(paths) -> dict[str, str]:
    """Image file name -> the upload it is (the image's and its .txt's paths in gradio's cache, named by content), so
    a caption typed for an image comes back only for that same image and caption file."""
    paths = [Path(p) for p in paths or []]
    texts = {p.stem: str(p) for p in paths if p.suffix.lower() == ".txt"}
    return {p.name: f"{p}|{texts.get(p.stem, '')}" for p in paths if p.suffix.lower() != ".txt"}


def _uploaded_file(path: str) -> bool:
    """Whether `path` is a file in gradio's upload folder (a path kept in the browser is never trusted further)."""
    from gradio.utils import get_upload_folder

    resolved = Path(path).resolve()
    return resolved.is_relative_to(Path(get_upload_folder()).resolve()) and resolved.is_file()
