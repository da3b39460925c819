"""Postgres and RabbitMQ for a local run, when none answers: our own, under the project folder.

`make run` and `make test` look for the servers at DATABASE_URL and RABBITMQ_URL. When those are
unset and nothing answers at the usual local addresses, they bring their own (see `provide`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from booking.runtime.settings import DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL

PROJECT_ROOT = Path(__file__).resolve().parents[5]


class InfraSettings(BaseSettings):
    """Where `make run` and `make test` look for servers, and where they keep their own."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # Where to look for a running server when DATABASE_URL (RABBITMQ_URL) is unset.
    infra_probe_database_url: str = DEFAULT_DATABASE_URL
    infra_probe_rabbitmq_url: str = DEFAULT_RABBITMQ_URL
    # Where the servers `make run` starts itself keep their data (kept across runs; `make
    # clean-infra` removes it), and their ports: apart from the usual ones, so they never clash.
    infra_dir: Path = PROJECT_ROOT / ".infra"
    infra_postgres_port: int = 55432
    infra_rabbitmq_port: int = 55672
    infra_rabbitmq_dist_port: int = 55673
