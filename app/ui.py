"""The web UI: Train, Generate and Adapters tabs over the same trainer, runtime and library as the CLI.

    lora-studio ui [--host 127.0.0.1] [--port 7860] [--auth user:pass] [--workspace DIR]

The page holds no state that matters: runs live in `<workspace>/runs/` and adapters in `<workspace>/library/`,
so a closed browser or a restarted UI loses nothing. Errors are shown in the page, in the status line of the
tab where they happened.
"""

from __future__ import annotations

import dataclasses
import html
import json
import random
import threading
import typing
from pathlib import Path

import gradio as gr

from adapters.base import generation_defaults
from adapters.errors import UserError
from adapters.library import Library
from adapters.runtime import SCHEDULERS as RUNTIME_SCHEDULERS
from app.jobs import (
    active_run,
    cancel_run,
    list_runs,
    pair_uploads,
    resume_run,
    stage_dataset,
    start_run,
    view_run,
)
from trainer.config import TrainConfig

COMMON_FIELDS = (
    "name base_model trigger_word steps rank alpha learning_rate resolution batch_size attention seed "
    "preview_prompt preview_every"
).split()
HIDDEN_FIELDS = {"data", "output", "run_dir", "library", "overwrite", "resume"}
# The page shows previews as training goes and keeps runs resumable; the CLI defaults are leaner.
UI_DEFAULTS = {"preview_every": 100, "save_every": 200}
SCHEDULERS = {"model default": None, **{name: name for name in RUNTIME_SCHEDULERS}}
NONE = "(none)"
SLOTS = 4
THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
SAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "sample_images"


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def _setting(f: dataclasses.Field, hint) -> gr.components.Component:
    """A form control for one TrainConfig field, labelled and explained by the field's own help text."""
    value = UI_DEFAULTS.get(f.name, f.default)
    common = dict(label=_label(f.name), info=f.metadata["help"], elem_id=f"setting-{f.name}")
    if f.metadata.get("choices"):
        return gr.Radio(list(f.metadata["choices"]), value=value, **common)
    if hint is bool:
        return gr.Checkbox(value=value, **common)
    if hint is int:
        return gr.Number(value=value, precision=0, **common)
    if hint is float:
        return gr.Number(value=value, **common)
    return gr.Textbox(value=value, **common)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _progress_html(view) -> str:
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


def _status_text(view) -> str:
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
    return f"**{view.name}**: {words.get(view.status, view.status)}"


class StudioCache:
    """One loaded base pipeline at a time, shared by every Generate request; a lock keeps requests in turn."""

    def __init__(self):
        self.studio = None
        self.lock = threading.Lock()

    def get(self, base_model: str):
        from adapters.runtime import Studio

        if self.studio is None or self.studio.base_model != base_model:
            self.studio = None
            self.studio = Studio(base_model)
        return self.studio


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


