"""The web UI: Train, Generate and Adapters tabs over the same trainer, runtime and library as the CLI.

    lora-studio ui [--host 127.0.0.1] [--port 7860] [--auth user:pass] [--workspace DIR]

One module per tab (`train`, `generate`, `library` for the Adapters tab) and one for the settings form built from
TrainConfig (`settings`); each tab is a class that makes its controls where it is built and connects its handlers
in `wire`. The page holds no state that matters: runs live in `<workspace>/runs/`, adapters in
`<workspace>/library/` and generated pictures in `<workspace>/outputs/`, so a closed browser or a restarted UI
loses nothing. Errors are shown in the page, in the status line of the tab where they happened.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import gradio as gr

from adapters.errors import UserError
from adapters.libraries import import_all
from adapters.library import Library
from app.jobs import MAX_FILE_MB, MAX_UPLOAD_FILES, watch_queue
from app.outputs import Outputs
from app.ui.generate import CSS as GENERATE_CSS
from app.ui.generate import JS as GENERATE_JS
from app.ui.generate import GenerateRequest, GenerateTab
from app.ui.library import LibraryTab
from app.ui.train import TrainTab, loss_frame, status_text

__all__ = ["GenerateRequest", "build_app", "launch", "loss_frame", "status_text"]

THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_app(
    workspace: str | Path = ".",
    base_model: str = "builtin",
    preload: str | Path | None = None,
    max_upload_files: int = MAX_UPLOAD_FILES,
    compile_unet: bool | str = False,
):
    """The Blocks app for a workspace folder (holding `runs/`, `library/` and `outputs/`)."""
    workspace = Path(workspace)
    runs_root, library = workspace / "runs", Library(workspace / "library")
    preload_files = sorted(str(p) for p in Path(preload).iterdir() if p.is_file()) if preload else None
    # Gradio keeps every upload and every picture it sends in its cache folder (GRADIO_TEMP_DIR, else the system
    # temp folder's gradio/): files older than a day are deleted each hour, and all of this app's when it stops.
    with gr.Blocks(title="lora-studio", delete_cache=(3600, 86400)) as app:
        gr.Markdown("# lora-studio\nTrain a LoRA style adapter from a handful of images, then use it.")
        train = TrainTab(runs_root, library, preload_files, max_upload_files)
        generate = GenerateTab(library, base_model, Outputs(workspace / "outputs"), runs_root, compile_unet)
        adapters = LibraryTab(library)
        train.wire(app)
        generate.wire()
        adapters.wire()
    return app


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: str | None = None,
    workspace: str = ".",
    base_model: str = "builtin",
    preload: str | None = None,
    *,
    insecure_no_auth: bool = False,
    max_file_mb: int = MAX_FILE_MB,
    max_upload_files: int = MAX_UPLOAD_FILES,
    compile_unet: bool | str = False,
    block: bool = True,
):
    """Serve the app; `auth` is `user:password`, and a `host` other than a loopback address needs it (or
    `insecure_no_auth`). Gradio serves files only from the workspace's `runs/`, `library/` and `outputs/` (and
    `preload`), besides its own upload and cache folders; an upload larger than `max_file_mb` is refused, and so
    is one of more than `max_upload_files` files on the Train tab. `compile_unet`: whether the Generate tab's
    "Compile the UNet" box starts ticked (pictures through a torch.compile'd UNet, `Studio.use_compile`) and whether
    compiles run in the background: "auto", "background", "now" (True) or "off" (False), as `ui --compile` takes
    them (`app.ui.generate.compile_mode`). `block=False` returns the running app at once (close it with
    `app.close()`)."""
    credentials = None
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth must look like user:password")
        credentials = (user, password)
    if credentials is None and not is_loopback(host) and not insecure_no_auth:
        raise UserError(
            f"--host {host} lets other machines open the page, and with it your files and GPU: add --auth "
            "user:password, or --insecure-no-auth if every machine that can reach this one is trusted"
        )
    if max_file_mb < 1 or max_upload_files < 1:
        raise UserError("--max-file-mb and --max-upload-files must be at least 1")
    workspace_dir = Path(workspace).resolve()
    (workspace_dir / "runs").mkdir(parents=True, exist_ok=True)
    import_all()  # before any thread of the page imports a diffusers class (see adapters/libraries.py)
    app = build_app(workspace_dir, base_model, preload, max_upload_files, compile_unet)
    watch_queue(workspace_dir / "runs")  # runs left waiting by an app that stopped start in turn
    served = [
        workspace_dir / "runs",
        workspace_dir / "library",
        workspace_dir / "outputs",
        *([Path(preload).resolve()] if preload else []),
    ]
    app.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        auth=credentials,
        share=False,
        ssr_mode=False,
        show_error=True,
        theme=gr.themes.Default(**THEME_FONTS),
        css=GENERATE_CSS,
        js=GENERATE_JS,
        allowed_paths=[str(p) for p in served],
        max_file_size=f"{max_file_mb}mb",
        prevent_thread_lock=not block,
    )
    return app
