"""Konnect payments as the real API keeps them: the init body, the payment, its transactions.

Pure: no I/O, and every function that needs the time is given `now`.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

REF_PATTERN = re.compile(r"[0-9a-f]{24}")
PaymentMethod = Literal["wallet", "bank_card", "e-DINAR", "flouci"]
PAYMENT_METHODS: tuple[PaymentMethod, ...] = get_args(PaymentMethod)
# Konnect's own fee on a card payment; what it is exactly is not public, any plausible rate
# will do to show that transaction amounts are not the payment's amount.
FEE_RATE = Decimal("0.015")


def iso(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and a Z, as Konnect writes its dates."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_ref() -> str:
    """24 lowercase hex characters, the shape of Konnect's ids."""
    return secrets.token_hex(12)


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an absolute http(s) URL")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


HttpUrl = Annotated[StrictStr, AfterValidator(_http_url)]


class InitPayment(BaseModel):
    """The body of `POST /payments/init-payment`. Strict: Konnect wants integers, not 12.5."""

    # Unknown fields are ignored, as Konnect does.
    model_config = ConfigDict(extra="ignore", frozen=True)

    receiverWalletId: Annotated[StrictStr, AfterValidator(_not_blank)]
    amount: Annotated[StrictInt, Field(gt=0)]
    token: Literal["TND", "EUR", "USD"] = "TND"
    type: Literal["immediate", "partial"] = "immediate"
    description: StrictStr | None = None
    acceptedPaymentMethods: list[PaymentMethod] = Field(
        default_factory=lambda: list(PAYMENT_METHODS), min_length=1
    )
    lifespan: Annotated[StrictInt, Field(gt=0)] = 10
    checkoutForm: StrictBool = False
    addPaymentFeesToAmount: StrictBool = False
    firstName: StrictStr | None = None
    lastName: StrictStr | None = None
    phoneNumber: StrictStr | None = None
    email: StrictStr | None = None
    orderId: StrictStr | None = None
    webhook: HttpUrl | None = None
    silentWebhook: StrictBool = False
    successUrl: HttpUrl | None = None
    failUrl: HttpUrl | None = None
    theme: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        # A client that serialises its unset fields as null means "not given"; a required
        # field sent as null is then reported as missing.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Pydantic's complaints in Konnect's `errors` form, each naming its target field."""
    errors = []
    for error in exc.errors(include_url=False):
        kind = error["type"]
        if kind == "missing":
            code = "required"
        elif kind.endswith("_type") or kind in ("model_attributes_type", "dict_type"):
            code = "invalid_type"
        else:
            code = "invalid_value"
        target = ".".join(str(part) for part in error["loc"]) or "body"
        errors.append({"code": code, "target": target, "message": error["msg"]})
    return errors


@dataclass
class Transaction:
    id: str
    status: Literal["success", "failed"]
    amount: int
    fees: int
    created_at: datetime
    method: str = "bank_card"

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "amount": self.amount,
            "method": self.method,
            "fees": self.fees,
            "createdAt": iso(self.created_at),
        }


class PaymentClosed(Exception):
    """The payment cannot take this attempt (already completed, or expired)."""


@dataclass
class Payment:
    ref: str
    link: str
    request: InitPayment
    created_at: datetime
    expiration_date: datetime
    updated_at: datetime
    type: str
    reached_amount: int = 0
    transactions: list[Transaction] = field(default_factory=list)

    @classmethod
    def open(cls, request: InitPayment, public_url: str, now: datetime) -> Payment:
        ref = new_ref()
        return cls(
            ref=ref,
            link=f"{public_url}/pay/{ref}",
            request=request,
            created_at=now,
            expiration_date=now + timedelta(minutes=request.lifespan),
            updated_at=now,
            type=request.type,
        )

    @property
    def amount(self) -> int:
        return self.request.amount

    @property
    def amount_due(self) -> int:
        return max(self.amount - self.reached_amount, 0)

    @property
    def completed(self) -> bool:
        return self.reached_amount >= self.amount

    def status(self, now: datetime) -> Literal["pending", "completed", "expired"]:
        if self.completed:
            return "completed"
        if now >= self.expiration_date:
            return "expired"
        return "pending"

    def pay(self, amount: int | None, now: datetime) -> Transaction:
        """A successful payment of `amount` (default: all that is due); less is a partial one.

        Completing an expired payment is allowed: it is the late payment that raced the expiry,
        which the control API must be able to stage. The pay page refuses it.
        """
        if self.completed:
            raise PaymentClosed("the payment is already completed")
        paid = self.amount_due if amount is None else amount
        if paid < self.amount_due:
            self.type = "partial"
        fees = int((Decimal(paid) * FEE_RATE).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        # With addPaymentFeesToAmount the payer pays the fees on top: the transaction is larger
        # than what reaches the merchant.
        charged = paid + fees if self.request.addPaymentFeesToAmount else paid
        transaction = Transaction(new_ref(), "success", charged, fees, now)
        self.transactions.append(transaction)
        self.reached_amount += paid
        self.updated_at = now
        return transaction

    def fail(self, now: datetime) -> Transaction:
        """A refused card: a failed transaction; the payment stays open for another try."""
        if self.completed:
            raise PaymentClosed("the payment is already completed")
        transaction = Transaction(new_ref(), "failed", self.amount_due, 0, now)
        self.transactions.append(transaction)
        self.updated_at = now
        return transaction

    def expire(self, now: datetime) -> None:
        self.expiration_date = min(self.expiration_date, now - timedelta(seconds=1))
        self.updated_at = now

    def as_json(self, now: datetime) -> dict[str, Any]:
        request = self.request
        return {
            "id": self.ref,
            "status": self.status(now),
            "amount": self.amount,
            "amountDue": self.amount_due,
            "reachedAmount": self.reached_amount,
            "token": request.token,
            "orderId": request.orderId,
            "type": self.type,
            "description": request.description,
            "acceptedPaymentMethods": list(request.acceptedPaymentMethods),
            "expirationDate": iso(self.expiration_date),
            "link": self.link,
            "webhook": request.webhook,
            "silentWebhook": request.silentWebhook,
            "successUrl": request.successUrl,
            "failUrl": request.failUrl,
            "receiverWallet": {"id": request.receiverWalletId},
            "successfulTransactions": sum(t.status == "success" for t in self.transactions),
            "failedTransactions": sum(t.status == "failed" for t in self.transactions),
            "transactions": [t.as_json() for t in self.transactions],
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
        }


@dataclass
class Payments:
    """Every payment this sandbox made, in the order it made them."""

    by_ref: dict[str, Payment] = field(default_factory=dict)

    def open(self, request: InitPayment, public_url: str, now: datetime) -> Payment:
        payment = Payment.open(request, public_url, now)
        self.by_ref[payment.ref] = payment
        return payment

    def get(self, ref: str) -> Payment | None:
        return self.by_ref.get(ref) if REF_PATTERN.fullmatch(ref) else None

    def all(self, order_id: str | None = None) -> list[Payment]:
        every = self.by_ref.values()
        return [p for p in every if order_id is None or p.request.orderId == order_id]

    def clear(self) -> None:
        self.by_ref.clear()
