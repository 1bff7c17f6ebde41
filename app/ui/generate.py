"""The Generate tab: pictures from a base model with up to four library adapters at chosen strengths.

Every picture is saved to the workspace's `outputs/` with its settings inside (`app.outputs`); the History gallery
reads that folder, and clicking a picture there puts its settings back into the controls.
"""

from __future__ import annotations

import dataclasses
import gc
import random
import re
import threading
import typing
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from safetensors import SafetensorError, safe_open

from adapters.base import base_model_label, generation_defaults
from adapters.errors import UserError
from adapters.library import Library
from adapters.runtime import SCHEDULERS as RUNTIME_SCHEDULERS
from app.images import Parameters, labelled_grid
from app.outputs import Outputs

SCHEDULERS = {"model default": None, **{name: name for name in RUNTIME_SCHEDULERS}}
NONE = "(none)"
SLOTS = 4
# measured on a lent H100, SD 1.5 shapes at 512 and 30 steps (benchmarks/RESULTS.md, 2026-12-06), with the UNet
# alone compiled (the VAE's decoder, compiled too since, is not timed there)
COMPILE_INFO = (
    "the UNet and the VAE's decoder are compiled; the first picture at each size compiles (SD 1.5 on an H100, "
    "the UNet alone: 44 s the first time, 9 s once cached), later "
    "ones draw faster (0.26 s against 0.38 s); strengths and adapters change without compiling again"
)
# measured in the background on lent H100s, SD 1.5 shapes at 512 and 30 steps, one adapter (benchmarks/RESULTS.md,
# 2026-12-07: results/h100_gen_background.json and h100_gen_both.json, two machines)
COMPILE_INFO_BACKGROUND = (
    "the UNet and the VAE's decoder are compiled in the background while pictures are drawn uncompiled, then "
    "pictures draw faster (SD 1.5 on an H100: about 0.7 s a picture during the compile, done after 96-168 s, "
    "then 0.25-0.27 s against 0.38-0.41 s); new adapters compile again in the background, strengths do not"
)


def compile_mode(mode: bool | str) -> tuple[bool, bool]:
    """(whether the Compile box starts ticked, whether compiles run in the background) for `lora-studio ui
    --compile MODE`: "auto" (background on a CUDA GPU, else unticked), "background", "now" (the first picture at a
    size waits for its compile; also True) or "off" (also False)."""
    if mode == "auto":
        import torch

        return torch.cuda.is_available(), True
    if mode in (True, "now"):
        return True, False
    if mode == "background":
        return True, True
    if mode in (False, "off"):
        return False, False
    raise UserError(f"--compile must be one of auto, background, now, off; got {mode!r}")


SMALL = 256  # pictures narrower than this are enlarged with square pixels (the built-in model's are 64)

# The tab's look, given to `launch`: pictures whole (never cropped), small ones enlarged without blur; the results
# column stays in view while the controls beside it scroll (the grid's button is far down the page).
CSS = """
.small-pictures img { image-rendering: pixelated; }
#generate-results { position: sticky; top: 8px; align-self: flex-start; }
.gradio-container { overflow: clip !important; }  /* clips as gradio's hidden does, but lets sticky stick */
/* a gallery's label floats over its top-left corner: the pictures start below it, not under it */
#gallery .grid-wrap, #history .grid-wrap, #previews .grid-wrap { padding-top: 34px; }
"""
# Run once when the page loads: Ctrl+Enter (Cmd+Enter on a Mac) in a prompt box presses Generate, as in A1111.
JS = """
() => {
  document.addEventListener("keydown", (event) => {
    const inPrompt = event.target.closest("#prompt, #negative-prompt");
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && inPrompt) {
      event.preventDefault();
      document.querySelector("#generate-button")?.click();
    }
  }, true);
}
"""


