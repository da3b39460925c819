"""The payments domain: the fee split, Konnect's verdict, payments and escrow holds, the budget of
Konnect lookups and the tally of unknown refs. No I/O."""

from collections.abc import Callable
from dataclasses import replace
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
    FreezeKind,
    InvalidFeeRate,
    KonnectVerdict,
    Lookup,
    LookupBudget,
    MalformedKonnectPayment,
    MoneyFate,
    MoneyReceived,
    Payment,
    PaymentState,
    RefundAlreadyRecorded,
    RefundCause,
    ReleaseScheduling,
    ReleaseTooEarly,
    Settlement,
    Split,
    UnknownRefTally,
    konnect_amount_paid,
    konnect_currency,
    konnect_outcome,
    split_payment,
)
from booking.runtime.domain import IllegalTransition, InvalidMoney

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
    def test_an_opened_payment_is_initiating_and_has_nothing_from_konnect_yet(self) -> None:
        payment = Payment.opened(id=uuid4(), order_id=uuid4(), amount=PRICE, currency="TND", now=T0)
        assert payment.status is PaymentState.INITIATING
        assert (payment.created_at, payment.updated_at) == (T0, T0)
        assert (payment.payment_ref, payment.pay_url, payment.amount_paid) == (None, None, None)

    @pytest.mark.parametrize(("amount", "currency"), [(-1, "TND"), (1.5, "TND"), (100, "tnd")])
    def test_a_payment_is_never_opened_for_money_the_domain_refuses(
        self, amount: Any, currency: str
    ) -> None:
        with pytest.raises(InvalidMoney):
            Payment.opened(id=uuid4(), order_id=uuid4(), amount=amount, currency=currency, now=T0)

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


def make_payment(status: PaymentState = PaymentState.PENDING, paid: int | None = None) -> Payment:
    """A payment open at Konnect until T0 + 30 min (in `status`, with `paid` recorded)."""
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
    if paid is not None:
        fee, escrow = split_payment(paid, RATE)
        payment.amount_paid, payment.platform_fee, payment.escrow_amount = paid, fee, escrow
    return payment


def verdict(status: str, now: datetime = LATER, **fields: Any) -> KonnectVerdict:
    return KonnectVerdict.read(konnect(status, **fields), now)


def partial(reached: int, status: str = "pending") -> KonnectVerdict:
    """Konnect's word on a partial payment that reached `reached` so far."""
    return verdict(status, type="partial", reachedAmount=reached)


EXPIRY = T0 + timedelta(minutes=30)
NOTHING = Settlement()


def snapshot(thing: Any) -> dict[str, Any]:
    return {name: getattr(thing, name) for name in thing.__slots__}


class TestPaidInFull:
    def test_money_in_full_completes_the_payment_and_is_held(self) -> None:
        payment = make_payment()
        settlement = payment.apply_verdict(verdict("completed"), RATE, LATER)
        assert payment.status is PaymentState.COMPLETED
        assert settlement.fate is MoneyFate.HELD and settlement.refund_cause is None
        assert settlement.money == MoneyReceived(
            amount=PRICE,
            amount_paid=PRICE,
            platform_fee=18_000,
            escrow_amount=102_000,
            currency="TND",
            paid_at=LATER,
            previous_state=PaymentState.PENDING,
        )
        assert (payment.amount_paid, payment.platform_fee, payment.escrow_amount) == (
            PRICE,
            18_000,
            102_000,
        )
        assert payment.paid_at == LATER and payment.updated_at == LATER

    def test_duplicate_webhooks_complete_the_payment_once(self) -> None:
        payment = make_payment()
        payment.apply_verdict(verdict("completed"), RATE, LATER)
        before = snapshot(payment)
        again = payment.apply_verdict(verdict("completed"), RATE, LATER + timedelta(seconds=1))
        assert again == NOTHING and not again.changed
        assert snapshot(payment) == before

    def test_money_in_full_past_our_own_expiry_is_still_on_time(self) -> None:
        # Konnect took it: its own expiry counts from its answer, ours from later.
        payment = make_payment()
        settlement = payment.apply_verdict(verdict("completed", EXPIRY), RATE, EXPIRY)
        assert settlement.fate is MoneyFate.HELD and not settlement.expired

    def test_more_than_the_amount_is_overpaid(self) -> None:
        payment = make_payment(PaymentState.UNDERPAID, paid=70_000)
        settlement = payment.apply_verdict(partial(130_000, "completed"), RATE, LATER)
        assert payment.status is PaymentState.COMPLETED
        assert settlement.fate is MoneyFate.OVERPAID
        assert settlement.money is not None and settlement.money.over
        assert (settlement.money.amount_paid, settlement.money.escrow_amount) == (
            130_000,
            110_500,
        )

    @given(amount=st.integers(min_value=1, max_value=10**12), rate=fee_rates())
    def test_the_recorded_fee_and_escrow_add_up(self, amount: int, rate: Decimal) -> None:
        payment = make_payment()
        payment.apply_verdict(partial(amount, "completed"), rate, LATER)
        assert payment.platform_fee + payment.escrow_amount == amount  # type: ignore[operator]


