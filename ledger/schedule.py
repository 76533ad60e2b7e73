"""The amortization schedule of a loan, exact to the cent.

Each month's interest is the balance times the monthly rate, rounded to the cent; the rest of
the payment repays principal. The last installment absorbs every rounding difference, so
the principal column sums exactly to the loan amount. An imported loan follows the file's
monthly payment, even where it does not match the file's rate; if that payment repays the
loan early, the installments after it are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from ledger.calendar import add_months
from ledger.money import to_money

ZERO = Decimal("0.00")


@dataclass(frozen=True)
class Installment:
    number: int
    due_date: date
    payment: Decimal
    interest: Decimal
    principal: Decimal
    balance: Decimal


def monthly_rate(annual_rate: Decimal) -> Decimal:
    return annual_rate / Decimal(1200)


def interest_on(balance: Decimal, rate: Decimal) -> Decimal:
    """A month's interest on `balance` at the monthly `rate`, to the cent: what the schedule charges."""
    return to_money(balance * rate)


def amortization(amount: Decimal, annual_rate: Decimal, tenure: int, payment: Decimal, start: date) -> list[Installment]:
    # An imported loan's payment is the file's, which may hold fractions of a cent (8884.875) or
    # spell its cents otherwise (15344.0): what is paid is in cents.
    payment = to_money(payment)
    rate = monthly_rate(annual_rate)
    balance = to_money(amount)
    rows: list[Installment] = []
    for number in range(1, tenure + 1):
        interest = interest_on(balance, rate)
        if number == tenure or payment >= balance + interest:
            principal = balance
            paid = principal + interest
        else:
            principal = payment - interest
            paid = payment
        balance -= principal
        rows.append(Installment(number, add_months(start, number), paid, interest, principal, balance))
        if balance == 0:
            rows += [Installment(n, add_months(start, n), ZERO, ZERO, ZERO, ZERO) for n in range(number + 1, tenure + 1)]
            break
    return rows
