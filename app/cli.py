"""The `lora-studio` command line: train, generate, export, inspect, caption, ui, demo.

lora-studio train --data sample_images --steps 200 --rank 8 --output style.safetensors
lora-studio generate --prompt "a red circle" --adapter style.safetensors:0.8 --seed 7 --output out.png
lora-studio inspect style.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from adapters.errors import UserError
from adapters.formats import check_writable

COMPILE_HELP = (
    "draw through a torch.compile'd UNet and VAE decoder: faster pictures after a one-time compile at each size "
    "(SD 1.5 on an H100, the UNet alone compiled: 44 s, then 9 s in later runs from "
    "~/.cache/lora-studio/torchinductor; 0.26 s a picture against 0.38 s). now (what a bare --compile means): the "
    "first picture at a size waits for the compile; off: never"
)


def _train(args: argparse.Namespace) -> int:
    from trainer.config import from_args
    from trainer.loop import Cancelled, train
    from trainer.runs import read_events

    if args.preset == "list":
        from trainer.presets import listing

        print(listing())
        return 0
    config = from_args(args, args.config)
    if args.check_data:
        return _check_data(config)
    if args.plan:
        return _plan(config)
    if config.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(config)
    try:
        result = train(config)
    except Cancelled as stop:
        if stop.adapter is not None:
            print(
                f"training cancelled at step {stop.step}; the adapter learned so far is {stop.adapter}; go on with: "
                f"lora-studio train --run-dir {stop.run_dir} --resume latest",
                file=sys.stderr,
            )
        else:
            again = (
                f"lora-studio train --run-dir {stop.run_dir} --resume latest" if stop.run_dir else "the same command"
            )
            print(
                "training cancelled before its first step: nothing was learned, so nothing was saved; start it "
                f"again with: {again}",
                file=sys.stderr,
            )
        return 130
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(f"wrote {result.adapter}")
        kept = [e for e in read_events(result.run_dir) if e.get("type") == "library" and not e.get("partial")]
        if kept:  # the name may differ from --name (a name taken in the library gets -2, -3, ...)
            print(f"saved in the library {kept[-1]['library']} as {kept[-1]['name']}")
    return 0


def _check_data(config) -> int:
    """Print the data-set check of the --data folder for these settings (the base model's VAE looks at the
    pictures; its size and buckets are training's), then stop: nothing is trained or written."""
    from trainer.datacheck import check_data, folder_pairs, model_for_check
    from trainer.dataset import bucket_stride, check_folder

    said, missing = [], set()  # what training says of the folder, said here too
    pairs, names = folder_pairs(config.data, said, missing)
    prediction = None if config.prediction_type == "auto" else config.prediction_type
    native, geometry, vae, notes = model_for_check(config.base_model, prediction)
    resolution = config.resolution or native
    report = check_data(
        pairs,
        names=names,
        resolution=resolution,
        stride=bucket_stride(resolution, *geometry),
        buckets=config.buckets,
        trigger_word=config.trigger_word,
        default_caption=config.default_caption,
        vae=vae,
        missing=missing,
    )
    report.notes += [*said, *notes]
    print(f"data check of {config.data} ({len(pairs)} images, training at {resolution} px):")
    print("\n".join(report.lines()))
    try:  # training's own check of the folder, as `train` would run it: exit 1 when it would refuse to start
        check_folder(config.data, config.default_caption)
    except UserError as exc:
        print(f"training would not start: {exc}")
        return 1
    return 0


def _plan(config) -> int:
    """Print the run's plan (trainer/plan.py) for this machine; exit 1 when it would not fit. An optimiser this
    machine cannot run is refused as the run itself would refuse it."""
    from adapters.base import pick_device
    from trainer.dataset import check_folder, repeats_of
    from trainer.loop import resolve_precision
    from trainer.optim import check_optimizer
    from trainer.plan import estimate

    device = pick_device()
    check_optimizer(config, device)
    resolve_precision(config.mixed_precision, device)  # fp16 on the CPU: refused as the run would refuse it
    pictures = [path for path, _ in check_folder(config.data)] if config.data else []
    images = sum(repeats_of(path, config.data, config.repeats) for path in pictures)
    plan = estimate(config, device=device, processes=config.num_processes, images=images, pictures=pictures)
    print(plan)
    return 0 if plan.fits else 1


def _launch(config) -> int:
    """Run this same training on `num_processes` processes through accelerate's launcher (torchrun underneath).

    The run folder is made here, once, so that every process writes to the same one; the processes then read
    the config back from it. Ctrl-C and the UI's Cancel reach every process (one process group), and each saves
    nothing but the main one, which writes the adapter learned so far.
    """
    import signal
    import socket
    import subprocess

    from trainer.loop import restore_signals, set_stop_signals
    from trainer.runs import new_run_dir

    run_dir = Path(config.run_dir) if config.run_dir else new_run_dir("runs", config.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.run_dir = str(run_dir)
    launch_config = run_dir / "launch.json"
    config.save(launch_config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(config.num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        "app.cli",
        "train",
        "--config",
        str(launch_config),
    ]
    print(f"launching {config.num_processes} processes: {' '.join(cmd[2:])}", file=sys.stderr)
    # the workers get the signal too and stop cleanly; this process waits for them, then gets its handlers back
    # (ignored ones would stay ignored in every process it starts later: a page started after it ignored Ctrl-C)
    previous = set_stop_signals(signal.SIG_IGN)
    try:
        code = subprocess.call(cmd)
    finally:
        restore_signals(previous)
    if code:
        _say_why_the_workers_failed(run_dir)
    return code


def _say_why_the_workers_failed(run_dir: Path) -> None:
    """torchrun ends a failed run with every worker's traceback and its own report, which bury the cause: say the
    error the main process logged in the run's events last, where the user looks."""
    from trainer.runs import scan_events

    events = scan_events(run_dir)[0]
    if events and events[-1]["type"] == "error":
        print(f"lora-studio: training failed: {events[-1]['message']}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> int:
    from adapters.base import base_model_label
    from adapters.formats import read_safetensors
    from adapters.runtime import Studio, parse_adapter_arg
    from app.images import Parameters, save_image

    out = Path(args.output)
    check_writable(out, "--output")  # a folder is said to be one (--overwrite would not help)
    if out.exists() and not args.overwrite:
        raise UserError(f"--output {out} already exists; choose another name or pass --overwrite")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError(f"--output {out} must end in .png, .jpg or .webp")
    prediction = None if args.prediction_type == "auto" else args.prediction_type
    adapters = [parse_adapter_arg(spec) for spec in args.adapter or []]
    given: dict[Path, float] = {}
    for path, strength in adapters:  # a missing or broken --adapter is named before the base model takes its time
        read_safetensors(Path(path))
        if Path(path).resolve() in given:  # it would be drawn at the sum, and the picture's text name one strength
            raise UserError(
                f"--adapter {path} is given twice (strengths {given[Path(path).resolve()]:g} and {strength:g}); "
                "give it once, at the strength you want"
            )
        given[Path(path).resolve()] = strength
    if args.seed < 0:  # as the page's -1: a new picture each time, its seed said and written into it
        args.seed = random.randrange(2**32)
        print(f"seed {args.seed} (--seed {args.seed} draws this picture again)")
    studio = Studio(args.base_model, prediction_type=prediction, compile_unet=args.compile == "now")
    strengths, names = {}, {}  # loaded name -> strength; loaded name -> the file's stem, as the picture names it
    for path, strength in adapters:
        name = studio.load(Path(path), name=f"{len(strengths)}_{Path(path).stem}")
        strengths[name], names[name] = strength, Path(path).stem
    guidance = studio.defaults["guidance"] if args.guidance is None else args.guidance
    rescale = studio.defaults["guidance_rescale"] if args.guidance_rescale is None else args.guidance_rescale
    image = studio.generate(
        args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        sampling_steps=args.sampling_steps,
        guidance=guidance,
        guidance_rescale=rescale,
        width=args.width,
        height=args.height,
        strengths=strengths,
    )[0]
    parameters = Parameters(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.sampling_steps,
        sampler=studio.sampler,
        cfg_scale=guidance,
        seed=args.seed,
        width=image.width,
        height=image.height,
        model=base_model_label(args.base_model),
        guidance_rescale=rescale,
        adapters={names[n]: s for n, s in strengths.items()},
        lora_hashes={names[n]: studio.hashes[n] for n in strengths},
    )
    save_image(image, out, parameters.text())
    print(f"wrote {out}")
    return 0


def _caption(args: argparse.Namespace) -> int:
    """Write a caption file for each image of --data that has none (or an empty one), from an image-to-text
    model; a caption already written is never changed."""
    from adapters.formats import write_atomic
    from trainer.captions import Captioner
    from trainer.datacheck import folder_pairs

    said = []  # what training passes over in the folder (.bmp pictures, captions without an image): said here too
    pairs, names = folder_pairs(args.data, said)
    for note in said:
        print(f"note: {note}")
    todo = [(path, name) for (path, caption), name in zip(pairs, names) if not caption]
    if not todo:
        print(f"every image in {args.data} has a caption; nothing to do (delete a .txt file to have it redone)")
        return 0
    captioner = Captioner(args.model)
    for path, name in todo:
        caption = captioner.caption(path, args.trigger_word)
        write_atomic(path.with_suffix(".txt"), (caption + "\n").encode())
        print(f"{name}: {caption}")
    kept = len(pairs) - len(todo)
    print(f"wrote {len(todo)} caption(s) beside their images; {kept} written before were kept: read and edit them")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from adapters.inspect import describe

    info = describe(Path(args.file))
    print(json.dumps(info, indent=2))
    if not info["modules"]:  # printed all the same: what the file holds may say what it is
        print(
            f"{args.file} holds no LoRA weights in a layout lora-studio knows: it is not an adapter it can use",
            file=sys.stderr,
        )
        return 1
    return 0


GRADIO_CACHE = ".gradio-cache"  # the workspace's folder for gradio's copies of uploads (`lora-studio ui`)
DEMO_PROMPTS = ("glowline, a green triangle", "glowline, a large purple star", "glowline, an orange diamond")
DEMO_STRENGTHS = (0.0, 0.5, 1.0)


def _demo(args: argparse.Namespace) -> int:
    """Train on sample_images/ with the built-in model, then write a strength 0 / 0.5 / 1 preview grid."""
    import time

    from adapters.runtime import Studio
    from app.images import labelled_grid, save_image
    from trainer.config import TrainConfig
    from trainer.loop import train

    out_dir = Path(args.output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    check_writable(out_dir / f"demo-{stamp}.png", "--output-dir")
    data = Path(__file__).resolve().parent.parent / "sample_images"
    result = train(TrainConfig(data=str(data), output=str(out_dir / f"demo-{stamp}.safetensors")))
    studio = Studio("builtin")
    studio.load(result.adapter, name="demo")
    rows = [[studio.generate(p, seed=7, strengths={"demo": s})[0] for s in DEMO_STRENGTHS] for p in DEMO_PROMPTS]
    grid = labelled_grid(rows, [f"strength {s:g}" for s in DEMO_STRENGTHS], list(DEMO_PROMPTS))
    path = out_dir / f"demo-{stamp}.png"
    save_image(grid, path)
    print(f"wrote {result.adapter} and the preview grid {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from adapters.export import export_adapter

    out = export_adapter(
        Path(args.file), args.format, Path(args.output), base_model=args.base_model, overwrite=args.overwrite
    )
    print(f"wrote {out} ({args.format} layout)")
    return 0


def _ui(args: argparse.Namespace) -> int:
    import shutil

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from a local tool
    # gradio's copies of uploads and sent pictures: in the workspace (removed when the page stops), not the system
    # temp folder, unless the person chose a folder with GRADIO_TEMP_DIR
    own_cache = None
    if not os.environ.get("GRADIO_TEMP_DIR"):
        own_cache = Path(args.workspace).resolve() / GRADIO_CACHE / str(os.getpid())  # one a page process
        os.environ["GRADIO_TEMP_DIR"] = str(own_cache)
    from app.ui import launch

    try:
        launch(
            args.host,
            args.port,
            args.auth,
            args.workspace,
            args.base_model,
            args.preload,
            insecure_no_auth=args.insecure_no_auth,
            max_file_mb=args.max_file_mb,
            max_upload_files=args.max_upload_files,
            compile_unet=args.compile,
        )
    finally:
        if own_cache is not None:
            shutil.rmtree(own_cache, ignore_errors=True)
            try:
                own_cache.parent.rmdir()  # when no other page process of this workspace uses it
            except OSError:
                pass
    return 0


class _OldSpelling(argparse.Action):
    """Stores an option's value; given under its old spelling, first says the new one on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string != self.option_strings[0]:
            print(
                f"lora-studio: {option_string} is now {self.option_strings[0]}; the old spelling works for now",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)


def _option(parser: argparse.ArgumentParser, new: str, old: str, **kwargs) -> None:
    """An option under its one name, still accepting the spelling it had before (with a notice)."""
    parser.add_argument(new, old, action=_OldSpelling, **kwargs)


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line (and a close match for a mistyped choice) instead of the
    whole usage block above it."""

    def error(self, message: str):
        import difflib
        import re

        typo = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if typo:
            choices = re.findall(r"'([^']*)'", typo.group(3))
            close = difflib.get_close_matches(typo.group(2), choices, n=1)
            message += f"; did you mean {close[0]!r}?" if close else ""
        self.exit(2, f"{self.prog}: error: {message}\n({self.prog} --help lists every flag)\n")


def build_parser() -> argparse.ArgumentParser:
    from app.jobs import MAX_FILE_MB, MAX_UPLOAD_FILES
    from trainer.config import add_arguments

    parser = Parser(prog="lora-studio", description="Train and use LoRA style adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an adapter on a folder of images and captions")
    p.add_argument(
        "--config", help="a .json or .yaml file of TrainConfig fields (and preset: NAME); flags override it"
    )
    p.add_argument(
        "--preset",
        metavar="NAME",
        help="start from a named recipe (--preset list shows them); the config file and flags override it",
    )
    p.add_argument(
        "--check-data",
        action="store_true",
        help="check the --data folder (near-duplicates, outliers, small images, buckets, captions), print what it "
        "finds and exit without training",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print what this run would need here (GPU memory by phase, system memory, disk, time) and what it "
        "would turn on to fit, then exit without training",
    )
    add_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("generate", help="make an image with zero or more adapters")
    p.add_argument(
        "--base-model",
        default="builtin",
        help="builtin, a Hugging Face id, a diffusers folder or a .safetensors checkpoint file",
    )
    p.add_argument(
        "--prediction-type",
        default="auto",
        choices=("auto", "epsilon", "v_prediction"),
        help="for a single-file checkpoint that does not say what it predicts (SD 2.x 768: v_prediction)",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0, help="-1: a random seed, printed and written into the picture")
    _option(p, "--sampling-steps", "--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's recommended (7.5 for SD)")
    p.add_argument(
        "--guidance-rescale",
        type=float,
        default=None,
        help="default: 0.7 for zero-terminal-SNR models (the built-in one), else 0",
    )
    p.add_argument("--width", type=int, default=None, help="default: the base model's native size")
    p.add_argument("--height", type=int, default=None, help="default: the base model's native size")
    p.add_argument(
        "--adapter", action="append", metavar="FILE[:STRENGTH]", help="adapter file and strength (repeatable)"
    )
    _option(p, "--output", "--out", required=True, help="image file to write (.png, .jpg or .webp)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument(
        "--compile", nargs="?", const="now", default="off", choices=("now", "off"), help=COMPILE_HELP + " (default)"
    )
    p.set_defaults(func=_generate)

    p = sub.add_parser("ui", help="start the web app (Train, Generate, Adapters)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument(
        "--auth", default=None, metavar="USER:PASS", help="require this login (needed with a --host other than local)"
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-local --host without a login (only where every machine that can reach it is trusted)",
    )
    p.add_argument(
        "--max-file-mb", type=int, default=MAX_FILE_MB, help="largest upload, in MB (default: %(default)s)"
    )
    p.add_argument(
        "--max-upload-files",
        type=int,
        default=MAX_UPLOAD_FILES,
        help="most files in one Train upload (default: %(default)s)",
    )
    p.add_argument("--workspace", default=".", help="folder holding runs/ and library/ (default: here)")
    p.add_argument("--base-model", default="builtin", help="base model preselected in the page")
    p.add_argument("--preload", default=None, metavar="FOLDER", help="put this folder's images in the upload box")
    p.add_argument(
        "--compile",
        nargs="?",
        const="now",
        default="auto",
        choices=("auto", "background", "now", "off"),
        help=COMPILE_HELP + "; background: pictures are drawn uncompiled while a worker thread compiles, then "
        "compiled; auto (the default): background on a CUDA GPU, else off. It sets the Generate tab's Compile box: "
        "ticked (now, background) or not; ticked later, it compiles in the background unless now",
    )
    p.set_defaults(func=_ui)

    p = sub.add_parser("demo", help="train on the bundled sample images and write a preview grid")
    _option(
        p, "--output-dir", "--out-dir", default="outputs", help="where the adapter and grid go (default: %(default)s)"
    )
    p.set_defaults(func=_demo)

    p = sub.add_parser("export", help="convert an adapter to the kohya/A1111 or the diffusers layout")
    p.add_argument("file")
    p.add_argument("--format", required=True, choices=("kohya", "diffusers"))
    _option(p, "--output", "--out", required=True, help="the .safetensors file to write")
    p.add_argument(
        "--base-model",
        default=None,
        help="the model the adapter is for (default: the one in its header, else builtin)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "caption", help="write first captions for the images of a folder that have none, from an image-to-text model"
    )
    p.add_argument("--data", required=True, help="the folder of training images (its <N>_name sub-folders too)")
    p.add_argument(
        "--model",
        required=True,
        help="an image-to-text model transformers loads (BLIP, GIT, Florence-2...): a Hugging Face id or a local "
        "folder, e.g. Salesforce/blip-image-captioning-base",
    )
    p.add_argument("--trigger-word", default="", help="put first in every caption written")
    p.set_defaults(func=_caption)

    p = sub.add_parser("inspect", help="print an adapter file's format and metadata as JSON")
    p.add_argument("file")
    p.set_defaults(func=_inspect)
    return parser


def _attach_negative_numbers(argv: list[str]) -> list[str]:
    """`--flag -1e-4` -> `--flag=-1e-4`: argparse would take a negative number in e-notation for a flag."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and token.startswith("-"):
            try:
                float(token)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={token}"
                continue
        out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    import warnings

    # diffusers passes huggingface_hub an argument it deprecated: a warning at every hub lookup no user can act on
    warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(_attach_negative_numbers(list(argv)))
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before a command took it over (train's does once its model loads)
        what = "training stopped before its first step: nothing was learned" if args.command == "train" else "stopped"
        print(f"{what} (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