class TestUnderpaid:
    def test_a_short_payment_is_recorded_underpaid_and_stays_open(self) -> None:
        payment = make_payment()
        settlement = payment.apply_verdict(partial(70_000), RATE, LATER)
        assert payment.status is PaymentState.UNDERPAID and payment.is_open
        assert settlement.fate is MoneyFate.UNDERPAID and not settlement.expired
        assert settlement.money is not None and settlement.money.short
        assert (payment.amount_paid, payment.platform_fee, payment.escrow_amount) == (
            70_000,
            10_500,
            59_500,
        )

    def test_konnect_completing_a_payment_short_leaves_it_underpaid(self) -> None:
        payment = make_payment()
        settlement = payment.apply_verdict(verdict("completed", reachedAmount=70_000), RATE, LATER)
        assert payment.status is PaymentState.UNDERPAID
        assert settlement.fate is MoneyFate.UNDERPAID

    def test_more_money_still_short_records_the_new_total(self) -> None:
        payment = make_payment(PaymentState.UNDERPAID, paid=70_000)
        settlement = payment.apply_verdict(partial(90_000), RATE, LATER)
        assert payment.status is PaymentState.UNDERPAID and payment.amount_paid == 90_000
        assert settlement.fate is MoneyFate.UNDERPAID
        assert settlement.money is not None and settlement.money.amount_paid == 90_000

    def test_the_same_total_again_changes_nothing(self) -> None:
        payment = make_payment(PaymentState.UNDERPAID, paid=70_000)
        before = snapshot(payment)
        assert payment.apply_verdict(partial(70_000), RATE, LATER) == NOTHING
        assert snapshot(payment) == before

    def test_konnect_reporting_less_than_recorded_never_takes_money_back(self) -> None:
        payment = make_payment(PaymentState.UNDERPAID, paid=70_000)
        assert payment.apply_verdict(partial(10_000), RATE, LATER) == NOTHING
        assert payment.amount_paid == 70_000

    def test_paying_the_rest_completes_it_on_time(self) -> None:
        payment = make_payment(PaymentState.UNDERPAID, paid=70_000)
        settlement = payment.apply_verdict(partial(PRICE, "completed"), RATE, LATER)
        assert payment.status is PaymentState.COMPLETED
        assert settlement.fate is MoneyFate.HELD
        assert settlement.money is not None
        assert settlement.money.amount_paid == PRICE
        assert settlement.money.previous_state is PaymentState.UNDERPAID

    @pytest.mark.parametrize("konnect_word", ["expired", "unknown"])
    def test_at_expiry_what_was_paid_is_owed_back(self, konnect_word: str) -> None:
        payment = make_payment(PaymentState.UNDERPAID, paid=70_000)
        word = (
            partial(70_000, "expired")
            if konnect_word == "expired"
            else KonnectVerdict.unknown("TND")
        )
        settlement = payment.apply_verdict(word, RATE, EXPIRY)
        assert payment.status is PaymentState.EXPIRED and payment.amount_paid == 70_000
        assert settlement.expired and settlement.money is None
        assert settlement.fate is MoneyFate.REFUND_DUE
        assert settlement.refund_cause is RefundCause.UNDERPAID_EXPIRED

    def test_money_first_seen_at_expiry_short_is_recorded_and_owed_back(self) -> None:
        payment = make_payment()
        settlement = payment.apply_verdict(partial(70_000, "expired"), RATE, LATER)
        assert payment.status is PaymentState.EXPIRED and payment.amount_paid == 70_000
        assert settlement.expired and settlement.money is not None
        assert settlement.fate is MoneyFate.REFUND_DUE
        assert settlement.refund_cause is RefundCause.UNDERPAID_EXPIRED

    def test_an_underpaid_payment_is_overdue_past_its_expiry(self) -> None:
        payment = make_payment(PaymentState.UNDERPAID, paid=70_000)
        assert not payment.is_overdue(EXPIRY - timedelta(microseconds=1))
        assert payment.is_overdue(EXPIRY)


class TestExpiry:
    def test_expired_at_konnect_with_nothing_paid_expires_the_payment(self) -> None:
        payment = make_payment()
        settlement = payment.apply_verdict(verdict("expired"), RATE, LATER)
        assert settlement == Settlement(expired=True)
        assert payment.status is PaymentState.EXPIRED

    def test_pending_past_our_own_expiry_expires_the_payment(self) -> None:
        payment = make_payment()
        still_open = KonnectVerdict(state=PaymentState.PENDING, amount_paid=0, currency="TND")
        assert payment.apply_verdict(still_open, RATE, EXPIRY) == Settlement(expired=True)

    def test_an_ended_payment_expires_only_once(self) -> None:
        payment = make_payment(PaymentState.EXPIRED)
        assert payment.apply_verdict(verdict("expired"), RATE, LATER) == NOTHING

    def test_pending_with_failed_attempts_changes_nothing(self) -> None:
        payment = make_payment()
        settlement = payment.apply_verdict(verdict("pending", failedTransactions=1), RATE, LATER)
        assert settlement == NOTHING and payment.status is PaymentState.PENDING

    def test_konnect_not_knowing_the_payment_only_lets_our_expiry_end_it(self) -> None:
        payment = make_payment()
        assert payment.apply_verdict(KonnectVerdict.unknown("TND"), RATE, LATER) == NOTHING
        assert payment.apply_verdict(KonnectVerdict.unknown("TND"), RATE, EXPIRY).expired