@dataclass
class GenerateRequest:
    """What the Generate tab's controls ask for, read from them in one place (`from_inputs`)."""

    base_model: str
    prompt: str
    negative_prompt: str
    seed: int
    random_seed: bool
    sampling_steps: int
    guidance: float
    guidance_rescale: float
    width: int  # 0 = the model's size
    height: int
    scheduler: str  # a key of SCHEDULERS
    batch_count: int  # pipeline calls, one after the other
    batch_size: int  # pictures per call
    compare_strengths: str  # strengths of the first chosen adapter to compare, as typed: "0, 0.5, 1"
    compile_unet: bool  # draw through a torch.compile'd UNet (`Studio.use_compile`)
    strengths: dict[str, float]  # adapter name -> strength, in slot order; empty slots left out

    @classmethod
    def from_inputs(cls, values: typing.Sequence) -> GenerateRequest:
        """Gradio passes the controls' values positionally, in the order of `GenerateTab.inputs`: every field
        above but `strengths`, then each slot's adapter, then each slot's strength."""
        n = len(dataclasses.fields(cls)) - 1
        plain = dict(zip([f.name for f in dataclasses.fields(cls)], values[:n]))
        names, levels = values[n : n + SLOTS], values[n + SLOTS : n + 2 * SLOTS]
        picked = [(name, float(level)) for name, level in zip(names, levels) if name and name != NONE]
        strengths = dict(picked)
        for name in strengths:  # one slot's strength would silently be dropped
            twice = [f"{level:g}" for n, level in picked if n == name]
            if len(twice) > 1:
                raise UserError(
                    f"adapter {name} is picked in {len(twice)} slots (strengths {' and '.join(twice)}); pick it in "
                    "one, at the strength you want"
                )
        for key in ("seed", "sampling_steps", "width", "height", "batch_count", "batch_size"):
            plain[key] = int(plain[key] or 0)
        for key in ("guidance", "guidance_rescale"):
            plain[key] = float(plain[key])
        request = cls(**plain, strengths=strengths)
        if request.batch_count < 1 or request.batch_size < 1:
            raise UserError("Batch count and Batch size must be at least 1")
        request.random_seed = request.random_seed or request.seed == -1  # -1: a random seed, as in A1111
        return request

    def compare_values(self) -> list[float]:
        try:
            values = [float(v) for v in self.compare_strengths.replace(";", ",").split(",") if v.strip()]
        except ValueError:
            typed = self.compare_strengths
            raise UserError(f"strengths must be numbers separated by commas, got {typed!r}") from None
        if not values:
            raise UserError("give at least one strength to compare, e.g. 0, 0.5, 1")
        return values


class StudioCache:
    """One loaded base pipeline at a time, shared by every Generate request; a lock keeps requests in turn."""

    def __init__(self, background_compile: bool = False):
        self.studio = None
        self.lock = threading.Lock()
        self.loads = 0  # base models loaded so far
        self.background_compile = background_compile  # each studio compiles on a worker thread (see Studio)

    def get(self, base_model: str):
        """The studio for `base_model`, loaded if another is held (each request then says whether to compile)."""
        import torch

        from adapters.runtime import Studio

        if self.studio is None or self.studio.base_model != base_model:
            if self.studio is not None:  # its graphs hold it in reference cycles: free its memory before loading
                self.studio.stop_compiling()
                self.studio = None
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self.studio = Studio(base_model, background_compile=self.background_compile)
            self.loads += 1
        return self.studio


@dataclass
class Job:
    """Pictures at one set of adapter strengths, with a caption; `seed` None: the request's seed."""

    strengths: dict[str, float]
    label: str
    seed: int | None = None


@dataclass
class Shown:
    """What one press of Generate, Compare or X/Y grid made: the pictures (saved file or image, caption), each
    picture's parameters, from which seed."""

    seed: int
    pictures: list[tuple] = dataclasses.field(default_factory=list)
    parameters: list[Parameters] = dataclasses.field(default_factory=list)
    asked: int = 0  # pictures asked for
    loaded: list[str] = dataclasses.field(default_factory=list)  # what had to be loaded for them
    compile_on: bool = False  # compiling was turned on for them (the first picture at a size compiles)
    small: bool = False  # pictures narrower than SMALL: shown with square pixels
    interrupted: bool = False


