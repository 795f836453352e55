"""The report's figures on plain numbers: the Pareto front, and each figure drawn or skipped when empty."""

import math

from safeproj.plots.report import (
    Estimate,
    TradeoffPoint,
    VariantGroup,
    pareto_front,
    plot_mso,
    plot_pareto,
    plot_tradeoff,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_pareto_front_keeps_only_undominated_points():
    points = [(0.1, 1.0), (0.5, 2.0), (0.4, 3.0), (0.9, 4.0), (0.05, 0.5), (0.5, 2.5)]
    assert pareto_front(points) == [4, 0, 1, 3]


def test_figures_are_written_from_plain_numbers_and_skipped_without_any(tmp_path):
    with_ci, single = Estimate(0.5, 0.4, 0.6), Estimate(2.0)
    assert with_ci.has_interval and not single.has_interval and math.isnan(single.low)
    curves = {"top": [TradeoffPoint(0.25, with_ci, single), TradeoffPoint(0.75, single, with_ci)], "random": []}
    path = plot_tradeoff(
        curves, tmp_path / "tradeoff.png", title="t", utility="u", harm="h", reference=("no projection", single, single)
    )
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert plot_tradeoff({"top": [], "random": []}, tmp_path / "none.png", title="t", utility="u", harm="h") is None

    groups = [VariantGroup("a", [("top", 0.5, 2.0), ("random", 0.4, 1.0)], (0.6, 3.0)), VariantGroup("b", [])]
    assert plot_pareto(groups, tmp_path / "pareto.png", utility="u", harm="h").read_bytes()[:8] == PNG_MAGIC
    assert plot_pareto([VariantGroup("b", [])], tmp_path / "none.png", utility="u", harm="h") is None

    mso = {"safety-useful": {0.3: (with_ci, Estimate(0.1)), 0.9: (single, Estimate(0.2))}}
    assert plot_mso(mso, tmp_path / "mso.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_mso({}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
