"""The lending policy's rules, case by case and as properties."""

from __future__ import annotations

import math
from datetime import date
from decimal import ROUND_HALF_UP, localcontext
from decimal import Decimal as D
from fractions import Fraction
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.calendar import add_months, installments_due
from ledger.domain import LoanTerms
from ledger.policy import (
    CreditHistory,
    LoanFacts,
    LoanRequest,
    approved_limit,
    credit_history,
    credit_score,
    decide,
    minimum_rate,
    monthly_installment,
)
from ledger.schedule import amortization, interest_on


@pytest.mark.parametrize(
    ("principal", "rate", "tenure", "emi"),
    [
        (D(100_000), D(12), 12, D("8884.88")),
        (D(100_000), D(0), 12, D("8333.33")),
        (D(120_000), D(0), 12, D("10000.00")),
        (D(500_000), D("10.5"), 60, D("10746.95")),
        (D(1), D(100), 1, D("1.08")),
        # Exactly half a paisa, which 50 digits of 20/1200 put just below: halves go up.
        (D("4.50"), D(20), 1, D("4.58")),
        (D(12), D("0.5"), 1, D("12.01")),
        (D("3000.30"), D(20), 1, D("3050.31")),
    ],
)
def test_monthly_installment(principal: D, rate: D, tenure: int, emi: D) -> None:
    assert monthly_installment(principal, rate, tenure) == emi


@pytest.mark.parametrize(
    ("income", "limit"),
    [(D(12_500), D(500_000)), (D(12_499), D(400_000)), (D(50_000), D(1_800_000)), (D(1), D(0)), (D(4_167), D(200_000))],
)
def test_approved_limit_rounds_to_the_nearest_lakh_halves_up(income: D, limit: D) -> None:
    assert approved_limit(income) == limit


@pytest.mark.parametrize(
    ("score", "floor"),
    [(100, D(0)), (51, D(0)), (50, D(12)), (31, D(12)), (30, D(16)), (11, D(16)), (10, None), (0, None)],
)
def test_slab_boundaries(score: int, floor: D | None) -> None:
    assert minimum_rate(score) == floor


def history(**changes: object) -> CreditHistory:
    fields = CreditHistory.empty().__dict__ | changes
    return CreditHistory(**fields)  # type: ignore[arg-type]


def test_a_customer_with_no_history_scores_in_the_31_to_50_slab() -> None:
    score = credit_score(CreditHistory.empty(), D(1_000_000)).score
    assert 31 <= score <= 50


def test_debt_over_the_limit_scores_zero() -> None:
    assert credit_score(history(current_debt=D(1_000_001), current_loans=1), D(1_000_000)).score == 0
    assert credit_score(history(current_debt=D(1_000_000), current_loans=1), D(1_000_000)).score > 0


def test_requested_rate_below_the_slab_minimum_is_corrected() -> None:
    decision = decide(CreditHistory.empty(), D(100_000), D(3_600_000), LoanRequest(D(100_000), D(8), 12))
    assert decision.approved
    assert decision.corrected_interest_rate == D(12)
    assert decision.monthly_installment == D("8884.88")
    above = decide(CreditHistory.empty(), D(100_000), D(3_600_000), LoanRequest(D(100_000), D(14), 12))
    assert above.corrected_interest_rate == D(14)


def test_affordability_counts_current_emis_plus_the_new_one() -> None:
    # Half of 20,000 is 10,000: 1,115.12 already + 8,884.88 new = 10,000.00 exactly is allowed.
    ok = decide(history(current_emis=D("1115.12")), D(20_000), D(1_000_000), LoanRequest(D(100_000), D(12), 12))
    assert ok.approved
    over = decide(history(current_emis=D("1115.13")), D(20_000), D(1_000_000), LoanRequest(D(100_000), D(12), 12))
    assert not over.approved
    assert "50% of monthly income" in over.message


