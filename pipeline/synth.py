"""Procedural dermoscopy-like benchmark with known ground truth (ABCD rule, Fitzpatrick skin, faults).

Each lesion gets ABCD attributes, a total dermoscopy score TDS = 1.3A + 0.1B + 0.5C + 0.5D and a label
from it; the image is drawn from those attributes, and the caption states exactly them. Injected faults
(vague or swapped captions, duplicates, broken files) are recorded in `truth.csv`, which `curate`
never reads. Same seed, same bytes.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from pipeline.config import Data, Synth
from pipeline.errors import InputError

COLOURS = {  # sRGB of each dermoscopic colour
    "white": (236, 234, 228),
    "red": (184, 58, 60),
    "light brown": (176, 122, 80),
    "dark brown": (96, 56, 34),
    "blue-grey": (104, 120, 142),
    "black": (28, 24, 24),
}
STRUCTURES = ("pigment network", "structureless areas", "dots", "globules", "streaks")
# Fitzpatrick type -> ITA° range (Chardon et al.; Del Bino et al.)
ITA_RANGES = {"I": (55, 90), "II": (41, 55), "III": (28, 41), "IV": (10, 28), "V": (-30, 10), "VI": (-90, -30)}
FITZPATRICK = tuple(ITA_RANGES)
VAGUE_CAPTIONS = (
    "Abnormal lesion.",
    "Concerning appearance, please review.",
    "Suspicious spot, needs follow-up.",
    "Atypical lesion, looks concerning.",
    "Unusual mole, abnormal.",
)
CAMERAS = ("dermatoscope", "phone", "lamp")
LABELS = ("benign", "suspicious", "melanoma")  # what label_of names; data.labels may reorder them
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")
MANIFEST_COLUMNS = ("id", "image", "caption", "label", "patient_id", "fitzpatrick", "site", "camera", "source")
TRUTH_COLUMNS = (
    "id", "fault", "source_id", "image_label", "asymmetry", "border", "colours", "structures",
    "tds", "fitzpatrick", "ita", "dark",
)


@dataclass
class Lesion:
    """Ground truth of one lesion image."""

    id: str
    patient_id: str
    fitzpatrick: str
    site: str
    camera: str
    asymmetry: int
    border: int
    colours: tuple[str, ...]
    structures: tuple[str, ...]
    dark: bool
    ita: float = 0.0
    caption: str = ""
    label: str = ""
    fault: str = "none"
    source_id: str = ""
    image_label: str = field(default="")

    @property
    def tds(self) -> float:
        return total_dermoscopy_score(self.asymmetry, self.border, len(self.colours), len(self.structures))


def total_dermoscopy_score(a: int, b: int, c: int, d: int) -> float:
    """Stolz's ABCD rule of dermoscopy."""
    return round(1.3 * a + 0.1 * b + 0.5 * c + 0.5 * d, 2)


def label_of(tds: float) -> str:
    """benign < 4.75 <= suspicious <= 5.45 < melanoma."""
    if tds < 4.75:
        return "benign"
    return "suspicious" if tds <= 5.45 else "melanoma"


# Class-typical dermoscopy (Argenziano's and Stolz's descriptions): benign naevi show one or two browns and a
# regular network; suspicious lesions add regression (white) or vessels (red) and dots or globules; melanomas
# show blue-grey and black and branched streaks. name: (colours allowed, at least one of, all of;
# structures allowed, at least one of, all of).
TYPICAL = {
    "benign": (("light brown", "dark brown"), (), (), ("pigment network", "structureless areas"), (), ()),
    "suspicious": (("white", "red", "light brown", "dark brown"), ("white", "red"), (),
                   ("pigment network", "structureless areas", "dots", "globules"), ("dots", "globules"), ()),
    "melanoma": (tuple(COLOURS), (), ("blue-grey", "black"), STRUCTURES, (), ("streaks",)),
}


