"""Near-duplicate search without comparing every pair (multi-index hashing on the 256-bit pHash) finds
exactly what the exhaustive search finds: on 2,000 generated images with planted exact and near duplicates,
and on hashes built to sit right at the threshold."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import checks

BITS = 26  # params.yaml's curate.near_duplicate_bits


def brute_pairs(h: np.ndarray, max_bits: int) -> set[tuple[int, int]]:
    out = set()
    for i in range(len(h)):
        for j in np.flatnonzero(np.bitwise_count(h[i + 1 :] ^ h[i]).sum(1) <= max_bits):
            out.add((i, int(i + 1 + j)))
    return out


def exhaustive_marks(hashes: np.ndarray, max_bits: int) -> list[str | None]:
    """The exhaustive greedy scan that `mark_duplicates` replaced: the first of a group keeps."""
    marks: list[str | None] = [None] * len(hashes)
    for i in range(len(hashes)):
        if marks[i]:
            continue
        dist = np.bitwise_count(hashes[i + 1 :] ^ hashes[i]).sum(1)
        for j in np.flatnonzero(dist <= max_bits):
            if not marks[i + 1 + j]:
                marks[i + 1 + j] = f"duplicate_of:r{i}"
    return marks


@pytest.fixture(scope="module")
def image_hashes(tmp_path_factory, params) -> np.ndarray:
    from pipeline import synth

    out = tmp_path_factory.mktemp("dup2000")
    f = dataclasses.replace(params.synth.faults, vague=0.0, mismatch=0.0, corrupt=0.0, not_image=0.0,
                            empty_file=0.0, exact_duplicate=0.03, near_duplicate=0.06)
    synth.run(dataclasses.replace(params.synth, n=2000, image_size=48, seed=7, faults=f), params.data, out)
    files = sorted(Path(out, "images").iterdir())
    assert len(files) >= 2000
    return np.stack([checks.phash(Image.open(p).convert("RGB")) for p in files])


def test_multi_index_search_equals_the_exhaustive_search_on_2000_images(image_hashes):
    truth = brute_pairs(image_hashes, BITS)
    assert len(truth) >= 100  # the planted duplicates (and look-alikes) are there to be found
    got = checks.near_pairs(image_hashes, BITS)
    assert set(map(tuple, got.tolist())) == truth
    for bits in (0, 8, 40):  # other thresholds: other chunkings, still exact
        assert set(map(tuple, checks.near_pairs(image_hashes, bits).tolist())) == brute_pairs(image_hashes, bits)


def test_marks_and_cross_set_search_equal_the_exhaustive_ones(image_hashes):
    rows = [checks.Row(index=i, raw={"id": f"r{i}"}) for i in range(len(image_hashes))]
    for i, r in enumerate(rows):
        r.sha256, r.phash = f"sha{i}", image_hashes[i]  # distinct bytes: only near duplicates
    checks.mark_duplicates(rows, BITS)
    assert [r.reasons[0] if r.reasons else None for r in rows] == exhaustive_marks(image_hashes, BITS)
    assert sum(bool(r.reasons) for r in rows) >= 50
    ref, other = image_hashes[:1000], image_hashes[1000:]
    want = (np.bitwise_count(other[:, None, :] ^ ref[None, :, :]).sum(-1) <= BITS).any(1)
    got = checks.duplicates_of(([f"a{i}" for i in range(1000)], ref), ([f"b{i}" for i in range(len(other))], other), BITS)
    assert want.any() and np.array_equal(got, want)


def test_hashes_at_the_threshold_and_degenerate_buckets():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, (40, 4), dtype=np.uint64)
    bits = np.unpackbits(base.view(np.uint8), axis=1)
    copies = []
    for k in (BITS - 1, BITS, BITS + 1, BITS + 2):  # flips spread so that every chunk may differ
        b = bits.copy()
        for row in b:
            row[rng.choice(256, k, replace=False)] ^= 1
        copies.append(np.packbits(b, axis=1).view(np.uint64))
    h = np.concatenate([base, *copies, np.repeat(base[:1], 30, 0)])  # 30 identical: one big bucket
    assert set(map(tuple, checks.near_pairs(h, BITS).tolist())) == brute_pairs(h, BITS)
    assert checks.near_pairs(h[:1], BITS).shape == (0, 2) and checks.near_pairs(h, -1).shape == (0, 2)


def test_pixel_confirmation_keeps_distinct_parts_and_still_finds_copies(tmp_path):
    """Distinct parts of one shape on a uniform belt sit within the pHash threshold of each other; with
    `near_duplicate_confirm` only the re-encoded, shifted copies stay duplicates (examples/parts' faults)."""
    import csv
    import hashlib
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "raw"
    subprocess.run([sys.executable, str(root / "examples/parts/generate.py"), "--out", str(out), "--n", "150",
                    "--seed", "3", "--duplicates", "0.06", "--corrupt", "0", "--vague", "0", "--mismatch", "0"],
                   check=True, capture_output=True)
    truth = {t["id"]: t for t in csv.DictReader(open(out / "truth.csv"))}

    def marked(confirm: float) -> dict[str, str]:
        rows = [checks.Row(index=i, raw={"id": t["id"]}) for i, t in enumerate(truth.values())]
        for r in rows:
            r.path = next(out.glob(f"images/{r.raw['id']}.*"))
            r.sha256 = hashlib.sha256(r.path.read_bytes()).hexdigest()
            r.phash = checks.phash(Image.open(r.path).convert("RGB"))
        checks.mark_duplicates(rows, BITS, confirm)
        return {r.raw["id"]: r.reasons[0] for r in rows if r.reasons}

    hash_only, confirmed = marked(0.0), marked(0.05)
    distinct = lambda m: [i for i in m if truth[i]["fault"] == "clean"]  # noqa: E731
    copies = lambda m: [i for i in m if truth[i]["fault"] == "near_duplicate"]  # noqa: E731
    assert len(distinct(hash_only)) >= 5  # the hash alone takes clean photos of other parts for copies
    assert len(distinct(confirmed)) <= len(distinct(hash_only)) // 4
    assert copies(hash_only) and len(copies(confirmed)) >= len(copies(hash_only)) // 2  # most copies still found
    assert set(confirmed) <= set(hash_only)  # confirmation only removes pairs
    for i in copies(confirmed):
        assert confirmed[i] == f"duplicate_of:{truth[i]['source_id']}"


def test_aligned_difference_is_zero_for_a_shifted_copy_and_ignores_brightness(tmp_path):
    rng = np.random.default_rng(0)
    pic = rng.integers(40, 200, (96, 96, 3)).astype(np.uint8)
    Image.fromarray(pic).save(tmp_path / "a.png")
    Image.fromarray((pic * 1.2).astype(np.uint8)).save(tmp_path / "brighter.png")
    t = checks.thumbnail(tmp_path / "a.png")
    assert t.shape == (64, 64) and abs(float(t.mean())) < 1e-4 and float(t.std()) == pytest.approx(1.0, abs=1e-3)
    assert checks.aligned_difference(t, checks.thumbnail(tmp_path / "brighter.png")) < 0.05  # the parts' threshold
    a = rng.normal(0, 1, (64, 64)).astype(np.float32)
    shifted = np.roll(a, (1, -2), (0, 1))
    assert checks.aligned_difference(a, shifted) == pytest.approx(0.0, abs=1e-6)
    assert checks.aligned_difference(a, np.roll(a, 3, 0)) > 0.5  # beyond the 2-pixel search: a different picture
    assert checks.aligned_difference(a, rng.normal(0, 1, (64, 64)).astype(np.float32)) > 0.8