def test_limit_counts_current_loans_plus_the_new_one() -> None:
    at_limit = decide(history(current_debt=D(400_000)), D(1_000_000), D(500_000), LoanRequest(D(100_000), D(12), 12))
    assert at_limit.approved
    over = decide(history(current_debt=D(400_000)), D(1_000_000), D(500_000), LoanRequest(D("100000.01"), D(12), 12))
    assert not over.approved
    assert "approved limit" in over.message


def test_a_low_score_is_refused_whatever_the_rate() -> None:
    bad_payer = history(loans_taken=3, emis_due=30, emis_paid_on_time=0)
    decision = decide(bad_payer, D(1_000_000), D(10_000_000), LoanRequest(D(1000), D(30), 12))
    assert decision.credit.score <= 10
    assert not decision.approved
    assert "credit score" in decision.message


def test_installments_due_counts_due_dates_on_or_before_today() -> None:
    start = date(2026, 1, 31)
    assert add_months(start, 1) == date(2026, 2, 28)
    assert installments_due(start, 12, date(2026, 2, 27)) == 0
    assert installments_due(start, 12, date(2026, 2, 28)) == 1
    assert installments_due(start, 12, date(2026, 3, 30)) == 1
    assert installments_due(start, 12, date(2026, 3, 31)) == 2
    assert installments_due(start, 12, date(2030, 1, 1)) == 12
    assert installments_due(start, 12, date(2025, 1, 1)) == 0


money = st.decimals(min_value=0, max_value=10_000_000, places=2)
counts = st.integers(min_value=0, max_value=400)


@st.composite
def histories(draw: st.DrawFn) -> CreditHistory:
    due = draw(counts)
    return CreditHistory(
        loans_taken=draw(counts),
        completed_loans=draw(counts),
        loans_this_year=draw(counts),
        emis_due=due,
        emis_paid_on_time=draw(st.integers(min_value=0, max_value=due)),
        current_loans=draw(counts),
        current_debt=draw(money),
        current_emis=draw(money),
    )


limits = st.decimals(min_value=0, max_value=20_000_000, places=0)


@given(histories(), limits)
def test_score_never_leaves_0_to_100(h: CreditHistory, limit: D) -> None:
    assert 0 <= credit_score(h, limit).score <= 100


@given(histories(), limits, st.integers(min_value=1, max_value=50))
def test_score_never_falls_when_on_time_payments_rise(h: CreditHistory, limit: D, more: int) -> None:
    better = history(**(h.__dict__ | {"emis_paid_on_time": min(h.emis_due, h.emis_paid_on_time + more)}))
    assert credit_score(better, limit).score >= credit_score(h, limit).score


@given(histories(), limits, st.decimals(min_value=D("0.01"), max_value=5_000_000, places=2))
def test_score_never_rises_when_current_debt_rises(h: CreditHistory, limit: D, more: D) -> None:
    deeper = history(**(h.__dict__ | {"current_debt": h.current_debt + more}))
    assert credit_score(deeper, limit).score <= credit_score(h, limit).score


def test_a_sum_of_exactly_a_half_rounds_up() -> None:
    # 40 + 35 x (2 x 51 / 84 - 1) = 47.5 exactly; 28-digit Decimal division made it 47.4999... and 47.
    score = credit_score(history(emis_due=84, emis_paid_on_time=51), D(500_000))
    assert (score.score, score.payment_history) == (48, D("7.50"))
    # 40 + 35 x (2 x 2 / 3 - 1) - 30 x 75,000 / 300,000 = 40 + 35/3 - 15/2 = 44.1666...: 44; and
    # with 1 of 3 EMIs on time and a debt of 1/6 of the limit, 40 - 35/3 - 5 = 23.333...: 23.
    assert credit_score(history(emis_due=3, emis_paid_on_time=2, current_debt=D(75_000)), D(300_000)).score == 44
    assert credit_score(history(emis_due=3, emis_paid_on_time=1, current_debt=D(50_000)), D(300_000)).score == 23
    # Two repeating fractions that sum to a half: 40 + 35/3 - 30 x 65,000 / 900,000 = 40 + 35/3 - 13/6 = 49.5: 50.
    assert credit_score(history(emis_due=3, emis_paid_on_time=2, current_debt=D(65_000)), D(900_000)).score == 50


