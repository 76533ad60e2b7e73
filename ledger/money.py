"""Money is Decimal, rounded half up to the cent, never a binary float."""

from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")


def to_money(amount: Decimal) -> Decimal:
    """Round to 2 places, halves up (and never a negative zero)."""
    return amount.quantize(CENT, rounding=ROUND_HALF_UP) + 0


def plain(number: Decimal, step: Decimal) -> Decimal:
    """`number` (finite, a multiple of `step`) spelled so that PostgreSQL's numeric takes it:
    no more decimals than `step` has, and a zero with no sign and no positive exponent. JSON and
    text cells can spell one number many ways; `12500.` followed by 16,400 zeros (numeric holds
    16,383 decimals at most) or `0E+1073741823` (an overflow) would reach the events as spelled,
    and the projection would stop at them for good. A positive exponent is spelled out (`1E+3` as
    `1000`): the number goes back to clients, in answers and in histories, as it is spelled here."""
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int), "a finite number"
    if exponent < int(step.as_tuple().exponent):
        number = number.quantize(step)  # only zeros dropped: the same number
    elif number.is_zero() and exponent > 0:
        number = Decimal(0)
    elif exponent > 0:
        number = Decimal(f"{number:f}")  # exact: a string converts with no rounding
    return number.copy_abs() if number.is_zero() else number