def _subset(rng: np.random.Generator, allowed: tuple[str, ...], any_of: tuple[str, ...],
            all_of: tuple[str, ...], k: int, order: list[str]) -> tuple[str, ...] | None:
    """`k` distinct items of `allowed` holding all of `all_of` and one of `any_of`, or None."""
    if k > len(allowed) or k < len(all_of) + (1 if any_of and not set(any_of) & set(all_of) else 0):
        return None
    for _ in range(50):
        rest = [x for x in allowed if x not in all_of]
        picked = list(all_of) + list(rng.choice(rest, k - len(all_of), replace=False))
        if not any_of or set(any_of) & set(picked):
            return tuple(sorted((str(x) for x in picked), key=order.index))
    return None


def sample_attributes(rng: np.random.Generator, label: str, margin: float = 0.0,
                      mode: str = "typical") -> tuple[int, int, tuple[str, ...], tuple[str, ...]]:
    """Draw ABCD attributes whose TDS falls in `label`'s range (rejection sampling); with `margin`,
    benign and melanoma scores keep that far from the suspicious band [4.75, 5.45]. `typical` draws
    colours and structures from the class-typical sets of `TYPICAL` (the label can be read from the
    image at low resolution); `uniform` from all of them (the label must be counted out of the ABCD
    attributes: a much harder benchmark)."""
    if mode not in ("typical", "uniform"):
        raise InputError(f"synth.attributes: {mode!r} is not typical or uniform")
    everything = (tuple(COLOURS), (), (), STRUCTURES, (), ())
    c_allowed, c_any, c_all, s_allowed, s_any, s_all = TYPICAL[label] if mode == "typical" else everything
    for _ in range(10_000):
        a, b = int(rng.integers(0, 3)), int(rng.integers(0, 9))
        c, d = int(rng.integers(1, 7)), int(rng.integers(1, 6))
        tds = total_dermoscopy_score(a, b, c, d)
        if label_of(tds) != label or (label != "suspicious" and 4.75 - margin <= tds <= 5.45 + margin):
            continue
        colours = _subset(rng, c_allowed, c_any, c_all, c, list(COLOURS))
        structures = _subset(rng, s_allowed, s_any, s_all, d, list(STRUCTURES))
        if colours is not None and structures is not None:
            return a, b, colours, structures
    raise AssertionError(f"no attributes found for {label}")


