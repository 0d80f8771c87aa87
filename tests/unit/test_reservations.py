from __future__ import annotations

from kubenova.handlers.controller.placement import Usage
from kubenova.handlers.controller.reservations import Reservations


def test_binds_count_until_the_index_has_them() -> None:
    reservations = Reservations()
    reservations.add("a", "n1", Usage(1, 100))
    reservations.add("b", "n1", Usage(2, 200))
    assert reservations.totals({}) == {"n1": Usage(3, 300)}
    # The index caught up with "a": it is counted once, from the index.
    assert reservations.totals({"n1": [("a", Usage(1, 100))]}) == {"n1": Usage(3, 300)}
    assert reservations.totals({"n1": [("a", Usage(1, 100)), ("b", Usage(2, 200))]}) == {"n1": Usage(3, 300)}
    assert reservations.totals({}) == {}, "once seen, a reservation is gone"
