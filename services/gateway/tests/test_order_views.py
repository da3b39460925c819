"""The order views the gateway keeps from the order changes feed: rules alone, no servers."""

from __future__ import annotations

import uuid

from booking.gateway.order_views import OrderViews
from booking.runtime.auth import Identity, Role

MENTEE = Identity(sub="mentee-1", role=Role.MENTEE)
OTHER_MENTEE = Identity(sub="mentee-2", role=Role.MENTEE)
ADMIN = Identity(sub="admin-1", role=Role.ADMIN)


class Feed:
    consuming = True


def views(size: int = 100) -> tuple[OrderViews, Feed]:
    feed = Feed()
    return OrderViews(lambda: feed.consuming, size=size), feed


def body(version: int) -> bytes:
    return b'{"version":%d}' % version


def read_by(kept: OrderViews, order_id: uuid.UUID, reader: Identity, version: int) -> None:
    """A read sent on to orders, which answered `reader` 200 at `version`."""
    kept.answered(kept.expect(order_id), reader, body(version), version)


class TestWhoIsAnswered:
    def test_nothing_is_answered_before_orders_answered_a_read(self):
        kept, _ = views()
        order_id = uuid.uuid4()
        assert kept.answer(order_id, ADMIN) is None
        kept.expect(order_id)
        assert kept.answer(order_id, ADMIN) is None  # a placeholder has nothing to show

    def test_the_mentee_orders_answered_is_answered_and_no_other_mentee(self):
        kept, _ = views()
        order_id = uuid.uuid4()
        read_by(kept, order_id, MENTEE, 1)
        assert kept.answer(order_id, MENTEE) == body(1)
        assert kept.answer(order_id, OTHER_MENTEE) is None  # orders decides: its 404
        assert kept.answer(order_id, ADMIN) == body(1)

    def test_an_admins_read_makes_no_mentee_a_reader(self):
        kept, _ = views()
        order_id = uuid.uuid4()
        read_by(kept, order_id, ADMIN, 1)
        assert kept.answer(order_id, ADMIN) == body(1)
        assert kept.answer(order_id, MENTEE) is None

    def test_a_refused_read_leaves_nothing(self):
        kept, _ = views()
        order_id = uuid.uuid4()
        kept.not_answered(kept.expect(order_id))
        assert not kept.watches(str(order_id))


class TestKeptCurrent:
    def test_a_higher_version_from_the_feed_replaces_the_view_and_a_lower_does_not(self):
        kept, _ = views()
        order_id = uuid.uuid4()
        read_by(kept, order_id, MENTEE, 2)
        kept.changed(str(order_id), 3, body(3))
        assert kept.answer(order_id, MENTEE) == body(3)
        kept.changed(str(order_id), 2, body(2))  # late, or delivered twice
        assert kept.answer(order_id, MENTEE) == body(3)

    def test_a_change_that_arrives_while_orders_answers_wins_over_the_older_answer(self):
        kept, _ = views()
        order_id = uuid.uuid4()
        ticket = kept.expect(order_id)
        kept.changed(str(order_id), 4, body(4))  # committed after orders read version 3
        kept.answered(ticket, MENTEE, body(3), 3)
        assert kept.answer(order_id, MENTEE) == body(4)

    def test_changes_of_orders_nobody_read_are_not_kept(self):
        kept, _ = views()
        kept.changed(str(uuid.uuid4()), 1, body(1))
        assert len(kept) == 0

    def test_an_order_changed_through_this_replica_is_read_from_orders_next(self):
        kept, _ = views()
        order_id = uuid.uuid4()
        read_by(kept, order_id, ADMIN, 1)
        kept.forget(order_id)
        assert kept.answer(order_id, ADMIN) is None


class TestNeverOlderThanTheFeed:
    def test_nothing_is_answered_while_the_feed_does_not_consume(self):
        kept, feed = views()
        order_id = uuid.uuid4()
        read_by(kept, order_id, MENTEE, 1)
        feed.consuming = False
        assert kept.answer(order_id, MENTEE) is None
        feed.consuming = True
        assert kept.answer(order_id, MENTEE) == body(1)

    def test_an_answer_that_comes_back_while_the_feed_does_not_consume_is_not_kept(self):
        kept, feed = views()
        order_id = uuid.uuid4()
        ticket = kept.expect(order_id)
        feed.consuming = False
        kept.answered(ticket, MENTEE, body(1), 1)
        feed.consuming = True
        assert kept.answer(order_id, MENTEE) is None

    def test_a_gap_in_the_feed_forgets_everything_and_answers_sent_before_it(self):
        kept, _ = views()
        order_id, pending = uuid.uuid4(), uuid.uuid4()
        read_by(kept, order_id, MENTEE, 1)
        ticket = kept.expect(pending)
        kept.forget_all()
        assert kept.answer(order_id, MENTEE) is None
        kept.expect(pending)  # read again after the gap
        kept.answered(ticket, MENTEE, body(1), 1)  # the answer to the read before it
        assert kept.answer(pending, MENTEE) is None


class TestBounded:
    def test_the_least_recently_read_order_goes_first(self):
        kept, _ = views(size=2)
        first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        read_by(kept, first, MENTEE, 1)
        read_by(kept, second, MENTEE, 1)
        assert kept.answer(first, MENTEE) == body(1)  # read: now the most recent
        read_by(kept, third, MENTEE, 1)
        assert len(kept) == 2
        assert kept.answer(second, MENTEE) is None
        assert kept.answer(first, MENTEE) == body(1)
        assert kept.answer(third, MENTEE) == body(1)