class TestLateMoney:
    @pytest.mark.parametrize("ended", [PaymentState.EXPIRED, PaymentState.FAILED])
    def test_money_after_the_payment_ended_is_recorded_and_owed_back(
        self, ended: PaymentState
    ) -> None:
        payment = make_payment(ended)
        settlement = payment.apply_verdict(verdict("completed"), RATE, LATER)
        assert payment.status is PaymentState.COMPLETED and payment.amount_paid == PRICE
        assert settlement.fate is MoneyFate.REFUND_DUE
        assert settlement.refund_cause is RefundCause.PAYMENT_ENDED
        assert settlement.money is not None and settlement.money.previous_state is ended
        assert not settlement.expired

    def test_late_money_konnect_still_calls_expired_keeps_the_payment_ended(self) -> None:
        payment = make_payment(PaymentState.EXPIRED)
        settlement = payment.apply_verdict(partial(50_000, "expired"), RATE, LATER)
        assert payment.status is PaymentState.EXPIRED and payment.amount_paid == 50_000
        assert settlement.fate is MoneyFate.REFUND_DUE

    def test_late_money_on_top_of_an_expired_underpayment_owes_the_new_total(self) -> None:
        payment = make_payment(PaymentState.EXPIRED, paid=70_000)
        settlement = payment.apply_verdict(partial(PRICE, "completed"), RATE, LATER)
        assert settlement.fate is MoneyFate.REFUND_DUE
        assert settlement.money is not None and settlement.money.amount_paid == PRICE
        assert payment.status is PaymentState.COMPLETED

    def test_an_ended_payment_without_new_money_changes_nothing(self) -> None:
        payment = make_payment(PaymentState.EXPIRED, paid=70_000)
        before = snapshot(payment)
        assert payment.apply_verdict(partial(70_000, "expired"), RATE, LATER) == NOTHING
        assert snapshot(payment) == before


class TestMoneyForAnEndedOrder:
    def test_money_in_full_for_an_ended_order_is_owed_back_never_held(self) -> None:
        payment = make_payment()
        settlement = payment.apply_verdict(verdict("completed"), RATE, LATER, order_ended=True)
        assert payment.status is PaymentState.COMPLETED
        assert settlement.fate is MoneyFate.REFUND_DUE
        assert settlement.refund_cause is RefundCause.ORDER_ENDED

    def test_short_money_for_an_ended_order_waits_for_the_payment_to_end(self) -> None:
        payment = make_payment()
        settlement = payment.apply_verdict(partial(70_000), RATE, LATER, order_ended=True)
        assert payment.status is PaymentState.UNDERPAID
        assert settlement.fate is MoneyFate.UNDERPAID_FOR_ENDED_ORDER

    def test_its_expiry_with_money_owes_it_back(self) -> None:
        payment = make_payment(PaymentState.UNDERPAID, paid=70_000)
        settlement = payment.apply_verdict(
            partial(70_000, "expired"), RATE, LATER, order_ended=True
        )
        assert settlement.expired and settlement.fate is MoneyFate.REFUND_DUE
        assert settlement.refund_cause is RefundCause.ORDER_ENDED

    def test_its_expiry_without_money_only_expires(self) -> None:
        payment = make_payment()
        settlement = payment.apply_verdict(verdict("expired"), RATE, LATER, order_ended=True)
        assert settlement == Settlement(expired=True)

    def test_late_money_for_an_ended_order_names_the_ending(self) -> None:
        payment = make_payment(PaymentState.EXPIRED)
        settlement = payment.apply_verdict(verdict("completed"), RATE, LATER, order_ended=True)
        assert settlement.refund_cause is RefundCause.ORDER_ENDED


class TestVerdictRefusals:
    def test_a_currency_mismatch_is_reported_and_changes_nothing(self) -> None:
        payment = make_payment()
        before = snapshot(payment)
        settlement = payment.apply_verdict(verdict("completed", token="EUR"), RATE, LATER)
        assert isinstance(settlement.currency_mismatch, CurrencyMismatch)
        assert not settlement.changed and settlement.fate is None
        assert snapshot(payment) == before

    def test_another_currency_without_money_does_not_stop_an_expiry(self) -> None:
        payment = make_payment()
        assert payment.apply_verdict(verdict("expired", token="EUR"), RATE, LATER).expired

    @pytest.mark.parametrize("status", [PaymentState.INITIATING, PaymentState.INITIATION_FAILED])
    def test_a_payment_never_opened_takes_no_verdict(self, status: PaymentState) -> None:
        payment = make_payment(status)
        assert payment.apply_verdict(verdict("completed"), RATE, LATER) == NOTHING
        assert payment.status is status

    def test_a_float_rate_is_refused_before_anything_changes(self) -> None:
        payment = make_payment()
        with pytest.raises(InvalidFeeRate):
            payment.apply_verdict(verdict("completed"), 0.15, LATER)  # type: ignore[arg-type]
        assert payment.status is PaymentState.PENDING and payment.amount_paid is None