def _join(items: tuple[str, ...] | list[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption_of(lesion: Lesion) -> str:
    """What is visible and why it matters, then the impression (only attributes the lesion has)."""
    asym = ("a symmetric shape", "asymmetry in one axis", "asymmetry in two axes")[lesion.asymmetry]
    border = (
        "no abrupt border segment"
        if lesion.border == 0
        else f"an abrupt border in {NUMBER_WORDS[lesion.border]} of eight segments"
    )
    c = len(lesion.colours)
    colours = f"{NUMBER_WORDS[c]} colour{'s' if c > 1 else ''} ({', '.join(lesion.colours)})"
    structures = _join(["a pigment network" if s == "pigment network" else s for s in lesion.structures])
    return (
        f"This lesion shows {asym}, {border}, {colours} and {structures}, "
        f"for a total dermoscopy score of {lesion.tds:.2f}. Clinical impression: {label_of(lesion.tds)}."
    )


# ---------------------------------------------------------------------------------------------- colour
def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (D65) -> sRGB in [0, 1]; (..., 3) -> (..., 3)."""
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    fy = (L + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200
    f = np.stack([fx, fy, fz], -1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * np.array([0.95047, 1.0, 1.08883])
    m = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    rgb = xyz @ m.T
    rgb = np.where(rgb <= 0.0031308, 12.92 * rgb, 1.055 * np.clip(rgb, 0, None) ** (1 / 2.4) - 0.055)
    return np.clip(rgb, 0, 1)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] -> CIELAB (D65); (..., 3) -> (..., 3)."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = (lin @ m.T) / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def ita_degrees(lab: np.ndarray) -> float:
    """Individual typology angle of the mean colour: atan((L* - 50) / b*)."""
    L, b = float(lab[..., 0].mean()), float(lab[..., 2].mean())
    return math.degrees(math.atan2(L - 50, b))


def fitzpatrick_of_ita(ita: float) -> str:
    for name, (lo, hi) in ITA_RANGES.items():
        if lo <= ita < hi or (name == "I" and ita >= lo):
            return name
    return "VI"


# --------------------------------------------------------------------------------------------- drawing
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], (size, size), by bilinear upsampling of a coarse grid."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def draw_skin(rng: np.random.Generator, size: int, fitzpatrick: str) -> tuple[np.ndarray, float]:
    """Skin background (size, size, 3) in [0, 1] whose ITA lies inside the type's range."""
    lo, hi = ITA_RANGES[fitzpatrick]
    lo, hi = max(lo, -60), min(hi, 70)
    ita = float(rng.uniform(lo + 2, hi - 2))
    b = float(rng.uniform(12, 20))
    L = float(np.clip(50 + b * math.tan(math.radians(ita)), 22, 88))
    ita = math.degrees(math.atan2(L - 50, b))
    lab = np.empty((size, size, 3), np.float32)
    lab[..., 0] = L + 2.0 * _smooth_noise(rng, size, 6) + rng.normal(0, 0.6, (size, size))
    lab[..., 1] = rng.uniform(8, 14) + 1.5 * _smooth_noise(rng, size, 5)
    lab[..., 2] = b + 0.8 * _smooth_noise(rng, size, 5)
    return lab_to_srgb(lab), ita


def _radius_profile(rng: np.random.Generator, theta: np.ndarray, asymmetry: int) -> np.ndarray:
    """r(θ) in the lesion frame: even cosines only = symmetric about both axes; cos(θ), cos(3θ)
    break the left-right symmetry (one axis); sin terms break the other one too (two axes)."""
    r = 1 + rng.uniform(0.05, 0.2) * np.cos(2 * theta) + rng.uniform(-0.04, 0.04) * np.cos(4 * theta)
    if asymmetry >= 1:
        r = r + rng.uniform(0.18, 0.26) * np.cos(theta) + rng.uniform(0.05, 0.1) * np.cos(3 * theta)
    if asymmetry >= 2:
        r = r + rng.uniform(0.18, 0.26) * np.sin(theta) + rng.uniform(0.05, 0.1) * np.sin(3 * theta)
    return r


def draw_lesion(rng: np.random.Generator, skin: np.ndarray, lesion: Lesion) -> np.ndarray:
    """Paint the lesion onto `skin` (H, W, 3) from its ABCD attributes."""
    size = skin.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
    cx, cy = rng.uniform(-0.08, 0.08, 2)
    phi = rng.uniform(0, 2 * math.pi)
    x, y = xx - cx, yy - cy
    u, v = x * math.cos(phi) + y * math.sin(phi), -x * math.sin(phi) + y * math.cos(phi)
    d, theta = np.hypot(u, v), np.arctan2(v, u)
    base = rng.uniform(0.3, 0.42)
    r = base * _radius_profile(rng, theta, lesion.asymmetry)
    rho = d / r  # (H, W): 1 on the border
    # border: each of the 8 segments is abrupt (sharp edge) or gradual (wide fade)
    abrupt = np.zeros(8, bool)
    abrupt[rng.choice(8, lesion.border, replace=False)] = True
    octant = ((theta + math.pi) / (2 * math.pi) * 8).astype(int) % 8
    width = np.where(abrupt[octant], 0.025, 0.22)
    alpha = np.clip((1 - rho) / width + 0.5, 0, 1)
    # colours in rings, warped by low-frequency noise; asymmetric lesions shift the rings off-centre
    shift = 0.25 * lesion.asymmetry * u / (base + 1e-6)
    ring = np.clip(rho + 0.12 * _smooth_noise(rng, size, 4) - 0.1 * shift, 0, 0.999)
    order = list(lesion.colours)
    rng.shuffle(order)
    palette = np.array([COLOURS[c] for c in order], np.float32) / 255
    if lesion.dark:
        palette = palette * 0.55
    colour = palette[(ring * len(order)).astype(int)]  # (H, W, 3)
    colour = _draw_structures(rng, colour, rho, theta, lesion.structures, size)
    alpha = np.maximum(alpha, _streak_mask(rng, rho, theta, lesion.structures))
    return skin * (1 - alpha[..., None]) + colour * alpha[..., None]


def _draw_structures(rng, colour, rho, theta, structures, size) -> np.ndarray:
    """Dermoscopic structures inside the lesion, each visibly distinct."""
    yy, xx = np.mgrid[0:size, 0:size]
    inside = rho < 0.95
    dark = np.array([0.16, 0.1, 0.08], np.float32)
    if "pigment network" in structures:
        period = size / rng.uniform(9, 12)
        grid = (np.abs(np.sin(np.pi * xx / period)) < 0.25) | (np.abs(np.sin(np.pi * yy / period)) < 0.25)
        m = grid & inside & (rho > 0.25)
        colour[m] = 0.45 * colour[m] + 0.55 * dark
    if "structureless areas" in structures:
        start = rng.uniform(0, 2 * math.pi)
        sector = ((theta - start) % (2 * math.pi)) < 1.6
        m = sector & (rho < 0.8)
        colour[m] = 0.3 * colour[m] + 0.7 * np.array([0.78, 0.62, 0.55], np.float32)
    if "dots" in structures:
        for _ in range(int(rng.integers(18, 30))):
            py, px = _point_inside(rng, rho, 0.85)
            colour[py, px] = dark * 0.6
    if "globules" in structures:
        for _ in range(int(rng.integers(5, 9))):
            py, px = _point_inside(rng, rho, 0.8)
            rad = max(1.5, size / 40)
            m = (yy - py) ** 2 + (xx - px) ** 2 <= rad**2
            colour[m] = np.array([0.3, 0.17, 0.1], np.float32)
    return colour


def _point_inside(rng, rho, limit) -> tuple[int, int]:
    ys, xs = np.nonzero(rho < limit)
    i = int(rng.integers(0, len(ys)))
    return int(ys[i]), int(xs[i])


def _streak_mask(rng, rho, theta, structures) -> np.ndarray:
    """Radial streaks that cross the border (branched streaks / pseudopods)."""
    if "streaks" not in structures:
        return np.zeros_like(rho)
    angles = rng.uniform(-math.pi, math.pi, int(rng.integers(7, 12)))
    delta = np.abs(((theta[..., None] - angles) + math.pi) % (2 * math.pi) - math.pi).min(-1)
    return ((delta < 0.06) & (rho > 0.7) & (rho < 1.3)).astype(np.float32)


def apply_camera(rng: np.random.Generator, rgb: np.ndarray, camera: str) -> Image.Image:
    """Acquisition look: dermatoscope (even light, round field), phone (cast, blur), lamp (warm ramp)."""
    size = rgb.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
    if camera == "dermatoscope":
        field_ = np.clip((1.12 - np.hypot(xx, yy)) / 0.1, 0, 1)[..., None]
        rgb = rgb * field_
    elif camera == "phone":
        rgb = rgb * np.array([1.08, 1.0, 0.86], np.float32) * rng.uniform(0.9, 1.05)
    elif camera == "lamp":
        ramp = rng.uniform(0.7, 0.85) + rng.uniform(0.3, 0.4) * (xx + 1) / 2
        rgb = rgb * ramp[..., None] * np.array([1.05, 0.97, 0.82], np.float32)
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8))
    if camera == "phone":
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 1.4))))
    return img


