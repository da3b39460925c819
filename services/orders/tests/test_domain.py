"""The orders domain: money, the order and session status machines, booking times. No I/O."""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import uuid4

import pytest

from booking.orders.domain import (
    CLOCK_SKEW,
    LIVE_SESSION_STATUSES,
    BookedSession,
    CurrencyMismatch,
    Escrow,
    EscrowStatus,
    InvalidBooking,
    InvalidOffering,
    Mentor,
    Money,
    Order,
    OrderStatus,
    SessionStatus,
    Underpayment,
    cancel_booking,
    check_price,
    fail_unopened_payment,
    plan_session,
)
from booking.runtime.domain import IllegalTransition, InvalidMoney

T0 = datetime(2030, 1, 6, 9, 0, tzinfo=UTC)
LATER = T0 + timedelta(minutes=5)
PRICE = 120_000  # 120 TND in millimes


def make_order(status: OrderStatus = OrderStatus.PENDING, **changes: object) -> Order:
    order = Order(
        id=uuid4(),
        mentee_id="mentee-1",
        mentor_id=uuid4(),
        offering_id=uuid4(),
        amount=Money(PRICE, "TND"),
        created_at=T0,
        updated_at=T0,
    )
    order.status = status
    for name, value in changes.items():
        setattr(order, name, value)
    return order


def make_session(status: SessionStatus = SessionStatus.PENDING_PAYMENT) -> BookedSession:
    session = BookedSession(
        id=uuid4(),
        order_id=uuid4(),
        mentor_id=uuid4(),
        start_at=T0 + timedelta(days=1),
        end_at=T0 + timedelta(days=1, hours=1),
    )
    session.status = status
    return session


class TestMoney:
    def test_an_integer_amount_and_an_iso_code_make_money(self) -> None:
        money = Money(120_000, "TND")
        assert (money.amount, money.currency) == (120_000, "TND")

    def test_zero_is_an_amount(self) -> None:
        assert Money(0, "EUR").amount == 0

    @pytest.mark.parametrize("amount", [-1, 1.5, 120000.0, True, False, Decimal("1"), "100", None])
    def test_anything_but_a_non_negative_int_is_refused(self, amount: object) -> None:
        with pytest.raises(InvalidMoney):
            Money(amount, "TND")  # type: ignore[arg-type]

    @pytest.mark.parametrize("currency", ["tnd", "TN", "TNDX", "", "T1D", None, 788])
    def test_a_currency_must_be_three_upper_case_letters(self, currency: object) -> None:
        with pytest.raises(InvalidMoney):
            Money(100, currency)  # type: ignore[arg-type]

    def test_money_is_a_value(self) -> None:
        assert Money(5, "TND") == Money(5, "TND")
        assert Money(5, "TND") != Money(5, "EUR")


# -- the order status machine --------------------------------------------------------------------

OrderMove = Callable[[Order], object]

ORDER_MOVES: dict[str, tuple[OrderMove, OrderStatus]] = {
    "awaiting_payment": (
        lambda o: o.awaiting_payment("ref-1", "https://pay.example/ref-1", LATER),
        OrderStatus.AWAITING_PAYMENT,
    ),
    "set_amount_paid": (lambda o: o.set_amount_paid(PRICE, "TND", LATER), OrderStatus.PAID),
    "confirm": (lambda o: o.confirm(LATER), OrderStatus.CONFIRMED),
    "fail_payment": (lambda o: o.fail_payment(LATER), OrderStatus.PAYMENT_FAILED),
    "cancel": (lambda o: o.cancel(LATER), OrderStatus.CANCELLED),
}

# Written out by hand from docs/states.md, not derived from the code under test.
LEGAL_ORDER_MOVES = {
    (OrderStatus.PENDING, "awaiting_payment"),
    (OrderStatus.PENDING, "set_amount_paid"),  # PaymentCompleted before PaymentInitiated
    (OrderStatus.PENDING, "fail_payment"),  # PaymentInitiationFailed
    (OrderStatus.PENDING, "cancel"),
    (OrderStatus.AWAITING_PAYMENT, "set_amount_paid"),
    (OrderStatus.AWAITING_PAYMENT, "fail_payment"),
    (OrderStatus.AWAITING_PAYMENT, "cancel"),
    (OrderStatus.PAID, "confirm"),
    (OrderStatus.PAID, "cancel"),
    (OrderStatus.CONFIRMED, "cancel"),
}
ALL_ORDER_MOVES = [(status, move) for status in OrderStatus for move in ORDER_MOVES]


