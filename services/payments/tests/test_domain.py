"""The payments domain: the fee split, Konnect's verdict, payments and escrow holds. No I/O."""

from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from booking.payments.domain import (
    AlreadyApplied,
    CurrencyMismatch,
    EscrowHold,
    EscrowStatus,
    IllegalTransition,
    InvalidFeeRate,
    KonnectVerdict,
    MalformedKonnectPayment,
    Payment,
    PaymentState,
    ReleaseTooEarly,
    Split,
    konnect_amount_paid,
    konnect_currency,
    konnect_outcome,
    split_payment,
)
from booking.runtime.domain import InvalidMoney

T0 = datetime(2030, 1, 6, 9, 0, tzinfo=UTC)
LATER = T0 + timedelta(minutes=5)
PRICE = 120_000
RATE = Decimal("0.15")


@st.composite
def fee_rates(draw: st.DrawFn) -> Decimal:
    """0 <= r < 1 with 0 to 4 decimal places: 0, 0.1, 0.15, 0.333, 0.9999, ..."""
    places = draw(st.integers(min_value=0, max_value=4))
    units = draw(st.integers(min_value=0, max_value=10**places - 1))
    return Decimal(units).scaleb(-places)


amounts = st.integers(min_value=0, max_value=10**12)


def half_up_reference(amount: int, rate: Decimal) -> int:
    with localcontext() as context:
        context.prec = 60
        return int((Decimal(amount) * rate).quantize(Decimal(1), rounding=ROUND_HALF_UP))


class TestSplitPayment:
    @given(amount=amounts, rate=fee_rates())
    @example(amount=10**12, rate=Decimal("0.9999"))
    @example(amount=0, rate=Decimal("0.5"))
    def test_fee_and_escrow_add_up_to_what_was_paid_exactly(
        self, amount: int, rate: Decimal
    ) -> None:
        fee, escrow = split_payment(amount, rate)
        assert type(fee) is int and type(escrow) is int
        assert fee + escrow == amount
        assert 0 <= fee <= amount
        assert 0 <= escrow <= amount

    @given(amount=amounts, rate=fee_rates())
    def test_the_fee_is_the_product_rounded_half_up_to_the_millime(
        self, amount: int, rate: Decimal
    ) -> None:
        assert split_payment(amount, rate).platform_fee == half_up_reference(amount, rate)

    @pytest.mark.parametrize(
        ("amount", "rate", "fee"),
        [
            (5, Decimal("0.1"), 1),  # 0.5 -> 1
            (25, Decimal("0.1"), 3),  # 2.5 -> 3 (half-even would give 2)
            (1, Decimal("0.5"), 1),
            (3, Decimal("0.5"), 2),
            (14, Decimal("0.1"), 1),  # 1.4 -> 1
            (15, Decimal("0.1"), 2),  # 1.5 -> 2
            (5_000, Decimal("0.0001"), 1),  # 0.5 -> 1
            (120_000, Decimal("0.15"), 18_000),
            (99_999, Decimal("0.15"), 15_000),  # 14999.85 -> 15000
        ],
    )
    def test_exact_halves_round_up(self, amount: int, rate: Decimal, fee: int) -> None:
        assert split_payment(amount, rate) == Split(platform_fee=fee, escrow=amount - fee)

    def test_no_fee_at_rate_zero(self) -> None:
        assert split_payment(120_000, Decimal(0)) == (0, 120_000)

    def test_a_rate_beyond_the_context_precision_is_still_exact(self) -> None:
        rate = Decimal("0." + "3" * 40)
        assert split_payment(10**12, rate).platform_fee == 333_333_333_333

    @pytest.mark.parametrize(
        "rate", [0.15, Decimal("1"), Decimal("1.5"), Decimal("-0.01"), Decimal("NaN"), "0.15"]
    )
    def test_a_rate_outside_zero_to_one_or_not_a_decimal_is_refused(self, rate: Any) -> None:
        with pytest.raises(InvalidFeeRate):
            split_payment(1_000, rate)

    @pytest.mark.parametrize("amount", [-1, 1.0, True])
    def test_an_amount_that_is_not_minor_units_is_refused(self, amount: Any) -> None:
        with pytest.raises(InvalidMoney):
            split_payment(amount, RATE)


def konnect(status: str, **fields: Any) -> dict[str, Any]:
    payment: dict[str, Any] = {
        "id": "5f0c1e2d3a4b5c6d7e8f9a0b",
        "status": status,
        "amount": PRICE,
        "amountDue": PRICE,
        "reachedAmount": 0,
        "token": "TND",
        "type": "immediate",
        "expirationDate": (T0 + timedelta(minutes=30)).isoformat().replace("+00:00", "Z"),
        "successfulTransactions": 0,
        "failedTransactions": 0,
        "transactions": [],
    }
    payment.update(fields)
    return payment


