"""The shared domain vocabulary: the bounded sample of a long run of refs."""

from booking.runtime.domain import keep_ends


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
