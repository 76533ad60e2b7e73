"""Money is Decimal, rounded half up to the cent, never a binary float."""

from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")


def to_money(amount: Decimal) -> Decimal:
    """Round to 2 places, halves up (and never a negative zero)."""
    return amount.quantize(CENT, rounding=ROUND_HALF_UP) + 0
