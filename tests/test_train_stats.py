"""fastattnreg.train.stats: t quantiles, intervals of a mean, paired differences, verdicts."""
import math

import pytest

from fastattnreg.train.stats import mean_ci, paired_difference, t975, verdict

scipy_stats = pytest.importorskip("scipy.stats", reason="scipy (comes with scikit-learn)")


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29, 30, 31, 40, 100, 1000])
def test_t975_matches_scipy(df):
    assert t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-4)


def test_mean_ci_matches_scipy_interval():
    vals = [0.61, 0.58, 0.66, 0.63, 0.55]
    ci = mean_ci(vals)
    low, high = scipy_stats.t.interval(0.95, len(vals) - 1, loc=sum(vals) / 5,
                                       scale=scipy_stats.sem(vals))
    assert (ci.mean, ci.low, ci.high) == pytest.approx((sum(vals) / 5, low, high), abs=1e-5)
    assert ci.std == pytest.approx(scipy_stats.tstd(vals))


def test_paired_difference_removes_shared_seed_variation():
    ref = [0.50, 0.60, 0.70, 0.55, 0.65]
    better = [r + d for r, d in zip(ref, [0.020, 0.030, 0.025, 0.022, 0.028])]
    paired = paired_difference(better, ref)
    assert verdict(paired) == "better" and paired.low > 0
    # Unpaired, the same numbers overlap: the seed spread (0.08) dwarfs the 0.025 gain.
    assert mean_ci(better).low < mean_ci(ref).high
    assert verdict(paired_difference(ref, better)) == "worse"
    assert verdict(paired_difference([0.5, 0.6, 0.7], [0.6, 0.5, 0.7])) == "indistinguishable"


def test_one_seed_has_no_interval():
    ci = mean_ci([0.7])
    assert ci.std == 0.0 and math.isnan(ci.low) and math.isnan(ci.high)
    assert verdict(ci) == "one seed"


@pytest.mark.parametrize("bad, match", [([], "at least one"), ([0.5, math.nan], "finite")])
def test_bad_values_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        mean_ci(bad)
    with pytest.raises(ValueError, match="one reference value"):
        paired_difference([0.1, 0.2], [0.1])
