"""Two-sample tests with a p-value you can trust at any batch size (docs/design.md §3.6).

Every drift statistic of `monitor` gets its p-value from a **permutation test**: the reference and batch
rows are pooled, their membership is shuffled `permutations` times (seeded) and the statistic recomputed;
p = (1 + #{null >= observed}) / (1 + permutations), which is exactly valid (P(p <= a) <= a under the null)
at every sample size. With `strata` (e.g. the label of every row) the membership is shuffled only within a
stratum: the test then asks whether p(x | stratum) changed, so a batch that only changes the label mix is
not reported as a change of the images. The statistics:

- `mmd`: the unbiased MMD^2 with an RBF kernel (Evidently's `MMD2u`), bandwidth the median of the pooled
  pairwise distances (a permutation-invariant choice, so the kernel matrix is computed once);
- `linear_mmd`: the same with a linear kernel (the distance between mean vectors), for TF-IDF features;
- `model`: a domain classifier's held-out ROC AUC (as Evidently's `model` method: a logistic regression,
  half of the rows to fit, half to score), refit on every permutation;
- `ks` / `mean`: the two-sample Kolmogorov-Smirnov distance / absolute mean difference of a 1-D score;
- `chi2`: Pearson's chi-square statistic of a categorical column's counts (label mix, subgroup mix).

`holm` adjusts the p-values of several tests for multiple testing (Holm-Bonferroni), `bonferroni` too.
Nothing here knows the data: arrays in, numbers out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np


@dataclass
class TestResult:
    statistic: float
    p_value: float
    permutations: int
    null: list[float] = field(default_factory=list)  # the permutation distribution (rounded), for the report
    note: str = ""

    def summary(self) -> dict:
        q = np.quantile(self.null, [0.5, 0.9, 0.95, 0.99]) if self.null else [None] * 4
        return {"value": self.statistic, "p_value": self.p_value, "permutations": self.permutations, "note": self.note,
                "null_quantiles": {"q50": _f(q[0]), "q90": _f(q[1]), "q95": _f(q[2]), "q99": _f(q[3])},
                "null": [round(float(v), 6) for v in self.null]}


def _f(v) -> float | None:
    return None if v is None else float(v)


# ---------------------------------------------------------------------------------------- permutations
def memberships(is_cur: np.ndarray, strata: np.ndarray | None, permutations: int,
                rng: np.random.Generator) -> np.ndarray:
    """(permutations, N) boolean matrix: row b marks the rows that play 'batch' in permutation b. The
    number of batch rows is kept in every stratum (all rows form one stratum when `strata` is None)."""
    n = len(is_cur)
    out = np.zeros((permutations, n), dtype=bool)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    for idx in groups:
        k = int(is_cur[idx].sum())
        if k == 0:
            continue
        if k == len(idx):
            out[:, idx] = True
            continue
        order = rng.random((permutations, len(idx))).argsort(1)[:, :k]
        rows = np.repeat(np.arange(permutations), k)
        out[rows, idx[order].ravel()] = True
    return out


def permutation_test(stat: Callable[[np.ndarray], np.ndarray], is_cur: np.ndarray, strata: np.ndarray | None,
                     permutations: int, seed: int) -> TestResult:
    """`stat` maps a (B, N) membership matrix to B statistics (larger = more different)."""
    is_cur = np.asarray(is_cur, dtype=bool)
    if strata is not None:
        strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    observed = float(stat(is_cur[None, :])[0])
    null = np.concatenate([stat(memberships(is_cur, strata, min(256, permutations - b), rng))
                           for b in range(0, permutations, 256)])
    p = (1 + int(np.sum(null >= observed - 1e-9 * max(1.0, abs(observed))))) / (1 + permutations)
    return TestResult(observed, float(p), permutations, [float(v) for v in null])


# ------------------------------------------------------------------------------------------ statistics
def rbf_kernel(x: np.ndarray) -> tuple[np.ndarray, float]:
    """The RBF kernel matrix of the pooled rows, bandwidth^2 = median pooled squared distance."""
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    off = d2[np.triu_indices(len(x), 1)]
    sigma2 = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0
    return np.exp(-d2 / sigma2), sigma2


def mmd2u(kernel: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 (Evidently's `MMD2u`) for each membership row (True = batch) over one kernel matrix.
    One matrix product per row block: with b = 1 - a, K b = (column sums of K) - K a."""
    b = member.astype(kernel.dtype)  # (B, N) batch indicator
    a = 1 - b
    ka = a @ kernel
    kb = kernel.sum(0)[None, :] - ka
    m, n = a.sum(1).astype(np.float64), b.sum(1).astype(np.float64)
    diag = np.diag(kernel)
    kxx = (ka * a).sum(1, dtype=np.float64) - a @ diag
    kyy = (kb * b).sum(1, dtype=np.float64) - b @ diag
    kxy = (ka * b).sum(1, dtype=np.float64)
    return kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2 * kxy / (m * n)


