"""The shared domain vocabulary: the bounded sample of a long run of refs."""

import uuid

from booking.runtime.domain import EventIds, keep_ends


def sampled(items: list[str], size: int) -> tuple[list[str], list[str]]:
    first: list[str] = []
    last: list[str] = []
    for item in items:
        keep_ends(first, last, item, size)
    return first, last


class TestKeepEnds:
    def test_a_short_run_is_kept_whole_in_order(self):
        assert sampled(["a", "b", "c"], 3) == (["a", "b", "c"], [])

    def test_a_long_run_keeps_its_first_and_its_latest_items(self):
        items = [str(n) for n in range(1000)]

        first, last = sampled(items, 3)

        assert (first, last) == (["0", "1", "2"], ["997", "998", "999"])

    def test_an_item_seen_again_is_kept_once_and_counts_as_latest(self):
        first, last = sampled(["a", "b", "c", "d", "c", "a", "e", "c"], 2)

        assert (first, last) == (["a", "b"], ["e", "c"])


class TestEventIds:
    def test_one_fact_gives_one_id_and_different_facts_differ(self):
        ids = EventIds(uuid.UUID("9c4f3a56-2be1-4d0b-8f43-6a1e0c7d5b21"))
        order = uuid.uuid4()
        assert ids("OrderCancelled", order) == ids("OrderCancelled", order)
        assert ids("OrderCancelled", order) != ids("OrderConfirmed", order)
        # The parts are joined with ':', so ids recorded before the parts were split stay equal.
        assert ids("OrderCancelled", order) == ids(f"OrderCancelled:{order}")

    def test_services_do_not_share_ids(self):
        fact = ("failed", uuid.uuid4(), 1)
        assert EventIds(uuid.uuid4())(*fact) != EventIds(uuid.uuid4())(*fact)
