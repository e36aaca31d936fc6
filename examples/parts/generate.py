"""Make the second benchmark: machined parts with surface defects, photographed on a production line.

A raw dataset folder in the pipeline's layout (docs/design.md §3.1): `manifest.csv` + `images/`, and
`truth.csv` (what each row really is: the injected fault, the drawn defect) for benchmarks only.
Nothing in `pipeline/` knows this generator; the pipeline reads the result through
`examples/parts/params.yaml` alone.

- Five labels: `ok`, `scratch`, `dent`, `crack`, `corrosion` (positive label: `crack`, the one that
  must not be missed).
- Parts: a round flange with a bore, a square plate with four holes or an L-bracket; material (the
  subgroup the bias gate judges): `steel`, `aluminium`, `brass`; finish `brushed`, `polished`, `matte`.
- Cameras: `cam_a` (line 1: even top light, sharp, PNG) and `cam_b` (line 2, after a camera swap:
  warmer light from one side, lower contrast, sensor noise, slight blur, JPEG): the shift the monitor
  should catch.
- Faults, as in a real archive: vague notes, notes swapped between parts, exact and near duplicates,
  corrupt and empty files.

    python examples/parts/generate.py --out work/parts/raw [--n 1000] [--seed 0] [--camera cam_a]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

LABELS = ("ok", "scratch", "dent", "crack", "corrosion")
MIX = {"ok": 0.3, "scratch": 0.2, "dent": 0.15, "crack": 0.15, "corrosion": 0.2}
MATERIALS = {"steel": (150, 156, 166), "aluminium": (196, 198, 202), "brass": (184, 152, 84)}
FINISHES = ("brushed", "polished", "matte")
PARTS = ("flange", "plate", "bracket")
ZONES = ("near the rim", "near the centre", "on the left side", "on the right side")
CAMERAS = ("cam_a", "cam_b")
COLUMNS = ("id", "image", "caption", "label", "patient_id", "material", "site", "camera", "source")
VAGUE = ("Part looks off, please check.", "Possible issue on this one.", "Not sure about this part.",
         "Flagged by operator, needs review.")


@dataclass(frozen=True)
class Part:
    id: str
    serial: str            # the physical part: its photos never cross splits (patient_id)
    label: str
    material: str
    finish: str
    kind: str
    zone: str
    size: str              # small | large defect
    count: int             # scratches / dents / patches
    camera: str
    caption: str = ""
    fault: str = "clean"
    source_id: str = ""


def describe(p: Part) -> str:
    """An inspector's note: the part, what the surface shows and where, then the verdict."""
    head = f"{p.material.capitalize()} {p.kind} with a {p.finish} finish, photographed from above."
    n = ("one", "two", "three")[p.count - 1]
    plural = "s" if p.count > 1 else ""
    finding = {
        "ok": "Surface uniform, edges clean, no marks, pits or discolouration.",
        "scratch": f"{n.capitalize()} thin straight bright line{plural} {p.zone}, {p.size}, cutting across the finish.",
        "dent": f"{n.capitalize()} round shallow depression{plural} {p.zone}, {p.size}, shaded on one side.",
        "crack": f"A jagged dark branching line {p.zone}, {p.size}, following no tool path.",
        "corrosion": f"{n.capitalize()} rough orange-brown patch{'es' if p.count > 1 else ''} {p.zone}, {p.size}, with pitting.",
    }[p.label]
    return f"{head} {finding} Verdict: {p.label}"


# ------------------------------------------------------------------------------------------- drawing
def _zone_centre(rng: np.random.Generator, zone: str, solid: np.ndarray) -> tuple[float, float]:
    """A point of the zone that lies on the part (`solid`: the part's pixels at least 5 px from an edge)."""
    size = solid.shape[0]
    off = {"near the rim": (0.0, -0.3), "near the centre": (0.0, 0.12), "on the left side": (-0.25, 0.05),
           "on the right side": (0.25, 0.05)}[zone]
    ang = rng.uniform(0, 2 * math.pi) if zone == "near the rim" else 0.0
    x = size / 2 + (off[0] * math.cos(ang) - off[1] * math.sin(ang)) * size + rng.uniform(-3, 3)
    y = size / 2 + (off[0] * math.sin(ang) + off[1] * math.cos(ang)) * size + rng.uniform(-3, 3)
    ys, xs = np.nonzero(solid)
    k = int(np.argmin((xs - x) ** 2 + (ys - y) ** 2))
    return float(xs[k]), float(ys[k])