class TestKonnectOutcome:
    def test_completed_is_paid(self) -> None:
        assert konnect_outcome(konnect("completed", reachedAmount=PRICE), LATER) is (
            PaymentState.COMPLETED
        )

    def test_pending_is_still_open(self) -> None:
        assert konnect_outcome(konnect("pending"), LATER) is PaymentState.PENDING

    def test_pending_with_failed_transactions_is_still_open_for_a_retry(self) -> None:
        payment = konnect(
            "pending",
            failedTransactions=2,
            transactions=[{"status": "failed_payment", "amount": PRICE}] * 2,
        )
        assert konnect_outcome(payment, LATER) is PaymentState.PENDING

    def test_the_verdict_comes_from_the_status_never_the_transactions(self) -> None:
        payment = konnect("pending", transactions=[{"status": "success", "amount": PRICE}])
        assert konnect_outcome(payment, LATER) is PaymentState.PENDING

    @pytest.mark.parametrize("status", ["pending", "failed", "canceled", "something_new", None])
    def test_past_the_expiration_date_it_is_expired_whatever_the_status_says(
        self, status: str | None
    ) -> None:
        at_expiry = T0 + timedelta(minutes=30)
        assert konnect_outcome(konnect(status), at_expiry) is PaymentState.EXPIRED  # type: ignore[arg-type]

    def test_a_completed_payment_past_its_expiry_is_still_paid_never_dropped(self) -> None:
        late = T0 + timedelta(days=1)
        assert konnect_outcome(konnect("completed"), late) is PaymentState.COMPLETED

    def test_an_expired_status_is_expired_before_the_date(self) -> None:
        assert konnect_outcome(konnect("expired"), LATER) is PaymentState.EXPIRED

    @pytest.mark.parametrize("status", ["failed", "weird", "", None])
    def test_an_unknown_status_is_pending(self, status: str | None) -> None:
        assert konnect_outcome(konnect(status), LATER) is PaymentState.PENDING  # type: ignore[arg-type]

    def test_an_expiration_date_without_offset_is_utc(self) -> None:
        payment = konnect("pending", expirationDate="2030-01-06T09:30:00.000")
        assert konnect_outcome(payment, T0 + timedelta(minutes=29)) is PaymentState.PENDING
        assert konnect_outcome(payment, T0 + timedelta(minutes=30)) is PaymentState.EXPIRED

    def test_no_expiration_date_means_no_expiry_from_the_date(self) -> None:
        payment = konnect("pending", expirationDate=None)
        assert konnect_outcome(payment, T0 + timedelta(days=365)) is PaymentState.PENDING

    def test_a_malformed_expiration_date_is_refused(self) -> None:
        with pytest.raises(MalformedKonnectPayment):
            konnect_outcome(konnect("pending", expirationDate="tomorrow"), LATER)


class TestKonnectAmountPaid:
    def test_a_completed_payment_paid_its_amount(self) -> None:
        assert konnect_amount_paid(konnect("completed", reachedAmount=PRICE)) == PRICE

    def test_a_completed_payment_that_left_reached_amount_empty_paid_its_amount(self) -> None:
        assert konnect_amount_paid(konnect("completed", reachedAmount=0)) == PRICE
        assert konnect_amount_paid(konnect("completed", reachedAmount=None)) == PRICE

    def test_a_partial_payment_paid_what_it_reached(self) -> None:
        payment = konnect("completed", type="partial", reachedAmount=70_000)
        assert konnect_amount_paid(payment) == 70_000

    def test_a_completed_payment_that_reached_less_is_never_credited_more(self) -> None:
        assert konnect_amount_paid(konnect("completed", reachedAmount=70_000)) == 70_000

    def test_a_pending_payment_paid_what_it_reached_so_far(self) -> None:
        assert konnect_amount_paid(konnect("pending")) == 0
        assert konnect_amount_paid(konnect("pending", reachedAmount=10_000)) == 10_000

    @pytest.mark.parametrize("amount", [120000.5, "120000", True, -1])
    def test_an_amount_that_is_not_millimes_is_refused(self, amount: Any) -> None:
        with pytest.raises(MalformedKonnectPayment):
            konnect_amount_paid(konnect("completed", amount=amount, reachedAmount=None))


