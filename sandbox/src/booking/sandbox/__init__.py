"""Local stand-ins for the outside systems (Konnect, Google) for runs and tests.

Each speaks its provider's wire format as /work/shared/reference/providers.md describes it, so a
client tested against it works against the real thing: `konnect` is Konnect's payment API v2 with
a pay page; `google` is Google's OAuth consent and token endpoints and Calendar API v3. Both have
a control API under /_sandbox that stages outcomes (payments, webhooks, revoked tokens) and faults,
open only with the control token (control.py).
"""
