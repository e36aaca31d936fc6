"""pipeline.drift: permutation p-values that hold their level at any sample size, statistics equal to their
outside references (Evidently's MMD2u, scipy's K-S and chi-square, statsmodels' Holm), strata that keep a
pure label-mix change from reading as a change of the images."""
import numpy as np
import pytest
from scipy import stats

from pipeline import drift


@pytest.mark.parametrize("n_ref,n_cur", [(60, 10), (80, 40)])
def test_same_distribution_false_alarms_stay_at_the_level(n_ref, n_cur):
    rng = np.random.default_rng(0)
    alpha, reps = 0.1, 150
    p = np.array([drift.two_sample(rng.normal(size=(n_ref, 5)), rng.normal(size=(n_cur, 5)), "mmd", 99, s).p_value
                  for s in range(reps)])
    rate = float(np.mean(p < alpha))
    # binomial: at the true level 0.1, 150 draws exceed 0.19 with probability < 0.001
    assert rate <= 0.19, rate
    # and the p-values are spread over (0, 1], not piled at 1 (a test that never fires would pass the bound)
    assert np.mean(p < 0.5) > 0.35 and stats.kstest(p, "uniform").pvalue > 0.001


def test_a_shift_is_found_with_a_small_p_value():
    rng = np.random.default_rng(1)
    ref, cur = rng.normal(size=(100, 5)), rng.normal(size=(40, 5)) + [0.8, 0, 0, 0, 0]
    r = drift.two_sample(ref, cur, "mmd", 199, 0)
    assert r.p_value == pytest.approx(1 / 200) and r.statistic > max(r.null)
    # the domain classifier fits on half the rows: it needs a larger shift at this size (why mmd is the default)
    assert drift.two_sample(ref, cur + [0.7, 0, 0, 0, 0], "model", 99, 0).p_value <= 0.02


def _mixture(rng, n, share_b, shift_b=0.0):
    y = np.where(rng.random(n) < share_b, "b", "a")
    x = rng.normal(size=(n, 4)) + np.where(y == "b", 2.0 + shift_b, 0.0)[:, None] * np.array([1, 0, 0, 0])
    return x, y


def test_strata_separate_a_label_mix_change_from_a_change_of_the_images():
    rng = np.random.default_rng(2)
    xr, yr = _mixture(rng, 300, 0.3)
    xc, yc = _mixture(rng, 150, 0.7)  # only the label mix changed
    assert drift.two_sample(xr, xc, "mmd", 199, 0).p_value < 0.01  # unconditioned: "the images changed"
    assert drift.two_sample(xr, xc, "mmd", 199, 0, yr, yc).p_value > 0.05  # within labels: they did not
    xs, ys = _mixture(rng, 150, 0.3, shift_b=3.0)  # class b's images moved
    assert drift.two_sample(xr, xs, "mmd", 199, 0, yr, ys).p_value < 0.01
    # the label-mix change itself is the chi-square test's
    assert drift.two_sample(yr, yc, "chi2", 199, 0).p_value < 0.01


def test_memberships_keep_every_stratum_count():
    rng = np.random.default_rng(3)
    strata = np.array(list("aaaabbbbbbcc"))
    is_cur = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1], bool)
    m = drift.memberships(is_cur, strata, 50, rng)
    for s in "abc":
        assert (m[:, strata == s].sum(1) == is_cur[strata == s].sum()).all()
    assert m[:, strata == "c"].all()  # a stratum with only batch rows stays as it is
    assert len({tuple(r) for r in m}) > 10  # and the others really are shuffled


def test_mmd_equals_evidentlys_mmd2u_on_the_same_kernel():
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import MMD2u

    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 3))
    kernel, _ = drift.rbf_kernel(x)
    member = np.zeros(50, bool)
    member[30:] = True
    assert drift.mmd2u(kernel, member[None])[0] == pytest.approx(MMD2u(kernel, 30, 20), rel=1e-10)
    assert drift.mmd2u(kernel.astype(np.float32), member[None])[0] == pytest.approx(MMD2u(kernel, 30, 20), rel=1e-4)


def test_ks_and_chi2_equal_scipys_statistics():
    rng = np.random.default_rng(5)
    v = np.round(rng.normal(size=70), 1)  # ties included
    member = np.zeros(70, bool)
    member[45:] = True
    assert drift.ks_stat(v)(member[None])[0] == pytest.approx(stats.ks_2samp(v[:45], v[45:]).statistic)
    cats = rng.choice(["x", "y", "z"], 70, p=[0.5, 0.3, 0.2])
    table = [[np.sum(cats[~member] == c) for c in "xyz"], [np.sum(cats[member] == c) for c in "xyz"]]
    expected = stats.chi2_contingency(table, correction=False).statistic
    assert drift.chi2_stat(cats)(member[None])[0] == pytest.approx(expected)


def test_holm_and_bonferroni_equal_statsmodels():
    from statsmodels.stats.multitest import multipletests

    p = {"covariate": 0.004, "prevalence": 0.03, "subgroup": 0.2, "text": 0.011, "alignment": 0.9}
    for method in ("holm", "bonferroni"):
        ours = drift.adjust(p, method)
        theirs = multipletests(list(p.values()), method=method)[1]
        assert [ours[k] for k in p] == pytest.approx(list(theirs))
    with pytest.raises(ValueError, match="unknown correction"):
        drift.adjust(p, "fdr")


def test_atc_threshold_reproduces_the_validation_figure():
    conf = np.random.default_rng(6).normal(size=400)
    for target in (0.2, 0.55, 0.9):
        t = drift.atc_threshold(conf, target)
        assert np.mean(conf > t) == pytest.approx(target, abs=1 / 400)