def make_payment(status: PaymentState = PaymentState.PENDING) -> Payment:
    payment = Payment(
        id=uuid4(),
        order_id=uuid4(),
        amount=PRICE,
        currency="TND",
        payment_ref="5f0c1e2d3a4b5c6d7e8f9a0b",
        pay_url="https://pay.example/5f0c",
        expires_at=T0 + timedelta(minutes=30),
        created_at=T0,
        updated_at=T0,
    )
    payment.status = status
    return payment


class TestPaymentCompletion:
    def test_completion_records_the_money_the_fee_and_the_escrow(self) -> None:
        payment = make_payment()
        done = payment.apply_completion(PRICE, "TND", RATE, LATER)
        assert payment.status is PaymentState.COMPLETED
        assert (payment.amount_paid, payment.platform_fee, payment.escrow_amount) == (
            PRICE,
            18_000,
            102_000,
        )
        assert payment.paid_at == LATER and payment.updated_at == LATER
        assert (done.amount_paid, done.platform_fee, done.escrow_amount) == (PRICE, 18_000, 102_000)
        assert done.currency == "TND" and done.paid_at == LATER
        assert not done.late and not done.amount_mismatch

    def test_duplicate_webhooks_complete_the_payment_once(self) -> None:
        payment = make_payment()
        payment.apply_completion(PRICE, "TND", RATE, LATER)
        with pytest.raises(AlreadyApplied):
            payment.apply_completion(PRICE, "TND", RATE, LATER + timedelta(seconds=1))
        assert payment.paid_at == LATER and payment.platform_fee == 18_000

    def test_an_underpayment_is_recorded_and_flagged(self) -> None:
        payment = make_payment()
        done = payment.apply_completion(70_000, "TND", RATE, LATER)
        assert done.amount_mismatch and done.amount == PRICE
        assert (done.platform_fee, done.escrow_amount) == (10_500, 59_500)

    def test_a_currency_mismatch_is_refused_and_changes_nothing(self) -> None:
        payment = make_payment()
        with pytest.raises(CurrencyMismatch):
            payment.apply_completion(PRICE, "EUR", RATE, LATER)
        assert payment.status is PaymentState.PENDING and payment.amount_paid is None

    @pytest.mark.parametrize("ended", [PaymentState.EXPIRED, PaymentState.FAILED])
    def test_money_after_the_payment_ended_is_recorded_and_flagged_late(
        self, ended: PaymentState
    ) -> None:
        payment = make_payment(ended)
        done = payment.apply_completion(PRICE, "TND", RATE, LATER)
        assert done.late and done.previous_state is ended
        assert payment.status is PaymentState.COMPLETED and payment.amount_paid == PRICE

    def test_a_float_rate_is_refused_before_anything_changes(self) -> None:
        payment = make_payment()
        with pytest.raises(InvalidFeeRate):
            payment.apply_completion(PRICE, "TND", 0.15, LATER)  # type: ignore[arg-type]
        assert payment.status is PaymentState.PENDING

    @given(amount=amounts, rate=fee_rates())
    def test_the_recorded_fee_and_escrow_add_up(self, amount: int, rate: Decimal) -> None:
        payment = make_payment()
        payment.apply_completion(amount, "TND", rate, LATER)
        assert payment.platform_fee + payment.escrow_amount == amount  # type: ignore[operator]


class TestPaymentEnding:
    def test_a_pending_payment_expires(self) -> None:
        payment = make_payment()
        payment.expire(LATER)
        assert payment.status is PaymentState.EXPIRED and payment.updated_at == LATER

    def test_a_pending_payment_fails(self) -> None:
        payment = make_payment()
        payment.fail(LATER)
        assert payment.status is PaymentState.FAILED

    @pytest.mark.parametrize(
        "status", [PaymentState.COMPLETED, PaymentState.EXPIRED, PaymentState.FAILED]
    )
    @pytest.mark.parametrize("move", ["expire", "fail"])
    def test_only_a_pending_payment_can_end(self, status: PaymentState, move: str) -> None:
        payment = make_payment(status)
        with pytest.raises(IllegalTransition) as refused:
            getattr(payment, move)(LATER)
        assert refused.value.from_state is status
        assert payment.status is status and payment.updated_at == T0

    def test_overdue_is_pending_past_its_expiry(self) -> None:
        payment = make_payment()
        assert not payment.is_overdue(T0 + timedelta(minutes=29))
        assert payment.is_overdue(T0 + timedelta(minutes=30))
        payment.apply_completion(PRICE, "TND", RATE, LATER)
        assert not payment.is_overdue(T0 + timedelta(days=1))