class TestPaymentEnding:
    @pytest.mark.parametrize("status", [PaymentState.PENDING, PaymentState.UNDERPAID])
    def test_an_open_payment_expires(self, status: PaymentState) -> None:
        payment = make_payment(status)
        payment.expire(LATER)
        assert payment.status is PaymentState.EXPIRED and payment.updated_at == LATER

    def test_a_pending_payment_fails(self) -> None:
        payment = make_payment()
        payment.fail(LATER)
        assert payment.status is PaymentState.FAILED

    @pytest.mark.parametrize(
        ("move", "status"),
        [
            ("expire", PaymentState.COMPLETED),
            ("expire", PaymentState.EXPIRED),
            ("expire", PaymentState.FAILED),
            ("expire", PaymentState.INITIATING),
            ("fail", PaymentState.COMPLETED),
            ("fail", PaymentState.EXPIRED),
            ("fail", PaymentState.FAILED),
            ("fail", PaymentState.UNDERPAID),
        ],
    )
    def test_only_an_open_payment_can_end(self, move: str, status: PaymentState) -> None:
        payment = make_payment(status)
        with pytest.raises(IllegalTransition) as refused:
            getattr(payment, move)(LATER)
        assert refused.value.from_state is status
        assert payment.status is status and payment.updated_at == T0

    def test_overdue_is_open_past_its_expiry(self) -> None:
        payment = make_payment()
        assert not payment.is_overdue(T0 + timedelta(minutes=29))
        assert payment.is_overdue(EXPIRY)
        payment.apply_verdict(verdict("completed"), RATE, LATER)
        assert not payment.is_overdue(T0 + timedelta(days=1))


END = T0 + timedelta(days=1, hours=1)
DELAY = timedelta(hours=24)
DUE = END + DELAY
ADMIN = "admin-7"


def paid_in_full() -> MoneyReceived:
    return MoneyReceived(
        amount=PRICE,
        amount_paid=PRICE,
        platform_fee=18_000,
        escrow_amount=102_000,
        currency="TND",
        paid_at=LATER,
        previous_state=PaymentState.PENDING,
    )


def held(*, scheduled: bool = False) -> EscrowHold:
    hold = EscrowHold.held_for(
        paid_in_full(), id=uuid4(), order_id=uuid4(), mentor_id=uuid4(), now=LATER
    )
    if scheduled:
        hold.schedule_release(END, DELAY, LATER)
    return hold


def frozen(kind: FreezeKind = FreezeKind.SCHEDULING_ABANDONED) -> EscrowHold:
    hold = held()
    hold.freeze(kind, f"frozen: {kind}", None, LATER)
    return hold


def released() -> EscrowHold:
    hold = held(scheduled=True)
    hold.release_when_due(DUE)
    return hold


def refund_due() -> EscrowHold:
    hold = frozen(FreezeKind.ORDER_CANCELLED)
    hold.choose_refund("the session will not happen", ADMIN, LATER)
    return hold


def refunded(reference: str = "R-1") -> EscrowHold:
    hold = refund_due()
    hold.record_refund(reference, "paid back by bank transfer", ADMIN, LATER)
    return hold


STATES: dict[str, Callable[[], EscrowHold]] = {
    "held": held,
    "held, release due": lambda: held(scheduled=True),
    "frozen (scheduling)": lambda: frozen(FreezeKind.SCHEDULING_ABANDONED),
    "frozen (cancelled)": lambda: frozen(FreezeKind.ORDER_CANCELLED),
    "frozen (overpaid)": lambda: frozen(FreezeKind.OVERPAID),
    "released": released,
    "refund_due": refund_due,
    "refunded": refunded,
}

AT = DUE + timedelta(days=365)  # when every move of the table below is made

MOVES: dict[str, Callable[[EscrowHold], object]] = {
    "release_when_due": lambda h: h.release_when_due(AT),
    "freeze (cancelled)": lambda h: h.freeze(FreezeKind.ORDER_CANCELLED, "cancelled", ADMIN, AT),
    "freeze (scheduling)": lambda h: h.freeze(
        FreezeKind.SCHEDULING_ABANDONED, "abandoned", None, AT
    ),
    "release_by_admin": lambda h: h.release_by_admin("the mentor held it", ADMIN, AT),
    "choose_refund": lambda h: h.choose_refund("not held", ADMIN, AT),
    "record_refund (R-1)": lambda h: h.record_refund("R-1", "paid back", ADMIN, AT),
    "record_refund (R-2)": lambda h: h.record_refund("R-2", "paid back", ADMIN, AT),
    "owe_more": lambda h: h.owe_more(PRICE + 10_000, 110_500, "late money", AT),
}

H, F = EscrowStatus.HELD, EscrowStatus.FROZEN
R, D, X = EscrowStatus.RELEASED, EscrowStatus.REFUND_DUE, EscrowStatus.REFUNDED
SAME, NO = "already applied", "refused"

