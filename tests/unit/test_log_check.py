"""The bad-input test's log check (tests.helpers.log_problems) on logs written the way kubenova writes
them."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

from tests.helpers import log_problems

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # kubenova.cli's


def logged(write: Callable[[logging.Logger], None]) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(FORMAT))
    log = logging.getLogger(f"kubenova.test.{id(out)}")
    log.addHandler(handler)
    log.propagate = False
    try:
        write(log)
    finally:
        log.removeHandler(handler)
    return out.getvalue()


def test_a_handler_that_raised_is_found() -> None:
    def handler(log: logging.Logger) -> None:
        log.info("reconciling x1")
        try:
            raise KeyError("spec")
        except KeyError:
            log.exception("reconciling x1 failed")
        log.info("next")

    problems = log_problems(logged(handler))
    assert len(problems) == 2, problems  # the ERROR line and its traceback
    assert "reconciling x1 failed" in problems[0] and "KeyError: 'spec'" in problems[1]


def test_warnings_and_kopf_retries_are_not_failures() -> None:
    def calm(log: logging.Logger) -> None:
        log.warning("API error on abc: Conflict; trying again later")
        log.info("bound default/vm to node-0")

    text = logged(calm) + (
        "2026-11-29 06:44:51,095 ERROR kopf._cogs.clients.watching: Request attempt #1 failed; "
        "will retry: GET https://127.0.0.1:26443/apis/x -> APITooManyRequestsError('storage')\n"
    )
    assert log_problems(text) == []


def test_any_other_error_line_is_a_failure() -> None:
    text = logged(lambda log: log.error("cannot write the status of x1"))
    assert len(log_problems(text)) == 1