class TestOrderStatusMachine:
    def test_a_new_order_is_pending_and_unpaid(self) -> None:
        order = make_order()
        assert order.status is OrderStatus.PENDING
        assert order.amount_paid == 0
        assert order.payment_ref is None and order.pay_url is None
        assert not order.is_paid

    @pytest.mark.parametrize(
        ("start", "move"), [m for m in ALL_ORDER_MOVES if m in LEGAL_ORDER_MOVES]
    )
    def test_every_legal_move_lands_in_its_state_and_stamps_the_time(
        self, start: OrderStatus, move: str
    ) -> None:
        order = make_order(start)
        action, target = ORDER_MOVES[move]
        action(order)
        assert order.status is target
        assert order.updated_at == LATER
        assert order.created_at == T0

    @pytest.mark.parametrize(
        ("start", "move"), [m for m in ALL_ORDER_MOVES if m not in LEGAL_ORDER_MOVES]
    )
    def test_every_illegal_move_is_refused_naming_both_states_and_changes_nothing(
        self, start: OrderStatus, move: str
    ) -> None:
        order = make_order(start, payment_ref="ref-0", pay_url="https://pay.example/ref-0")
        before = (order.status, order.amount_paid, order.payment_ref, order.pay_url)
        action, target = ORDER_MOVES[move]
        with pytest.raises(IllegalTransition) as refused:
            action(order)
        assert refused.value.from_state is start
        assert refused.value.to_state is target
        assert start.value in str(refused.value) and target.value in str(refused.value)
        assert str(order.id) in str(refused.value)
        assert (order.status, order.amount_paid, order.payment_ref, order.pay_url) == before
        assert order.updated_at == T0

    def test_awaiting_payment_stores_the_ref_and_the_pay_url(self) -> None:
        order = make_order()
        order.awaiting_payment("5f0c1e2d3a4b5c6d7e8f9a0b", "https://pay.example/x", LATER)
        assert order.payment_ref == "5f0c1e2d3a4b5c6d7e8f9a0b"
        assert order.pay_url == "https://pay.example/x"

    def test_the_same_payment_initiated_twice_changes_nothing(self) -> None:
        order = make_order()
        order.awaiting_payment("ref-1", "https://pay.example/1", LATER)
        order.awaiting_payment("ref-1", "https://pay.example/1", LATER + timedelta(minutes=1))
        assert order.status is OrderStatus.AWAITING_PAYMENT
        assert order.updated_at == LATER

    def test_a_second_payment_ref_for_one_order_is_refused(self) -> None:
        order = make_order()
        order.awaiting_payment("ref-1", "https://pay.example/1", LATER)
        with pytest.raises(IllegalTransition):
            order.awaiting_payment("ref-2", "https://pay.example/2", LATER)
        assert order.payment_ref == "ref-1"

    def test_paid_and_confirmed_orders_count_as_paid(self) -> None:
        assert make_order(OrderStatus.PAID).is_paid
        assert make_order(OrderStatus.CONFIRMED).is_paid
        assert not make_order(OrderStatus.AWAITING_PAYMENT).is_paid