# What each move does from each state: the status it leads to, SAME (AlreadyApplied: nothing
# changes) or NO (IllegalTransition: nothing changes). docs/recovery.md section 4.
EXPECTED: dict[str, dict[str, EscrowStatus | str]] = {
    "held": {
        "release_when_due": NO,  # never scheduled: never released on its own
        "freeze (cancelled)": F,
        "freeze (scheduling)": F,
        "release_by_admin": NO,
        "choose_refund": NO,
        "record_refund (R-1)": NO,
        "record_refund (R-2)": NO,
        "owe_more": NO,
    },
    "held, release due": {
        "release_when_due": R,
        "freeze (cancelled)": F,
        "freeze (scheduling)": F,
        "release_by_admin": NO,
        "choose_refund": NO,
        "record_refund (R-1)": NO,
        "record_refund (R-2)": NO,
        "owe_more": NO,
    },
    "frozen (scheduling)": {
        "release_when_due": NO,
        "freeze (cancelled)": F,  # the graver reason replaces it
        "freeze (scheduling)": SAME,
        "release_by_admin": R,
        "choose_refund": D,
        "record_refund (R-1)": NO,
        "record_refund (R-2)": NO,
        "owe_more": NO,
    },
    "frozen (cancelled)": {
        "release_when_due": NO,
        "freeze (cancelled)": SAME,
        "freeze (scheduling)": SAME,
        "release_by_admin": R,
        "choose_refund": D,
        "record_refund (R-1)": NO,
        "record_refund (R-2)": NO,
        "owe_more": NO,
    },
    "frozen (overpaid)": {
        "release_when_due": NO,
        "freeze (cancelled)": F,
        "freeze (scheduling)": SAME,
        "release_by_admin": R,
        "choose_refund": D,
        "record_refund (R-1)": NO,
        "record_refund (R-2)": NO,
        "owe_more": NO,
    },
    "released": {
        "release_when_due": SAME,
        "freeze (cancelled)": NO,
        "freeze (scheduling)": NO,
        "release_by_admin": SAME,
        "choose_refund": NO,
        "record_refund (R-1)": NO,
        "record_refund (R-2)": NO,
        "owe_more": NO,
    },
    "refund_due": {
        "release_when_due": NO,
        "freeze (cancelled)": NO,
        "freeze (scheduling)": NO,
        "release_by_admin": NO,
        "choose_refund": SAME,
        "record_refund (R-1)": X,
        "record_refund (R-2)": X,
        "owe_more": D,
    },
    "refunded": {
        "release_when_due": NO,
        "freeze (cancelled)": NO,
        "freeze (scheduling)": NO,
        "release_by_admin": NO,
        "choose_refund": NO,
        "record_refund (R-1)": SAME,  # refunded under R-1
        "record_refund (R-2)": NO,  # a second refund under another reference
        "owe_more": NO,
    },
}


def test_the_expectations_cover_every_state_and_move() -> None:
    assert set(EXPECTED) == set(STATES)
    assert all(set(moves) == set(MOVES) for moves in EXPECTED.values())


class TestEveryStateAndMove:
    @pytest.mark.parametrize(
        ("state", "move"), [(state, move) for state in STATES for move in MOVES]
    )
    def test_each_move_from_each_state(self, state: str, move: str) -> None:
        hold = STATES[state]()
        before = snapshot(hold)
        expected = EXPECTED[state][move]
        if expected == NO:
            with pytest.raises(IllegalTransition) as refused:
                MOVES[move](hold)
            assert refused.value.from_state is before["status"]
            assert snapshot(hold) == before
        elif expected == SAME:
            with pytest.raises(AlreadyApplied):
                MOVES[move](hold)
            assert snapshot(hold) == before
        else:
            MOVES[move](hold)
            assert hold.status is expected
            assert hold.sequence == before["sequence"] + 1
            assert hold.updated_at == AT


class TestMadeHeldOrOwedBack:
    def test_a_payment_in_full_is_held_with_no_release_due_yet(self) -> None:
        hold = held()
        assert (hold.status, hold.sequence, hold.release_due_at) == (H, 1, None)
        assert (hold.amount, hold.amount_paid, hold.currency) == (102_000, PRICE, "TND")
        assert hold.refund_amount is None and hold.frozen_reason is None

    def test_money_for_an_ended_order_is_owed_back_from_the_start(self) -> None:
        hold = EscrowHold.owed_back(
            id=uuid4(),
            order_id=uuid4(),
            mentor_id=uuid4(),
            escrow_amount=59_500,
            amount_paid=70_000,
            currency="TND",
            reason="the payment expired short",
            now=LATER,
        )
        assert (hold.status, hold.sequence) == (D, 1)
        # Everything the mentee paid goes back, the platform's fee included.
        assert (hold.refund_amount, hold.amount) == (70_000, 59_500)
        assert hold.reason == "the payment expired short" and hold.release_due_at is None

    def test_a_sequence_starts_at_one(self) -> None:
        with pytest.raises(ValueError):
            replace(held(), sequence=0)

    def test_a_hold_holds_minor_units(self) -> None:
        with pytest.raises(InvalidMoney):
            replace(held(), amount=1.5)  # type: ignore[arg-type]  # the point: a float


