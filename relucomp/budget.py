"""One parser for counts given by people: ``15000``, ``15k``, ``1.5M``, ``2G``, ``10%``."""

from __future__ import annotations

import re
from decimal import Decimal

from .errors import BudgetError

_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}
_RE = re.compile(r"^\s*([0-9][0-9_,]*(?:\.[0-9]+)?|\.[0-9]+)\s*([kKmMgG%]?)\s*$")
#: commas only as thousands separators ("2,000", "1,500,000.5"); "1,5k" is refused, not read as 15k
_GROUPED = re.compile(r"^[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?$")


def parse_count(text: str | int | float, *, total: int | None = None, what: str = "ReLU budget") -> int:
    """Parse ``text`` into an integer count.

    ``k``/``M``/``G`` multiply by 10^3/10^6/10^9 (case-insensitive); ``%`` is a
    fraction of ``total`` (rounded down, so a budget is never exceeded).
    """
    if isinstance(text, bool):
        raise BudgetError(f"{what} {text!r} is not a number", "give e.g. 15000, 15k, 1.5M or 10%")
    if isinstance(text, int):
        return text
    if isinstance(text, float):
        if not text.is_integer():
            raise BudgetError(f"{what} {text} is not a whole number", "give a whole count, e.g. 15000")
        return int(text)
    m = _RE.match(str(text))
    if not m:
        raise BudgetError(f"cannot parse {what} {text!r}", "give e.g. 15000, 15k, 1.5M or 10%")
    raw = m.group(1)
    if "," in raw and not _GROUPED.match(raw):
        raise BudgetError(f"cannot parse {what} {text!r}: commas may only separate thousands",
                          "write thousands as 2,000 or 2000 and decimals with '.', e.g. 15k or 1.5k")
    # exact decimal arithmetic: float rounding must not move a count by one (32.3% of 1000 is 323)
    number = Decimal(raw.replace(",", "").replace("_", ""))
    suffix = m.group(2).lower()
    if suffix == "%":
        if total is None:
            raise BudgetError(f"{what} {text!r} is a percentage but the total is unknown", "give an absolute count")
        if number > 100:
            raise BudgetError(f"{what} {text!r} is above 100%", "give a percentage between 0 and 100")
        return int(Decimal(int(total)) * number // 100)
    value = number * _SUFFIX[suffix]
    if value != value.to_integral_value():
        raise BudgetError(f"{what} {text!r} is not a whole number", "give a whole count, e.g. 15000 or 15k")
    return int(value)


def check_relu_budget(budget: int, total: int) -> int:
    """Validate a ReLU budget against the model's ReLU count."""
    if budget <= 0:
        raise BudgetError(f"ReLU budget {budget} must be positive",
                          "give a budget between 1 and the model's ReLU count (use `relucomp inspect` to see it)")
    if budget > total:
        raise BudgetError(f"ReLU budget {budget:,} is above the model's {total:,} ReLUs",
                          f"give a budget ≤ {total:,} (e.g. {max(1, total // 10):,} for a 10x cut)")
    return budget


def human(n: float) -> str:
    """``15000 -> '15k'``, ``557056 -> '557.1k'``."""
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.1f}{suf}".replace(".0" + suf, suf)
    return str(int(n)) if float(n).is_integer() else f"{n:.2f}"


def _fmt_ops(by_node: list[dict], limit: int = 4) -> str:
    parts = []
    for r in sorted(by_node, key=lambda r: -r["comparisons"])[:limit]:
        what = "a leaf module" if r["kind"] == "leaf" else r["op"]
        detail = f"{r['hidden_relus']:,} hidden ReLUs" if r["hidden_relus"] else r["op"]
        parts.append(f"{r['name']} ({what}: {detail}, {r['comparisons']:,})")
    more = len(by_node) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def check_uncounted_nonlinearities(gm, budget: int, *, include_maxpool: bool = False) -> int:
    """Charge the comparisons no gate controls against ``budget``; return what is left for the gates.

    ``gm`` must carry ShapeAnalysisPass metadata.  Ungated comparisons are
    ReLUs hidden in opaque leaf modules, ReLU6 / hardtanh / clamp bounds,
    other activations, max/min, sorting and, with ``include_maxpool``,
    MaxPool comparisons.  Raises :class:`BudgetError` (before any training)
    naming the ops when they alone reach the budget.
    """
    from relucomp.passes.shape_prop import ungated_comparisons

    un = ungated_comparisons(gm, include_maxpool=include_maxpool)
    if un["total"] == 0:
        return budget
    if un["total"] >= budget:
        leaf = any(r["kind"] == "leaf" for r in un["by_node"])
        pool = include_maxpool and any("maxpool" in r["op"] for r in un["by_node"])
        fixes = []
        if leaf:
            fixes.append("un-leaf the module (drop it from leaf_modules / make it traceable) so its ReLUs can be gated")
        if any(o in r["op"] for r in un["by_node"] for o in ("relu6", "hardtanh", "clamp")):
            fixes.append("replace ReLU6 / hardtanh / clamp by ReLU")
        if pool:
            fixes.append("leave MaxPool out of the budget (drop --budget-includes-maxpool) or use --replace-maxpool")
        fixes.append(f"or raise the budget above {un['total']:,}")
        raise BudgetError(
            f"the model evaluates {un['total']:,} comparisons per image that relucomp cannot gate, "
            f"≥ the budget of {budget:,}: {_fmt_ops(un['by_node'])}",
            "; ".join(fixes))
    return budget - un["total"]
