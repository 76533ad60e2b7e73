"""An import through the real worker with its loan sheet read in two processes (infra.xlsx_split):
the helper process starts from a Celery pool process, and the import comes out as it does with one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from infra.xlsx import read_history
from tests.stress.conftest import Served, follow


def test_an_import_whose_loan_sheet_a_helper_process_reads_half_of_comes_out_whole(
    served: Served, figures: dict[str, Any]
) -> None:
    served.stop("worker")
    served.start_worker(IMPORT_SPLIT_SIZE="0")  # every .xlsx sheet, however small, read in two processes
    with served.client() as client:
        done = follow(client, client.post("/imports").json()["job_id"])
    assert done["state"] == "completed", done
    summary = done["summary"]
    assert (summary["customers_imported"], summary["loans_imported"], summary["rows_rejected"]) == (300, 782, 0)
    assert len(summary["rekeyed_loans"]) == 29
    log = served.log("worker")
    assert "loan_data.xlsx: a helper process reads the rows from row" in log
    assert "reading its half here" not in log and "reading it whole" not in log  # the helper's half was used
    assert served.scalar("SELECT count(*) FROM readmodel.loans WHERE origin = 'imported'") == 782
    assert served.scalar("SELECT count(DISTINCT source_loan_id) FROM readmodel.loans WHERE origin = 'imported'") == 782 - 29
    files = Path(served.env["IMPORT_DIR"])
    _, loans, _ = read_history(files / "customer_data.xlsx", files / "loan_data.xlsx", split_size=1 << 62)  # one reader
    with served.connect() as conn:
        rows = conn.execute(
            "SELECT source_loan_id, customer_id, loan_amount, interest_rate, monthly_installment, start_date, emis_paid_on_time"
            " FROM readmodel.loans WHERE origin = 'imported'"
        ).fetchall()
    assert sorted(rows) == sorted(
        (ln.loan_id, ln.customer_id, ln.amount, ln.interest_rate, ln.monthly_payment, ln.start_date, ln.emis_paid_on_time)
        for ln in loans
    )
    figures.update(**served.audit())
