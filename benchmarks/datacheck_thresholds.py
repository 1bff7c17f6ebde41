"""How the data check's thresholds (trainer/datacheck.py) hold on the demo set, on the built-in model's VAE:

    python benchmarks/datacheck_thresholds.py > benchmarks/results/datacheck_thresholds.txt

1. Duplicates: the 16 pictures of sample_images/, plus for each a crop (60-90% of the side at a random place,
   resized to 48-256 px, saved as JPEG) and a small copy (32-48 px). Counted: planted pictures found against a
   picture of the same origin, planted pictures missed, findings that pair pictures of different origins.
2. Outliers: 400 random subsets (5 to 16 pictures) of the demo set, each alone and with one picture of the
   built-in model's plain style added; the distance `_outliers` uses, for the demo pictures and for the added one.
   Also the first rule tried (a robust z-score over channel means, spreads and correlations) on the same subsets.
Seeded: the same numbers on every run (on the same libraries).
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.base import load_vae  # noqa: E402
from trainer import datacheck  # noqa: E402
from trainer.builtin.scenes import render, sample_scene  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def planted_set(seed: int = 1) -> tuple[dict[str, Image.Image], dict[str, str]]:
    rng = random.Random(seed)
    base = {p.name: Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.png"))}
    pictures, origin = dict(base), {name: name for name in base}
    for name, image in base.items():
        side = int(image.width * rng.uniform(0.6, 0.9))
        left, top = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
        crop = image.crop((left, top, left + side, top + side)).resize((rng.choice([48, 64, 90, 160, 256]),) * 2)
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=85)
        pictures[f"crop_{name}"] = Image.open(buffer).convert("RGB")
        pictures[f"small_{name}"] = image.resize((rng.choice([32, 40, 48]),) * 2, Image.Resampling.LANCZOS)
        origin[f"crop_{name}"] = origin[f"small_{name}"] = name
    return pictures, origin


def duplicates(vae, folder: Path) -> None:
    pictures, origin = planted_set()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in pictures.items():
        image.save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    names = list(pictures)
    findings, _ = datacheck.picture_findings(paths, names, vae)
    pairs = [(f.file, f.others[0]) for f in findings if f.kind == "duplicate"]
    right = {n for pair in pairs if origin[pair[0]] == origin[pair[1]] for n in pair}
    wrong = [pair for pair in pairs if origin[pair[0]] != origin[pair[1]]]
    planted = [n for n in names if n != origin[n]]
    missed = [n for n in planted if n not in right]
    print(f"1. duplicates: {len(pictures)} pictures, {len(planted)} planted (16 crops, 16 small copies)")
    print(f"   planted pictures found against their origin: {len(planted) - len(missed)} of {len(planted)}")
    print(f"   not found against their origin: {', '.join(missed) or 'none'}")
    print(f"   findings pairing different origins: {len(wrong)} {wrong if wrong else ''}")
    print(f"   outlier findings: {[f.file for f in findings if f.kind == 'outlier']}")
    hashes = {n: datacheck.perceptual_hash(im) for n, im in pictures.items()}

    def bits(a: str, b: str) -> int:
        return int((hashes[a] != hashes[b]).sum())

    small = sorted(bits(n, origin[n]) for n in planted if n.startswith("small"))
    demo = [n for n in names if n == origin[n]]
    apart = min(bits(a, b) for a in demo for b in demo if a < b)
    print(f"   hash bits apart: each small copy from its picture {small}; two demo pictures at least {apart}")


def _robust_z_with_correlations(latents: list[torch.Tensor]) -> np.ndarray:
    """The first rule tried (trainer/datacheck.py before ff836be): channel means, spreads and correlations, each
    scaled by its median absolute deviation (floored at a tenth of the typical one); the distance from the median
    as a robust z-score among the pictures' distances. It flagged a picture at 5."""
    stats = []
    for lat in latents:
        flat = lat.flatten(1).double()
        mean, spread = flat.mean(1), flat.std(1)
        centred = (flat - mean[:, None]) / spread.clamp_min(1e-6)[:, None]
        gram = centred @ centred.T / flat.shape[1]
        upper = torch.triu_indices(len(mean), len(mean), offset=1)
        stats.append(torch.cat([mean, spread, gram[upper[0], upper[1]]]).numpy())
    x = np.stack(stats)
    median = np.median(x, 0)
    scale = 1.4826 * np.median(np.abs(x - median), 0)
    scale = np.maximum(scale, 0.1 * np.median(scale) + 1e-9)
    distance = np.sqrt((((x - median) / scale) ** 2).mean(1))
    typical = np.median(distance)
    return (distance - typical) / max(1.4826 * np.median(np.abs(distance - typical)), 0.1 * typical, 1e-9)


def outliers(vae) -> None:
    base = {p.name: Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.png"))}
    plain = {}
    for seed in range(4):
        pixels = render([sample_scene(random.Random(seed))], size=128, style="plain")[0]
        plain[f"plain_{seed}"] = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    latents = {n: datacheck.latent_maps(vae, im)[0] for n, im in {**base, **plain}.items()}
    stats = {n: datacheck.style_statistics(lat) for n, lat in latents.items()}

    def distances(names: list[str]) -> tuple[np.ndarray, set[str]]:
        chosen = {n: stats[n] for n in names}
        return datacheck.outlier_distances(chosen), {f.file for f in datacheck._outliers(chosen)}

    rng = random.Random(0)
    normal_max, added_min, normal_flagged, added_missed = 0.0, 1e9, 0, 0
    old_normal, old_added, old_flagged, old_missed = 0.0, 1e9, 0, 0
    for _ in range(400):
        subset = rng.sample(list(base), rng.randint(5, 16))
        d, found = distances(subset)
        normal_max, normal_flagged = max(normal_max, d.max()), normal_flagged + bool(found)
        z = _robust_z_with_correlations([latents[n] for n in subset])
        old_normal, old_flagged = max(old_normal, z.max()), old_flagged + bool((z >= 5).any())
        extra = rng.choice(list(plain))
        d, found = distances([*subset, extra])
        added_min, added_missed = min(added_min, d[-1]), added_missed + (extra not in found)
        z = _robust_z_with_correlations([latents[n] for n in [*subset, extra]])
        old_added, old_missed = min(old_added, z[-1]), old_missed + (z[-1] < 5)
    print("2. outliers: 400 random subsets of 5-16 demo pictures, alone and with one plain-style picture added")
    print(
        f"   distance, demo pictures: at most {normal_max:.2f}; subsets with a demo picture flagged: {normal_flagged}"
    )
    print(f"   distance, the added plain picture: at least {added_min:.2f}; times it was not flagged: {added_missed}")
    print("   first rule tried (robust z with channel correlations, flagged at 5):")
    print(f"   demo pictures up to {old_normal:.1f}; subsets with a demo picture flagged: {old_flagged}")
    print(f"   the added plain picture down to {old_added:.1f}; times it was not flagged: {old_missed}")


def main() -> None:
    import tempfile

    torch.manual_seed(0)
    vae = load_vae("builtin", device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        duplicates(vae, Path(folder))
    outliers(vae)


if __name__ == "__main__":
    main()
