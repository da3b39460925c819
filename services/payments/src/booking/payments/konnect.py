"""The Konnect API v2 adapter: init-payment and get-payment, with bounded retries.

One `httpx.AsyncClient` per process, opened and closed by the app's lifespan. Every call carries
`x-api-key`. Timeouts, transport errors, 429 and 5xx are retried with exponential backoff and
full jitter, a bounded number of times (a short Retry-After is honoured); any other 4xx is an
answer, never retried. Konnect's `{"errors": [{code, target, message}]}` becomes an exception
that says what Konnect said. The API key never reaches a log line or an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from uuid import UUID

import httpx
from pydantic import SecretStr

from booking.payments.settings import PaymentsSettings
from booking.runtime.outside import (
    OutsideClient,
    RetriesExhausted,
    RetryPolicy,
    TransientAnswer,
    describe_failure,
    retry_after,
)

log = logging.getLogger(__name__)


# -- errors ----------------------------------------------------------------------------------


class KonnectError(Exception):
    """Konnect answered with an error: its HTTP status and its `errors` array."""

    def __init__(self, status: int, errors: list[dict[str, Any]], *, what: str) -> None:
        self.status = status
        self.errors = errors
        self.what = what
        super().__init__(f"Konnect {what} answered {status}: {self.message}")

    @property
    def message(self) -> str:
        """Konnect's own words: every error's message (and target), or the status alone."""
        parts = []
        for error in self.errors:
            text = str(error.get("message") or error.get("code") or "").strip()
            target = error.get("target")
            if text and target:
                text = f"{target}: {text}"
            if text:
                parts.append(text)
        return "; ".join(parts) or f"HTTP {self.status}"


class KonnectRefused(KonnectError):
    """400/422 and any other 4xx we do not name: the request itself is wrong. Not retried."""


class KonnectUnauthorized(KonnectError):
    """401: the API key is missing or wrong (a configuration error). Not retried."""


class PaymentNotFound(KonnectError):
    """404: Konnect knows no payment with that ref."""


class KonnectUnavailable(Exception):
    """Konnect could not be reached or kept failing (timeouts, 429, 5xx) through every attempt."""

    def __init__(self, what: str, attempts: int, last: BaseException | None) -> None:
        self.what = what
        self.attempts = attempts
        self.last = last
        cause = describe_failure(last) if last is not None else "no answer"
        super().__init__(f"Konnect {what} failed after {attempts} attempt(s): {cause}")


class _Transient(TransientAnswer, KonnectError):
    """A 429 or 5xx: worth another attempt."""


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InitiatedPayment:
    payment_ref: str
    pay_url: str


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    """What we ask Konnect to open: one payment for one order (amount in minor units)."""

    order_id: UUID
    amount: int
    currency: str
    description: str
    first_name: str
    last_name: str
    email: str
    phone: str | None
    lifespan_minutes: int
    webhook_url: str
    success_url: str
    fail_url: str


def return_url(
    base: str, order_id: UUID, outcome: Literal["success", "failed"], order_token: str
) -> str:
    """Where Konnect sends the payer back: `<base>/<order id>?outcome=<outcome>&token=<order
    token>`, keeping any query `base` has (Konnect appends its own `payment_ref`)."""
    parts = urlsplit(base)
    query = [*parse_qsl(parts.query), ("outcome", outcome), ("token", order_token)]
    path = f"{parts.path.rstrip('/')}/{order_id}"
    return urlunsplit(parts._replace(path=path, query=urlencode(query)))


# -- the client ------------------------------------------------------------------------------


class KonnectClient(OutsideClient):
    system = "Konnect"

    def __init__(
        self,
        *,
        api_url: str,
        api_key: SecretStr,
        wallet_id: str,
        timeout: float = 10.0,
        max_attempts: int = 4,
        retry_base: float = 0.5,
        retry_after_max: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        event_hooks: dict[str, list[Callable[..., Any]]] | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._api_key = api_key
        self.wallet_id = wallet_id
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_after_max = retry_after_max
        self.transport = transport
        self.event_hooks = event_hooks

    @classmethod
    def from_settings(cls, settings: PaymentsSettings, **kwargs: Any) -> KonnectClient:
        return cls(
            api_url=settings.konnect_api_url,
            api_key=settings.konnect_api_key,
            wallet_id=settings.konnect_wallet_id,
            timeout=settings.konnect_timeout_seconds,
            max_attempts=settings.konnect_max_attempts,
            retry_base=settings.konnect_retry_base_seconds,
            retry_after_max=settings.konnect_retry_after_max_seconds,
            **kwargs,
        )

    @property
    def configured(self) -> list[str]:
        """The settings Konnect needs that are missing (empty: configured)."""
        missing = []
        if not self.api_url:
            missing.append("KONNECT_API_URL")
        if not self._api_key.get_secret_value():
            missing.append("KONNECT_API_KEY")
        if not self.wallet_id:
            missing.append("KONNECT_WALLET_ID")
        return missing

    def _http_options(self) -> dict[str, Any]:
        return {"base_url": self.api_url}

    # -- the API -----------------------------------------------------------------------------

    async def init_payment(self, request: PaymentRequest) -> InitiatedPayment:
        """Open a payment (Konnect has no idempotency key: each call makes a new one)."""
        body: dict[str, Any] = {
            "receiverWalletId": self.wallet_id,
            "token": request.currency,
            "amount": request.amount,
            "type": "immediate",
            "description": request.description,
            "lifespan": request.lifespan_minutes,
            "checkoutForm": False,
            "addPaymentFeesToAmount": False,
            "firstName": request.first_name,
            "lastName": request.last_name,
            "email": request.email,
            "orderId": str(request.order_id),
            "webhook": request.webhook_url,
            # Konnect calls the webhook itself; the payer's browser goes to our pages.
            "silentWebhook": True,
            "successUrl": request.success_url,
            "failUrl": request.fail_url,
        }
        if request.phone:
            body["phoneNumber"] = request.phone
        answer = await self._call("init-payment", "POST", "/payments/init-payment", json=body)
        ref, pay_url = answer.get("paymentRef"), answer.get("payUrl")
        if not isinstance(ref, str) or not ref:
            raise KonnectError(200, [{"message": "no paymentRef"}], what="init-payment")
        if not isinstance(pay_url, str) or not pay_url.startswith(("https://", "http://")):
            # Refused here, not later: a link no payer can open must not be retried forever.
            raise KonnectError(200, [{"message": f"payUrl is no link: {pay_url!r}"}], what="init")
        return InitiatedPayment(payment_ref=ref, pay_url=pay_url)

    async def get_payment(self, payment_ref: str) -> dict[str, Any]:
        """The payment object (what Konnect returns under "payment")."""
        answer = await self._call("get-payment", "GET", f"/payments/{payment_ref}")
        payment = answer.get("payment")
        if not isinstance(payment, dict):
            raise KonnectError(200, [{"message": "no payment object"}], what="get-payment")
        return payment

    async def ping(self) -> int:
        """One unauthenticated request, no retries: Konnect's HTTP status, whatever it is."""
        response = await self.http.get("/")
        return response.status_code

    # -- retries -----------------------------------------------------------------------------

    @property
    def retries(self) -> RetryPolicy:
        return RetryPolicy("Konnect", self.max_attempts, self.retry_base, self.retry_after_max, log)

    async def _call(self, what: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        async def once(_attempt: int) -> dict[str, Any]:
            return await self._once(what, method, path, **kwargs)

        try:
            return await self.retries.call(what, once)
        except RetriesExhausted as exhausted:
            raise KonnectUnavailable(what, exhausted.attempts, exhausted.last) from exhausted.last

    async def _once(self, what: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await self.http.request(
            method, path, headers={"x-api-key": self._api_key.get_secret_value()}, **kwargs
        )
        if response.is_success:
            try:
                body = response.json()
            except ValueError as error:
                raise KonnectError(
                    response.status_code, [{"message": "the answer is not JSON"}], what=what
                ) from error
            if not isinstance(body, dict):
                raise KonnectError(
                    response.status_code, [{"message": "the answer is not an object"}], what=what
                )
            return body
        status = response.status_code
        errors = _errors_of(response)
        if status == 429 or status >= 500:
            raise _Transient(status, errors, what=what, retry_after=retry_after(response))
        if status == 401:
            raise KonnectUnauthorized(status, errors, what=what)
        if status == 404:
            raise PaymentNotFound(status, errors, what=what)
        raise KonnectRefused(status, errors, what=what)


def _errors_of(response: httpx.Response) -> list[dict[str, Any]]:
    """Konnect's `errors` array; a body of another shape becomes one error with its text."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()[:300]
        return [{"message": text}] if text else []
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list):
        return [e if isinstance(e, dict) else {"message": str(e)} for e in errors]
    if isinstance(body, dict) and isinstance(body.get("message") or body.get("detail"), str):
        return [{"message": body.get("message") or body.get("detail")}]
    return [{"message": str(body)[:300]}]