class TestSetAmountPaid:
    def test_the_exact_amount_pays_the_order(self) -> None:
        order = make_order(OrderStatus.AWAITING_PAYMENT)
        assert order.set_amount_paid(PRICE, "TND", LATER) is None
        assert order.status is OrderStatus.PAID
        assert order.amount_paid == PRICE
        assert order.updated_at == LATER

    def test_more_than_the_amount_pays_the_order_and_records_what_arrived(self) -> None:
        order = make_order(OrderStatus.AWAITING_PAYMENT)
        assert order.set_amount_paid(PRICE + 1, "TND", LATER) is None
        assert order.status is OrderStatus.PAID
        assert order.amount_paid == PRICE + 1

    def test_an_underpayment_keeps_the_order_awaiting_payment_and_reports_the_shortfall(
        self,
    ) -> None:
        order = make_order(OrderStatus.AWAITING_PAYMENT)
        under = order.set_amount_paid(PRICE - 1, "TND", LATER)
        assert under == Underpayment(order.id, PRICE, PRICE - 1, "TND")
        assert under.shortfall == 1
        assert str(order.id) in under.detail and "1 short" in under.detail
        assert order.status is OrderStatus.AWAITING_PAYMENT
        assert order.amount_paid == PRICE - 1  # what arrived is recorded, never dropped

    def test_a_later_total_that_reaches_the_amount_pays_the_order(self) -> None:
        order = make_order(OrderStatus.AWAITING_PAYMENT)
        assert order.set_amount_paid(PRICE // 2, "TND", LATER) is not None
        assert order.set_amount_paid(PRICE, "TND", LATER) is None
        assert order.status is OrderStatus.PAID

    def test_a_recorded_total_never_falls(self) -> None:
        order = make_order(OrderStatus.AWAITING_PAYMENT, amount_paid=500)
        with pytest.raises(InvalidMoney):
            order.set_amount_paid(400, "TND", LATER)
        assert order.amount_paid == 500

    def test_an_underpayment_before_payment_initiated_keeps_the_order_pending(self) -> None:
        order = make_order(OrderStatus.PENDING)
        assert isinstance(order.set_amount_paid(0, "TND", LATER), Underpayment)
        assert order.status is OrderStatus.PENDING

    def test_a_currency_mismatch_is_refused_and_changes_nothing(self) -> None:
        order = make_order(OrderStatus.AWAITING_PAYMENT)
        with pytest.raises(CurrencyMismatch) as refused:
            order.set_amount_paid(PRICE, "EUR", LATER)
        assert (refused.value.expected, refused.value.got) == ("TND", "EUR")
        assert order.status is OrderStatus.AWAITING_PAYMENT
        assert order.amount_paid == 0
        assert order.updated_at == T0

    @pytest.mark.parametrize("amount", [-1, 1.0, True, Decimal(PRICE), None])
    def test_an_amount_that_is_not_minor_units_is_refused(self, amount: object) -> None:
        order = make_order(OrderStatus.AWAITING_PAYMENT)
        with pytest.raises(InvalidMoney):
            order.set_amount_paid(amount, "TND", LATER)  # type: ignore[arg-type]
        assert order.amount_paid == 0

    @pytest.mark.parametrize("status", [OrderStatus.CANCELLED, OrderStatus.PAYMENT_FAILED])
    def test_money_for_an_ended_order_is_refused_for_the_caller_to_report(
        self, status: OrderStatus
    ) -> None:
        order = make_order(status)
        with pytest.raises(IllegalTransition) as refused:
            order.set_amount_paid(PRICE, "TND", LATER)
        assert refused.value.from_state is status
        assert order.amount_paid == 0

    def test_a_second_payment_for_a_paid_order_is_refused(self) -> None:
        order = make_order(OrderStatus.AWAITING_PAYMENT)
        order.set_amount_paid(PRICE, "TND", LATER)
        with pytest.raises(IllegalTransition):
            order.set_amount_paid(PRICE * 2, "TND", LATER)
        assert order.amount_paid == PRICE


# -- the session status machine ------------------------------------------------------------------

SessionMove = Callable[[BookedSession], object]

SESSION_MOVES: dict[str, tuple[SessionMove, SessionStatus]] = {
    "await_calendar": (lambda s: s.await_calendar(), SessionStatus.AWAITING_CALENDAR),
    "schedule": (
        lambda s: s.schedule("evt0123456789", "https://meet.google.com/abc-defg-hij"),
        SessionStatus.SCHEDULED,
    ),
    "fail_scheduling": (lambda s: s.fail_scheduling(), SessionStatus.SCHEDULING_FAILED),
    "cancel": (lambda s: s.cancel(), SessionStatus.CANCELLED),
}

LEGAL_SESSION_MOVES = {
    (SessionStatus.PENDING_PAYMENT, "await_calendar"),
    (SessionStatus.PENDING_PAYMENT, "cancel"),
    (SessionStatus.AWAITING_CALENDAR, "schedule"),
    (SessionStatus.AWAITING_CALENDAR, "fail_scheduling"),
    (SessionStatus.AWAITING_CALENDAR, "cancel"),
    (SessionStatus.SCHEDULING_FAILED, "schedule"),  # retried after the mentor reconnected
    (SessionStatus.SCHEDULING_FAILED, "fail_scheduling"),  # the retry failed too
    (SessionStatus.SCHEDULING_FAILED, "cancel"),
    (SessionStatus.SCHEDULED, "cancel"),
}
ALL_SESSION_MOVES = [(status, move) for status in SessionStatus for move in SESSION_MOVES]


class TestSessionStatusMachine:
    def test_a_new_session_waits_for_payment_and_holds_the_slot(self) -> None:
        session = make_session()
        assert session.status is SessionStatus.PENDING_PAYMENT
        assert session.is_live

    @pytest.mark.parametrize(
        ("start", "move"), [m for m in ALL_SESSION_MOVES if m in LEGAL_SESSION_MOVES]
    )
    def test_every_legal_move_lands_in_its_state(self, start: SessionStatus, move: str) -> None:
        session = make_session(start)
        action, target = SESSION_MOVES[move]
        action(session)
        assert session.status is target

    @pytest.mark.parametrize(
        ("start", "move"), [m for m in ALL_SESSION_MOVES if m not in LEGAL_SESSION_MOVES]
    )
    def test_every_illegal_move_is_refused_naming_both_states(
        self, start: SessionStatus, move: str
    ) -> None:
        session = make_session(start)
        session.calendar_event_id = "evt-earlier" if start is SessionStatus.SCHEDULED else None
        action, target = SESSION_MOVES[move]
        with pytest.raises(IllegalTransition) as refused:
            action(session)
        assert (refused.value.from_state, refused.value.to_state) == (start, target)
        assert start.value in str(refused.value) and target.value in str(refused.value)
        assert session.status is start

    def test_scheduling_stores_the_event_and_the_meet_link(self) -> None:
        session = make_session(SessionStatus.AWAITING_CALENDAR)
        session.schedule("evt1", "https://meet.google.com/abc-defg-hij")
        assert session.calendar_event_id == "evt1"
        assert session.meet_link == "https://meet.google.com/abc-defg-hij"

    def test_the_same_confirmation_twice_changes_nothing_but_a_late_meet_link(self) -> None:
        session = make_session(SessionStatus.AWAITING_CALENDAR)
        session.schedule("evt1", None)
        session.schedule("evt1", "https://meet.google.com/abc-defg-hij")
        assert session.status is SessionStatus.SCHEDULED
        assert session.meet_link == "https://meet.google.com/abc-defg-hij"
        session.schedule("evt1", None)
        assert session.meet_link == "https://meet.google.com/abc-defg-hij"

    def test_a_second_event_for_a_scheduled_session_is_refused(self) -> None:
        session = make_session(SessionStatus.AWAITING_CALENDAR)
        session.schedule("evt1", "https://meet.google.com/a")
        with pytest.raises(IllegalTransition):
            session.schedule("evt2", "https://meet.google.com/b")
        assert session.calendar_event_id == "evt1"

    def test_a_session_must_end_after_it_starts(self) -> None:
        with pytest.raises(InvalidBooking):
            BookedSession(id=uuid4(), order_id=uuid4(), mentor_id=uuid4(), start_at=T0, end_at=T0)


class TestSlot:
    @pytest.mark.parametrize(
        ("status", "live"),
        [
            (SessionStatus.PENDING_PAYMENT, True),
            (SessionStatus.AWAITING_CALENDAR, True),
            (SessionStatus.SCHEDULED, True),
            (SessionStatus.SCHEDULING_FAILED, True),
            (SessionStatus.CANCELLED, False),
        ],
    )
    def test_only_a_cancelled_session_frees_the_slot(self, status: SessionStatus, live: bool):
        assert make_session(status).is_live is live
        assert (status in LIVE_SESSION_STATUSES) is live

    def test_a_failed_payment_frees_the_slot_by_cancelling_the_session(self) -> None:
        order, session = make_order(OrderStatus.AWAITING_PAYMENT), make_session()
        order.fail_payment(LATER)
        session.cancel()
        assert order.status is OrderStatus.PAYMENT_FAILED
        assert not session.is_live


# -- recovery: an admin's cancel, payments that never open, the escrow's status -----------------

# What each order status's session is when nothing went wrong.
SESSION_OF = {
    OrderStatus.PENDING: SessionStatus.PENDING_PAYMENT,
    OrderStatus.AWAITING_PAYMENT: SessionStatus.PENDING_PAYMENT,
    OrderStatus.PAID: SessionStatus.AWAITING_CALENDAR,
    OrderStatus.CONFIRMED: SessionStatus.SCHEDULED,
    OrderStatus.PAYMENT_FAILED: SessionStatus.CANCELLED,
    OrderStatus.CANCELLED: SessionStatus.CANCELLED,
}


class TestCancelBooking:
    @pytest.mark.parametrize(
        "status",
        [
            OrderStatus.PENDING,
            OrderStatus.AWAITING_PAYMENT,
            OrderStatus.PAID,
            OrderStatus.CONFIRMED,
        ],
    )
    def test_a_live_order_is_cancelled_and_its_slot_freed(self, status: OrderStatus) -> None:
        order, session = make_order(status), make_session(SESSION_OF[status])
        assert cancel_booking(order, session, LATER) is True
        assert order.status is OrderStatus.CANCELLED
        assert order.updated_at == LATER
        assert session.status is SessionStatus.CANCELLED
        assert not session.is_live

    def test_a_paid_order_whose_scheduling_failed_is_cancelled_too(self) -> None:
        order = make_order(OrderStatus.PAID)
        session = make_session(SessionStatus.SCHEDULING_FAILED)
        assert cancel_booking(order, session, LATER) is True
        assert (order.status, session.status) == (OrderStatus.CANCELLED, SessionStatus.CANCELLED)

    def test_cancelling_a_cancelled_order_again_changes_nothing(self) -> None:
        order = make_order(OrderStatus.CANCELLED)
        session = make_session(SessionStatus.CANCELLED)
        assert cancel_booking(order, session, LATER) is False
        assert order.status is OrderStatus.CANCELLED
        assert order.updated_at == T0

    def test_an_order_whose_payment_failed_cannot_be_cancelled(self) -> None:
        order = make_order(OrderStatus.PAYMENT_FAILED)
        session = make_session(SessionStatus.CANCELLED)
        with pytest.raises(IllegalTransition) as refused:
            cancel_booking(order, session, LATER)
        assert refused.value.from_state is OrderStatus.PAYMENT_FAILED
        assert order.status is OrderStatus.PAYMENT_FAILED
        assert order.updated_at == T0


TIMEOUT = timedelta(minutes=30)


class TestPaymentNeverOpened:
    def test_a_pending_order_fails_once_the_timeout_has_passed_and_frees_its_slot(self) -> None:
        order, session = make_order(), make_session()
        due = T0 + TIMEOUT
        assert order.payment_never_opened(due, TIMEOUT)
        assert fail_unopened_payment(order, session, due, TIMEOUT) is True
        assert order.status is OrderStatus.PAYMENT_FAILED
        assert order.updated_at == due
        assert session.status is SessionStatus.CANCELLED

    def test_a_pending_order_within_the_timeout_is_left_alone(self) -> None:
        order, session = make_order(), make_session()
        early = T0 + TIMEOUT - timedelta(seconds=1)
        assert not order.payment_never_opened(early, TIMEOUT)
        assert fail_unopened_payment(order, session, early, TIMEOUT) is False
        assert (order.status, session.status) == (
            OrderStatus.PENDING,
            SessionStatus.PENDING_PAYMENT,
        )
        assert order.updated_at == T0

    @pytest.mark.parametrize(
        "changes",
        [
            {"status": OrderStatus.AWAITING_PAYMENT, "payment_ref": "ref-1"},
            # Money seen before PaymentInitiated: the order is pending, but the payment opened.
            {"payment_ref": "ref-1", "amount_paid": 1_000},
            {"amount_paid": 1_000},
            {"payment_ref": "ref-1"},
            {"status": OrderStatus.PAID, "amount_paid": PRICE},
            {"status": OrderStatus.CANCELLED},
            {"status": OrderStatus.PAYMENT_FAILED},
        ],
        ids=["awaiting payment", "underpaid early", "money", "ref", "paid", "cancelled", "failed"],
    )
    def test_an_order_whose_payment_opened_or_that_ended_is_left_alone(
        self, changes: dict[str, object]
    ) -> None:
        order = make_order(**changes)  # type: ignore[arg-type]
        status = order.status
        session = make_session(SESSION_OF[status])
        long_after = T0 + timedelta(days=3)
        assert not order.payment_never_opened(long_after, TIMEOUT)
        assert fail_unopened_payment(order, session, long_after, TIMEOUT) is False
        assert (order.status, session.status) == (status, SESSION_OF[status])


class TestEscrow:
    def test_nothing_is_known_of_an_unpaid_orders_escrow(self) -> None:
        assert Escrow() == Escrow(status=None, sequence=0)

    def test_a_payment_in_full_holds_the_escrow_before_any_escrow_event(self) -> None:
        escrow = Escrow()
        assert escrow.hold_for_payment() is True
        assert (escrow.status, escrow.sequence) == (EscrowStatus.HELD, 0)

    def test_any_escrow_event_is_newer_than_the_hold_a_payment_implies(self) -> None:
        escrow = Escrow()
        escrow.hold_for_payment()
        assert escrow.observe(EscrowStatus.FROZEN, 1) is True
        assert (escrow.status, escrow.sequence) == (EscrowStatus.FROZEN, 1)

    def test_a_payment_applied_after_an_escrow_event_does_not_reset_it(self) -> None:
        escrow = Escrow()
        escrow.observe(EscrowStatus.FROZEN, 2)
        assert escrow.hold_for_payment() is False
        assert (escrow.status, escrow.sequence) == (EscrowStatus.FROZEN, 2)

    def test_the_highest_sequence_wins_whatever_order_the_events_arrive_in(self) -> None:
        moves = [
            (EscrowStatus.FROZEN, 2),
            (EscrowStatus.REFUND_DUE, 3),
            (EscrowStatus.REFUNDED, 4),
        ]
        for arrival in ([0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]):
            escrow = Escrow()
            escrow.hold_for_payment()
            for index in arrival:
                escrow.observe(*moves[index])
            assert (escrow.status, escrow.sequence) == (EscrowStatus.REFUNDED, 4), arrival

    @pytest.mark.parametrize("sequence", [1, 2])
    def test_an_older_or_equal_sequence_changes_nothing(self, sequence: int) -> None:
        escrow = Escrow()
        escrow.observe(EscrowStatus.RELEASED, 2)
        assert escrow.observe(EscrowStatus.FROZEN, sequence) is False
        assert (escrow.status, escrow.sequence) == (EscrowStatus.RELEASED, 2)

    @pytest.mark.parametrize("sequence", [0, -1, True, 1.0])
    def test_a_sequence_is_a_positive_integer(self, sequence: object) -> None:
        escrow = Escrow()
        with pytest.raises(ValueError):
            escrow.observe(EscrowStatus.HELD, sequence)  # type: ignore[arg-type]
        assert escrow == Escrow()


YEAR = timedelta(days=365)


class TestPlanSession:
    def test_the_end_is_the_start_plus_the_offering_duration(self) -> None:
        start = T0 + timedelta(days=2)
        assert plan_session(45, start, T0, horizon=YEAR) == start + timedelta(minutes=45)

    def test_a_start_in_another_offset_is_the_same_instant(self) -> None:
        tunis = datetime(2030, 1, 7, 10, 0, tzinfo=UTC).astimezone()
        assert plan_session(60, tunis, T0, horizon=YEAR) == datetime(2030, 1, 7, 11, 0, tzinfo=UTC)

    @pytest.mark.parametrize(
        "start",
        [T0 - CLOCK_SKEW - timedelta(seconds=1), T0 - timedelta(hours=1), T0 - timedelta(days=3)],
        ids=["just past the skew", "an hour ago", "days ago"],
    )
    def test_a_start_in_the_past_is_refused(self, start: datetime) -> None:
        with pytest.raises(InvalidBooking, match="in the past") as refused:
            plan_session(60, start, T0, horizon=YEAR)
        assert refused.value.field == "start_at"

    @pytest.mark.parametrize(
        "start", [T0, T0 - timedelta(seconds=1), T0 - CLOCK_SKEW], ids=["now", "1 s ago", "skew"]
    )
    def test_a_start_within_the_clock_skew_of_now_is_taken(self, start: datetime) -> None:
        assert plan_session(60, start, T0, horizon=YEAR) == start + timedelta(hours=1)

    def test_a_start_at_the_horizon_is_taken_and_past_it_refused(self) -> None:
        assert plan_session(60, T0 + YEAR, T0, horizon=YEAR) == T0 + YEAR + timedelta(hours=1)
        with pytest.raises(InvalidBooking, match="more than 365 days ahead") as refused:
            plan_session(60, T0 + YEAR + timedelta(seconds=1), T0, horizon=YEAR)
        assert refused.value.field == "start_at"

    def test_the_horizon_is_the_callers(self) -> None:
        week = timedelta(days=7)
        with pytest.raises(InvalidBooking, match="more than 7 days ahead"):
            plan_session(60, T0 + timedelta(days=8), T0, horizon=week)

    def test_a_session_that_would_end_past_the_end_of_time_is_refused(self) -> None:
        last = datetime.max.replace(tzinfo=UTC) - timedelta(minutes=30)
        forever = last - T0
        with pytest.raises(InvalidBooking, match="earlier start"):
            plan_session(60, last, T0, horizon=forever)

    def test_a_naive_start_is_refused(self) -> None:
        with pytest.raises(InvalidBooking, match="time zone"):
            plan_session(60, datetime(2031, 1, 1, 9, 0), T0, horizon=YEAR)

    @pytest.mark.parametrize("duration", [0, -30, 30.0, True, None, "60"])
    def test_a_duration_that_is_not_a_positive_whole_number_of_minutes_is_refused(
        self, duration: object
    ) -> None:
        with pytest.raises(InvalidBooking, match="duration"):
            plan_session(duration, T0 + timedelta(days=1), T0, horizon=YEAR)  # type: ignore[arg-type]


class TestCheckPrice:
    @pytest.mark.parametrize(
        ("currency", "limit"), [("TND", 10_000_000), ("EUR", 1_000_000), ("USD", 1_000_000)]
    )
    def test_the_maximum_is_in_major_units_of_the_prices_own_currency(
        self, currency: str, limit: int
    ) -> None:
        check_price(Money(limit, currency), max_major_units=10_000)
        with pytest.raises(InvalidOffering, match="above the most an offering may cost") as over:
            check_price(Money(limit + 1, currency), max_major_units=10_000)
        assert over.value.field == "price.amount"

    def test_the_refusal_shows_both_amounts_as_the_currency_writes_them(self) -> None:
        with pytest.raises(InvalidOffering) as over:
            check_price(Money(10_000_001, "TND"), max_major_units=10_000)
        assert "10000.001 TND" in str(over.value) and "10000.000 TND" in str(over.value)


class TestMentorIdentity:
    def test_linking_a_subject_replaces_the_previous_one_and_counts_the_link(self) -> None:
        mentor = Mentor(
            id=uuid4(),
            name="Amel Ben Salah",
            email="amel@example.com",
            timezone="Africa/Tunis",
            created_at=T0,
        )
        assert mentor.link_identity("idp|1") is None
        assert mentor.link_identity("idp|2") == "idp|1"
        assert (mentor.identity_subject, mentor.identity_sequence) == ("idp|2", 2)