END = T0 + timedelta(days=1, hours=1)
DELAY = timedelta(hours=24)


def make_hold() -> EscrowHold:
    return EscrowHold(
        id=uuid4(),
        order_id=uuid4(),
        mentor_id=uuid4(),
        amount=102_000,
        currency="TND",
        created_at=T0,
    )


class TestEscrowHold:
    def test_a_hold_is_released_once_the_session_ended_plus_the_delay(self) -> None:
        hold = make_hold()
        hold.release(END + DELAY, END, DELAY)
        assert hold.status is EscrowStatus.RELEASED and hold.released_at == END + DELAY

    def test_an_early_release_is_refused(self) -> None:
        hold = make_hold()
        with pytest.raises(ReleaseTooEarly) as refused:
            hold.release(END + DELAY - timedelta(seconds=1), END, DELAY)
        assert refused.value.due_at == END + DELAY
        assert hold.status is EscrowStatus.HELD and hold.released_at is None

    def test_a_cancelled_hold_is_never_released(self) -> None:
        hold = make_hold()
        hold.cancel(LATER)
        with pytest.raises(IllegalTransition):
            hold.release(END + DELAY * 10, END, DELAY)
        assert hold.status is EscrowStatus.CANCELLED and hold.released_at is None

    def test_a_second_release_is_already_applied(self) -> None:
        hold = make_hold()
        hold.release(END + DELAY, END, DELAY)
        with pytest.raises(AlreadyApplied):
            hold.release(END + DELAY * 2, END, DELAY)
        assert hold.released_at == END + DELAY

    def test_a_released_hold_cannot_be_cancelled(self) -> None:
        hold = make_hold()
        hold.release(END + DELAY, END, DELAY)
        with pytest.raises(IllegalTransition):
            hold.cancel(END + DELAY)

    def test_a_hold_holds_minor_units(self) -> None:
        with pytest.raises(InvalidMoney):
            EscrowHold(
                id=uuid4(),
                order_id=uuid4(),
                mentor_id=uuid4(),
                amount=1.5,
                currency="TND",
                created_at=T0,
            )


class TestKonnectCurrency:
    def test_the_token_is_the_currency(self) -> None:
        assert konnect_currency(konnect("completed", token="EUR")) == "EUR"

    def test_no_token_is_konnects_default_tnd(self) -> None:
        assert konnect_currency(konnect("completed", token=None)) == "TND"

    @pytest.mark.parametrize("token", ["TN", "T1D", 5, ["TND"]])
    def test_a_token_that_is_no_currency_code_is_refused(self, token: Any) -> None:
        with pytest.raises(MalformedKonnectPayment):
            konnect_currency(konnect("completed", token=token))


class TestInitiation:
    def test_an_initiated_payment_is_pending_with_its_ref_link_and_expiry(self) -> None:
        payment = make_payment(PaymentState.INITIATING)
        payment.initiated("a" * 24, "https://pay.example/a", T0 + timedelta(minutes=30), LATER)
        assert payment.status is PaymentState.PENDING
        assert (payment.payment_ref, payment.pay_url) == ("a" * 24, "https://pay.example/a")
        assert payment.expires_at == T0 + timedelta(minutes=30) and payment.updated_at == LATER

    def test_a_refused_initiation_ends_the_payment(self) -> None:
        payment = make_payment(PaymentState.INITIATING)
        payment.initiation_failed(LATER)
        assert payment.status is PaymentState.INITIATION_FAILED

    @pytest.mark.parametrize("status", [PaymentState.PENDING, PaymentState.INITIATION_FAILED])
    def test_only_an_initiating_payment_can_be_initiated(self, status: PaymentState) -> None:
        payment = make_payment(status)
        with pytest.raises(IllegalTransition):
            payment.initiated("b" * 24, "https://pay.example/b", LATER, LATER)
        with pytest.raises(IllegalTransition):
            payment.initiation_failed(LATER)
        assert payment.status is status


def verdict(status: str, now: datetime = LATER, **fields: Any) -> KonnectVerdict:
    return KonnectVerdict.read(konnect(status, **fields), now)