def _part_mask(rng: np.random.Generator, kind: str, size: int) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    c, r = size / 2 + rng.uniform(-2, 2, 2), size * rng.uniform(0.40, 0.45)
    if kind == "flange":
        d.ellipse((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=255)
        h = r * 0.22
        d.ellipse((c[0] - h, c[1] - h, c[0] + h, c[1] + h), fill=0)
    elif kind == "plate":
        d.rectangle((c[0] - r, c[1] - r, c[0] + r, c[1] + r), fill=255)
        for sx in (-1, 1):
            for sy in (-1, 1):
                x, y, h = c[0] + sx * r * 0.78, c[1] + sy * r * 0.78, r * 0.09
                d.ellipse((x - h, y - h, x + h, y + h), fill=0)
    else:  # an L-shaped bracket
        d.rectangle((c[0] - r, c[1] - r, c[0] - r * 0.2, c[1] + r), fill=255)
        d.rectangle((c[0] - r, c[1] + r * 0.2, c[0] + r, c[1] + r), fill=255)
    return m


def _surface(rng: np.random.Generator, material: str, finish: str, size: int) -> np.ndarray:
    base = np.array(MATERIALS[material], np.float32) / 255 * rng.uniform(0.93, 1.05)
    surf = np.broadcast_to(base, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if finish == "brushed":  # fine parallel tool marks
        angle = rng.uniform(0, math.pi)
        lines = rng.normal(0, 1, size * 2)[((xx * math.cos(angle) + yy * math.sin(angle)) * size).astype(int) + size // 2]
        surf *= (1 + 0.05 * lines)[..., None]
    elif finish == "polished":  # a soft specular highlight
        hx, hy = rng.uniform(0.3, 0.7, 2)
        surf *= (1 + 0.25 * np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / 0.03))[..., None]
    else:  # matte: grainy
        surf *= (1 + 0.04 * rng.normal(0, 1, (size, size)))[..., None]
    return surf


def _defect(rng: np.random.Generator, p: Part, img: np.ndarray, inside: np.ndarray) -> np.ndarray:
    size = img.shape[0]
    big = p.size == "large"
    solid = np.asarray(Image.fromarray((inside[..., 0] * 255).astype(np.uint8)).filter(ImageFilter.MinFilter(11))) > 128
    layer = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(layer)
    if p.label == "scratch":
        for _ in range(p.count):
            x, y = _zone_centre(rng, p.zone, solid)
            a, half = rng.uniform(0, math.pi), size * (0.3 if big else 0.18)
            d.line((x - half * math.cos(a), y - half * math.sin(a), x + half * math.cos(a), y + half * math.sin(a)),
                   fill=255, width=3 if big else 2)
        m = np.asarray(layer, np.float32)[..., None] / 255 * inside
        return img * (1 - m) + (0.25 * img + 0.75) * m  # bare metal: near white
    if p.label == "crack":
        x, y = _zone_centre(rng, p.zone, solid)
        a, steps = rng.uniform(0, 2 * math.pi), 10 if big else 7
        pts = [(x, y)]
        for _ in range(steps):
            a += rng.uniform(-0.9, 0.9)
            x, y = x + 4.0 * math.cos(a), y + 4.0 * math.sin(a)
            pts.append((x, y))
        d.line(pts, fill=255, width=3 if big else 2)
        bx, by = pts[len(pts) // 2]
        b = a + rng.choice([-1.2, 1.2])
        d.line((bx, by, bx + 10 * math.cos(b), by + 10 * math.sin(b)), fill=255, width=2)
        m = np.asarray(layer, np.float32)[..., None] / 255 * inside
        return img * (1 - 0.9 * m)  # an open crack: near black
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(p.count):
        x, y = _zone_centre(rng, p.zone, solid)
        r = size * (0.14 if big else 0.09) * rng.uniform(0.85, 1.15)
        dist = np.hypot(xx - x, yy - y) / r
        if p.label == "dent":  # dark on one side, light on the other: a shaded depression
            a = rng.uniform(0, 2 * math.pi)
            shade = ((xx - x) * math.cos(a) + (yy - y) * math.sin(a)) / r
            m = np.clip(1 - dist, 0, 1) * inside[..., 0]
            img = img * (1 + (0.9 * m * shade - 0.45 * m)[..., None])
        else:  # corrosion: rough orange-brown patch with dark pits
            rough = dist + 0.35 * rng.uniform(-1, 1, dist.shape)
            m = (rough < 1).astype(np.float32)[..., None] * inside
            rust = np.array([0.62, 0.33, 0.14], np.float32) * rng.uniform(0.8, 1.1, (size, size, 1))
            pits = (rng.random((size, size)) < 0.12)[..., None] * m
            img = img * (1 - m) + rust * m
            img = img * (1 - 0.6 * pits)
    return np.clip(img, 0, 1)


def render(p: Part, index: int, seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng([seed, index, 11])
    yy = np.mgrid[0:size, 0:size][0].astype(np.float32) / size
    belt = 0.16 + 0.03 * (np.floor(yy * 12) % 2)  # dark conveyor belt with slats
    img = np.repeat(belt[..., None], 3, -1) * np.array([0.9, 0.95, 1.0], np.float32)
    inside = np.asarray(_part_mask(rng, p.kind, size), np.float32)[..., None] / 255
    part = _surface(rng, p.material, p.finish, size)
    if p.label != "ok":
        part = _defect(rng, p, part, inside)
    img = img * (1 - inside) + part * inside
    if p.camera == "cam_b":  # line 2: warm side light, low contrast, noise
        xx = np.mgrid[0:size, 0:size][1].astype(np.float32) / size
        img = img * (0.75 + 0.35 * xx)[..., None] * np.array([1.1, 1.0, 0.8], np.float32)
        img = 0.15 + 0.75 * img + rng.normal(0, 0.03, img.shape)
    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    if p.camera == "cam_b":
        out = out.filter(ImageFilter.GaussianBlur(radius=0.7))
    return out


def encode(img: Image.Image, camera: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if camera == "cam_b":
        img.save(buf, format="JPEG", quality=80)
        return buf.getvalue(), ".jpg"
    img.save(buf, format="PNG")
    return buf.getvalue(), ".png"


# ------------------------------------------------------------------------------------------- dataset
def plan(n: int, seed: int, camera: str, prefix: str) -> list[Part]:
    rng = np.random.default_rng([seed, 1])
    labels = rng.choice(LABELS, size=n, p=[MIX[k] for k in LABELS])
    parts, serial = [], 0
    while len(parts) < n:
        shots = int(rng.integers(1, 3))  # a part is photographed once or twice (both shots: one serial)
        material = str(rng.choice(list(MATERIALS)))  # one third each
        finish, kind = str(rng.choice(FINISHES)), str(rng.choice(PARTS))
        label = str(labels[len(parts)])
        zone, size = str(rng.choice(ZONES)), str(rng.choice(["small", "large"]))
        count = int(rng.integers(1, 4)) if label in ("scratch", "dent", "corrosion") else 1
        for _ in range(min(shots, n - len(parts))):
            p = Part(id=f"{prefix}{len(parts):05d}", serial=f"{prefix}SN{serial:05d}", label=label,
                     material=material, finish=finish, kind=kind, zone=zone, size=size, count=count, camera=camera)
            parts.append(replace(p, caption=describe(p), source_id=p.id))
        serial += 1
    return parts


def inject_faults(parts: list[Part], seed: int, vague: float, mismatch: float) -> list[Part]:
    """Vague notes replace the caption; swapped notes come from a part of another label."""
    rng = np.random.default_rng([seed, 2])
    order = rng.permutation(len(parts))
    n_vague, n_mis = int(round(vague * len(parts))), int(round(mismatch * len(parts)))
    out = list(parts)
    for i in order[:n_vague]:
        out[i] = replace(out[i], caption=str(rng.choice(VAGUE)), fault="vague")
    for i in order[n_vague:n_vague + n_mis]:
        others = [j for j in range(len(parts)) if parts[j].label != parts[i].label]
        j = int(rng.choice(others))
        out[i] = replace(out[i], caption=parts[j].caption, fault="mismatch", source_id=parts[j].id)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--camera", choices=CAMERAS, default="cam_a")
    ap.add_argument("--site", default=None, help="default: line_1 for cam_a, line_2 for cam_b")
    ap.add_argument("--prefix", default="", help="id prefix (e.g. for a batch)")
    ap.add_argument("--vague", type=float, default=0.03)
    ap.add_argument("--mismatch", type=float, default=0.04)
    ap.add_argument("--duplicates", type=float, default=0.02, help="exact and near copies, each")
    ap.add_argument("--corrupt", type=float, default=0.01, help="truncated and empty files, each")
    a = ap.parse_args(argv)
    out = Path(a.out)
    site = a.site or {"cam_a": "line_1", "cam_b": "line_2"}[a.camera]
    parts = inject_faults(plan(a.n, a.seed, a.camera, a.prefix), a.seed, a.vague, a.mismatch)
    rng = np.random.default_rng([a.seed, 3])
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, truth = [], []

    def write(p: Part, payload: bytes, ext: str) -> None:
        rel = f"images/{p.id}{ext}"
        (out / rel).write_bytes(payload)
        rows.append({"id": p.id, "image": rel, "caption": p.caption, "label": p.label, "patient_id": p.serial,
                     "material": p.material, "site": site, "camera": p.camera, "source": "synthetic"})
        truth.append({"id": p.id, "fault": p.fault, "source_id": p.source_id, "label": p.label, "zone": p.zone,
                      "size": p.size, "count": p.count, "finish": p.finish, "kind": p.kind})

    blobs = {}
    for i, p in enumerate(parts):
        blobs[p.id] = encode(render(p, i, a.seed, a.size), p.camera)
        write(p, *blobs[p.id])
    k = int(round(a.duplicates * len(parts)))
    picks = rng.choice(len(parts), size=2 * k + 2 * int(round(a.corrupt * len(parts))), replace=False)
    for j, i in enumerate(picks[:k]):  # exact copies: the same bytes under another id
        p = parts[int(i)]
        write(replace(p, id=f"{p.id}x", fault="exact_duplicate"), *blobs[p.id])
    for j, i in enumerate(picks[k:2 * k]):  # near copies: re-encoded at another quality, 1 px shift
        p = parts[int(i)]
        img = Image.open(io.BytesIO(blobs[p.id][0])).convert("RGB").transform(
            (a.size, a.size), Image.AFFINE, (1, 0, 1, 0, 1, 0))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        write(replace(p, id=f"{p.id}n", fault="near_duplicate"), buf.getvalue(), ".jpg")
    rest = picks[2 * k:]
    for j, i in enumerate(rest):  # half truncated, half empty
        p = parts[int(i)]
        payload = blobs[p.id][0][: len(blobs[p.id][0]) // 3] if j % 2 == 0 else b""
        write(replace(p, id=f"{p.id}c", fault="corrupt" if j % 2 == 0 else "empty_file"), payload, blobs[p.id][1])
    for name, columns, data in (("manifest.csv", COLUMNS, rows), ("truth.csv", tuple(truth[0]), truth)):
        with open(out / name, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
            w.writeheader()
            w.writerows(data)
    faults: dict[str, int] = {}
    for t in truth:
        faults[t["fault"]] = faults.get(t["fault"], 0) + 1
    summary = {"rows": len(rows), "faults": faults, "out": str(out)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