def build_app(workspace: str | Path = ".", base_model: str = "builtin", preload: str | Path | None = None):
    """The Blocks app for a workspace folder (holding `runs/` and `library/`)."""
    workspace = Path(workspace)
    runs_root, library = workspace / "runs", Library(workspace / "library")
    studios = StudioCache()
    hints = typing.get_type_hints(TrainConfig)
    hidden = set(HIDDEN_FIELDS)
    if _gpu_count() < 2:  # the number of GPUs is offered only where there is a choice
        hidden.add("num_processes")
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name not in hidden]
    common = [f for f in fields if f.name in COMMON_FIELDS]
    advanced = [f for f in fields if f.name not in COMMON_FIELDS]
    preload_files = sorted(str(p) for p in Path(preload).iterdir() if p.is_file()) if preload else None
    try:
        defaults = generation_defaults(base_model)  # the model's recommended guidance, for the sliders
    except UserError:
        defaults = {"guidance": 7.5, "guidance_rescale": 0.0}

    def library_names() -> list[str]:
        return [e.name for e in library.list()]

    def run_choices():
        return [(f"{v.run_dir.name} · {v.status}", v.run_dir.name) for v in list_runs(runs_root)]

    with gr.Blocks(title="lora-studio") as app:
        gr.Markdown("# lora-studio\nTrain a LoRA style adapter from a handful of images, then use it.")
        with gr.Tab("Train", id="train"):
            with gr.Row():
                with gr.Column(scale=3):
                    files = gr.File(
                        label="Style images (.png, .jpg, .webp) and their .txt captions",
                        file_count="multiple",
                        file_types=[".png", ".jpg", ".jpeg", ".webp", ".txt"],
                        type="filepath",
                        value=preload_files,
                        height=220,
                        elem_id="upload",
                    )
                    table = gr.Dataframe(
                        headers=["image", "file", "caption"],
                        datatype=["markdown", "str", "str"],
                        column_count=(3, "fixed"),
                        interactive=True,
                        label="Captions: type or edit one per image",
                        elem_id="captions",
                        static_columns=[0, 1],
                    )
                with gr.Column(scale=2):
                    settings = {f.name: _setting(f, hints[f.name]) for f in common}
                    with gr.Accordion("Advanced", open=False):
                        settings.update({f.name: _setting(f, hints[f.name]) for f in advanced})
                    with gr.Accordion("Equivalent command line and config file", open=False):
                        command = gr.Code(language="shell", label="CLI", elem_id="cli-command")
                        config_json = gr.Code(language="json", label="config.json")
            with gr.Row():
                train_button = gr.Button("Train", variant="primary", elem_id="train-button")
                cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
                resume_button = gr.Button("Resume", elem_id="resume-button")
            # What the last button press or upload did, and, below it, the selected run's live state: two places,
            # so the once-a-second run refresh never wipes a message the person has not read yet.
            train_message = gr.Markdown(elem_id="train-message")
            train_status = gr.Markdown(elem_id="train-status")
            run_picker = gr.Dropdown(label="Runs (running and past)", choices=run_choices(), elem_id="run-picker")
            progress = gr.HTML(_progress_html(None))
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="loss", label="Loss", height=260, elem_id="loss-plot")
                previews = gr.Gallery(label="Previews as training goes", columns=4, height=260, elem_id="previews")
            timer = gr.Timer(1.0)

        with gr.Tab("Generate", id="generate") as generate_tab:
            with gr.Row():
                with gr.Column(scale=2):
                    gen_base = gr.Textbox(value=base_model, label="Base model", info="builtin, a hub id or a folder")
                    prompt = gr.Textbox(label="Prompt", value="glowline, a green triangle", elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt")
                    with gr.Row():
                        seed = gr.Number(value=7, precision=0, label="Seed", elem_id="seed")
                        random_seed = gr.Checkbox(value=False, label="Random seed")
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                        guidance = gr.Slider(0, 20, value=defaults["guidance"], step=0.5, label="Guidance")
                        rescale = gr.Slider(
                            0, 1, value=defaults["guidance_rescale"], step=0.05, label="Guidance rescale"
                        )
                    with gr.Row():
                        width = gr.Number(value=0, precision=0, label="Width (0 = model's size)")
                        height = gr.Number(value=0, precision=0, label="Height (0 = model's size)")
                    scheduler = gr.Dropdown(list(SCHEDULERS), value="model default", label="Scheduler")
                with gr.Column(scale=2):
                    slot_names, slot_strengths = [], []
                    for i in range(SLOTS):
                        with gr.Row():
                            slot_names.append(
                                gr.Dropdown(
                                    [NONE], value=NONE, label=f"Adapter {i + 1}", elem_id=f"adapter-{i}", scale=2
                                )
                            )
                            slot_strengths.append(
                                gr.Slider(
                                    -1, 2, value=1.0, step=0.05, label="Strength", elem_id=f"strength-{i}", scale=3
                                )
                            )
                    upload_adapter = gr.UploadButton("Upload a .safetensors adapter", file_types=[".safetensors"])
                    compare_strengths = gr.Textbox(
                        value="0, 0.5, 1", label="Compare strengths of adapter 1", elem_id="compare-strengths"
                    )
            with gr.Row():
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                compare_button = gr.Button("Compare strengths", elem_id="compare-button")
            gen_status = gr.Markdown(elem_id="generate-status")
            gallery = gr.Gallery(label="Pictures", columns=4, height=320, elem_id="gallery")

        with gr.Tab("Adapters", id="adapters") as adapters_tab:
            library_table = gr.Dataframe(
                headers=["name", "base_model", "rank", "alpha", "steps", "trigger_word", "date", "size_kb"],
                interactive=False,
                label="Adapter library",
                elem_id="library-table",
            )
            with gr.Row():
                picked = gr.Dropdown(library_names(), label="Adapter", elem_id="library-pick")
                import_button = gr.UploadButton("Import a .safetensors adapter", file_types=[".safetensors"])
            with gr.Row():
                picked_sample = gr.Image(label="Sample", height=200, interactive=False)
                picked_info = gr.JSON(label="Metadata")
            with gr.Row():
                download = gr.DownloadButton("Download", elem_id="download-button", interactive=False)
                new_name = gr.Textbox(label="New name", scale=2)
                rename_button = gr.Button("Rename")
                delete_button = gr.Button("Delete", variant="stop", elem_id="delete-button")
            with gr.Row(visible=False) as confirm_row:
                gr.Markdown("Delete this adapter file for good?")
                confirm_delete = gr.Button("Yes, delete it", variant="stop", elem_id="confirm-delete")
                keep = gr.Button("Keep it")
            library_status = gr.Markdown(elem_id="library-status")

        # -- Train tab --------------------------------------------------------------------------------------------
        setting_names = list(settings)
        setting_inputs = [settings[n] for n in setting_names]

        def fill_table(paths):
            uploads, problems = pair_uploads(paths or [])
            rows = [[f"![{u.path.name}](/gradio_api/file={u.path})", u.path.name, u.caption] for u in uploads]
            note = ("❌ " + "; ".join(problems)) if problems else ""
            return rows, note

        def config_from(values: list) -> TrainConfig:
            return TrainConfig.from_dict(dict(zip(setting_names, values)), source="the settings")

        def show_command(*values):
            try:
                config = config_from(list(values))
            except UserError as exc:
                return f"# {exc}", ""
            config.data = "<your images folder>"
            return config.cli_command(), json.dumps(config.to_dict(), indent=2)

        def on_train(paths, rows, *values):
            try:
                config = config_from(list(values))
                uploads, problems = pair_uploads(paths or [])
                if problems:
                    raise UserError("the upload has problems:\n  " + "\n  ".join(problems))
                typed = {
                    row[1]: row[2]
                    for row in (rows.values.tolist() if hasattr(rows, "values") else rows or [])
                    if len(row) > 2
                }
                for up in uploads:
                    if str(typed.get(up.path.name, "") or "").strip():
                        up.caption = str(typed[up.path.name]).strip()
                staged = stage_dataset(uploads, config.default_caption)
                if not config.preview_prompt:  # previews default to the first caption, with the trigger word
                    first = next(u.caption for u in uploads if u.caption) if any(u.caption for u in uploads) else ""
                    config.preview_prompt = first or config.default_caption
                run_dir = start_run(config, staged, runs_root, library.root)
            except UserError as exc:
                message = str(exc).replace("\n", "<br>")
                return f"❌ Nothing started: {message}", gr.Dropdown(choices=run_choices())
            return f"Started run **{run_dir.name}**.", gr.Dropdown(choices=run_choices(), value=run_dir.name)

        def on_cancel(name):
            if not name or not cancel_run(runs_root / name):
                return "No running training to cancel."
            return f"Cancelling **{name}**: the adapter learned so far will be saved."

        def on_resume(name):
            if not name:
                return "Choose a run to resume."
            try:
                resume_run(runs_root / name, runs_root)
            except UserError as exc:
                return f"❌ {exc}"
            return f"Resuming **{name}** from its newest checkpoint."

        def refresh(name):
            view = view_run(runs_root / name) if name and (runs_root / name).is_dir() else None
            losses = loss_frame(view.losses if view else [])
            pictures = [(path, f"step {step}") for path, step in (view.previews if view else [])]
            return _progress_html(view), losses, pictures, _status_text(view)

        def on_load():
            live = active_run(runs_root)
            runs = run_choices()
            value = live.run_dir.name if live else (runs[0][1] if runs else None)
            return gr.Dropdown(choices=runs, value=value)

        files.change(fill_table, files, [table, train_message])
        for component in setting_inputs:
            component.change(show_command, setting_inputs, [command, config_json])
        train_button.click(on_train, [files, table, *setting_inputs], [train_message, run_picker])
        cancel_button.click(on_cancel, run_picker, train_message)
        resume_button.click(on_resume, run_picker, train_message)
        timer.tick(refresh, run_picker, [progress, loss_plot, previews, train_status])
        shown_choices = gr.State([])

        def refresh_choices(name, shown):
            """Keep each run's state in the run list current (a run shown as starting reads done when it ends);
            the list is only re-sent when it changed, so an open dropdown is not closed under the user."""
            runs = run_choices()
            if [list(c) for c in runs] == [list(c) for c in shown or []]:
                return gr.skip(), shown
            return gr.Dropdown(choices=runs, value=name), runs

        timer.tick(refresh_choices, [run_picker, shown_choices], [run_picker, shown_choices])
        run_picker.change(refresh, run_picker, [progress, loss_plot, previews, train_status])
        app.load(on_load, None, run_picker)
        app.load(show_command, setting_inputs, [command, config_json])
        if preload_files:
            app.load(fill_table, files, [table, train_message])

        # -- Generate tab -----------------------------------------------------------------------------------------
        def slot_updates():
            names = [NONE, *library_names()]
            return [gr.Dropdown(choices=names) for _ in range(SLOTS)]

        def chosen(slots: list) -> dict[str, float]:
            names, strengths = slots[:SLOTS], slots[SLOTS:]
            out = {}
            for name, strength in zip(names, strengths):
                if name and name != NONE:
                    out[name] = float(strength)
            return out

        def render(base, text, neg, seed_value, randomize, n_steps, cfg, rs, w, h, sched, scale_sets, labels):
            seed_used = random.randint(0, 2**31 - 1) if randomize else int(seed_value or 0)
            with studios.lock:
                studio = studios.get(base.strip() or "builtin")
                for name in {n for scales in scale_sets for n in scales}:
                    studio.load(library.get(name).path, name=name)
                studio.set_scheduler(SCHEDULERS[sched])
                pictures = []
                for scales, label in zip(scale_sets, labels):
                    image = studio.generate(
                        text,
                        negative_prompt=neg,
                        seed=seed_used,
                        sampling_steps=int(n_steps),
                        guidance=float(cfg),
                        guidance_rescale=float(rs),
                        width=int(w) or None,
                        height=int(h) or None,
                        strengths=scales,
                    )[0]
                    pictures.append((image, label))
            return pictures, seed_used

        def on_generate(base, text, neg, seed_value, randomize, n_steps, cfg, rs, w, h, sched, *slots):
            try:
                scales = chosen(list(slots))
                label = ", ".join(f"{n} {s:g}" for n, s in scales.items()) or "base model"
                pictures, used = render(
                    base, text, neg, seed_value, randomize, n_steps, cfg, rs, w, h, sched, [scales], [label]
                )
            except UserError as exc:
                return gr.Gallery(), f"❌ {exc}"
            return pictures, f"Seed {used}. {label}."

        def on_compare(base, text, neg, seed_value, randomize, n_steps, cfg, rs, w, h, sched, strengths_text, *slots):
            try:
                scales = chosen(list(slots))
                first = next((n for n in slots[:SLOTS] if n and n != NONE), None)
                if first is None:
                    raise UserError("choose an adapter in slot 1 to compare its strengths")
                try:
                    values = [float(v) for v in strengths_text.replace(";", ",").split(",") if v.strip()]
                except ValueError:
                    raise UserError(
                        f"strengths must be numbers separated by commas, got {strengths_text!r}"
                    ) from None
                if not values:
                    raise UserError("give at least one strength to compare, e.g. 0, 0.5, 1")
                sets = [{**scales, first: v} for v in values]
                pictures, used = render(
                    base,
                    text,
                    neg,
                    seed_value,
                    randomize,
                    n_steps,
                    cfg,
                    rs,
                    w,
                    h,
                    sched,
                    sets,
                    [f"{first} strength {v:g}" for v in values],
                )
            except UserError as exc:
                return gr.Gallery(), f"❌ {exc}"
            return pictures, f"Seed {used}, the same for every picture."

        def on_upload_adapter(path):
            try:
                entry = library.add(path)
            except UserError as exc:
                return [*slot_updates(), f"❌ {exc}"]
            return [*slot_updates(), f"Added **{entry.name}** to the library."]

        gen_inputs = [
            gen_base,
            prompt,
            negative,
            seed,
            random_seed,
            steps,
            guidance,
            rescale,
            width,
            height,
            scheduler,
        ]
        generate_button.click(on_generate, [*gen_inputs, *slot_names, *slot_strengths], [gallery, gen_status])
        compare_button.click(
            on_compare, [*gen_inputs, compare_strengths, *slot_names, *slot_strengths], [gallery, gen_status]
        )
        generate_tab.select(slot_updates, None, slot_names)
        upload_adapter.upload(on_upload_adapter, upload_adapter, [*slot_names, gen_status])

        # -- Adapters tab -----------------------------------------------------------------------------------------
        def library_view(selected=None):
            entries = library.list()
            rows = [[e.summary[k] for k in library_table.headers] for e in entries]
            names = [e.name for e in entries]
            value = selected if selected in names else (names[0] if names else None)
            return rows, gr.Dropdown(choices=names, value=value)

        def show_adapter(name):
            if not name:
                return None, None, gr.DownloadButton(interactive=False), gr.Row(visible=False)
            try:
                entry = library.get(name)
            except UserError:
                return None, None, gr.DownloadButton(interactive=False), gr.Row(visible=False)
            info = {**entry.summary, "file": str(entry.path), "metadata": entry.metadata}
            button = gr.DownloadButton(f"Download {entry.path.name}", value=str(entry.path), interactive=True)
            return (str(entry.sample) if entry.sample else None), info, button, gr.Row(visible=False)

        def on_rename(old, new):
            try:
                entry = library.rename(old, new)
            except UserError as exc:
                return *library_view(old), f"❌ {exc}"
            return *library_view(entry.name), f"Renamed **{old}** to **{entry.name}**."

        def on_delete(name):
            try:
                library.delete(name)
            except UserError as exc:
                return *library_view(name), f"❌ {exc}", gr.Row(visible=False)
            return *library_view(), f"Deleted **{name}**.", gr.Row(visible=False)

        def on_import(path):
            try:
                entry = library.add(path)
            except UserError as exc:
                return *library_view(), f"❌ {exc}"
            return *library_view(entry.name), f"Imported **{entry.name}**."

        adapters_tab.select(library_view, picked, [library_table, picked])
        picked.change(show_adapter, picked, [picked_sample, picked_info, download, confirm_row])
        rename_button.click(on_rename, [picked, new_name], [library_table, picked, library_status])
        delete_button.click(lambda: gr.Row(visible=True), None, confirm_row)
        keep.click(lambda: gr.Row(visible=False), None, confirm_row)
        confirm_delete.click(on_delete, picked, [library_table, picked, library_status, confirm_row])
        import_button.upload(on_import, import_button, [library_table, picked, library_status])
    return app


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: str | None = None,
    workspace: str = ".",
    base_model: str = "builtin",
    preload: str | None = None,
) -> None:
    """Serve the app; `auth` is `user:password`."""
    credentials = None
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth must look like user:password")
        credentials = (user, password)
    app = build_app(workspace, base_model, preload)
    app.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        auth=credentials,
        ssr_mode=False,
        show_error=True,
        theme=gr.themes.Default(**THEME_FONTS),
        allowed_paths=[str(Path(workspace).resolve()), str(SAMPLE_IMAGES)],
    )
