"""The answers an API process keeps: dropped by the projection's notices, never kept from a read
that a notice may have overtaken, and never served while another process may have seen more."""

from __future__ import annotations

import asyncio
from datetime import date, timedelta
from pathlib import Path

from api.querycache import _RECENT_NOTICES, KeptAnswers
from api.readyourwrites import PositionWatcher, SharedPosition
from projections.projector import CHANGES_CHANNEL, NOTIFY_CHANNEL, STORE_RECREATED, changes_notice

DAY = date(2026, 11, 22)


def kept(answers: KeptAnswers, customer_id: int, value: object, today: date = DAY) -> None:
    assert answers.keep(customer_id, "loans", value, answers.since(), today)


def test_an_answer_is_kept_until_a_notice_names_its_customer() -> None:
    answers = KeptAnswers()
    kept(answers, 1, "one")
    kept(answers, 2, "two")
    answers.changed([2, 3])
    assert answers.get(1, "loans", DAY) == "one"
    assert answers.get(2, "loans", DAY) is None


def test_a_notice_that_names_no_one_drops_everything() -> None:
    answers = KeptAnswers()
    kept(answers, 1, "one")
    answers.keep_loan(1, 10, b"loan 10", answers.since())
    answers.changed(None)
    assert answers.get(1, "loans", DAY) is None
    assert answers.loan(10) is None


def test_a_read_overtaken_by_a_notice_for_its_customer_is_not_kept() -> None:
    answers = KeptAnswers()
    since = answers.since()  # the read starts ...
    answers.changed([7])  # ... the projection commits a change to customer 7 meanwhile ...
    assert not answers.keep(7, "loans", "maybe stale", since, DAY)  # ... so the read may predate it
    assert answers.get(7, "loans", DAY) is None
    assert answers.keep(8, "loans", "fresh", since, DAY)  # a notice for someone else leaves customer 8 alone
    assert answers.get(8, "loans", DAY) == "fresh"


def test_a_read_older_than_the_notices_remembered_is_not_kept() -> None:
    answers = KeptAnswers()
    since = answers.since()
    for _ in range(_RECENT_NOTICES + 1):
        answers.changed([99])
    assert not answers.keep(1, "loans", "unknown", since, DAY)
    assert answers.keep(1, "loans", "known", answers.since(), DAY)


def test_dated_answers_are_for_their_day_only() -> None:
    answers = KeptAnswers()
    kept(answers, 1, "today")
    assert answers.get(1, "loans", DAY + timedelta(days=1)) is None
    kept(answers, 1, "tomorrow", DAY + timedelta(days=1))
    assert answers.get(1, "loans", DAY) is None  # yesterday's answer went with the new day


def test_nothing_kept_is_served_while_the_notices_are_behind() -> None:
    current = True
    answers = KeptAnswers(trusted=lambda: current)
    kept(answers, 1, "one")
    answers.keep_loan(1, 10, b"loan 10", answers.since())
    current = False
    assert answers.get(1, "loans", DAY) is None
    assert answers.loan(10) is None
    current = True
    assert answers.get(1, "loans", DAY) == "one"
    assert answers.loan(10) == b"loan 10"


def test_a_loan_answer_goes_with_its_customer() -> None:
    answers = KeptAnswers()
    answers.keep_loan(1, 10, b"loan 10", answers.since())
    answers.keep_loan(2, 20, b"loan 20", answers.since())
    answers.changed([1])
    assert answers.loan(10) is None
    assert answers.loan(20) == b"loan 20"


def test_size_bounds_customers_and_loans() -> None:
    answers = KeptAnswers(size=2)
    for customer_id in (1, 2, 3):
        kept(answers, customer_id, customer_id)
    assert len(answers) == 2 and answers.get(1, "loans", DAY) is None  # the oldest went
    for loan_id in range(100, 100 + answers.loan_size + 1):
        answers.keep_loan(3, loan_id, loan_id, answers.since())
    assert answers.loan(100) is None and answers.loan(101) == 101
    assert KeptAnswers(size=0).keep(1, "loans", "x", 0, DAY) is False


