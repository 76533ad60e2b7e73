"""The amortization schedule of a loan, exact to the cent.

Each month's interest is the balance times the monthly rate, rounded to the cent; the rest of
the payment repays principal. The last installment absorbs every rounding difference, so
the principal column sums exactly to the loan amount. An imported loan follows the file's
monthly payment, even where it does not match the file's rate; if that payment repays the
loan early, the installments after it are zero, and if it does not cover a month's interest, the
balance grows and the last installment owes it all (the file's figures are facts: the import
keeps them).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal, localcontext

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


# Digits enough for any schedule: an imported balance under 10**15 that its payment never repays
# grows at most (1 + 100/1200)**600 times, about 7 * 10**20, and its interest is that times a rate
# of up to 9 digits. The default 28 digits would overflow (decimal.InvalidOperation) before.
SCHEDULE_DIGITS = 60


def interest_on(balance: Decimal, annual_rate: Decimal) -> Decimal:
    """A month's interest on `balance` at `annual_rate` percent a year, to the cent: what the
    schedule charges. Rounded once, from the exact balance x rate / 1200: a monthly rate rounded
    first (25 / 1200 is 0.0208333...) would put an exact half cent just under it, and round it down."""
    return to_money(balance * annual_rate / 1200)


def amortization(amount: Decimal, annual_rate: Decimal, tenure: int, payment: Decimal, start: date) -> list[Installment]:
    with localcontext(prec=SCHEDULE_DIGITS):
        # An imported loan's payment is the file's, which may hold fractions of a cent (8884.875) or
        # spell its cents otherwise (15344.0): what is paid is in cents.
        payment = to_money(payment)
        balance = to_money(amount)
        rows: list[Installment] = []
        for number in range(1, tenure + 1):
            interest = interest_on(balance, annual_rate)
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