class TestApplyVerdict:
    def test_completed_completes_once(self) -> None:
        payment = make_payment()
        first = payment.apply_verdict(verdict("completed"), RATE, LATER)
        again = payment.apply_verdict(verdict("completed"), RATE, LATER)
        assert first.changed and first.completion is not None
        assert first.completion.amount_paid == PRICE and not first.completion.late
        assert not again.changed and again.completion is None

    def test_pending_with_failed_attempts_changes_nothing(self) -> None:
        payment = make_payment()
        settlement = payment.apply_verdict(verdict("pending", failedTransactions=1), RATE, LATER)
        assert not settlement.changed and payment.status is PaymentState.PENDING

    def test_expired_at_konnect_expires_the_payment(self) -> None:
        payment = make_payment()
        settlement = payment.apply_verdict(verdict("expired"), RATE, LATER)
        assert settlement.expired and payment.status is PaymentState.EXPIRED

    def test_pending_past_our_own_expiry_expires_the_payment(self) -> None:
        payment = make_payment()
        payment.expires_at = LATER
        still_open = KonnectVerdict(state=PaymentState.PENDING, amount_paid=0, currency="TND")
        assert payment.apply_verdict(still_open, RATE, LATER).expired

    def test_an_ended_payment_expires_only_once(self) -> None:
        payment = make_payment(PaymentState.EXPIRED)
        assert not payment.apply_verdict(verdict("expired"), RATE, LATER).changed

    def test_a_partial_payment_still_open_waits_for_the_rest(self) -> None:
        payment = make_payment()
        partial = verdict("pending", type="partial", reachedAmount=70_000)
        assert not payment.apply_verdict(partial, RATE, LATER).changed

    def test_a_partial_payment_that_ended_is_completed_short_never_dropped(self) -> None:
        payment = make_payment()
        partial = verdict("expired", type="partial", reachedAmount=70_000)
        settlement = payment.apply_verdict(partial, RATE, LATER)
        assert settlement.completion is not None and not settlement.expired
        assert settlement.completion.amount_paid == 70_000
        assert not settlement.completion.late and settlement.completion.amount_mismatch

    def test_money_after_the_end_is_a_late_completion(self) -> None:
        payment = make_payment(PaymentState.EXPIRED)
        settlement = payment.apply_verdict(verdict("completed"), RATE, LATER)
        assert settlement.completion is not None and settlement.completion.late

    def test_a_currency_mismatch_is_reported_and_changes_nothing(self) -> None:
        payment = make_payment()
        settlement = payment.apply_verdict(verdict("completed", token="EUR"), RATE, LATER)
        assert isinstance(settlement.currency_mismatch, CurrencyMismatch)
        assert not settlement.changed and payment.status is PaymentState.PENDING

    def test_konnect_not_knowing_the_payment_only_lets_our_expiry_end_it(self) -> None:
        payment = make_payment()
        assert not payment.apply_verdict(KonnectVerdict.unknown("TND"), RATE, LATER).changed
        overdue = T0 + timedelta(minutes=30)
        assert payment.apply_verdict(KonnectVerdict.unknown("TND"), RATE, overdue).expired


class TestEscrowForCompletion:
    def completion(self, status: PaymentState = PaymentState.PENDING, paid: int = PRICE):
        return make_payment(status).apply_completion(paid, "TND", RATE, LATER)

    def hold(self, completion) -> EscrowHold:
        return EscrowHold.for_completion(
            completion,
            id=uuid4(),
            order_id=uuid4(),
            mentor_id=uuid4(),
            session_end_at=END,
            delay=DELAY,
            now=LATER,
        )

    def test_an_on_time_full_payment_is_held_until_the_session_ended_plus_the_delay(self):
        hold = self.hold(self.completion())
        assert hold.status is EscrowStatus.HELD and hold.release_due_at == END + DELAY
        assert hold.amount == 102_000 and hold.currency == "TND"

    def test_an_overpayment_is_held_too(self) -> None:
        assert self.hold(self.completion(paid=PRICE + 1)).status is EscrowStatus.HELD

    @pytest.mark.parametrize(
        ("status", "paid"), [(PaymentState.EXPIRED, PRICE), (PaymentState.PENDING, 70_000)]
    )
    def test_a_late_or_short_payment_is_frozen_never_due(
        self, status: PaymentState, paid: int
    ) -> None:
        hold = self.hold(self.completion(status, paid))
        assert hold.status is EscrowStatus.FROZEN and hold.release_due_at is None
        with pytest.raises(IllegalTransition):
            hold.release_when_due(END + DELAY * 100)

    def test_a_held_hold_is_released_when_due_and_not_before(self) -> None:
        hold = self.hold(self.completion())
        with pytest.raises(ReleaseTooEarly):
            hold.release_when_due(END + DELAY - timedelta(microseconds=1))
        hold.release_when_due(END + DELAY)
        assert hold.status is EscrowStatus.RELEASED and hold.released_at == END + DELAY
        with pytest.raises(AlreadyApplied):
            hold.release_when_due(END + DELAY)
