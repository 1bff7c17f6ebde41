"""The Adapters tab: the library's adapters with their metadata and sample; download, rename, delete, import."""

from __future__ import annotations

import html
import re
from pathlib import Path

import gradio as gr

from adapters.errors import UserError
from adapters.library import Library
from app.ui.settings import page_words

# the library table: each adapter's summary field and its column's heading
COLUMNS = {
    "name": "Name",
    "base_model": "Base model",
    "rank": "Rank",
    "alpha": "Alpha",
    "steps": "Steps",
    "trigger_word": "Trigger word",
    "recommended_strength": "Recommended strength",
    "date": "Trained (UTC)",
    "size_kb": "Size (KB)",
}


def shown_value(key: str, value):
    """A summary field as the table shows it: a file's ISO time (2026-12-07T18:44:53Z) as 2026-12-07 18:44."""
    if (
        key == "date"
        and isinstance(value, str)
        and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?Z?", value)
    ):
        return value[:16].replace("T", " ")
    return value


def name_note(library: Library, typed: str, empty: str = "") -> str:
    """What the page says under a name box, for Train and Rename alike: the name the adapter will have in the
    library (cleaned as the library cleans names), or why it cannot have it. `empty` is said for an empty box."""
    if not str(typed or "").strip():
        return empty
    try:
        return f"Saved in the library as **{library.new_name(typed)}**."
    except UserError as exc:
        return f"⚠ {page_words(str(exc))}"


def problems_html(problems: list[tuple[Path, str]]) -> str:
    """One line per library file that cannot be read (and so is not in the table), with the reason."""
    return "".join(f"<div>⚠ Not listed: {html.escape(p.name)} — {html.escape(why)}</div>" for p, why in problems)


class LibraryTab:
    """The tab's controls (made where it is built, inside the app's Blocks) and its handlers."""

    def __init__(self, library: Library):
        self.library = library
        with gr.Tab("Adapters", id="adapters") as self.tab:
            self.table = gr.Dataframe(
                headers=list(COLUMNS.values()), interactive=False, label="Adapter library", elem_id="library-table"
            )
            self.problems = gr.HTML(elem_id="library-problems")
            with gr.Row():
                self.picked = gr.Dropdown([e.name for e in library.list()], label="Adapter", elem_id="library-pick")
                self.import_button = gr.UploadButton("Import a .safetensors adapter", file_types=[".safetensors"])
            with gr.Row():
                self.sample = gr.Image(label="Sample", height=200, interactive=False)
                self.info = gr.JSON(label="Metadata")
            with gr.Row():
                self.download = gr.DownloadButton("Download", elem_id="download-button", interactive=False)
                with gr.Column(scale=2):
                    self.new_name = gr.Textbox(label="New name", elem_id="rename-to")
                    self.rename_note = gr.Markdown(elem_id="rename-note")
                self.rename_button = gr.Button("Rename")
                self.delete_button = gr.Button("Delete", variant="stop", elem_id="delete-button")
            with gr.Row(visible=False) as self.confirm_row:
                gr.Markdown("Delete this adapter file for good?")
                self.confirm_delete = gr.Button("Yes, delete it", variant="stop", elem_id="confirm-delete")
                self.keep = gr.Button("Keep it")
            self.status = gr.Markdown(elem_id="library-status")

    def wire(self) -> None:
        view = [self.table, self.problems, self.picked]
        self.tab.select(self.view, self.picked, view)
        self.picked.change(self.show_adapter, self.picked, [self.sample, self.info, self.download, self.confirm_row])
        self.new_name.change(lambda typed: name_note(self.library, typed), self.new_name, self.rename_note)
        self.rename_button.click(self.on_rename, [self.picked, self.new_name], [*view, self.status])
        self.delete_button.click(lambda: gr.Row(visible=True), None, self.confirm_row)
        self.keep.click(lambda: gr.Row(visible=False), None, self.confirm_row)
        self.confirm_delete.click(self.on_delete, self.picked, [*view, self.status, self.confirm_row])
        self.import_button.upload(self.on_import, self.import_button, [*view, self.status])

    def view(self, selected=None):
        """The table, the unreadable files under it, and the picker (keeping `selected` when it is still there)."""
        entries, problems = self.library.scan()
        rows = [[shown_value(k, e.summary[k]) for k in COLUMNS] for e in entries]
        names = [e.name for e in entries]
        value = selected if selected in names else (names[0] if names else None)
        return rows, problems_html(problems), gr.Dropdown(choices=names, value=value)

    def show_adapter(self, name):
        hidden = None, None, gr.DownloadButton(interactive=False), gr.Row(visible=False)
        if not name:
            return hidden
        try:
            entry = self.library.get(name)
        except UserError:
            return hidden
        info = {**entry.summary, "file": str(entry.path), "metadata": entry.metadata}
        button = gr.DownloadButton(f"Download {entry.path.name}", value=str(entry.path), interactive=True)
        return (str(entry.sample) if entry.sample else None), info, button, gr.Row(visible=False)

    def on_rename(self, old, new):
        try:
            entry = self.library.rename(old, new)
        except UserError as exc:
            return *self.view(old), f"⚠ {page_words(str(exc))}"
        return *self.view(entry.name), f"Renamed **{old}** to **{entry.name}**."

    def on_delete(self, name):
        try:
            self.library.delete(name)
        except UserError as exc:
            return *self.view(name), f"⚠ {page_words(str(exc))}", gr.Row(visible=False)
        return *self.view(), f"Deleted **{name}**.", gr.Row(visible=False)

    def on_import(self, path):
        try:
            entry = self.library.add(path)
        except UserError as exc:
            return *self.view(), f"⚠ {page_words(str(exc))}"
        return *self.view(entry.name), f"Imported **{entry.name}**."
