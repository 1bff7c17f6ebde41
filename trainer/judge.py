"""The judge: which checkpoint, at which strength? At each saved checkpoint (or those --judge-every names) and at
the end of a run, held-out prompts are drawn at several strengths with fixed seeds and every picture is scored; all
of it goes to `<run>/judge.json`, with a contact sheet per judged step in `<run>/judge/`.

    judge = Judge.start(config, pipe, family, examples, resolution, sampling, run_dir, events)  # None if off
    strength = judge.score(step, unet, dtype)   # at a checkpoint: draws, scores, rewrites judge.json

The scores are measured with the base model's own VAE encoder (nothing is downloaded):
- **style**: a picture's style statistics are the Gram matrices of the encoder's feature maps (`conv_in` and each
  down block) and the pixels' colour mean and spread; its distance per statistic is how far it is from the training
  set's average, relative to that average's size. A cell's style score is the share of the base model's distance
  (the same prompts and seeds at strength 0) that the adapter removes, averaged over the statistics: 0 = as far as
  the base model, 1 = the training set's average exactly, below 0 = further than the base model.
- **leak**: a picture's likeness to the nearest training picture is the cosine similarity of their VAE latents on
  an 8 x 8 grid, each channel's own mean removed (where things are, not the overall colour). A cell's leak score
  places its pictures' mean likeness between the base model's (0) and a copy (1).
- **prompt following**: only with a CLIP model at hand, the one --judge-clip names or one of `CLIP_MODELS` in the
  local Hugging Face cache; else skipped, and judge.json says so.

The recommended pair (`recommend`, `RULE`): among the cells with a strength above 0 and a leak score at most the
leak limit, the highest style score. The leak limit is halfway between the training pictures' own likeness to each
other (on the leak scale) and a copy.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.errors import UserError
from adapters.formats import write_atomic
from trainer.dataset import prepare_image

JUDGE_JSON = "judge.json"
JUDGE_DIR = "judge"  # a contact sheet per judged checkpoint: prompts as rows, strengths as columns
LABEL = 14  # pixels of the contact sheet's bands for the strengths (top) and the prompts' numbers (left)
# The cost: PROMPTS x 2 (guidance) pictures through the UNet SAMPLING_STEPS times per strength. At 3 prompts and 8
# steps a default run's judging (its end only, 5 strengths) took 6.9% of the rest of the run on the built-in model
# (benchmarks/results/judge_cost_cpu.json); 4 prompts at 20 steps would cost 3.3 times as much.
PROMPTS = 3  # held-out prompts made from the captions when none are given
SEED = 1000  # prompt k is drawn with seed SEED + k, at every checkpoint and strength
SAMPLING_STEPS = 8
CLIP_MODELS = ("openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14")
TILE = 128  # the contact sheet's pictures are at most this wide

# What a held-out prompt swaps in for the caption's subject: colours and things the captions never name, so the
# picture shows new content and only the style can come from training. Only words the base model's tokenizer
# knows as one word are used (the built-in model knows few); black, white and grey are left alone (backgrounds).
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "teal", "brown")
THINGS = (
    "circle", "square", "triangle", "star", "diamond", "cat", "dog", "horse", "bird", "fish", "house", "tree",
    "car", "boat", "flower", "mountain", "castle", "lighthouse", "teapot", "bicycle", "apple", "chair", "clock",
    "guitar", "robot", "dragon", "bridge", "forest", "city", "woman", "man", "girl", "boy",
)  # fmt: skip


def parse_strengths(text: str) -> list[float]:
    """`judge_strengths` as numbers: comma-separated, each from -2 to 4; a UserError names the field otherwise."""
    values = []
    for part in str(text).split(","):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and -2 <= value <= 4):
            raise UserError(
                f"judge_strengths (--judge-strengths) must be comma-separated numbers from -2 to 4, e.g. "
                f"0,0.5,0.75,1,1.25; got {text!r}"
            )
        values.append(value)
    if not any(values):
        raise UserError("judge_strengths (--judge-strengths) needs a strength other than 0 to judge the adapter")
    return values


def parse_prompts(text: str) -> list[str]:
    """`judge_prompts` as a list: prompts separated by `;` (a prompt may hold commas); empty ones are dropped."""
    return [p.strip() for p in str(text).split(";") if p.strip()]


def swap_subjects(captions: list[str], trigger_word: str, known, count: int = PROMPTS) -> list[str]:
    """Held-out prompts from the captions: `count` of them, spread over the captions, each with its colour and thing
    words (`COLOURS`, `THINGS`, also plural) swapped for ones no caption uses, the trigger word kept. `known(word)`
    says whether the base model's tokenizer knows a word. A caption with nothing to swap gives `<trigger>, a
    <thing>`."""
    words = {w.lower() for c in captions for w in re.findall(r"[A-Za-z]+", c)}
    kinds = {"colour": COLOURS, "thing": THINGS}
    spare = {k: [w for w in ws if known(w) and w not in words and w + "s" not in words] for k, ws in kinds.items()}
    kind_of = {w: kind for kind, ws in kinds.items() for w in ws}
    picked = [captions[round(i * len(captions) / count) % len(captions)] for i in range(count)] if captions else []
    prompts = []
    for k, caption in enumerate(picked):
        used = dict.fromkeys(kinds, 0)
        parts = re.split(r"([A-Za-z]+)", caption)  # words at the odd places, what lies between them at the even
        for i in range(1, len(parts), 2):
            lower = parts[i].lower()
            plural = lower.endswith("s") and lower[:-1] in kind_of
            kind = kind_of.get(lower[:-1] if plural else lower)
            if kind is None or lower == trigger_word.lower() or not spare[kind]:
                continue
            parts[i] = spare[kind][(k + used[kind]) % len(spare[kind])] + ("s" if plural else "")
            used[kind] += 1
        prompt = "".join(parts)
        if prompt == caption:  # nothing swappable: a plain new subject in the style
            thing = spare["thing"][k % len(spare["thing"])] if spare["thing"] else "thing"
            prompt = f"{trigger_word}, a {thing}" if trigger_word else f"a {thing}"
        prompts.append(prompt)
    return prompts


@dataclass
class Statistics:
    """The style statistics and layout of a batch of pictures."""

    grams: list[torch.Tensor]  # per feature map, (N, C, C): channel correlations, normalised by the map's size
    colour: torch.Tensor  # (N, 6): mean and standard deviation of R, G, B, pixels in 0..1
    layout: torch.Tensor  # (N, 4 * 8 * 8): the VAE latent on an 8x8 grid, each channel's own mean removed


@torch.no_grad()
def statistics(vae, pixels: torch.Tensor, batch: int | None = None) -> Statistics:
    """`Statistics` of pictures (N, 3, H, W) in -1..1, from one pass of `vae`'s encoder each: `batch` at a time
    (default: 8 on the CPU, 1 on a GPU, as the latent cache encodes, so that the judge needs no more GPU memory than
    the caching; each feature map is reduced to its Gram matrix as the encoder makes it, never kept)."""
    encoder = vae.encoder
    layers = [encoder.conv_in, *encoder.down_blocks]
    if next(vae.parameters()).dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.float()  # e.g. SDXL's VAE overflows in fp16 (the caching of the latents upcasts it too)
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    batch = batch or (1 if device.type == "cuda" else 8)
    grams: list[list[torch.Tensor]] = [[] for _ in layers]

    def gram(i: int, out: torch.Tensor) -> None:
        flat = out.float().flatten(2)  # (n, C, HW)
        grams[i].append((flat @ flat.transpose(1, 2) / flat.shape[2]).cpu())

    colours, layouts = [], []
    hooks = [layer.register_forward_hook(lambda m, i, out, k=k: gram(k, out)) for k, layer in enumerate(layers)]
    try:
        for start in range(0, len(pixels), batch):
            chunk = pixels[start : start + batch]
            latent = vae.encode(chunk.to(device, dtype)).latent_dist.mean.float()
            rgb = (chunk.float() + 1) / 2
            colours.append(torch.cat([rgb.mean((2, 3)), rgb.std((2, 3))], 1).cpu())
            # where things are, whatever the size: on a grid of 8 x 8, with the overall colour (channel means) out
            grid = torch.nn.functional.adaptive_avg_pool2d(latent, 8)
            layouts.append((grid - grid.mean((2, 3), keepdim=True)).flatten(1).cpu())
    finally:
        for hook in hooks:
            hook.remove()
    return Statistics([torch.cat(g) for g in grams], torch.cat(colours), torch.cat(layouts))


class Reference:
    """The training set's style statistics (their average) and layouts (each picture's), to score pictures by."""

    def __init__(self, stats: Statistics | list[Statistics]):
        """From the `statistics` of the pictures, in one batch or several (only their sums are kept)."""
        parts = stats if isinstance(stats, list) else [stats]
        self.images = sum(len(part.colour) for part in parts)
        self.grams = [sum(part.grams[i].sum(0) for part in parts) / self.images for i in range(len(parts[0].grams))]
        self.colour = sum(part.colour.sum(0) for part in parts) / self.images
        self.layouts = torch.nn.functional.normalize(torch.cat([part.layout for part in parts]), dim=1)

    def own_likeness(self) -> float | None:
        """How alike the training pictures are to each other: each one's `likeness` to its nearest other one, the
        median; None for a single picture."""
        if self.images < 2:
            return None
        similar = self.layouts @ self.layouts.T
        similar.fill_diagonal_(-1.0)
        return float(similar.max(1).values.median())

    def distances(self, stats: Statistics) -> torch.Tensor:
        """(N, terms): each picture's distance from the set's average per statistic (each Gram matrix, then the
        colour), relative to the average's size; 0 = the average exactly."""
        terms = [
            (g - ref).flatten(1).norm(dim=1) / ref.norm().clamp_min(1e-8) for g, ref in zip(stats.grams, self.grams)
        ]
        terms.append((stats.colour - self.colour).norm(dim=1) / self.colour.norm().clamp_min(1e-8))
        return torch.stack(terms, 1)

    def likeness(self, stats: Statistics) -> torch.Tensor:
        """(N,): cosine similarity of each picture's layout to the nearest training picture's; 1 = a copy."""
        return (torch.nn.functional.normalize(stats.layout, dim=1) @ self.layouts.T).max(1).values


def style_score(distances: torch.Tensor, base: torch.Tensor) -> float:
    """A cell's style score from its pictures' `Reference.distances` (N, terms) and those of the same prompts and
    seeds at strength 0: per statistic, the share of the base model's mean distance that is removed, averaged over
    the statistics. 0 = as far from the style as the base model, 1 = the training set's average statistics."""
    removed = 1 - distances.mean(0) / base.mean(0).clamp_min(1e-8)
    return float(removed.mean())


def leak_score(likeness: torch.Tensor, base: torch.Tensor) -> float:
    """A cell's leak score from its pictures' `Reference.likeness` and those of the base model (strength 0): where
    their mean falls between the base model's (0) and a copy of a training picture (1)."""
    base_mean = float(base.mean())
    return (float(likeness.mean()) - base_mean) / max(1 - base_mean, 1e-6)


def leak_limit(own_likeness: float | None, base: torch.Tensor) -> float:
    """The most leak a recommended cell may have: halfway between the training pictures' likeness to each other
    (on the leak scale; 0 when there is a single picture or they are less alike than the base model's pictures
    are to them) and a copy (1)."""
    own = 0.0 if own_likeness is None else max(leak_score(torch.tensor([own_likeness]), base), 0.0)
    return (own + 1) / 2


def recommend(rows: list[dict], limit: float) -> tuple[dict | None, str]:
    """The recommended (step, strength) as `RULE` says, and, when there is none, why. A cell is a candidate when its
    strength is above 0, its style score above 0 (closer to the style than the base model) and its leak score at
    most `limit`; the candidate with the highest style score wins, ties going to the lower strength, then the
    earlier step."""
    cells = [(row["step"], cell) for row in rows for cell in row["cells"] if cell["strength"] > 0]
    candidates = [(step, cell) for step, cell in cells if cell["style"] > 0 and cell["leak"] <= limit]
    if not candidates:
        if not cells:
            return None, "nothing judged yet"
        if not any(cell["style"] > 0 for _, cell in cells):
            return None, "no checkpoint and strength draws closer to the style than the base model (style score > 0)"
        return None, f"every cell closer to the style than the base model leaks more than the limit ({limit:.2f})"
    step, cell = max(candidates, key=lambda sc: (sc[1]["style"], -sc[1]["strength"], -sc[0]))
    return {"step": step, "strength": cell["strength"], "style": cell["style"], "leak": cell["leak"]}, ""


def _to_pixels(images) -> torch.Tensor:
    """PIL pictures -> (N, 3, H, W) in -1..1."""
    import numpy as np

    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1 for im in images]
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])


def check_clip(choice: str) -> None:
    """Refuse a --judge-clip that cannot load without a download, before any work: a folder that is not there or
    holds no model config, or a hub id not in the local Hugging Face cache. Empty is fine (look in the cache)."""
    if not choice:
        return
    where = f"judge_clip (--judge-clip) {choice!r}"
    path = Path(choice).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{where}: the folder has no config.json; give a folder holding a CLIP model's files")
        return
    if path.exists():
        raise UserError(f"{where} is a file; give a folder holding a CLIP model's files, or a hub id")
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", choice) and not choice.startswith((".", "~"))
    if not hub_id:
        raise UserError(f"{where}: no such folder")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(choice, "config.json"), str):
        raise UserError(
            f"{where}: no such folder, and no such model in the local Hugging Face cache (the judge never "
            "downloads one): give a folder, download it first (hf download "
            f"{choice}), or leave it empty to skip prompt following"
        )


class _Clip:
    """Prompt following: CLIP's image-text cosine similarity x 100 (the CLIPScore scale), from the CLIP model `choice`
    names (a hub id in the local Hugging Face cache or a folder) or, with none named, the first of `CLIP_MODELS` in
    the local cache; never downloaded. With none named and none found, `why` says what was looked for."""

    def __init__(self, device, choice: str = ""):
        self.model = self.processor = None
        self.name, self.why = "", ""
        if choice:
            self._load(choice, device)  # named: it must load
            return
        from huggingface_hub import try_to_load_from_cache

        for name in CLIP_MODELS:
            if isinstance(try_to_load_from_cache(name, "config.json"), str):
                with contextlib.suppress(UserError):
                    self._load(name, device)
                    return
        self.why = f"no CLIP model in the local Hugging Face cache (looked for {', '.join(CLIP_MODELS)}); skipped"

    def _load(self, name: str, device) -> None:
        from transformers import CLIPModel, CLIPProcessor  # slow to import: only when there is a model

        try:
            self.model = CLIPModel.from_pretrained(name, local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as exc:
            self.model = self.processor = None
            raise UserError(
                f"judge_clip (--judge-clip): cannot load a CLIP model from {name!r} without downloading it (a folder "
                f"with a CLIP model's config, weights and processor files, or a hub id already in the local cache; "
                f"empty = skip prompt following unless one is cached): {str(exc).splitlines()[0]}"
            ) from None
        self.name = name

    @torch.no_grad()
    def scores(self, images, prompts: list[str]) -> list[float] | None:
        if self.model is None:
            return None
        device = next(self.model.parameters()).device
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        out = self.model(**{k: v.to(device) for k, v in inputs.items()})
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return [100 * max(float(v), 0.0) for v in (image * text).sum(-1)]


class Judge:
    """Draws the held-out prompts at each strength with the training UNet's own LoRA, scores them, and keeps
    `<run>/judge.json` up to date (rewritten whole, atomically, after each checkpoint)."""

    def __init__(
        self, *, pipe, family, prompts, strengths, reference, resolution, sampling, run_dir, events, clip=""
    ):
        self.pipe, self.family, self.prompts = pipe, family, prompts
        # strength 0, the base model, is always drawn: the scores are measured from it
        self.strengths = sorted({0.0, *strengths})
        self.seeds = [SEED + k for k in range(len(prompts))]
        self.reference, self.resolution, self.sampling = reference, resolution, sampling
        self.run_dir, self.events = Path(run_dir), events
        # token ids: with --train-text-encoder the encoders' LoRA changes as it trains, so each draw encodes anew;
        # the conditioning of the frozen encoders is computed once, here
        self.tokens = family.tokens(pipe, prompts), family.tokens(pipe, [""] * len(prompts))
        self.conds = family.conditioning(pipe, prompts), family.conditioning(pipe, [""] * len(prompts))
        self.clip = _Clip(pipe.vae.device, clip)
        self.rows: list[dict] = []
        self.base: dict | None = None  # strength 0: distances and likeness of each prompt's picture
        self.limit = 0.5
        self.setup_seconds = 0.0  # the training set's statistics, the prompts' conditioning, looking for CLIP

    @classmethod
    def start(cls, config, pipe, family, examples, resolution, sampling, run_dir, events) -> Judge | None:
        """The run's judge (None with `config.judge` off), made before the captions are encoded: the prompts'
        conditioning is computed now, while the text encoders are still on the device. A resumed run keeps the rows
        of its judge.json; those after the step it resumed from are replaced as it judges again."""
        if not config.judge:
            return None
        started = time.perf_counter()
        prompts = parse_prompts(config.judge_prompts)
        if not prompts:
            tokenizer = pipe.tokenizer
            prompts = swap_subjects(
                [ex.caption for ex in examples],
                config.trigger_word,
                lambda word: tokenizer.tokenize(word) == [f"{word}</w>"],
            )
        # the training pictures as the judge's are drawn: the centre square at the training resolution, 8 at a time
        # (only the Gram matrices' sums are kept: a few MB for any number of pictures)
        batches = [examples[i : i + 8] for i in range(0, len(examples), 8)]
        reference = Reference(
            [statistics(pipe.vae, torch.stack([prepare_image(ex.path, resolution) for ex in b])) for b in batches]
        )
        judge = cls(
            pipe=pipe,
            family=family,
            prompts=prompts,
            strengths=parse_strengths(config.judge_strengths),
            reference=reference,
            resolution=resolution,
            sampling=sampling,
            run_dir=run_dir,
            events=events,
            clip=config.judge_clip,
        )
        judge.setup_seconds = time.perf_counter() - started
        before = read_judge(run_dir) if config.resume else {}
        if before.get("prompts") == judge.prompts and before.get("strengths") == judge.strengths:
            judge.rows = [row for row in before.get("checkpoints", []) if isinstance(row, dict)]
        return judge

    @contextlib.contextmanager
    def _strength(self, models, strength: float):
        """The LoRA of the models being trained at `strength` for a while: each layer's scale times `strength`, or
        at 0 the layers switched off (the base model exactly, DoRA too); put back exactly as they were after."""
        from adapters.lora import lora_layers

        layers = [layer for model in models for _, layer in lora_layers(model, "default")]
        saved = [(layer.scaling["default"], layer._disable_adapters) for layer in layers]
        try:
            for layer, (scale, _) in zip(layers, saved):
                layer.scaling["default"] = scale * strength
                layer._disable_adapters = strength == 0  # peft's own switch (`disable_adapters`), without its grads
            yield
        finally:
            for layer, (scale, disabled) in zip(layers, saved):
                layer.scaling["default"], layer._disable_adapters = scale, disabled

    @torch.no_grad()
    def _batch(self, device: torch.device) -> int:
        return 1 if device.type == "cuda" else len(self.prompts)

    def _draw(self, unet, text_encoders: dict, strength: float, dtype) -> list:
        """The prompts' pictures at `strength`: all in one batch on the CPU; one prompt at a time on a GPU, where
        the training state is in memory too (the previews draw one at a time as well)."""
        device = unet.device
        self.pipe.unet = unet
        # the frozen model in the compute dtype, the LoRA in fp32: mixed under autocast, as the previews are
        mixed = dtype != torch.float32
        size = self._batch(device)
        images = []
        with self._strength([unet, *text_encoders.values()], strength):
            with torch.autocast(device.type, dtype=dtype, enabled=mixed):
                cond, empty = (self.family.encode(self.pipe, t) for t in self.tokens) if text_encoders else self.conds
                for start in range(0, len(self.prompts), size):
                    part = slice(start, start + size)
                    cond_part, empty_part = ({k: v[part].to(device) for k, v in c.items()} for c in (cond, empty))
                    images += self.pipe(
                        **self.family.pipeline_kwargs(cond_part, empty_part),
                        num_inference_steps=SAMPLING_STEPS,
                        guidance_scale=self.sampling["guidance"],
                        guidance_rescale=self.sampling["guidance_rescale"],
                        generator=[torch.Generator("cpu").manual_seed(s) for s in self.seeds[part]],
                        height=self.resolution,
                        width=self.resolution,
                    ).images
        return images

    def score(self, step: int, unet, dtype=torch.float32, text_encoders: dict | None = None) -> float | None:
        """Judge the LoRA as it is at `step`, on the UNet and any `text_encoders` being trained ({name: model};
        `dtype`: the frozen model's): draw, score, rewrite judge.json and draw the step's contact sheet. Returns the
        recommended strength for the adapter as it is now (None: none recommended)."""
        started = time.perf_counter()
        text_encoders = text_encoders or {}
        models = [unet, *text_encoders.values()]
        modes = [model.training for model in models]
        for model in models:
            model.eval()
        try:
            pictures = {}
            for strength in self.strengths:
                if strength == 0 and self.base is not None:  # the base model draws the same at every checkpoint
                    pictures[0.0] = self.base["images"]
                    continue
                pictures[strength] = self._draw(unet, text_encoders, strength, dtype)
        finally:
            for model, mode in zip(models, modes):
                model.train(mode)
        measured = {s: self.reference_scores(images) for s, images in pictures.items()}
        if self.base is None:
            self.base = {"images": pictures[0.0], **measured[0.0]}
            self.limit = leak_limit(self.reference.own_likeness(), self.base["likeness"])
        cells = []
        for strength, scores in measured.items():
            following = self.clip.scores(pictures[strength], self.prompts)
            cells.append(
                {
                    "strength": strength,
                    "style": style_score(scores["distances"], self.base["distances"]),
                    "leak": leak_score(scores["likeness"], self.base["likeness"]),
                    "style_distance": [round(float(v), 5) for v in scores["distances"].mean(1)],
                    "likeness": [round(float(v), 5) for v in scores["likeness"]],
                    "prompt_following": None if following is None else sum(following) / len(following),
                }
            )
        sheet = self._contact_sheet(step, pictures)
        row = {"step": step, "cells": cells, "sheet": sheet.name, "seconds": time.perf_counter() - started}
        self.rows = [r for r in self.rows if r["step"] < step] + [row]  # later ones: a timeline a resume left
        self._write()
        self.events.emit("judge", step=step, seconds=row["seconds"], recommended=recommend(self.rows, self.limit)[0])
        return self.final_strength(step)

    def summary(self, step: int) -> str:
        """One line for the terminal on the judging of `step`: its best cell and the recommendation so far."""
        row = next(r for r in self.rows if r["step"] == step)
        here, why = recommend([row], self.limit)
        best, _ = recommend(self.rows, self.limit)
        said = (
            f"best here strength {here['strength']:g} (style {here['style']:.2f}, leak {here['leak']:.2f})"
            if here
            else f"no strength qualifies here: {why}"
        )
        overall = f"recommended so far: step {best['step']} at strength {best['strength']:g}" if best else ""
        return f"judged step {step} in {row['seconds']:.1f} s: {said}" + (f"; {overall}" if overall else "")

    def verdict(self) -> str:
        """The judge's last word for the terminal: the recommended checkpoint and strength, or why there is none."""
        best, why = recommend(self.rows, self.limit)
        where = self.run_dir / JUDGE_JSON
        if best is None:
            return f"judge: no checkpoint and strength recommended: {why} (scores: {where})"
        return (
            f"judge: recommended step {best['step']} at strength {best['strength']:g} (style {best['style']:.2f}, "
            f"leak {best['leak']:.2f}; scores: {where})"
        )

    def reference_scores(self, images) -> dict:
        stats = statistics(self.pipe.vae, _to_pixels(images))
        return {"distances": self.reference.distances(stats), "likeness": self.reference.likeness(stats)}

    def final_strength(self, step: int) -> float | None:
        """The recommended strength for the adapter as it is at `step` (the rule of `recommend`, on its row only)."""
        best, _ = recommend([r for r in self.rows if r["step"] == step], self.limit)
        return None if best is None else best["strength"]

    def _contact_sheet(self, step: int, pictures: dict) -> Path:
        from PIL import Image, ImageDraw

        tile = min(TILE, self.resolution)
        top, left = LABEL, LABEL  # a band above for each column's strength, one at the left for the prompt's number
        sheet = Image.new("RGB", (left + tile * len(pictures), top + tile * len(self.prompts)), "white")
        draw = ImageDraw.Draw(sheet)
        for column, strength in enumerate(sorted(pictures)):
            draw.text((left + column * tile + 2, 2), f"{strength:g}", fill="black")
            for row, image in enumerate(pictures[strength]):
                sheet.paste(image.convert("RGB").resize((tile, tile)), (left + column * tile, top + row * tile))
        for row in range(len(self.prompts)):
            draw.text((2, top + row * tile + 2), str(row + 1), fill="black")
        path = self.run_dir / JUDGE_DIR / f"step_{step:06d}.png"
        path.parent.mkdir(exist_ok=True)
        import io

        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        write_atomic(path, buffer.getvalue())
        return path

    def _write(self) -> None:
        best, why = recommend(self.rows, self.limit)
        last = max(r["step"] for r in self.rows)
        record = {
            "version": 1,
            "prompts": self.prompts,
            "seeds": self.seeds,
            "strengths": self.strengths,
            "sampling_steps": SAMPLING_STEPS,
            "setup_seconds": round(self.setup_seconds, 3),
            "scores": {
                "style": "share of the base model's distance to the training set's style statistics (VAE encoder "
                "Gram matrices, colour mean and spread) that the adapter removes: 0 = base model, 1 = the set's "
                "average",
                "leak": "where the pictures' likeness to the nearest training picture (VAE latent layout, cosine) "
                "falls between the base model's (0) and a copy (1)",
                "prompt_following": self.clip.name
                and f"CLIP image-text similarity x 100 ({self.clip.name}), averaged over the prompts",
            },
            "prompt_following": None if self.clip.model is None else self.clip.name,
            "prompt_following_skipped": self.clip.why or None,
            "training_images": self.reference.images,
            "training_likeness": self.reference.own_likeness(),
            "base_likeness": [round(float(v), 5) for v in self.base["likeness"]],
            "leak_limit": self.limit,
            "rule": RULE,
            "checkpoints": sorted(self.rows, key=lambda r: r["step"]),
            "recommended": best,
            "not_recommended_because": why or None,
            "latest": {"step": last, "strength": self.final_strength(last)},
        }
        write_atomic(self.run_dir / JUDGE_JSON, (json.dumps(record, indent=1) + "\n").encode())


RULE = (
    "recommended: among the cells with a strength above 0, a style score above 0 (closer to the training set's "
    "style than the base model) and a leak score at most leak_limit, the one with the highest style score (ties: "
    "the lower strength, then the earlier step); none if no cell qualifies. leak_limit is halfway between the "
    "training pictures' own likeness to each other (on the leak scale; 0 for a single picture) and a copy (1)."
)


def read_judge(run_dir: Path) -> dict:
    """A run's judge.json, or {} when it has none or it cannot be read."""
    try:
        record = json.loads((Path(run_dir) / JUDGE_JSON).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
