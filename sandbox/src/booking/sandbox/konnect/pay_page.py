"""The page a payer opens at payUrl: the amount, the description, and Pay / Fail buttons.

A button acts like the control API (a full payment, or a refused card; the webhook once), then
sends the browser on as Konnect does: to successUrl / failUrl (with `payment_ref` added) when
given, else to a result page. With a webhook and `silentWebhook` false, Konnect sends the
browser to the webhook URL instead of calling it itself; so does the sandbox.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from html import escape

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from booking.sandbox.konnect.payments import Payment, Payments
from booking.sandbox.konnect.webhooks import Webhooks, with_payment_ref

# TND counts in millimes (3 decimals); EUR and USD in cents.
DECIMALS = {"TND": 3, "EUR": 2, "USD": 2}

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} | Konnect sandbox</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 28rem; margin: 3rem auto; color: #222; }}
.amount {{ font-size: 2rem; font-weight: 600; margin: .5rem 0; }}
.status {{ color: #555; }}
form {{ display: inline-block; margin-right: .5rem; }}
button {{ font-size: 1rem; padding: .5rem 1.5rem; border-radius: .3rem; border: 0;
  cursor: pointer; }}
button.pay {{ background: #0a7d33; color: #fff; }}
button.fail {{ background: #b3261e; color: #fff; }}
</style></head>
<body><p><small>Konnect sandbox: no real money moves here.</small></p>
<h1>{title}</h1>
{body}
</body></html>
"""


def money(amount: int, token: str) -> str:
    decimals = DECIMALS.get(token, 3)
    return f"{amount / 10**decimals:.{decimals}f} {token}"


def page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(PAGE.format(title=escape(title), body=body), status_code=status_code)


def summary(payment: Payment, now: datetime) -> str:
    request = payment.request
    lines = [f'<p class="amount">{money(payment.amount_due or payment.amount, request.token)}</p>']
    if payment.reached_amount and not payment.completed:
        lines.append(f"<p>Already paid: {money(payment.reached_amount, request.token)}</p>")
    if request.description:
        lines.append(f'<p class="description">{escape(request.description)}</p>')
    lines.append(f'<p class="status">Status: {payment.status(now)}</p>')
    return "\n".join(lines)


def pay_page_router(
    payments: Payments, webhooks: Webhooks, clock: Callable[[], datetime]
) -> APIRouter:
    router = APIRouter(prefix="/pay", include_in_schema=False)

    def closed_page(payment: Payment, now: datetime, status_code: int) -> HTMLResponse | None:
        """The page for a payment that takes no more attempts, or None while it is payable."""
        status = payment.status(now)
        if status == "completed":
            message = "<p>This payment is already completed. Nothing more is due.</p>"
            return page("Already paid", summary(payment, now) + message, status_code)
        if status == "expired":
            message = "<p>This payment link has expired. Ask the merchant for a new one.</p>"
            return page("Payment expired", summary(payment, now) + message, status_code)
        return None

    def unknown() -> HTMLResponse:
        return page("Unknown payment", "<p>There is no payment at this address.</p>", 404)

    def onward(payment: Payment, redirect_to: str | None, title: str, now: datetime) -> Response:
        request = payment.request
        if request.webhook and not request.silentWebhook:
            return RedirectResponse(with_payment_ref(request.webhook, payment.ref), 303)
        if redirect_to:
            return RedirectResponse(with_payment_ref(redirect_to, payment.ref), 303)
        again = f'<p><a href="/pay/{payment.ref}">Back to the payment</a></p>'
        return page(title, summary(payment, now) + again)

    async def notify(payment: Payment) -> None:
        if payment.request.silentWebhook:
            await webhooks.notify(payment.request.webhook, payment.ref, "once", 0, "pay_page")

    @router.get("/{ref}")
    async def show(ref: str) -> HTMLResponse:
        payment = payments.get(ref)
        if payment is None:
            return unknown()
        now = clock()
        if closed := closed_page(payment, now, 200):
            return closed
        buttons = (
            f'<form method="post" action="/pay/{ref}/pay">'
            '<button class="pay" type="submit">Pay</button></form>'
            f'<form method="post" action="/pay/{ref}/fail">'
            '<button class="fail" type="submit">Fail</button></form>'
        )
        return page("Pay with Konnect", summary(payment, now) + buttons)

    @router.post("/{ref}/pay")
    async def pay(ref: str) -> Response:
        payment = payments.get(ref)
        if payment is None:
            return unknown()
        now = clock()
        if closed := closed_page(payment, now, 409):
            return closed
        payment.pay(None, now)
        await notify(payment)
        return onward(payment, payment.request.successUrl, "Payment completed", clock())

    @router.post("/{ref}/fail")
    async def fail(ref: str) -> Response:
        payment = payments.get(ref)
        if payment is None:
            return unknown()
        now = clock()
        if closed := closed_page(payment, now, 409):
            return closed
        payment.fail(now)
        await notify(payment)
        return onward(payment, payment.request.failUrl, "Payment failed", clock())

    return router
