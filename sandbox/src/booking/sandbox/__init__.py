"""Local stand-ins for the outside systems (Konnect, Google) for runs and tests.

`konnect` speaks Konnect's payment API v2 as /work/shared/reference/providers.md describes it,
with a pay page and a control API (/_sandbox) that stages payments, webhooks and faults. `google`
is still a placeholder that answers its health probes and a problem+json 404 for the rest.
"""