class GenerateTab:
    """The tab's controls (made where it is built, inside the app's Blocks) and its handlers."""

    def __init__(
        self,
        library: Library,
        base_model: str,
        outputs: Outputs | None = None,
        runs_root: Path | None = None,
        compile_unet: bool | str = False,
    ):
        ticked, background = compile_mode(compile_unet)
        self.library, self.studios = library, StudioCache(background)
        self.stops: dict[str, threading.Event] = {}  # browser session -> its Interrupt flag
        self.outputs = outputs or Outputs(Path(library.root).parent / "outputs")  # beside the library
        self.runs_root = Path(runs_root or Path(library.root).parent / "runs")
        self.tried: dict[str, Path] = {}  # run checkpoints put in a slot: adapter name -> its file
        try:
            defaults = generation_defaults(base_model)  # the model's recommended guidance, for the sliders
        except UserError:
            defaults = {"guidance": 7.5, "guidance_rescale": 0.0}
        with gr.Tab("Generate", id="generate") as self.tab:
            with gr.Row(equal_height=False):
                with gr.Column(scale=5):
                    base = gr.Textbox(
                        value=base_model,
                        label="Base model",
                        info="builtin, a hub id, a diffusers folder or a .safetensors checkpoint file",
                        elem_id="generate-base",
                    )
                    self.prompt = gr.Textbox(
                        label="Prompt (Ctrl+Enter generates)", value="glowline, a green triangle", elem_id="prompt"
                    )
                    self.negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                    self.tokens = gr.Markdown(elem_id="prompt-tokens")
                    with gr.Row():
                        self.generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                        self.interrupt_button = gr.Button("Interrupt", variant="stop", elem_id="interrupt-button")
                        self.compare_button = gr.Button("Compare strengths", elem_id="compare-button")
                    with gr.Row():
                        self.seed = gr.Number(
                            value=7, precision=0, label="Seed (-1 = random)", elem_id="seed", scale=2, min_width=120
                        )
                        self.random_seed = gr.Checkbox(
                            value=False,
                            label="Random seed",
                            info="the box shows the last seed drawn",
                            elem_id="random-seed",
                            min_width=120,
                        )
                        self.reuse_seed = gr.Button("Reuse seed", elem_id="reuse-seed", min_width=100)
                        self.last_seed = gr.State(None)  # the seed of the last picture made in this session
                    with gr.Row():
                        self.steps = gr.Slider(1, 100, value=20, step=1, label="Sampling steps", elem_id="steps")
                        self.guidance = gr.Slider(
                            0, 20, value=defaults["guidance"], step=0.5, label="Guidance", elem_id="guidance"
                        )
                        self.rescale = gr.Slider(
                            0, 1, value=defaults["guidance_rescale"], step=0.05, label="Guidance rescale"
                        )
                    with gr.Row():
                        self.width = gr.Number(
                            value=0, precision=0, label="Width (0 = model's size)", elem_id="width"
                        )
                        self.height = gr.Number(
                            value=0, precision=0, label="Height (0 = model's size)", elem_id="height"
                        )
                        self.batch_count = gr.Number(
                            value=1, precision=0, minimum=1, label="Batch count", elem_id="batch-count", min_width=80
                        )
                        self.batch_size = gr.Number(
                            value=1, precision=0, minimum=1, label="Batch size", elem_id="batch-size", min_width=80
                        )
                    self.scheduler = gr.Dropdown(list(SCHEDULERS), value="model default", label="Scheduler")
                    self.compile_box = gr.Checkbox(
                        value=ticked,
                        label=(
                            "Compile the UNet (torch.compile): faster pictures once compiled in the background"
                            if background
                            else "Compile the UNet (torch.compile): faster pictures after a slow first one"
                        ),
                        info=COMPILE_INFO_BACKGROUND if background else COMPILE_INFO,
                        elem_id="compile-unet",
                    )
                    self.slot_names, self.slot_strengths = [], []
                    for i in range(SLOTS):
                        with gr.Row():
                            self.slot_names.append(
                                gr.Dropdown(
                                    [NONE], value=NONE, label=f"Adapter {i + 1}", elem_id=f"adapter-{i}", scale=2
                                )
                            )
                            self.slot_strengths.append(
                                gr.Slider(
                                    -1, 2, value=1.0, step=0.05, label="Strength", elem_id=f"strength-{i}", scale=3
                                )
                            )
                    self.auto_update = gr.Checkbox(
                        value=False,
                        label="Auto-update: draw again when a strength slider is let go (same seed, no reload)",
                        elem_id="auto-update",
                    )
                    self.upload_adapter = gr.UploadButton(
                        "Upload a .safetensors adapter", file_types=[".safetensors"]
                    )
                    with gr.Accordion("Checkpoints of a run: try and download", open=False):
                        with gr.Row():
                            self.ckpt_run = gr.Dropdown([], label="Run", elem_id="checkpoint-run", scale=2)
                            self.ckpt_step = gr.Dropdown([], label="Checkpoint", elem_id="checkpoint-step")
                        with gr.Row():
                            self.ckpt_try = gr.Button("Try in adapter 1", elem_id="checkpoint-try")
                            self.ckpt_download = gr.DownloadButton(
                                "Download its adapter", elem_id="checkpoint-download", interactive=False
                            )
                    with gr.Accordion("Compare strengths and X/Y grid", open=True):
                        compare = gr.Textbox(
                            value="0, 0.5, 1",
                            label="Strengths of adapter 1 (Compare strengths; the grid's columns)",
                            elem_id="compare-strengths",
                        )
                        self.grid_rows = gr.Radio(
                            ["seeds", "checkpoints"],
                            value="seeds",
                            label="Grid rows: seeds, or checkpoints of the run above (in place of adapter 1)",
                            elem_id="grid-rows",
                        )
                        self.grid_seeds = gr.Textbox(value="7, 8, 9", label="Seeds (rows)", elem_id="grid-seeds")
                        self.grid_checkpoints = gr.CheckboxGroup(
                            [], label="Checkpoints (rows)", elem_id="grid-checkpoints"
                        )
                        self.grid_button = gr.Button("Draw X/Y grid", elem_id="grid-button")
                with gr.Column(scale=4, elem_id="generate-results"):  # stays in view while the controls scroll
                    self.status = gr.Markdown(elem_id="generate-status")
                    self.gallery = gr.Gallery(label="Pictures", columns=2, object_fit="contain", elem_id="gallery")
                    self.history = gr.Gallery(
                        label="History: every picture, newest first (click one to restore its settings)",
                        columns=6,
                        height=250,
                        object_fit="contain",
                        allow_preview=False,
                        fit_columns=False,
                        elem_id="history",
                    )
                    self.history_paths = gr.State([])  # the files the history shows, in its order
        controls = dict(
            base_model=base,
            prompt=self.prompt,
            negative_prompt=self.negative,
            seed=self.seed,
            random_seed=self.random_seed,
            sampling_steps=self.steps,
            guidance=self.guidance,
            guidance_rescale=self.rescale,
            width=self.width,
            height=self.height,
            scheduler=self.scheduler,
            batch_count=self.batch_count,
            batch_size=self.batch_size,
            compare_strengths=compare,
            compile_unet=self.compile_box,
        )
        assert list(controls) == [f.name for f in dataclasses.fields(GenerateRequest)][:-1], "see from_inputs"
        self.inputs = [*controls.values(), *self.slot_names, *self.slot_strengths]
        # what a picture of the history puts back (`on_pick_history`), in this order
        self.restored = [
            self.prompt,
            self.negative,
            self.seed,
            self.random_seed,
            self.steps,
            self.guidance,
            self.rescale,
            self.width,
            self.height,
            self.scheduler,
            *self.slot_names,
            *self.slot_strengths,
            self.status,
        ]

    def wire(self) -> None:
        results = [self.gallery, self.status, self.history, self.history_paths, self.seed, self.random_seed]
        results.append(self.last_seed)
        self.generate_button.click(self.on_generate, self.inputs, results, show_progress_on=self.gallery)
        self.compare_button.click(self.on_compare, self.inputs, results, show_progress_on=self.gallery)
        # no output: an answer to Interrupt that came after the pictures' own would hide what they say
        self.interrupt_button.click(self.on_interrupt, None, None, concurrency_limit=None)
        for slot, strength in zip(self.slot_names, self.slot_strengths):
            slot.input(self.on_pick_adapter, [slot, self.prompt], [self.prompt, self.status])
            strength.release(
                self.on_auto_update, [self.auto_update, *self.inputs], results, show_progress_on=self.gallery
            )
        self.reuse_seed.click(self.on_reuse_seed, self.last_seed, [self.seed, self.random_seed, self.status])
        for box in (self.prompt, self.negative):
            box.change(
                self.on_tokens, [self.inputs[0], self.prompt, self.negative], self.tokens, trigger_mode="always_last"
            )
        self.tab.select(self.on_open, None, [*self.slot_names, self.history, self.history_paths, self.ckpt_run])
        self.ckpt_run.input(
            self.on_pick_run, self.ckpt_run, [self.ckpt_step, self.grid_checkpoints, self.ckpt_download, self.status]
        )
        self.ckpt_step.input(self.on_pick_checkpoint, [self.ckpt_run, self.ckpt_step], self.ckpt_download)
        self.ckpt_try.click(
            self.on_try_checkpoint,
            [self.inputs[0], self.ckpt_run, self.ckpt_step, self.prompt],
            [*self.slot_names, self.prompt, self.status],
        )
        grid_inputs = [self.grid_rows, self.grid_seeds, self.ckpt_run, self.grid_checkpoints, *self.inputs]
        self.grid_button.click(self.on_grid, grid_inputs, results, show_progress_on=self.gallery)
        self.history.select(self.on_pick_history, self.history_paths, [*self.restored, self.gallery])
        self.upload_adapter.upload(self.on_upload_adapter, self.upload_adapter, [*self.slot_names, self.status])

    def adapter_names(self) -> list[str]:
        """What the slots offer: the run checkpoints put in a slot, then the library's adapters, newest first."""
        return [*self.tried, *(e.name for e in self.library.list())]

    def adapter_path(self, name: str) -> Path:
        return self.tried[name] if name in self.tried else self.library.get(name).path

    def slot_updates(self):
        return [gr.Dropdown(choices=[NONE, *self.adapter_names()]) for _ in range(SLOTS)]

    def history_updates(self):
        paths = [str(p) for p in self.outputs.history()]
        return paths, paths

    def on_open(self):
        return [*self.slot_updates(), *self.history_updates(), gr.Dropdown(choices=self.runs_with_checkpoints())]

    def render(self, request: GenerateRequest, jobs: list[Job], stop, progress, save: bool = True) -> Shown:
        """For each job: batch count x batch size pictures, the k-th from seed + k (the job's seed, or the
        request's), each saved to the outputs folder with its parameters (`save`; else kept as images). `stop()`
        is asked after every denoising step; `Interrupted` leaves what was made before it in the returned `Shown`."""
        from adapters.runtime import Interrupted

        seed = random.randint(0, 2**31 - 1) if request.random_seed else request.seed
        base = request.base_model.strip() or "builtin"
        per_job = request.batch_count * request.batch_size
        shown = Shown(seed=seed, asked=len(jobs) * per_job)
        total = len(jobs) * per_job * request.sampling_steps
        with self.studios.lock:
            progress(0, desc="Loading the base model and adapters")
            loads = self.studios.loads
            studio = self.studios.get(base)
            files_read = studio.files_read
            for name in {n for job in jobs for n in job.strengths}:
                studio.load(self.adapter_path(name), name=name)
            if self.studios.loads > loads:
                shown.loaded.append(f"base model {base_model_label(base)}")
            if studio.files_read > files_read:
                shown.loaded.append(f"{studio.files_read - files_read} adapter file(s)")
            studio.set_scheduler(SCHEDULERS[request.scheduler])
            if request.compile_unet != studio.compile_unet:
                studio.use_compile(request.compile_unet)
                shown.compile_on = request.compile_unet
            for j, job in enumerate(jobs):
                for batch in range(request.batch_count):
                    first = (seed if job.seed is None else job.seed) + batch * request.batch_size
                    done = (j * per_job + batch * request.batch_size) * request.sampling_steps

                    def after_step(step, steps, done=done, first=first):
                        progress(
                            (done + step * request.batch_size, total),
                            desc=f"Pictures from seed {first}: step {step}/{steps}",
                            unit="steps",
                        )
                        return stop()

                    try:
                        images = studio.generate(
                            request.prompt,
                            negative_prompt=request.negative_prompt,
                            seed=first,
                            sampling_steps=request.sampling_steps,
                            guidance=request.guidance,
                            guidance_rescale=request.guidance_rescale,
                            width=request.width or None,
                            height=request.height or None,
                            strengths=job.strengths,
                            num_images=request.batch_size,
                            after_step=after_step,
                        )
                    except Interrupted:
                        shown.interrupted = True
                        return shown
                    for k, image in enumerate(images):
                        parameters = Parameters(
                            prompt=request.prompt,
                            negative_prompt=request.negative_prompt,
                            steps=request.sampling_steps,
                            sampler=studio.sampler,
                            cfg_scale=request.guidance,
                            seed=first + k,
                            width=image.width,
                            height=image.height,
                            model=base_model_label(base),
                            guidance_rescale=request.guidance_rescale,
                            adapters=dict(job.strengths),
                            lora_hashes={n: studio.hashes[n] for n in job.strengths if n in studio.hashes},
                        )
                        caption = f"{job.label}, seed {first + k}" if per_job > 1 else job.label
                        picture = str(self.outputs.save(image, parameters)) if save else image
                        shown.pictures.append((picture, caption))
                        shown.parameters.append(parameters)
                        shown.small = image.width < SMALL
        return shown

    def _loaded_and_notes(self, request: GenerateRequest, shown: Shown) -> str:
        """What the status line adds after the pictures: what had to be loaded, and whether the UNet compiles."""
        said = f" Loaded {' and '.join(shown.loaded)}." if shown.loaded else ""
        if not request.prompt.strip():  # drawn anyway, as A1111 and diffusers do
            said += (
                " The prompt was empty, so these pictures are what the model draws unprompted: type one in *Prompt*."
            )
        studio = self.studios.studio
        failed = studio.compile_failed if request.compile_unet and studio else ""
        if failed:
            said += f" ⚠ torch.compile failed, so pictures are drawn uncompiled ({failed})."
        elif request.compile_unet and studio and studio.compiling:
            said += (
                " The UNet and the VAE's decoder are being compiled in the background (torch.compile): pictures are "
                "drawn uncompiled until that is done, then faster."
            )
        elif shown.compile_on and self.studios.background_compile:
            pass  # ticked with nothing left to compile (all read from what was compiled before): nothing to say
        elif shown.compile_on:
            said += " The UNet runs through torch.compile now: the first picture at each size compiles."
        return said

    def _answer(self, request: GenerateRequest, shown: Shown, said: str):
        """What Generate and Compare put on the page: the pictures, what happened, the history, and the seed used
        in the Seed box (Random seed stays as it was, or is turned on by a -1 typed there)."""
        if shown.pictures:
            saved = [Path(path) for path, _ in shown.pictures]
            said += f" Saved in outputs/{saved[0].parent.name}/: {', '.join(p.name for p in saved)}."
        said += self._loaded_and_notes(request, shown)
        if shown.interrupted:
            said = f"Interrupted: {len(shown.pictures)} of {shown.asked} picture(s) made, the rest not. " + said
        history, paths = self.history_updates()
        # up to four pictures side by side in one row (Compare strengths' 0, 0.5, 1 among them); one: half the width
        columns = min(max(len(shown.pictures), 2), 4)
        small = ["small-pictures"] if shown.small else []
        gallery = gr.Gallery(value=shown.pictures, columns=columns, elem_classes=small)
        return gallery, said, history, paths, shown.seed, request.random_seed, shown.seed

    def _stop_flag(self, session: str) -> threading.Event:
        """This browser session's Interrupt flag, cleared: a new press of Generate starts unstopped."""
        flag = self.stops.setdefault(session, threading.Event())
        flag.clear()
        return flag

    def on_generate(self, request: gr.Request, progress=gr.Progress(), *values):
        try:
            asked = GenerateRequest.from_inputs(values)
            label = ", ".join(f"{n} {s:g}" for n, s in asked.strengths.items()) or "base model"
            flag = self._stop_flag(request.session_hash)
            shown = self.render(asked, [Job(asked.strengths, label)], flag.is_set, progress)
        except UserError as exc:
            return gr.skip(), f"⚠ {exc}", *[gr.skip()] * 5
        count = asked.batch_count * asked.batch_size
        seeds = f"Seed {shown.seed}" if count == 1 else f"Seeds {shown.seed}–{shown.seed + count - 1}"
        return self._answer(asked, shown, f"{seeds}. {label}.")

    def on_compare(self, request: gr.Request, progress=gr.Progress(), *values):
        try:
            asked = GenerateRequest.from_inputs(values)
            first = next(iter(asked.strengths), None)
            if first is None:
                raise UserError("choose an adapter in slot 1 to compare its strengths")
            asked.batch_count = asked.batch_size = 1
            jobs = [Job({**asked.strengths, first: v}, f"{first} strength {v:g}") for v in asked.compare_values()]
            shown = self.render(asked, jobs, self._stop_flag(request.session_hash).is_set, progress)
        except UserError as exc:
            return gr.skip(), f"⚠ {exc}", *[gr.skip()] * 5
        return self._answer(asked, shown, f"Seed {shown.seed}, the same for every picture.")

    def on_auto_update(self, request: gr.Request, progress=gr.Progress(), auto=False, *values):
        """A strength slider let go: with Auto-update on, one picture again from the seed in the Seed box (the seed
        of the last picture, when it was random), at the new strengths; nothing is reloaded."""
        if not auto:
            return [gr.skip()] * 7
        try:
            asked = GenerateRequest.from_inputs(values)
            asked.random_seed, asked.batch_count, asked.batch_size = False, 1, 1
            label = ", ".join(f"{n} {s:g}" for n, s in asked.strengths.items()) or "base model"
            shown = self.render(
                asked, [Job(asked.strengths, label)], self._stop_flag(request.session_hash).is_set, progress
            )
        except UserError as exc:
            return gr.skip(), f"⚠ {exc}", *[gr.skip()] * 5
        return self._answer(asked, shown, f"Auto-update: seed {shown.seed}. {label}.")

    def on_pick_adapter(self, name: str, prompt: str):
        """An adapter picked in a slot: its trigger word (from its file's header) goes in front of the prompt,
        unless the prompt already holds it."""
        if not name or name == NONE:
            return gr.skip(), gr.skip()
        try:
            with safe_open(str(self.adapter_path(name)), framework="pt") as f:
                trigger = (f.metadata() or {}).get("modelspec.trigger_phrase", "").strip()
        except (UserError, OSError, SafetensorError) as exc:
            return gr.skip(), f"⚠ {exc}"
        if not trigger:
            return gr.skip(), f"{name} names no trigger word in its file; the prompt is left as it is."
        if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", prompt or "", re.IGNORECASE):
            return gr.skip(), f"The prompt already holds {name}'s trigger word “{trigger}”."
        return (
            f"{trigger}, {prompt}" if prompt else trigger,
            f"Added {name}'s trigger word “{trigger}” to the prompt.",
        )

    # -- a run's checkpoints -----------------------------------------------------------------------------------
    def runs_with_checkpoints(self) -> list[tuple[str, str]]:
        """(label, run folder name) of every run with checkpoints holding an adapter, newest first."""
        from trainer.checkpoint import checkpoint_adapter, list_checkpoints

        found = []
        for run in sorted(self.runs_root.glob("*/"), key=lambda d: d.name, reverse=True):
            kept = [c for c in list_checkpoints(run) if checkpoint_adapter(c)]
            if kept:
                found.append((f"{run.name} · {len(kept)} checkpoint(s)", run.name))
        return found

    def checkpoints_of(self, run: str) -> list[tuple[str, str]]:
        """(label, folder name) of a run's checkpoints that hold an adapter, in step order."""
        from trainer.checkpoint import checkpoint_adapter, list_checkpoints

        if not run or Path(run).name != run or not (self.runs_root / run).is_dir():
            raise UserError("choose a run with checkpoints first (runs whose Save every made some are listed)")
        return [
            (f"step {int(c.name.split('_')[1])}", c.name)
            for c in list_checkpoints(self.runs_root / run)
            if checkpoint_adapter(c)
        ]

    def checkpoint_file(self, run: str, checkpoint: str) -> Path:
        from trainer.checkpoint import checkpoint_adapter

        if checkpoint not in [name for _, name in self.checkpoints_of(run)]:
            raise UserError(f"run {run} has no checkpoint {checkpoint!r} with an adapter; choose one of the list")
        return checkpoint_adapter(self.runs_root / run / "checkpoints" / checkpoint)

    def try_name(self, run: str, checkpoint: str, base_model: str) -> str:
        """Register a run's checkpoint as an adapter the slots offer (named `<run>-step<N>`), after checking the
        run was trained on the base model in the Base model box."""
        from trainer.config import TrainConfig

        path = self.checkpoint_file(run, checkpoint)
        trained_on = base_model_label(TrainConfig.from_file(self.runs_root / run / "config.json").base_model)
        if trained_on != base_model_label(base_model.strip() or "builtin"):
            raise UserError(
                f"run {run} was trained on base model {trained_on!r}; put that model in Base model to try its "
                "checkpoints"
            )
        name = f"{run}-step{int(checkpoint.split('_')[1])}"
        self.tried[name] = path
        return name

    def on_pick_run(self, run: str):
        try:
            steps = self.checkpoints_of(run)
        except UserError as exc:
            return gr.skip(), gr.skip(), gr.skip(), f"⚠ {exc}"
        newest = steps[-1][1] if steps else None
        download = (
            self.on_pick_checkpoint(run, newest) if newest else gr.DownloadButton(value=None, interactive=False)
        )
        return (
            gr.Dropdown(choices=steps, value=newest),
            gr.CheckboxGroup(choices=steps, value=[name for _, name in steps]),
            download,
            f"Run {run}: {len(steps)} checkpoint(s) with an adapter.",
        )

    def on_pick_checkpoint(self, run: str, checkpoint: str):
        try:
            path = self.checkpoint_file(run, checkpoint)
        except UserError:
            return gr.DownloadButton(value=None, interactive=False)
        return gr.DownloadButton(f"Download {path.name}", value=str(path), interactive=True)

    def on_try_checkpoint(self, base_model: str, run: str, checkpoint: str, prompt: str):
        """Put a run's checkpoint in adapter slot 1 (with its trigger word in the prompt, as for any adapter)."""
        try:
            name = self.try_name(run, checkpoint, base_model)
        except UserError as exc:
            return *[gr.skip()] * (SLOTS + 1), f"⚠ {exc}"
        prompt_update, said = self.on_pick_adapter(name, prompt)
        slots = self.slot_updates()
        slots[0] = gr.Dropdown(choices=[NONE, *self.adapter_names()], value=name)
        return *slots, prompt_update, f"Adapter 1 is now **{name}**: press Generate to try it. {said}"

    # -- X/Y grid ------------------------------------------------------------------------------------------------
    def on_grid(self, request: gr.Request, progress=gr.Progress(), rows="seeds", seeds="", run="", steps=(), *values):
        """One picture per (row, column): columns at the strengths of adapter 1 (the Compare box), rows at the
        seeds typed, or at a run's checkpoints (each in place of adapter 1, at the request's seed); one grid image
        with the labels drawn on it, saved to outputs/grids/."""
        try:
            asked = GenerateRequest.from_inputs(values)
            asked.batch_count = asked.batch_size = 1
            columns = asked.compare_values()
            others = dict(list(asked.strengths.items())[1:]) if asked.strengths else {}
            if rows == "checkpoints":
                if not steps:
                    raise UserError("tick at least one checkpoint of the run for the grid's rows")
                names = [self.try_name(run, step, asked.base_model) for step in steps]
                row_labels = [f"step {int(step.split('_')[1])}" for step in steps]
                jobs = [Job({**others, n: x}, f"{n} strength {x:g}") for n in names for x in columns]
                what = f"strength x checkpoint of run {run}"
            else:
                first = next(iter(asked.strengths), None)
                if first is None:
                    raise UserError("choose an adapter in slot 1: the grid's columns are its strengths")
                try:
                    row_seeds = [int(v) for v in seeds.replace(";", ",").split(",") if v.strip()]
                except ValueError:
                    raise UserError(
                        f"Seeds (rows) must be whole numbers separated by commas, got {seeds!r}"
                    ) from None
                if not row_seeds:
                    raise UserError("give at least one seed for the grid's rows, e.g. 7, 8, 9")
                row_labels = [f"seed {seed}" for seed in row_seeds]
                jobs = [
                    Job({**asked.strengths, first: x}, f"seed {seed}", seed) for seed in row_seeds for x in columns
                ]
                what = f"strength of {first} x seed"
            shown = self.render(asked, jobs, self._stop_flag(request.session_hash).is_set, progress, save=False)
        except UserError as exc:
            return gr.skip(), f"⚠ {exc}", *[gr.skip()] * 5
        if shown.interrupted:
            return gr.skip(), "Interrupted: the grid was not finished, nothing saved.", *[gr.skip()] * 5
        images = [image for image, _ in shown.pictures]
        cells = [images[i : i + len(columns)] for i in range(0, len(images), len(columns))]
        small = images[0].width < SMALL
        size = images[0].size if images[0].width >= 128 else (128, 128 * images[0].height // images[0].width)
        grid = labelled_grid(cells, [f"strength {x:g}" for x in columns], row_labels, cell=size)
        path = self.outputs.save_grid(grid, shown.parameters[0])
        said = f"X/Y grid, {what}: {len(row_labels)} x {len(columns)} pictures."
        said += f" Saved as outputs/grids/{path.parent.name}/{path.name}."
        said += self._loaded_and_notes(asked, shown)
        history, paths = self.history_updates()
        return (
            gr.Gallery(value=[str(path)], elem_classes=["small-pictures"] if small else []),
            said,
            history,
            paths,
            shown.seed,
            asked.random_seed,
            shown.seed,
        )

    def on_interrupt(self, request: gr.Request):
        """Stop this session's pictures after the denoising step under way (what is finished is kept)."""
        self.stops.setdefault(request.session_hash, threading.Event()).set()

    def on_reuse_seed(self, last_seed):
        if last_seed is None:
            return gr.skip(), gr.skip(), "⚠ No picture made yet in this page, so there is no seed to reuse."
        return last_seed, False, f"Seed {last_seed} set, Random seed off: Generate draws it again."

    def on_tokens(self, base_model: str, prompt: str, negative: str) -> str:
        """How many tokens each prompt has of the 75 the text encoder reads (CLIP: 77 with its start and end
        marks), and, past that, which words are cut."""
        if not (prompt or negative):
            return ""
        try:
            with self.studios.lock:
                studio = self.studios.get(base_model.strip() or "builtin")
                counts = [
                    (what, *studio.count_tokens(text))
                    for what, text in (("Prompt", prompt), ("Negative prompt", negative))
                    if text
                ]
        except UserError as exc:
            return f"⚠ {exc}"
        said = []
        for what, count, limit, cut in counts:
            if count <= limit:
                said.append(f"{what}: {count}/{limit} tokens")
            else:
                said.append(
                    f"⚠ {what}: {count}/{limit} tokens. The text encoder reads the first {limit}; the rest, "
                    f"from “{cut}…”, is cut off"
                )
        return " · ".join(said)

    def on_pick_history(self, paths: list[str], evt: gr.SelectData):
        """Put a history picture's settings back: prompt, negative prompt, seed (random off), steps, guidance,
        size, sampler and adapters with their strengths (those the library has); the picture itself goes in the
        Pictures box, so what is shown is what the settings made."""
        keep = [gr.skip()] * (len(self.restored) - 1)
        try:
            path = Path(paths[evt.index])
            found = Parameters.of_file(path)
        except (IndexError, TypeError):
            return [*keep, "⚠ That picture is no longer in the history; open the tab again to refresh it.", gr.skip()]
        except UserError as exc:
            return [*keep, f"⚠ {exc}", gr.skip()]
        known = self.adapter_names()
        adapters = [(n, s) for n, s in found.adapters.items() if n in known][:SLOTS]
        missing = [n for n in found.adapters if n not in known]
        names = [n for n, _ in adapters] + [NONE] * (SLOTS - len(adapters))
        levels = [s for _, s in adapters] + [1.0] * (SLOTS - len(adapters))
        notes = [f"Settings of **{path.name}** restored."]
        if missing:
            notes.append(f"⚠ Not in the library (nor a checkpoint tried here), left out: {', '.join(missing)}.")
        if len(found.adapters) - len(missing) > SLOTS:
            notes.append(f"⚠ Only the first {SLOTS} adapters fit in the slots.")

        def given(value):
            return gr.skip() if value is None else value

        return [
            found.prompt,
            found.negative_prompt,
            given(found.seed),
            False if found.seed is not None else gr.skip(),
            given(found.steps),
            given(found.cfg_scale),
            given(found.guidance_rescale),
            given(found.width),
            given(found.height),
            found.sampler if found.sampler in SCHEDULERS else "model default",
            *[gr.Dropdown(choices=[NONE, *known], value=n) for n in names],
            *levels,
            " ".join(notes),
            gr.Gallery(value=[(str(path), path.name)], columns=2),
        ]

    def on_upload_adapter(self, path):
        try:
            entry = self.library.add(path)
        except UserError as exc:
            return [*self.slot_updates(), f"⚠ {exc}"]
        return [*self.slot_updates(), f"Added **{entry.name}** to the library."]