class TestTheSessionsFate:
    def test_order_confirmed_makes_the_release_due_after_the_session_plus_the_delay(self):
        hold = held()
        assert hold.schedule_release(END, DELAY, LATER) is ReleaseScheduling.SCHEDULED
        assert hold.release_due_at == DUE and hold.status is H
        assert hold.sequence == 1  # no transition: no event

    def test_the_same_confirmation_again_changes_nothing(self) -> None:
        hold = held(scheduled=True)
        before = snapshot(hold)
        assert hold.schedule_release(END, DELAY, LATER) is ReleaseScheduling.UNCHANGED
        assert snapshot(hold) == before

    def test_a_moved_session_moves_the_release(self) -> None:
        hold = held(scheduled=True)
        later_end = END + timedelta(days=2)
        assert hold.schedule_release(later_end, DELAY, LATER) is ReleaseScheduling.SCHEDULED
        assert hold.release_due_at == later_end + DELAY

    def test_a_hold_frozen_for_the_scheduling_is_held_again_when_scheduled(self) -> None:
        hold = frozen(FreezeKind.SCHEDULING_ABANDONED)
        assert hold.schedule_release(END, DELAY, LATER) is ReleaseScheduling.UNFROZEN
        assert (hold.status, hold.sequence, hold.release_due_at) == (H, 3, DUE)
        assert hold.frozen_reason is None and hold.decided_by is None
        assert "scheduled" in (hold.reason or "")

    @pytest.mark.parametrize(
        "state",
        ["frozen (cancelled)", "frozen (overpaid)", "released", "refund_due", "refunded"],
    )
    def test_any_other_state_ignores_the_session_and_never_errs(self, state: str) -> None:
        hold = STATES[state]()
        before = snapshot(hold)
        assert hold.schedule_release(END, DELAY, LATER) is ReleaseScheduling.IGNORED
        assert snapshot(hold) == before

    def test_a_scheduled_hold_is_released_when_due_and_not_before(self) -> None:
        hold = held(scheduled=True)
        with pytest.raises(ReleaseTooEarly) as early:
            hold.release_when_due(DUE - timedelta(microseconds=1))
        assert early.value.due_at == DUE and hold.status is H
        hold.release_when_due(DUE)
        assert (hold.status, hold.sequence, hold.released_at) == (R, 2, DUE)
        assert hold.decided_by is None

    def test_a_held_hold_never_scheduled_is_never_released(self) -> None:
        hold = held()
        with pytest.raises(IllegalTransition):
            hold.release_when_due(END + DELAY * 1000)
        assert hold.status is H and hold.released_at is None

    @pytest.mark.parametrize("kind", list(FreezeKind))
    def test_freezing_says_why_and_clears_the_due_release(self, kind: FreezeKind) -> None:
        hold = held(scheduled=True)
        hold.freeze(kind, "why it froze", ADMIN, LATER)
        assert (hold.status, hold.frozen_reason, hold.sequence) == (F, kind, 2)
        assert (hold.reason, hold.decided_by, hold.release_due_at) == ("why it froze", ADMIN, None)
        with pytest.raises(IllegalTransition):
            hold.release_when_due(DUE + DELAY * 100)

    def test_a_hold_frozen_for_the_scheduling_then_cancelled_stays_frozen_for_good(self) -> None:
        hold = frozen(FreezeKind.SCHEDULING_ABANDONED)
        hold.freeze(FreezeKind.ORDER_CANCELLED, "the order was cancelled", ADMIN, LATER)
        assert (hold.status, hold.frozen_reason, hold.sequence) == (
            F,
            FreezeKind.ORDER_CANCELLED,
            3,
        )
        assert hold.schedule_release(END, DELAY, LATER) is ReleaseScheduling.IGNORED
        assert hold.status is F


class TestAnAdminsDecisions:
    def test_an_admin_releases_a_frozen_hold(self) -> None:
        hold = frozen()
        hold.release_by_admin("the session took place after all", ADMIN, LATER)
        assert (hold.status, hold.sequence, hold.released_at) == (R, 3, LATER)
        assert (hold.reason, hold.decided_by) == ("the session took place after all", ADMIN)
        assert hold.refund_amount is None

    def test_an_admin_chooses_a_refund_of_everything_paid(self) -> None:
        hold = frozen()
        hold.choose_refund("the mentor did not show up", ADMIN, LATER)
        assert (hold.status, hold.sequence, hold.refund_amount) == (D, 3, PRICE)
        assert hold.frozen_reason is FreezeKind.SCHEDULING_ABANDONED  # why it had been frozen

    def test_an_admin_records_the_refund_with_its_reference(self) -> None:
        hold = refund_due()
        hold.record_refund("BT-2030-001", "paid back by transfer", ADMIN, LATER)
        assert (hold.status, hold.refund_reference, hold.refunded_at) == (
            X,
            "BT-2030-001",
            LATER,
        )
        assert (hold.sequence, hold.decided_by) == (4, ADMIN)

    def test_a_second_reference_for_a_refund_is_refused_with_both_named(self) -> None:
        hold = refunded("R-1")
        with pytest.raises(RefundAlreadyRecorded) as refused:
            hold.record_refund("R-2", "again", ADMIN, LATER)
        assert "R-1" in str(refused.value) and "R-2" in str(refused.value)
        assert hold.refund_reference == "R-1"

    @pytest.mark.parametrize("reference", ["", "   "])
    def test_a_refund_is_recorded_with_a_reference(self, reference: str) -> None:
        hold = refund_due()
        with pytest.raises(ValueError):
            hold.record_refund(reference, "paid back", ADMIN, LATER)
        assert hold.status is D

    def test_every_transition_says_why(self) -> None:
        hold = frozen()
        with pytest.raises(ValueError):
            hold.release_by_admin(" ", ADMIN, LATER)
        assert hold.status is F and hold.sequence == 2


