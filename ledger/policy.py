"""The lending policy: EMI, approved limit, credit score and the eligibility decision.

Pure functions on Decimal. The write side (the Customer aggregate) and the read side
(check-eligibility on the projections) both call `decide`, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from typing import TYPE_CHECKING

from ledger.calendar import installments_due
from ledger.money import to_money
from ledger.schedule import interest_on

if TYPE_CHECKING:  # the domain's loans; ledger.domain imports this module
    from ledger.domain import LoanTerms

LONGEST_TENURE = 600  # months, for a loan requested through the API or imported from a file
ONE_LAKH = Decimal(100_000)
LIMIT_MULTIPLE = 36
AFFORDABILITY_SHARE = Decimal("0.5")

# Credit score: BASE points for everyone, then up to +/- the weights below (see README).
BASE_POINTS = 40
PAYMENT_WEIGHT = 35
COMPLETED_LOAN_POINTS = 3
COMPLETED_LOANS_CAP = 5
THIS_YEAR_LOAN_PENALTY = 3
THIS_YEAR_LOANS_CAP = 5
UTILISATION_WEIGHT = 30


def monthly_installment(principal: Decimal, annual_rate: Decimal, tenure: int) -> Decimal:
    """EMI = P*r*(1+r)^n / ((1+r)^n - 1) with r the monthly rate; P/n at 0%. Rounded half up
    from the exact value: when 50 digits put it within a hair of half a paisa (where they may
    fall on the wrong side: 4.50 at 20% for 1 month is exactly 4.575), it is computed exactly."""
    if tenure < 1:
        raise ValueError("tenure must be at least one month")
    with localcontext() as ctx:
        ctx.prec = 50
        if annual_rate == 0:
            return to_money(principal / tenure)
        r = annual_rate / Decimal(1200)
        growth = (1 + r) ** tenure
        if growth == 1:  # a rate too small to register at this precision: the 0% limit
            return to_money(principal / tenure)
        emi = principal * r * growth / (growth - 1)
        paise = emi.scaleb(2)
        if abs(paise - paise.to_integral_value(rounding=ROUND_FLOOR) - _HALF) > _HAIR:
            return to_money(emi)
    exact_r = Fraction(annual_rate) / 1200
    exact_growth = (1 + exact_r) ** tenure
    exact_paise = Fraction(principal) * exact_r * exact_growth / (exact_growth - 1) * 100
    n, d = exact_paise.numerator, exact_paise.denominator
    return Decimal((2 * n + d) // (2 * d)).scaleb(-2)  # floor(paise + 1/2): half up, as credit_score rounds


_HALF = Decimal("0.5")
_HAIR = Decimal("1e-20")  # paise: 50 digits of an EMI under 10^15 are off by far less


def approved_limit(monthly_income: Decimal) -> Decimal:
    """36 x monthly income, rounded to the nearest lakh, halves up."""
    lakhs = (LIMIT_MULTIPLE * monthly_income / ONE_LAKH).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    return lakhs * ONE_LAKH


@dataclass(frozen=True)
class LoanFacts:
    """What the policy needs to know about one loan, as the read model has it."""

    loan_id: int
    amount: Decimal
    tenure: int
    monthly_installment: Decimal
    start_date: date
    end_date: date
    emis_paid: int
    emis_paid_on_time: int


@dataclass(frozen=True)
class CreditHistory:
    """A customer's loan history summarised as of one date."""

    loans_taken: int
    completed_loans: int
    loans_this_year: int
    emis_due: int
    emis_paid_on_time: int
    current_loans: int
    current_debt: Decimal
    current_emis: Decimal

    @classmethod
    def empty(cls) -> CreditHistory:
        return cls(0, 0, 0, 0, 0, 0, Decimal(0), Decimal(0))


def credit_history(loans: Iterable[LoanFacts | LoanTerms], today: date) -> CreditHistory:
    """The history as of `today`, from the read model's rows or the customer aggregate's own
    loans (no copy of each: a customer with 1,000 loans decides a booking on them). A loan is
    completed when it has no repayments left (tenure - EMIs paid), and current when it has some
    and its end date is today or later."""
    loans_taken = completed = this_year = due = on_time = current = 0
    debt = emis = Decimal(0)
    for loan in loans:
        loans_taken += 1
        repayments_left = loan.tenure - loan.emis_paid
        if repayments_left <= 0:
            completed += 1
        if loan.start_date.year == today.year:
            this_year += 1
        loan_due = installments_due(loan.start_date, loan.tenure, today)
        due += loan_due
        # Installments are paid in order, and one paid before it fell due was paid on time: those
        # paid ahead are on time but not among the due ones, so a late EMI stays late when the
        # next ones are paid early. (An imported loan's EMIs were all paid on time.)
        on_time += max(0, loan.emis_paid_on_time - max(0, loan.emis_paid - loan_due))
        if repayments_left > 0 and loan.end_date >= today:  # current
            current += 1
            debt += loan.amount
            emis += loan.monthly_installment
    return CreditHistory(loans_taken, completed, this_year, due, on_time, current, debt, emis)


@dataclass(frozen=True)
class CreditScore:
    """The score and the points each component contributed."""

    score: int
    base: Decimal
    payment_history: Decimal
    completed_loans: Decimal
    current_year_activity: Decimal
    credit_utilisation: Decimal
    over_limit: bool


def _points(numerator: int, denominator: int) -> Decimal:
    """A component's exact points to the cent, halves up (a fraction that ends exactly at half a
    cent divides exactly in 28 digits, so it is not rounded twice)."""
    return to_money(Decimal(numerator) / denominator)


