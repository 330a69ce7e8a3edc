"""The published intervention effect (fcjax.metrics.effect), hand-computed."""

from __future__ import annotations

import pytest

from fcjax.metrics.effect import (
    condition,
    effect_lines,
    effects_by_condition,
    intervention_effect,
    mean_cmfg_star,
)


def _summary(model, dataset, cmfg, intervention="blank", system="blank"):
    return {
        "config": {
            "model": model,
            "dataset": dataset,
            "intervention": intervention,
            "system_intervention": system,
        },
        "estimators": {
            n: {"cmfg_star": v} for n, v in zip(("rcc", "deepconf", "sampling"), cmfg, strict=True)
        },
    }


def test_mean_cmfg_star_rounds_like_the_published_summary():
    s = _summary("m", "d", (0.70049, 0.6, 0.8))
    assert mean_cmfg_star(s) == pytest.approx((0.700 + 0.6 + 0.8) / 3)
    assert mean_cmfg_star(s, decimals=None) == pytest.approx((0.70049 + 0.6 + 0.8) / 3)
    assert mean_cmfg_star(_summary("m", "d", (0.7, None, 0.8))) is None


def test_effect_over_cells_by_hand():
    cells = [
        (_summary("a", "x", (0.6, 0.6, 0.6)), _summary("a", "x", (0.7, 0.7, 0.7), "perception")),
        (_summary("b", "y", (0.5, 0.5, 0.8)), _summary("b", "y", (0.5, 0.5, 0.5), "perception")),
        (_summary("c", "z", (0.5, None, 0.5)), _summary("c", "z", (0.9, 0.9, 0.9), "perception")),
    ]
    out = intervention_effect(cells)
    # cell deltas: +0.1, -0.1, dropped (the blank run lacks DeepConf)
    assert out["deltas"][0] == pytest.approx(0.1) and out["deltas"][1] == pytest.approx(-0.1)
    assert out["deltas"][2] is None and out["n_cells"] == 2
    assert out["effect"] == pytest.approx(0.0)
    assert out["sem"] == pytest.approx(((0.1**2 + 0.1**2) / 1) ** 0.5 / 2**0.5)
    single = intervention_effect(cells[:1])
    assert single["effect"] == pytest.approx(0.1) and single["sem"] == 0.0
    assert intervention_effect([])["effect"] is None


def test_effects_grouped_by_condition_and_cell():
    runs = [
        _summary("a", "x", (0.5, 0.5, 0.5)),
        _summary("a", "x", (0.6, 0.6, 0.6), "perception", "ms_hedge"),
        _summary("a", "x", (0.4, 0.4, 0.4), "perception"),
        _summary("b", "x", (0.9, 0.9, 0.9), "perception"),  # no blank run in its cell
    ]
    assert [condition(r) for r in runs] == [
        "blank",
        "ms_hedge+perception",
        "perception",
        "perception",
    ]
    effects = effects_by_condition(runs)
    assert effects["ms_hedge+perception"]["effect"] == pytest.approx(0.1)
    assert effects["perception"]["effect"] == pytest.approx(-0.1)
    assert effects["perception"]["n_cells"] == 1
    text = effect_lines(effects)
    assert "ms_hedge+perception: +0.1000" in text and "perception: -0.1000" in text