class TestLateMoneyOwed:
    def test_more_late_money_grows_the_refund_due(self) -> None:
        hold = EscrowHold.owed_back(
            id=uuid4(),
            order_id=uuid4(),
            mentor_id=uuid4(),
            escrow_amount=59_500,
            amount_paid=70_000,
            currency="TND",
            reason="expired short",
            now=LATER,
        )
        hold.owe_more(PRICE, 102_000, "the rest came after the expiry", LATER)
        assert (hold.status, hold.sequence) == (D, 2)
        assert (hold.refund_amount, hold.amount_paid, hold.amount) == (PRICE, PRICE, 102_000)

    def test_the_same_total_again_is_already_owed(self) -> None:
        hold = refund_due()
        before = snapshot(hold)
        with pytest.raises(AlreadyApplied):
            hold.owe_more(PRICE, 102_000, "the same money", LATER)
        assert snapshot(hold) == before


class TestSequence:
    def test_every_transition_counts_up_once(self) -> None:
        hold = held()  # 1
        hold.schedule_release(END, DELAY, LATER)  # no transition
        hold.freeze(FreezeKind.SCHEDULING_ABANDONED, "abandoned", None, LATER)  # 2
        hold.schedule_release(END, DELAY, LATER)  # 3: unfrozen
        hold.freeze(FreezeKind.ORDER_CANCELLED, "cancelled", ADMIN, LATER)  # 4
        hold.choose_refund("refund it", ADMIN, LATER)  # 5
        hold.record_refund("R-9", "paid back", ADMIN, LATER)  # 6
        assert (hold.status, hold.sequence) == (X, 6)

    def test_a_repeat_never_counts(self) -> None:
        hold = released()
        for _ in range(3):
            with pytest.raises(AlreadyApplied):
                hold.release_by_admin("again", ADMIN, LATER)
        assert hold.sequence == 2


# -- what webhooks may cost ----------------------------------------------------------------------


def taken(budget: LookupBudget, lookup: Lookup, now: float, asks: int) -> int:
    """How many of `asks` lookups at `now` the budget grants."""
    return sum(1 for _ in range(asks) if budget.take(lookup, now) == 0)


class TestLookupBudget:
    def test_webhooks_take_at_most_their_share_and_leave_the_rest_to_reconciliation(self):
        budget = LookupBudget(per_minute=30, webhook_share=0.7, now=0.0)

        assert taken(budget, Lookup.WEBHOOK, 0.0, 1000) == 21
        assert taken(budget, Lookup.RECONCILIATION, 0.0, 1000) == 9

    def test_reconciliation_may_use_what_webhooks_leave(self):
        budget = LookupBudget(per_minute=30, webhook_share=0.7, now=0.0)

        assert taken(budget, Lookup.RECONCILIATION, 0.0, 1000) == 30
        assert budget.take(Lookup.WEBHOOK, 0.0) > 0

    def test_a_refused_lookup_is_told_how_long_until_one_is_free_and_gets_it_then(self):
        budget = LookupBudget(per_minute=30, webhook_share=0.5, now=100.0)
        assert taken(budget, Lookup.WEBHOOK, 100.0, 15) == 15

        wait = budget.take(Lookup.WEBHOOK, 100.0)

        assert wait == pytest.approx(4.0)  # 15 a minute for webhooks: one each 4 s
        assert budget.take(Lookup.WEBHOOK, 100.0 + wait * 0.99) > 0
        assert budget.take(Lookup.WEBHOOK, 100.0 + wait) == 0

    def test_a_sustained_flood_of_webhooks_never_starves_reconciliation(self):
        per_minute, share = 30, 0.7
        budget = LookupBudget(per_minute, share, now=0.0)
        webhooks = reconciliations = 0
        for tenth in range(10 * 60 * 10):  # ten minutes: 100 webhooks a second, then a sweep ask
            now = tenth / 10
            webhooks += taken(budget, Lookup.WEBHOOK, now, 10)
            reconciliations += taken(budget, Lookup.RECONCILIATION, now, 1)

        minutes = 10
        assert webhooks <= share * per_minute * (minutes + 1)  # its rate, plus one burst
        assert reconciliations >= (1 - share) * per_minute * minutes
        assert webhooks + reconciliations <= per_minute * (minutes + 1)

    def test_tokens_never_pile_up_beyond_a_minutes_worth(self):
        budget = LookupBudget(per_minute=12, webhook_share=1.0, now=0.0)

        assert taken(budget, Lookup.WEBHOOK, 3600.0, 1000) == 12

    def test_webhooks_without_a_share_are_never_granted_one(self):
        budget = LookupBudget(per_minute=30, webhook_share=0, now=0.0)

        assert budget.take(Lookup.WEBHOOK, 0.0) == float("inf")
        assert budget.take(Lookup.WEBHOOK, 1e9) == float("inf")
        assert budget.take(Lookup.RECONCILIATION, 0.0) == 0

    @pytest.mark.parametrize(("per_minute", "share"), [(0, 0.5), (0.5, 0.5), (30, -0.1), (30, 1.1)])
    def test_a_budget_out_of_bounds_is_refused(self, per_minute: float, share: float):
        with pytest.raises(ValueError):
            LookupBudget(per_minute, share, now=0.0)


