"""Tools for developers and tests, kept out of the shipped image: `make run`'s supervisor
(`devrun`), the pytest fixtures every package's tests share (`fixtures`), a local OpenID-style
identity provider (`identity_provider`) and the gateway's stateful contract run (`contract_run`).
"""
