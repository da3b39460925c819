"""`make demo`: a narrated walkthrough of the whole system, against one started by `make run`.

`python -m demo` registers two mentors, connects one to the sandbox Google, books and pays a
session with each through the gateway and the sandbox Konnect, shows the first confirmed with its
Meet link and the second failing with the admin alert arriving on `/ws/admin`, then the system's
health. It finds the system where `make run` puts it (the same port variables, `BIND_HOST` and
`AUTH_JWT_SECRET`), and can be run again and again on the same system: every run makes its own
mentors. A failure is told in one line, never as a stack trace.
"""