INTERVAL = timedelta(seconds=5)


def refs(count: int, start: int = 0) -> list[str]:
    return [f"{n:024x}" for n in range(start, start + count)]


class TestUnknownRefTally:
    def test_the_first_ref_of_a_quiet_spell_is_reported_at_once(self):
        tally = UnknownRefTally(INTERVAL, sample=20)

        report = tally.seen("a" * 24, T0)

        assert report is not None
        assert (report.count, report.refs) == (1, ("a" * 24,))
        assert report.first_seen_at == report.last_seen_at == T0
        assert tally.count == 0

    def test_those_that_follow_wait_for_the_interval_and_come_in_one_report(self):
        tally = UnknownRefTally(INTERVAL, sample=20)
        tally.seen("a" * 24, T0)

        later = [tally.seen(ref, T0 + timedelta(seconds=1)) for ref in refs(3)]

        assert later == [None, None, None] and tally.count == 3
        assert tally.due(T0 + INTERVAL - timedelta(microseconds=1)) is None
        report = tally.due(T0 + INTERVAL)
        assert report is not None and (report.count, report.refs) == (3, tuple(refs(3)))
        assert report.first_seen_at == report.last_seen_at == T0 + timedelta(seconds=1)
        assert tally.due(T0 + 10 * INTERVAL) is None  # nothing since

    def test_a_ref_after_the_interval_is_reported_by_its_own_webhook(self):
        tally = UnknownRefTally(INTERVAL, sample=20)
        tally.seen("a" * 24, T0)
        tally.seen("b" * 24, T0 + timedelta(seconds=2))

        report = tally.seen("c" * 24, T0 + INTERVAL)

        assert report is not None and report.refs == ("b" * 24, "c" * 24)

    def test_a_flood_keeps_the_first_and_the_last_refs_and_counts_them_all(self):
        tally = UnknownRefTally(INTERVAL, sample=20)
        flood = refs(10_000)
        reports = [tally.seen(ref, T0 + timedelta(milliseconds=n)) for n, ref in enumerate(flood)]
        reports.append(tally.due(T0 + timedelta(minutes=1)))

        made = [r for r in reports if r is not None]
        assert sum(r.count for r in made) == 10_000
        assert len(made) == 3  # at once, after 5 s, and the tail
        assert made[0].refs == (flood[0],)
        assert made[1].refs == (*flood[1:21], *flood[4981:5001])
        assert made[2].refs == (*flood[5001:5021], *flood[-20:])
        assert all(len(r.refs) <= 40 for r in made)

    def test_repeats_of_one_ref_are_counted_and_listed_once(self):
        tally = UnknownRefTally(INTERVAL, sample=2)
        tally.seen("0" * 24, T0)
        for ref in ["a" * 24, "b" * 24, "a" * 24, "c" * 24, "d" * 24, "c" * 24] * 100:
            tally.seen(ref, T0)

        report = tally.due(T0 + INTERVAL)

        assert report is not None and report.count == 600
        assert report.refs == ("a" * 24, "b" * 24, "d" * 24, "c" * 24)

    def test_a_report_that_could_not_be_recorded_joins_the_next(self):
        tally = UnknownRefTally(INTERVAL, sample=20)
        lost = tally.seen("a" * 24, T0)
        assert lost is not None
        tally.put_back(lost)
        assert tally.seen("b" * 24, T0 + timedelta(seconds=1)) is None  # no retry per webhook

        report = tally.due(T0 + INTERVAL)

        assert report is not None and (report.count, report.refs) == (2, ("a" * 24, "b" * 24))
        assert (report.first_seen_at, report.last_seen_at) == (T0, T0 + timedelta(seconds=1))

    def test_a_tally_needs_an_interval_and_a_sample(self):
        with pytest.raises(ValueError):
            UnknownRefTally(timedelta(0), sample=20)
        with pytest.raises(ValueError):
            UnknownRefTally(INTERVAL, sample=0)
