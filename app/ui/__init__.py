"""The web UI: Train, Generate and Adapters tabs over the same trainer, runtime and library as the CLI.

    lora-studio ui [--host 127.0.0.1] [--port 7860] [--auth user:pass] [--workspace DIR]

One module per tab (`train`, `generate`, `library` for the Adapters tab) and one for the settings form built from
TrainConfig (`settings`); each tab is a class that makes its controls where it is built and connects its handlers
in `wire`. The page holds no state that matters: runs live in `<workspace>/runs/` and adapters in
`<workspace>/library/`, so a closed browser or a restarted UI loses nothing. Errors are shown in the page, in the
status line of the tab where they happened.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from adapters.errors import UserError
from adapters.library import Library
from app.ui.generate import GenerateRequest, GenerateTab
from app.ui.library import LibraryTab
from app.ui.train import TrainTab, loss_frame, status_text

__all__ = ["GenerateRequest", "build_app", "launch", "loss_frame", "status_text"]

THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "sample_images"


def build_app(workspace: str | Path = ".", base_model: str = "builtin", preload: str | Path | None = None):
    """The Blocks app for a workspace folder (holding `runs/` and `library/`)."""
    workspace = Path(workspace)
    runs_root, library = workspace / "runs", Library(workspace / "library")
    preload_files = sorted(str(p) for p in Path(preload).iterdir() if p.is_file()) if preload else None
    with gr.Blocks(title="lora-studio") as app:
        gr.Markdown("# lora-studio\nTrain a LoRA style adapter from a handful of images, then use it.")
        train = TrainTab(runs_root, library, preload_files)
        generate = GenerateTab(library, base_model)
        adapters = LibraryTab(library)
        train.wire(app)
        generate.wire()
        adapters.wire()
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