def test_a_component_of_exactly_half_a_cent_rounds_half_up() -> None:
    # 35 x (2 x 43 / 112 - 1) = -8.125 and -30 x 12,500 / 600,000 = -0.625 exactly; the 28-digit
    # divisions made them -8.1249... and -0.6249..., shown as -8.12 and -0.62.
    score = credit_score(history(emis_due=112, emis_paid_on_time=43, current_debt=D(12_500)), D(600_000))
    assert (score.payment_history, score.credit_utilisation) == (D("-8.13"), D("-0.63"))


def test_the_breakdown_shows_points_to_the_cent_and_the_score_rounds_their_exact_sum() -> None:
    # The README's example (customer 3 on 2026-11-22): 158 of 161 EMIs on time, debt at 4% of the limit.
    score = credit_score(history(emis_due=161, emis_paid_on_time=158, current_debt=D(24_000)), D(600_000))
    shown = score.base + score.payment_history + score.completed_loans + score.current_year_activity + score.credit_utilisation
    assert (score.payment_history, score.credit_utilisation, shown, score.score) == (D("33.70"), D("-1.20"), D("72.50"), 72)


def exact_score(h: CreditHistory, limit: D) -> int:
    """The README's formula in exact fractions, rounded half up and clamped: what the score must be."""
    total = Fraction(40) + 3 * min(h.completed_loans, 5) - 3 * min(h.loans_this_year, 5)
    if h.emis_due:
        total += 35 * (2 * Fraction(h.emis_paid_on_time, h.emis_due) - 1)
    if limit > 0:
        total -= 30 * min(Fraction(h.current_debt) / Fraction(limit), Fraction(1))
    elif h.current_debt > 0:
        total -= 30
    if h.current_debt > limit:
        return 0
    return math.floor(max(Fraction(0), min(Fraction(100), total)) + Fraction(1, 2))