def mmd_stat(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    kernel, _ = rbf_kernel(np.asarray(x, dtype=np.float64))
    kernel = kernel.astype(np.float32)  # the permutation products in single precision: twice as fast
    return lambda member: mmd2u(kernel, member)


def linear_mmd_stat(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Unbiased MMD^2 with a linear kernel: the squared distance between the two sides' mean vectors (for
    wide sparse features such as TF-IDF, where a word only one side uses must count in full)."""
    x = np.asarray(x, dtype=np.float32)
    kernel = x @ x.T
    return lambda member: mmd2u(kernel, member)


def classifier_stat(x: np.ndarray, seed: int = 42) -> Callable[[np.ndarray], np.ndarray]:
    """Evidently's `model` drift method as a statistic: ROC AUC of a logistic regression fit on a random half,
    scored on the other half (the split is fixed across permutations). Evidently fits SGD, whose AUC is
    noise at a few dozen rows; the exact fit of a logistic regression is as cheap here."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x = np.asarray(x, dtype=np.float64)
    half = np.random.default_rng(seed).permutation(len(x))
    fit, score = half[: len(x) // 2], half[len(x) // 2:]

    def stat(member: np.ndarray) -> np.ndarray:
        out = []
        for y in member.astype(int):
            if len(np.unique(y[fit])) < 2 or len(np.unique(y[score])) < 2:
                out.append(0.5)
                continue
            clf = LogisticRegression(max_iter=200).fit(x[fit], y[fit])
            out.append(roc_auc_score(y[score], clf.predict_proba(x[score])[:, 1]))
        return np.asarray(out)

    return stat


def ks_stat(values: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Two-sample Kolmogorov-Smirnov distance of a 1-D score, for every membership row at once."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    sv = v[order]
    last = np.r_[sv[1:] != sv[:-1], True]  # evaluate the ECDFs only after the last of tied values

    def stat(member: np.ndarray) -> np.ndarray:
        b = member[:, order].astype(np.float64)
        cb = np.cumsum(b, 1) / b.sum(1, keepdims=True)
        ca = np.cumsum(1 - b, 1) / (1 - b).sum(1, keepdims=True)
        return np.abs(cb - ca)[:, last].max(1)

    return stat


def mean_stat(values: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    v = np.asarray(values, dtype=np.float64)

    def stat(member: np.ndarray) -> np.ndarray:
        b = member.astype(np.float64)
        return np.abs(b @ v / b.sum(1) - (1 - b) @ v / (1 - b).sum(1))

    return stat


def chi2_stat(categories: Sequence) -> Callable[[np.ndarray], np.ndarray]:
    """Pearson's chi-square of the (reference, batch) x category table, for every membership row."""
    _, codes = np.unique(np.asarray(categories).astype(str), return_inverse=True)
    onehot = np.eye(codes.max() + 1)[codes]  # (N, C)
    total = onehot.sum(0)

    def stat(member: np.ndarray) -> np.ndarray:
        b = member.astype(np.float64)
        cur = b @ onehot  # (B, C)
        ref = total - cur
        n_cur, n_ref = cur.sum(1, keepdims=True), ref.sum(1, keepdims=True)
        n = n_cur + n_ref
        e_cur, e_ref = n_cur * total / n, n_ref * total / n
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(e_cur > 0, (cur - e_cur) ** 2 / e_cur, 0) + np.where(e_ref > 0, (ref - e_ref) ** 2 / e_ref, 0)
        return t.sum(1)

    return stat


STATISTICS = {"mmd": mmd_stat, "linear_mmd": linear_mmd_stat, "model": classifier_stat, "ks": ks_stat, "mean": mean_stat, "chi2": chi2_stat}


def two_sample(ref, cur, statistic: str, permutations: int, seed: int,
               ref_strata: Sequence | None = None, cur_strata: Sequence | None = None) -> TestResult:
    """Permutation test of `statistic` between reference and batch rows (arrays of rows, or 1-D values)."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown drift statistic {statistic!r} (known: {sorted(STATISTICS)})")
    ref, cur = np.asarray(ref), np.asarray(cur)
    pooled = np.concatenate([ref, cur])
    is_cur = np.r_[np.zeros(len(ref), bool), np.ones(len(cur), bool)]
    if ref_strata is None or cur_strata is None:
        return permutation_test(STATISTICS[statistic](pooled), is_cur, None, permutations, seed)
    strata = np.concatenate([np.asarray(ref_strata, dtype=str), np.asarray(cur_strata, dtype=str)])
    # a conditional statistic: the batch-weighted mean of the statistic within each stratum that holds at
    # least two rows of each side (a global statistic would miss a change that keeps the marginal, e.g.
    # every class's images turned into another class's look)
    parts = []
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        k = int(is_cur[idx].sum())
        if k >= 2 and len(idx) - k >= 2:
            parts.append((idx, k, STATISTICS[statistic](pooled[idx])))
    if not parts:
        return TestResult(float("nan"), 1.0, 0, [], "no stratum holds two rows of each side: not tested")
    total = sum(k for _, k, _ in parts)
    kept = np.concatenate([idx for idx, _, _ in parts])

    def stat(member: np.ndarray) -> np.ndarray:
        full = np.zeros((len(member), len(pooled)), dtype=bool)
        full[:, kept] = member
        return sum(k / total * f(full[:, idx]) for idx, k, f in parts)

    result = permutation_test(stat, is_cur[kept], strata[kept], permutations, seed)
    result.note = f"within {len(parts)} strata ({total} of {len(cur)} batch rows)"
    return result


# ---------------------------------------------------------------------------------- multiple testing
def adjust(p_values: dict[str, float], method: str) -> dict[str, float]:
    """Family-wise adjusted p-values: `holm` (step-down Holm-Bonferroni) or `bonferroni`."""
    names = [k for k, v in p_values.items() if v is not None]
    m = len(names)
    if method == "bonferroni":
        return {k: min(1.0, p_values[k] * m) for k in names}
    if method != "holm":
        raise ValueError(f"unknown correction {method!r} (holm | bonferroni)")
    order = sorted(names, key=lambda k: p_values[k])
    out, running = {}, 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[k]))
        out[k] = running
    return out


# ------------------------------------------------------------------------------------ performance
def bootstrap_interval(stat: Callable[[np.ndarray], float], n: int, draws: int, seed: int,
                       level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of `stat(indices)` over `n` rows."""
    if n < 2 or draws < 1:
        return None
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, n)) for _ in range(draws)]
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def atc_threshold(confidence: np.ndarray, target: float) -> float:
    """Average Thresholded Confidence (Garg et al., 2022): the threshold t at which the share of validation
    rows with confidence > t equals the validation figure `target` (here macro-F1)."""
    c = np.sort(np.asarray(confidence, dtype=np.float64))
    k = int(round((1 - target) * len(c)))  # rows at or below t
    if k <= 0:
        return float(c[0] - 1e-9)
    if k >= len(c):
        return float(c[-1])
    return float(c[k - 1])