def encode(img: Image.Image, camera: str) -> tuple[bytes, str]:
    """Image bytes and file extension: phones save JPEG, the others PNG."""
    buf = io.BytesIO()
    if camera == "phone":
        img.save(buf, format="JPEG", quality=70)
        return buf.getvalue(), ".jpg"
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), ".png"


# ------------------------------------------------------------------------------------------- dataset
def _normalised(mix: dict[str, float], names: tuple[str, ...], what: str) -> np.ndarray:
    if not mix:
        return np.full(len(names), 1 / len(names))
    unknown = set(mix) - set(names)
    if unknown:
        raise InputError(f"synth.{what}: unknown keys {sorted(unknown)} (known: {list(names)})")
    w = np.array([float(mix.get(n, 0.0)) for n in names])
    if w.sum() <= 0 or (w < 0).any():
        raise InputError(f"synth.{what}: weights must be >= 0 and not all 0")
    return w / w.sum()


def sites_of(cfg: Synth) -> list[tuple[str, str]]:
    """(site, camera) pairs from the comma-separated `site` and `camera` settings."""
    sites = [s.strip() for s in cfg.site.split(",") if s.strip()]
    cameras = [c.strip() for c in cfg.camera.split(",") if c.strip()]
    if not sites or len(cameras) not in (1, len(sites)):
        raise InputError(f"synth: give one camera or one per site (site={cfg.site!r}, camera={cfg.camera!r})")
    bad = [c for c in cameras if c not in CAMERAS]
    if bad:
        raise InputError(f"synth.camera: unknown camera {bad[0]!r} (known: {list(CAMERAS)})")
    return list(zip(sites, cameras * len(sites) if len(cameras) == 1 else cameras))


