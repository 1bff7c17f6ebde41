"""First captions for an uncaptioned set, from an image-to-text model, for a person to read and edit.

    captioner = Captioner("Salesforce/blip-image-captioning-base")  # a Hugging Face id or a local folder
    captioner.caption(Path("a.png"), trigger_word="glowline")        # "glowline, a red circle on a black background"

Any model transformers loads with `AutoProcessor` and `AutoModelForImageTextToText` (BLIP, BLIP-2, GIT, Florence-2,
vision-encoder-decoder models), its weights from safetensors only. The caption describes what is in the picture,
not how it is drawn: the style is what the trigger word stands for, so the trigger word goes first, and the
model's framing of the picture ("a painting of", "an illustration of", "in the style of ...") is cut.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from adapters.errors import UserError
from trainer.dataset import upright_rgb, with_trigger

# What each kind of model is asked, when it takes a text prompt: BLIP continues the words; Florence-2 takes a task.
PROMPTS = {"blip": "a picture of", "florence2": "<CAPTION>"}
# The way a captioning model frames a picture, which names the style rather than the content: cut from the start.
_FRAME = re.compile(
    r"^(?:(?:there is|this is|it is)\s+)?(?:(?:a|an|the)\s+)?(?:(?:close[- ]?up|black and white|colou?red|digital|"
    r"oil|watercolou?r|pencil|ink|3d|neon|abstract|simple|cartoon)\s+)*(?:picture|photo|photograph|image|painting|"
    r"drawing|illustration|sketch|render|rendering|artwork|art|cartoon|poster|graphic|clipart|vector|logo)s?\s+"
    r"(?:of|showing|with|depicting)\s+",
    re.IGNORECASE,
)
_STYLE_TAIL = re.compile(r"\s*,?\s+(?:in the style of|in (?:a|an)\s+[\w\s-]+?\s+style|drawn in)\b.*$", re.IGNORECASE)
_ARTEFACTS = re.compile(r"\b(?:arafed|araffe|arafe|arafly)\b\s*", re.IGNORECASE)  # BLIP's well-known stray words


def content_caption(text: str, trigger_word: str = "", prompt: str = "") -> str:
    """A model's description made into a training caption: the prompt it was given and its framing of the picture
    ("a painting of ...", "... in the style of ...") cut, the trigger word first."""
    text = " ".join(text.split())
    if prompt and not prompt.startswith("<") and text.lower().startswith(prompt.lower()):
        text = text[len(prompt) :].strip()
    text = _ARTEFACTS.sub("", text)
    text = _STYLE_TAIL.sub("", _FRAME.sub("", text)).strip(" ,.")
    return with_trigger(text, trigger_word) if text else trigger_word


class Captioner:
    """An image-to-text model, loaded once (from a Hugging Face id or a local folder); `caption` describes one
    picture. `prompt` overrides what the model is asked (default: PROMPTS for its kind, else nothing)."""

    def __init__(self, model: str, *, device=None, prompt: str | None = None, max_new_tokens: int = 30):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = (model or "").strip()
        path = Path(model).expanduser()
        if not model or (not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1)):
            raise UserError(
                f"captioning model {model!r} is neither an existing folder nor a Hugging Face id (owner/name), e.g. "
                "Salesforce/blip-image-captioning-base"
            )
        source = str(path) if path.exists() else model
        if path.is_file():
            raise UserError(
                f"captioning model {model!r} is a file: give the folder holding the image-to-text model's files "
                f"(config.json, the processor's files and .safetensors weights), such as {str(path.parent)!r} if "
                "it holds them, or a Hugging Face id"
            )
        if path.exists() and not (path / "config.json").is_file():
            raise UserError(
                f"captioning model folder {model!r} has no config.json: give a folder holding an image-to-text "
                "model's files (config.json, the processor's files and .safetensors weights), or a Hugging Face id"
            )
        if not path.exists():
            _check_hub_reachable(model)
        try:
            self.processor = AutoProcessor.from_pretrained(source)
            self.model = AutoModelForImageTextToText.from_pretrained(source, use_safetensors=True)
        except Exception as exc:  # hub, file or architecture errors: say which model and what to try
            where = "the folder's files" if path.exists() else "the name, and that this machine can reach the hub"
            raise UserError(
                f"could not load captioning model {model!r} ({type(exc).__name__}: {exc}). Give an image-to-text "
                "model transformers loads with AutoModelForImageTextToText (BLIP, GIT, Florence-2...) with "
                f"safetensors weights; check {where}"
            ) from exc
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.eval().requires_grad_(False).to(self.device)
        self.prompt = PROMPTS.get(self.model.config.model_type, "") if prompt is None else prompt
        self.max_new_tokens = max_new_tokens
        self.name = model

    @torch.no_grad()
    def describe(self, image_path: str | Path) -> str:
        """The model's own words for the picture (greedy decoding, so the same every time)."""
        image = upright_rgb(Path(image_path))
        asked = {"text": self.prompt} if self.prompt else {}
        inputs = self.processor(images=image, return_tensors="pt", **asked).to(self.device)
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()

    def caption(self, image_path: str | Path, trigger_word: str = "") -> str:
        """A training caption for the picture: what is in it, the trigger word first."""
        return content_caption(self.describe(image_path), trigger_word, self.prompt)


def _check_hub_reachable(model: str, timeout_s: float = 10.0) -> None:
    """A hub id not in the local cache needs the hub: asked once with a short timeout, so that a machine without a
    network is told in seconds (transformers' own retries took minutes). Offline mode and cached models are left
    to transformers, which loads them from the cache."""
    import huggingface_hub

    if huggingface_hub.constants.is_offline_mode():
        return
    if isinstance(huggingface_hub.try_to_load_from_cache(model, "config.json"), str):
        return
    from adapters.base import hub_unreachable

    try:
        huggingface_hub.HfApi().model_info(model, timeout=timeout_s)
    except Exception as exc:
        if not hub_unreachable(exc):
            return  # the hub answered: transformers says what it found (or did not)
        raise UserError(
            f"could not reach the Hugging Face hub for captioning model {model!r} ({type(exc).__name__}). Check your "
            "network; a model downloaded before loads from the local cache with HF_HUB_OFFLINE=1; or give a local "
            "folder"
        ) from exc


def fill_captions(
    captioner: Captioner,
    images: dict[str, str | Path],
    captions: dict[str, str],
    trigger_word: str = "",
    overwrite: bool = False,
) -> dict[str, str]:
    """Captions for every image (name -> path): the model's for those with none written (all of them with
    `overwrite`), the person's own kept as they are."""
    out = dict(captions)
    for name, path in images.items():
        if overwrite or not str(captions.get(name) or "").strip():
            out[name] = captioner.caption(path, trigger_word)
    return out