def credit_score(history: CreditHistory, limit: Decimal) -> CreditScore:
    """Score 0..100. Over the approved limit scores 0; otherwise base 40 plus:

    payment history   +35 .. -35  (share of due EMIs paid on time; 0 with nothing due yet)
    completed loans   +3 each, at most +15
    this year's loans -3 each, at most -15
    utilisation       0 .. -30    (current debt / approved limit)

    The two fractional components are kept as exact fractions (numerator, denominator) and the
    sum is rounded half up in integers: in 28-digit Decimal division 35 x (2 x 51 / 84 - 1) came
    to 7.4999…, and a sum of exactly 47.5 to 47. (The fractions module does the same exactly, at
    three times this function's cost.)"""
    pay_n, pay_d = 0, 1
    if history.emis_due:
        pay_n, pay_d = PAYMENT_WEIGHT * (2 * history.emis_paid_on_time - history.emis_due), history.emis_due
    completed = COMPLETED_LOAN_POINTS * min(history.completed_loans, COMPLETED_LOANS_CAP)
    activity = -THIS_YEAR_LOAN_PENALTY * min(history.loans_this_year, THIS_YEAR_LOANS_CAP)
    if limit > 0:  # -30 x min(debt / limit, 1), with debt / limit = share_n / share_d exactly
        debt_n, debt_d = history.current_debt.as_integer_ratio()
        limit_n, limit_d = limit.as_integer_ratio()
        share_n, share_d = debt_n * limit_d, debt_d * limit_n
        use_n, use_d = -UTILISATION_WEIGHT * min(share_n, share_d), share_d
    else:
        use_n, use_d = (-UTILISATION_WEIGHT if history.current_debt > 0 else 0), 1
    over_limit = history.current_debt > limit
    whole = BASE_POINTS + completed + activity
    # The sum rounded half up is floor(sum + 1/2): over the common denominator 2 x pay_d x use_d.
    rounded = ((2 * whole + 1) * pay_d * use_d + 2 * pay_n * use_d + 2 * use_n * pay_d) // (2 * pay_d * use_d)
    return CreditScore(
        score=0 if over_limit else max(0, min(100, rounded)),
        base=Decimal(BASE_POINTS),
        payment_history=_points(pay_n, pay_d),
        completed_loans=to_money(Decimal(completed)),
        current_year_activity=to_money(Decimal(activity)),
        credit_utilisation=_points(use_n, use_d),
        over_limit=over_limit,
    )


def minimum_rate(score: int) -> Decimal | None:
    """The lowest annual rate the score's slab allows; None when the slab approves nothing."""
    if score > 50:
        return Decimal(0)
    if score > 30:
        return Decimal(12)
    if score > 10:
        return Decimal(16)
    return None


@dataclass(frozen=True)
class LoanRequest:
    amount: Decimal
    interest_rate: Decimal
    tenure: int


@dataclass(frozen=True)
class Decision:
    approved: bool
    credit: CreditScore
    interest_rate: Decimal
    corrected_interest_rate: Decimal
    tenure: int
    monthly_installment: Decimal
    reasons: tuple[str, ...]

    @property
    def message(self) -> str:
        if self.approved:
            if self.corrected_interest_rate != self.interest_rate:
                return (
                    f"Loan approved at {self.corrected_interest_rate}% "
                    f"(the credit score {self.credit.score} requires at least that rate)"
                )
            return "Loan approved"
        return "Loan not approved: " + "; ".join(self.reasons)


def _shown(amount: Decimal) -> str:
    """An amount in a reason: to the cent, or as it is when it has more decimals (an imported
    file's limit, income or loan), which is what the rule compared."""
    cents = to_money(amount)
    return str(cents) if cents == amount else f"{amount.normalize():f}"


def decide(
    history: CreditHistory,
    monthly_income: Decimal,
    limit: Decimal,
    request: LoanRequest,
) -> Decision:
    """The eligibility decision for one loan request, on a customer's history as of one date."""
    credit = credit_score(history, limit)
    floor = minimum_rate(credit.score)
    rate = request.interest_rate if floor is None else max(request.interest_rate, floor)
    installment = monthly_installment(request.amount, rate, request.tenure)
    reasons: list[str] = []
    if floor is None:
        reasons.append(f"credit score {credit.score} is 10 or below")
    if history.current_debt + request.amount > limit:
        reasons.append(
            f"current loans ({_shown(history.current_debt)}) plus this loan ({_shown(request.amount)}) "
            f"exceed the approved limit ({_shown(limit)})"
        )
    if installment <= 0:  # nothing would ever be paid until the last month, which would owe it all
        reasons.append(
            f"the monthly installment would be {installment}: {to_money(request.amount)} is too small "
            f"to repay in cents over {request.tenure} months"
        )
    elif installment <= (interest := interest_on(to_money(request.amount), rate)):
        # The schedule's first month charges this interest: an installment no larger repays nothing,
        # every month, and the last installment would owe the whole amount.
        reasons.append(
            f"the monthly installment ({installment}) would only pay the first month's interest ({interest}): "
            f"none of {to_money(request.amount)} would be repaid before the last installment; "
            "ask for fewer months"  # always enough; a larger amount is only at low rates (not at 100% over 600)
        )
    if history.current_emis + installment > AFFORDABILITY_SHARE * monthly_income:
        reasons.append(
            f"monthly installments ({_shown(history.current_emis + installment)}) "
            f"would exceed 50% of monthly income ({_shown(monthly_income)})"
        )
    return Decision(
        approved=not reasons,
        credit=credit,
        interest_rate=request.interest_rate,
        corrected_interest_rate=rate,
        tenure=request.tenure,
        monthly_installment=installment,
        reasons=tuple(reasons),
    )