def plan_lesions(cfg: Synth, labels: tuple[str, ...]) -> list[Lesion]:
    """Patients, skin types, labels and ABCD attributes for `cfg.n` clean images."""
    rng = np.random.default_rng([cfg.seed, 1])
    skin_p = _normalised(cfg.skin_mix, FITZPATRICK, "skin_mix")
    class_p = _normalised(cfg.class_mix, labels, "class_mix")
    sites = sites_of(cfg)
    lo, hi = cfg.images_per_patient
    lesions: list[Lesion] = []
    patient = 0
    while len(lesions) < cfg.n:
        site, camera = sites[patient % len(sites)]
        fitz = FITZPATRICK[int(rng.choice(6, p=skin_p))]
        for _ in range(min(int(rng.integers(lo, hi + 1)), cfg.n - len(lesions))):
            label = labels[int(rng.choice(len(labels), p=class_p))]
            a, b, colours, structures = sample_attributes(rng, label, cfg.tds_margin, cfg.attributes)
            dark = label == "benign" and rng.random() < cfg.spurious_darkness
            lesion = Lesion(
                id=f"{site}-{len(lesions):06d}", patient_id=f"{site}-p{patient:05d}",
                fitzpatrick=fitz, site=site, camera=camera, asymmetry=a, border=b,
                colours=colours, structures=structures, dark=bool(dark),
            )
            lesion.caption, lesion.label = caption_of(lesion), label_of(lesion.tds)
            lesion.image_label = lesion.label
            lesions.append(lesion)
        patient += 1
    return lesions


def render(cfg: Synth, lesion: Lesion, index: int) -> Image.Image:
    """Draw one lesion image; its own seed makes it independent of the others."""
    rng = np.random.default_rng([cfg.seed, 2, index])
    skin, lesion.ita = draw_skin(rng, cfg.image_size, lesion.fitzpatrick)
    return apply_camera(rng, draw_lesion(rng, skin, lesion), lesion.camera)


def inject_caption_faults(cfg: Synth, lesions: list[Lesion]) -> None:
    """Vague captions and captions swapped in from a lesion of another label (in place)."""
    rng = np.random.default_rng([cfg.seed, 3])
    order = rng.permutation(len(lesions))
    n_vague = round(cfg.faults.vague * len(lesions))
    n_mis = round(cfg.faults.mismatch * len(lesions))
    for i in order[:n_vague]:
        lesions[i].caption = VAGUE_CAPTIONS[int(rng.integers(len(VAGUE_CAPTIONS)))]
        lesions[i].fault = "vague"
    originals = [(l.caption, l.label) for l in lesions]
    for i in order[n_vague : n_vague + n_mis]:
        target = lesions[i]
        donors = [
            j for j, l in enumerate(lesions)
            if l.image_label != target.image_label and l.fault != "vague"
            and (cfg.faults.mismatch_mode == "random" or l.site == target.site)
        ]
        if not donors:
            continue
        j = donors[int(rng.integers(len(donors)))]
        target.caption, target.label = originals[j]
        target.fault, target.source_id = "mismatch", lesions[j].id


