"""How the projector turns a page of stored events into rows (no database: `Projector.collect`).

A customer's imported history goes in as COPY text straight from its stored JSON; it must say
exactly what its decoded event would, and any state that COPY would need escaped, or that is not
the mapper's plain JSON, goes through the decoded event instead.
"""

from __future__ import annotations

import typing
from datetime import date
from decimal import Decimal
from typing import Any
from uuid import UUID

from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper

from ledger.application import Ledger
from ledger.domain import Customer, LoanTerms, PhoneNumber
from ledger.mapper import _state_type
from projections.projector import (
    SMALL_PAGE,
    Projector,
    Stored,
    _customer_row,
    _HistoryText,
    _loan_row,
    _LoanText,
)


def _ledger() -> Ledger:
    return Ledger({"PERSISTENCE_MODULE": "eventsourcing.popo"})


def _terms(loan_id: int, source_loan_id: int | None = None) -> LoanTerms:
    return LoanTerms(
        loan_id=loan_id,
        amount=Decimal("1000000.0"),
        interest_rate=Decimal("13.63"),
        tenure=45,
        monthly_installment=Decimal("28506.0"),
        start_date=date(2014, 8, 19),
        end_date=date(2018, 5, 19),
        emis_paid=44,
        emis_paid_on_time=43,
        source_loan_id=source_loan_id,
    )


def _history(customer_id: int, first_name: str = "Karan", source_customer_id: int | None = None) -> Any:
    customer = Customer.import_history(
        customer_id,
        first_name,
        "Joshi",
        56,
        f"94746{customer_id:05d}",
        Decimal("233000.0"),
        Decimal("8400000.0"),
        [_terms(customer_id * 10, source_loan_id=customer_id * 10 + 1), _terms(customer_id * 10 + 2)],
        source_customer_id,
    )
    (event,) = customer.collect_events()
    return event


def _page(mapper: Mapper, events: list[DomainEventProtocol[Any]]) -> list[Stored]:
    """`events` as stored, padded with phone claims to a page large enough for COPY."""
    padding = [PhoneNumber.claim(f"90000{n:05d}", n).collect_events()[0] for n in range(SMALL_PAGE + 1 - len(events))]
    stored = [mapper.to_stored_event(event) for event in [*events, *padding]]
    return [
        (position, UUID(str(s.originator_id)), s.originator_version, s.topic, s.state) for position, s in enumerate(stored, 1)
    ]


def _copy_text(row: tuple[Any, ...] | list[Any]) -> str:
    """A row as psycopg sends it to COPY: NULL as \\N, Decimals by str(), dates in ISO format."""
    return "\t".join("\\N" if value is None else str(value) for value in row) + "\n"


def test_an_imported_history_becomes_the_copy_text_of_its_decoded_event() -> None:
    app = _ledger()
    events = [_history(1, source_customer_id=501), _history(2)]
    stored = _page(app.mapper, events)
    page = Projector(app, "").collect(stored)

    assert page.customers == [] and page.loans == []  # nothing went through the decoded events
    decoded: list[Any] = [app.mapper.to_domain_event(app.mapper.to_stored_event(e)) for e in events]
    customers = [_customer_row(e, "imported", position) for position, e in enumerate(decoded, 1)]
    loans = [_loan_row(terms, e.customer_id, "imported") for e in decoded for terms in e.loans]
    assert page.loan_text == [_copy_text(row) for row in loans]
    assert len(page.loan_text) == 4 and "\t\\N\t" in page.loan_text[1]  # a loan without a source ID
    # The recorded time: ISO with a Z from the JSON, where psycopg would send +00:00; the same instant.
    for line, row in zip(page.customer_text, customers, strict=True):
        recorded_at = row[9].isoformat().replace("+00:00", "Z")
        assert line == _copy_text([*row[:9], "@", row[10]]).replace("@", recorded_at)
    assert page.customer_text[0].startswith("501\t1\tKaran\t") and page.customer_text[1].startswith("\\N\t2\t")


def test_a_state_copy_would_need_escaped_goes_through_its_decoded_event() -> None:
    app = _ledger()
    names = ["Tab\there", "Back\\slash", 'Say "hi"', "New\nline", "Ren\u00e9e"]
    events = [_history(n, first_name=name) for n, name in enumerate(names, 1)]
    page = Projector(app, "").collect(_page(app.mapper, events))

    # JSON escapes the first four (a backslash in the stored state); the accent needs no escape.
    assert [row[2] for row in page.customers] == names[:4]
    assert len(page.loans) == 8
    assert [line.split("\t")[2] for line in page.customer_text] == ["Ren\u00e9e"]
    assert len(page.loan_text) == 2


def test_the_librarys_tagged_json_goes_through_its_decoded_event() -> None:
    app = _ledger()
    legacy: Mapper[UUID] = Mapper(transcoder=app.construct_transcoder())
    stored = _page(app.mapper, [])
    tagged = legacy.to_stored_event(_history(7))
    assert b'"_type_":' in tagged.state
    stored[0] = (1, UUID(str(tagged.originator_id)), tagged.originator_version, tagged.topic, tagged.state)
    page = Projector(app, "").collect(stored)
    assert page.customer_text == [] and [row[1] for row in page.customers] == [7] and len(page.loans) == 2


def test_a_small_page_keeps_decoded_rows_for_its_inserts() -> None:
    app = _ledger()
    stored = _page(app.mapper, [_history(3)])[:SMALL_PAGE]
    page = Projector(app, "").collect(stored)
    assert page.small and page.customer_text == [] and len(page.customers) == 1 and len(page.loans) == 2


def test_events_the_read_model_ignores_are_never_decoded() -> None:
    app = _ledger()
    stored = _page(app.mapper, [_history(4)])
    position, originator_id, version, topic, _ = stored[-1]
    assert topic.endswith("PhoneNumber.Claimed")
    stored[-1] = (position, originator_id, version, topic, b"not json at all")
    page = Projector(app, "").collect(stored)
    assert len(page.customer_text) == 1 and page.position == len(stored) and page.size == SMALL_PAGE + 1


def test_the_text_views_read_the_fields_the_domain_events_store() -> None:
    # A second version of the event would be upcast by the mapper, which the text path skips.
    assert getattr(Customer.HistoryImported, "class_version", 1) == 1 and _state_type(Customer.HistoryImported) is not None
    stored = typing.get_type_hints(Customer.HistoryImported)
    assert set(_HistoryText.__struct_fields__) - {"timestamp"} <= stored.keys()
    assert {"customer_id", "first_name", "last_name", "age", "phone_number", "monthly_income", "approved_limit"} <= set(
        _HistoryText.__struct_fields__
    )
    assert _LoanText.__struct_fields__ == LoanTerms.__struct_fields__
    assert _LoanText.__struct_defaults__ == LoanTerms.__struct_defaults__