def test_the_least_recently_used_answer_makes_room() -> None:
    answers = KeptAnswers(size=2)
    kept(answers, 1, "one")
    kept(answers, 2, "two")
    assert answers.get(1, "loans", DAY) == "one"  # served: customer 1 is now the most recent
    kept(answers, 3, "three")
    assert answers.get(1, "loans", DAY) == "one" and answers.get(2, "loans", DAY) is None
    loans = KeptAnswers(size=1)  # room for two view-loan answers
    loans.keep_loan(1, 10, b"10", loans.since())
    loans.keep_loan(1, 11, b"11", loans.since())
    assert loans.loan(10) == b"10"
    loans.keep_loan(1, 12, b"12", loans.since())
    assert (loans.loan(10), loans.loan(11), loans.loan(12)) == (b"10", None, b"12")


def test_the_changes_notice_lists_customers_while_they_fit_a_notify() -> None:
    assert changes_notice(41, [3, 5]) == "41 3,5"
    assert changes_notice(41, []) == "41 "
    many = changes_notice(42, range(10**9, 10**9 + 1_000))  # 11,000 bytes listed: more than a NOTIFY takes
    assert many == "42 *"


def test_processes_share_the_highest_position_through_their_file(tmp_path: Path) -> None:
    path = tmp_path / "position"
    path.write_bytes(bytes(8))  # as `ledger api` makes it
    first, second = SharedPosition(str(path)), SharedPosition(str(path))
    try:
        first.raise_to(120)
        assert second.get() == 120
        second.raise_to(90)  # a process further behind does not lower it
        assert first.get() == 120
    finally:
        first.close()
        second.close()


def test_a_position_is_described_only_by_the_changes_notice_just_before_it() -> None:
    """The projector's commit sends the changes, then the position. A rebuild sends the position
    alone, often the same one the last page had: that must drop everything, not count as described."""
    drops: list[object] = []
    watcher = PositionWatcher("", on_change=drops.append)
    watcher._notice(CHANGES_CHANNEL, "5 1,2")
    watcher._notice(NOTIFY_CHANNEL, "5")
    assert drops == [[1, 2]] and watcher.position == 5
    watcher._notice(NOTIFY_CHANNEL, "5")  # a rebuild: the same position, no changes notice
    assert drops == [[1, 2], None]
    watcher._notice(CHANGES_CHANNEL, "6 ")  # a page that changed no one kept
    watcher._notice(NOTIFY_CHANNEL, "6")
    watcher._notice(CHANGES_CHANNEL, "7 *")  # more than a NOTIFY can list
    watcher._notice(NOTIFY_CHANNEL, "7")
    assert drops == [[1, 2], None, [], None] and watcher.position == 7


def test_after_the_store_is_recreated_a_wait_is_for_the_new_stores_positions() -> None:
    """A recreated event store counts from 1 again. The projector announces 0 when it empties the
    read model for it (or a rebuild of the new store announces its own position, with no changes
    notice): a command's wait must not end on the old store's height."""

    async def scenario() -> None:
        drops: list[object] = []
        watcher = PositionWatcher("", on_change=drops.append)
        watcher._notice(CHANGES_CHANNEL, "900 4")
        watcher._notice(NOTIFY_CHANNEL, "900")
        watcher._notice(CHANGES_CHANNEL, "850 4")  # a page sent before the position read at connection
        watcher._notice(NOTIFY_CHANNEL, "850")
        assert watcher.position == 900 and drops == [[4], [4]]
        watcher._behind = 950  # the last check saw the old read model further on
        watcher._notice(NOTIFY_CHANNEL, str(STORE_RECREATED))
        assert drops == [[4], [4], None] and watcher.position == 0 and watcher._behind is None
        assert not await watcher.wait_for(3, timeout=0.05)  # the new store's event 3 is not projected yet
        watcher._notice(CHANGES_CHANNEL, "3 1")
        watcher._notice(NOTIFY_CHANNEL, "3")
        assert await watcher.wait_for(3, timeout=0.05)
        assert watcher.shared.get() == 900  # never lowered: kept answers wait for the new store to pass it

        rebuilt = PositionWatcher("", on_change=drops.append)  # a store recreated, then rebuilt
        rebuilt._notice(CHANGES_CHANNEL, "900 4")
        rebuilt._notice(NOTIFY_CHANNEL, "900")
        rebuilt._notice(NOTIFY_CHANNEL, "100")  # the rebuild's swap: its position, no changes notice
        assert rebuilt.position == 100 and drops[-1] is None
        assert not await rebuilt.wait_for(101, timeout=0.05)

    asyncio.run(scenario())