def _fault_rows(cfg: Synth, lesions: list[Lesion], files: dict[str, bytes]) -> list[tuple[Lesion, bytes, str]]:
    """Extra rows: exact and near duplicates, corrupt, non-image and empty files."""
    rng = np.random.default_rng([cfg.seed, 4])
    f = cfg.faults
    clean = [l for l in lesions if l.fault == "none"]
    extra: list[tuple[Lesion, bytes, str]] = []
    kinds = [("exact_duplicate", f.exact_duplicate), ("near_duplicate", f.near_duplicate),
             ("corrupt", f.corrupt), ("not_image", f.not_image), ("empty_file", f.empty_file)]
    for kind, share in kinds:
        for _ in range(round(share * len(lesions))):
            src = clean[int(rng.integers(len(clean)))]
            row = Lesion(**{**src.__dict__, "id": f"{src.site}-{len(lesions) + len(extra):06d}",
                            "fault": kind, "source_id": src.id})
            data, ext = files[src.id], (".jpg" if src.camera == "phone" else ".png")
            if kind == "near_duplicate":
                data = _near_copy(rng, data, src.camera)
            elif kind == "corrupt":
                data = data[: len(data) // 2]
            elif kind == "not_image":
                data, ext = b"This is a text note that somebody saved with an image name.\n", ".png"
            elif kind == "empty_file":
                data = b""
            extra.append((row, data, ext))
    return extra


def _near_copy(rng: np.random.Generator, data: bytes, camera: str) -> bytes:
    """The same picture, slightly brighter, cropped by a pixel and re-encoded."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    img = img.crop((1, 1, w - 1, h - 1)).resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, np.float32) * rng.uniform(1.02, 1.05)
    out, _ = encode(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), camera)
    return out


def run(cfg: Synth, data: Data, out: Path) -> dict:
    """Write `out/manifest.csv`, `out/truth.csv` and `out/images/`; returns a summary."""
    lesions = plan_lesions(cfg, data.labels or LABELS)
    files: dict[str, bytes] = {}
    names: dict[str, str] = {}
    for i, lesion in enumerate(lesions):
        files[lesion.id], ext = encode(render(cfg, lesion, i), lesion.camera)
        names[lesion.id] = f"images/{lesion.id}{ext}"
    inject_caption_faults(cfg, lesions)
    rows = [(l, files[l.id], names[l.id]) for l in lesions]
    rows += [(l, b, f"images/{l.id}{ext}") for l, b, ext in _fault_rows(cfg, lesions, files)]
    (out / "images").mkdir(parents=True, exist_ok=True)
    for _, payload, rel in rows:
        (out / rel).write_bytes(payload)
    _write_csv(out / "manifest.csv", MANIFEST_COLUMNS, [_manifest_row(l, rel) for l, _, rel in rows])
    _write_csv(out / "truth.csv", TRUTH_COLUMNS, [_truth_row(l) for l, _, _ in rows])
    faults: dict[str, int] = {}
    for l, _, _ in rows:
        faults[l.fault] = faults.get(l.fault, 0) + 1
    return {"rows": len(rows), "faults": faults}


def _manifest_row(l: Lesion, rel: str) -> dict:
    return {"id": l.id, "image": rel, "caption": l.caption, "label": l.label, "patient_id": l.patient_id,
            "fitzpatrick": l.fitzpatrick, "site": l.site, "camera": l.camera, "source": "synthetic"}


def _truth_row(l: Lesion) -> dict:
    return {"id": l.id, "fault": l.fault, "source_id": l.source_id, "image_label": l.image_label,
            "asymmetry": l.asymmetry, "border": l.border, "colours": ";".join(l.colours),
            "structures": ";".join(l.structures), "tds": f"{l.tds:.2f}", "fitzpatrick": l.fitzpatrick,
            "ita": f"{l.ita:.2f}", "dark": int(l.dark)}


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