@st.composite
def near_halves(draw: st.DrawFn) -> CreditHistory:
    """Histories whose payment term is often exactly x.5 after a division that does not end:
    35 x (2 x on_time / due - 1) with due a multiple of 28 and on_time near its half (28-digit
    Decimal division got 47.5 wrong for due 84 and on_time 45 or 51)."""
    due = draw(st.sampled_from([28, 56, 84, 112, 140, 168]))
    return history(
        emis_due=due,
        emis_paid_on_time=draw(st.integers(min_value=due // 2 - 12, max_value=due // 2 + 12)),
        completed_loans=draw(st.integers(min_value=0, max_value=6)),
    )


@settings(max_examples=400)
@given(st.one_of(histories(), near_halves()), st.one_of(limits, st.decimals(min_value=0, max_value=20_000_000, places=2)))
def test_score_is_the_exact_sum_rounded_half_up(h: CreditHistory, limit: D) -> None:
    assert credit_score(h, limit).score == exact_score(h, limit)


@given(histories(), limits)
def test_score_is_deterministic(h: CreditHistory, limit: D) -> None:
    assert credit_score(h, limit) == credit_score(h, limit)


@given(
    st.decimals(min_value=1, max_value=10_000_000, places=2),
    st.decimals(min_value=0, max_value=100, places=2),
    st.integers(min_value=1, max_value=600),
)
def test_emi_repays_at_least_the_principal(principal: D, rate: D, tenure: int) -> None:
    emi = monthly_installment(principal, rate, tenure)
    assert emi * tenure >= principal - D("0.01") * tenure
    assert emi == emi.quantize(D("0.01"))


def exact_emi(principal: D, rate: D, tenure: int) -> D:
    if rate == 0:
        paise = Fraction(principal) / tenure * 100
    else:
        r = Fraction(rate) / 1200
        growth = (1 + r) ** tenure
        paise = Fraction(principal) * r * growth / (growth - 1) * 100
    whole, rest = divmod(paise.numerator, paise.denominator)
    return D(whole + (2 * rest >= paise.denominator)).scaleb(-2)


@given(
    st.one_of(
        st.tuples(  # one month at rates in steps of 0.005%: where the exact EMI can end in half a paisa
            st.decimals(min_value=D("0.01"), max_value=100_000, places=2),
            st.integers(min_value=1, max_value=20_000).map(lambda k: D(k) / 200),
            st.just(1),
        ),
        st.tuples(
            st.decimals(min_value=D("0.01"), max_value=10_000_000, places=2),
            st.decimals(min_value=0, max_value=100, places=6),
            st.integers(min_value=1, max_value=600),
        ),
    )
)
def test_the_emi_is_the_exact_value_rounded_half_up(case: tuple[D, D, int]) -> None:
    assert monthly_installment(*case) == exact_emi(*case)


def test_a_rate_too_small_to_register_is_the_zero_rate_limit() -> None:
    assert monthly_installment(D(100_000), D("5E-324"), 12) == D("8333.33")


@given(
    st.decimals(min_value=1, max_value=10_000_000, places=2),
    st.decimals(min_value=0, max_value=40, places=2),
    st.integers(min_value=1, max_value=360),
    st.decimals(min_value=D("0.8"), max_value=D("1.5"), places=2),
)
def test_the_schedule_repays_exactly_the_amount_whatever_the_payment(
    principal: D, rate: D, tenure: int, payment_factor: D
) -> None:
    payment = (monthly_installment(principal, rate, tenure) * payment_factor).quantize(D("0.01"))
    rows = amortization(principal, rate, tenure, payment, date(2024, 1, 31))
    assert len(rows) == tenure
    assert sum(r.principal for r in rows) == principal
    assert rows[-1].balance == 0
    assert all(r.payment == r.interest + r.principal for r in rows)
    assert [r.number for r in rows] == list(range(1, tenure + 1))


@pytest.mark.parametrize("payment", [D("8884.875"), D("8884.0"), D("8884.123456")])
def test_a_files_payment_is_paid_in_cents_and_the_schedule_still_adds_up(payment: D) -> None:
    """An imported loan's monthly payment is the file's: fractions of a cent, or cents spelled
    otherwise. What is paid is in cents, each balance is the one before less its principal, and
    the principals add up to the amount."""
    rows = amortization(D(100_000), D(12), 12, payment, date(2026, 1, 15))
    assert all(r.payment == r.payment.quantize(D("0.01")) and r.principal.as_tuple().exponent == -2 for r in rows)
    assert rows[0].payment == payment.quantize(D("0.01"), rounding=ROUND_HALF_UP)
    assert sum(r.principal for r in rows) == D(100_000) and rows[-1].balance == 0
    balances = [D(100_000), *(r.balance for r in rows)]
    assert all(before - r.principal == after for before, r, after in zip(balances, rows, balances[1:], strict=False))


def test_a_schedule_at_the_computed_emi() -> None:
    rows = amortization(D(100_000), D(12), 12, D("8884.88"), date(2026, 1, 15))
    assert (rows[0].due_date, rows[0].interest, rows[0].principal, rows[0].balance) == (
        date(2026, 2, 15),
        D("1000.00"),
        D("7884.88"),
        D("92115.12"),
    )
    assert rows[-1].due_date == date(2027, 1, 15)
    assert rows[-1].payment != D("8884.88")  # the last installment absorbs the rounding...
    assert abs(rows[-1].payment - D("8884.88")) < D("0.10")  # ...which is a few paise
    assert rows[-1].balance == 0


@st.composite
def loan_terms(draw: st.DrawFn) -> LoanTerms:
    tenure = draw(st.integers(min_value=1, max_value=120))
    start = draw(st.dates(min_value=date(2015, 1, 1), max_value=date(2026, 12, 31)))
    paid = draw(st.integers(min_value=0, max_value=tenure + 2))  # an imported file may count more than the tenure
    return LoanTerms(
        loan_id=draw(st.integers(min_value=1, max_value=10**6)),
        amount=draw(st.decimals(min_value=1, max_value=10**7, places=2)),
        interest_rate=D(12),
        tenure=tenure,
        monthly_installment=draw(st.decimals(min_value=1, max_value=10**6, places=2)),
        start_date=start,
        end_date=add_months(start, draw(st.integers(min_value=0, max_value=tenure + 12))),
        emis_paid=paid,
        emis_paid_on_time=draw(st.integers(min_value=0, max_value=paid)),
    )


@given(st.lists(loan_terms(), max_size=30), st.dates(min_value=date(2015, 1, 1), max_value=date(2030, 12, 31)))
def test_the_aggregates_loans_give_the_history_their_facts_give(loans: list[LoanTerms], today: date) -> None:
    """The customer aggregate hands the policy its own loans, with no copy as `LoanFacts` (the
    read model's rows): both must give the same history, repayments left and current loans included."""
    facts = [
        LoanFacts(
            t.loan_id, t.amount, t.tenure, t.monthly_installment, t.start_date, t.end_date, t.emis_paid, t.emis_paid_on_time
        )
        for t in loans
    ]

    def repayments_left(f: LoanFacts) -> int:  # as SPEC.md defines them
        return max(0, f.tenure - f.emis_paid)

    def is_current(f: LoanFacts) -> bool:
        return f.end_date >= today and repayments_left(f) > 0

    expected = CreditHistory(
        loans_taken=len(facts),
        completed_loans=sum(repayments_left(f) == 0 for f in facts),
        loans_this_year=sum(f.start_date.year == today.year for f in facts),
        emis_due=sum(installments_due(f.start_date, f.tenure, today) for f in facts),
        # Of the paid EMIs that are due, all but the late ones (a late EMI was due when it was paid).
        emis_paid_on_time=sum(
            max(0, min(f.emis_paid, installments_due(f.start_date, f.tenure, today)) - (f.emis_paid - f.emis_paid_on_time))
            for f in facts
        ),
        current_loans=sum(is_current(f) for f in facts),
        current_debt=sum((f.amount for f in facts if is_current(f)), D(0)),
        current_emis=sum((f.monthly_installment for f in facts if is_current(f)), D(0)),
    )
    assert credit_history(loans, today) == credit_history(facts, today) == expected


def test_a_loan_whose_emi_rounds_to_zero_is_refused() -> None:
    # 0.01 at 12% over 600 months: an EMI of 0.0001 rounds to 0.00, and no installment repays anything.
    tiny = decide(CreditHistory.empty(), D(100_000), D(3_600_000), LoanRequest(D("0.01"), D(12), 600))
    assert tiny.monthly_installment == D("0.00")
    assert not tiny.approved
    assert tiny.reasons == ("the monthly installment would be 0.00: 0.01 is too small to repay in cents over 600 months",)


@pytest.mark.parametrize(
    ("balance", "rate", "interest"),
    [
        ("0.24", "25", "0.01"),  # exactly 0.005
        ("15000.24", "25", "312.51"),  # exactly 312.505
        ("1530", "19", "24.23"),  # exactly 24.225
        ("100000", "12", "1000.00"),
        ("1000", "10", "8.33"),  # 8.333...
        ("1000", "11", "9.17"),  # 9.1666...
    ],
)
def test_a_months_interest_is_the_balance_times_the_rate_over_1200_rounded_once_halves_up(
    balance: str, rate: str, interest: str
) -> None:
    assert interest_on(D(balance), D(rate)) == D(interest)
    assert amortization(D(balance), D(rate), 2, D(balance), date(2026, 1, 1))[0].interest == D(interest)


def test_a_files_payment_below_the_interest_grows_the_balance_and_the_last_installment_owes_it() -> None:
    """An imported loan's payment is a fact, even one that never repays: the schedule still adds
    up, however far the balance grows (900 million at 100% over 600 months with nothing paid
    overflowed the default 28 digits: a 500 on its schedule and its repayments)."""
    rows = amortization(D(900_000_000), D(100), 600, D(0), date(2025, 1, 1))
    assert all(r.payment == 0 and r.principal == r.interest.copy_negate() for r in rows[:-1])
    assert all(earlier.balance < later.balance for earlier, later in pairwise(rows[:-1]))
    with localcontext() as exact:  # the test's own sums, as exact as the schedule's
        exact.prec = 60
        assert sum(r.principal for r in rows) == D(900_000_000) and rows[-1].balance == 0
        assert rows[-1].payment == rows[-2].balance + rows[-1].interest > D(10) ** 29


@pytest.mark.parametrize(
    ("amount", "rate", "tenure", "installment", "interest"),
    [
        # From a review: each EMI equals the first month's interest, so the principal never falls and
        # the last installment owes it all (101.00, 1,083,333.33, 152,015.76, 216,812.98, 1.08).
        ("100", "12", 600, "1.00", "1.00"),
        ("1000000", "100", 600, "83333.33", "83333.33"),
        ("144873.50", "59.16", 597, "7142.26", "7142.26"),
        ("206112.32", "62.3", 382, "10700.66", "10700.66"),
        ("1", "100", 600, "0.08", "0.08"),
        ("0.50", "12", 600, "0.01", "0.01"),  # half a paisa of interest rounds up to the EMI's cent
        # Exact half paise of interest, which a monthly rate rounded to 28 digits put just under the
        # half and rounded down (from reviews): 15000.24 x 25 / 1200 is 312.505, 1530 x 19 / 1200 is 24.225.
        ("15000.24", "25", 600, "312.51", "312.51"),
        ("1530", "19", 600, "24.23", "24.23"),
    ],
)
def test_a_loan_whose_emi_only_pays_the_interest_is_refused(
    amount: str, rate: str, tenure: int, installment: str, interest: str
) -> None:
    decision = decide(CreditHistory.empty(), D(10_000_000), D(10**12), LoanRequest(D(amount), D(rate), tenure))
    assert (decision.monthly_installment, decision.approved) == (D(installment), False)
    assert decision.reasons == (
        f"the monthly installment ({installment}) would only pay the first month's interest ({interest}): none of"
        f" {D(amount).quantize(D('0.01'))} would be repaid before the last installment; ask for fewer months",
    )
    schedule = amortization(D(amount), D(rate), tenure, decision.monthly_installment, date(2026, 1, 1))
    assert schedule[0].principal == 0 and schedule[-1].principal == D(amount)  # what it refuses: the last owes it all


@pytest.mark.parametrize(
    ("amount", "rate", "installment", "principal"),
    [
        ("1000", "12", "10.03", "0.03"),  # interest 10.00, EMI 10.03 (exactly 10.0256...)
        ("1504", "19", "23.82", "0.01"),  # interest 23.8133... (23.81): the EMI repays a cent
    ],
)
def test_a_loan_whose_emi_repays_some_principal_each_month_is_approved(
    amount: str, rate: str, installment: str, principal: str
) -> None:
    decision = decide(CreditHistory.empty(), D(10_000_000), D(10**12), LoanRequest(D(amount), D(rate), 600))
    assert (decision.monthly_installment, decision.approved) == (D(installment), True)
    schedule = amortization(D(amount), D(rate), 600, decision.monthly_installment, date(2026, 1, 1))
    assert schedule[0].principal == D(principal) and schedule[-1].balance == 0


def test_a_reason_shows_an_imported_amounts_fraction_of_a_cent_which_the_rule_compared() -> None:
    # An imported approved limit of 500000.555: a loan of 500000.56 is over it, by half a paisa.
    over = decide(CreditHistory.empty(), D(100_000_000), D("500000.555"), LoanRequest(D("500000.56"), D(14), 600))
    assert over.reasons == ("current loans (0.00) plus this loan (500000.56) exceed the approved limit (500000.555)",)
    dear = decide(history(current_emis=D("0.004")), D("12345.678"), D(10_000_000), LoanRequest(D(100_000), D(14), 12))
    assert dear.reasons == ("monthly installments (8978.714) would exceed 50% of monthly income (12345.678)",)
