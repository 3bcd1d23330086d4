"""relucomp.budget: the one parser for human-written counts, and budget validation."""

from __future__ import annotations

from fractions import Fraction

import pytest

from relucomp.budget import check_relu_budget, human, parse_count
from relucomp.errors import BudgetError, RelucompError


@pytest.mark.parametrize(
    "text, expected",
    [
        (15000, 15000),
        ("15000", 15000),
        ("15k", 15_000),
        ("15K", 15_000),
        (" 15k ", 15_000),
        ("15 k", 15_000),
        ("1.5M", 1_500_000),
        ("1.5m", 1_500_000),
        ("2G", 2_000_000_000),
        (".5k", 500),
        ("2,000", 2_000),
        ("1,500,000", 1_500_000),
        ("1_000", 1_000),
        ("0", 0),
        (2.0, 2),
        ("1.25k", 1_250),
    ],
)
def test_parse_count_accepts(text, expected):
    got = parse_count(text)
    assert got == expected
    assert isinstance(got, int)


@pytest.mark.parametrize(
    "text, total, expected",
    [
        ("10%", 557_056, 55_705),  # rounded down: a budget is never exceeded
        ("100%", 20_480, 20_480),
        ("0.5%", 20_480, 102),
        ("32.3%", 1000, 323),  # float arithmetic gave 322
        ("64.1%", 1000, 641),
        ("0%", 1000, 0),
    ],
)
def test_parse_count_percent(text, total, expected):
    assert parse_count(text, total=total) == expected


def test_percent_is_exact_floor_for_many_values():
    for total in (1000, 20_480, 73_728, 557_056):
        for tenths in range(0, 1001, 7):
            exact = int(Fraction(total) * Fraction(tenths, 10) / 100)
            assert parse_count(f"{tenths / 10:g}%", total=total) == exact, (total, tenths)


@pytest.mark.parametrize("text", ["abc", "", "   ", "15kk", "k", "1.5.2", "1e3", "-5", "15 000", "10 %%", "0x10",
                                  "1,5k", "15,00", "1,50,000"])
def test_parse_count_rejects_bad_strings(text):
    with pytest.raises(BudgetError) as ei:
        parse_count(text)
    err = ei.value
    assert isinstance(err, RelucompError) and isinstance(err, ValueError)
    assert "parse" in err.cause and repr(text) in err.cause
    assert err.fix and "15k" in err.fix


def test_parse_count_percent_above_100_and_without_total():
    with pytest.raises(BudgetError, match="above 100%"):
        parse_count("150%", total=1000)
    with pytest.raises(BudgetError, match="total is unknown"):
        parse_count("10%")


@pytest.mark.parametrize("text", ["1.5", "0.5", "1.2345k", 1.5, "2.0000005M"])
def test_parse_count_rejects_non_integers(text):
    with pytest.raises(BudgetError, match="not a whole number"):
        parse_count(text)


def test_parse_count_rejects_bool_and_uses_what():
    with pytest.raises(BudgetError, match="not a number"):
        parse_count(True)
    with pytest.raises(BudgetError, match="MAC budget"):
        parse_count("lots", what="MAC budget")


def test_check_relu_budget():
    assert check_relu_budget(1, 100) == 1
    assert check_relu_budget(100, 100) == 100
    for bad in (0, -5):
        with pytest.raises(BudgetError) as ei:
            check_relu_budget(bad, 100)
        assert "must be positive" in ei.value.cause and str(bad) in ei.value.cause
        assert "relucomp inspect" in ei.value.fix
    with pytest.raises(BudgetError) as ei:
        check_relu_budget(600_000, 557_056)
    assert "600,000" in ei.value.cause and "557,056" in ei.value.cause
    assert "≤ 557,056" in ei.value.fix and "55,705" in ei.value.fix
    assert "fix:" in str(ei.value)


@pytest.mark.parametrize("n, text", [(15000, "15k"), (557056, "557.1k"), (1_500_000, "1.5M"), (999, "999"),
                                     (2_000_000_000, "2G"), (0.5, "0.50")])
def test_human(n, text):
    assert human(n) == text
