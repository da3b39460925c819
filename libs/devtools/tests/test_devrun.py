"""`make run`'s environment: the addresses that follow from the ports, unless set."""

import os

import pytest

from booking.devtools import infra
from booking.devtools.devrun import DevRunError, child_environment, devrun_settings, environment


class TestChildEnvironment:
    def test_the_services_find_each_other_and_the_sandboxes_on_the_ports_given(self):
        env = child_environment(
            {
                "GATEWAY_PORT": "9000",
                "PAYMENTS_PORT": "9002",
                "SANDBOX_KONNECT_PORT": "9010",
                "SANDBOX_GOOGLE_PORT": "9011",
            }
        )
        assert env["PUBLIC_BASE_URL"] == "http://127.0.0.1:9000"
        assert env["PAYMENTS_URL"] == "http://127.0.0.1:9002"
        assert env["KONNECT_API_URL"] == "http://127.0.0.1:9010/api/v2"
        assert env["SANDBOX_KONNECT_PUBLIC_URL"] == "http://127.0.0.1:9010"
        assert env["GOOGLE_TOKEN_URL"] == "http://127.0.0.1:9011/token"
        assert env["GOOGLE_CALENDAR_API_URL"] == "http://127.0.0.1:9011/calendar/v3"

    def test_an_address_set_in_the_environment_wins(self):
        env = child_environment({"KONNECT_API_URL": "https://api.konnect.example/api/v2"})
        assert env["KONNECT_API_URL"] == "https://api.konnect.example/api/v2"


class TestEnvironment:
    def test_an_env_file_beside_the_makefile_fills_in_and_the_environment_wins(
        self, tmp_path, monkeypatch
    ):
        (tmp_path / ".env").write_text(
            "# a comment\nGATEWAY_PORT=9100\nLOG_LEVEL=DEBUG\nDEVRUN_READY_TIMEOUT=5\n"
        )
        monkeypatch.setattr(infra, "PROJECT_ROOT", tmp_path)
        monkeypatch.setenv("LOG_LEVEL", "WARNING")
        env = environment()
        assert env["GATEWAY_PORT"] == "9100"
        assert env["LOG_LEVEL"] == "WARNING"
        assert devrun_settings(env).devrun_ready_timeout == 5

    def test_without_an_env_file_it_is_the_environment(self, tmp_path, monkeypatch):
        monkeypatch.setattr(infra, "PROJECT_ROOT", tmp_path)
        assert environment() == dict(os.environ)

    def test_a_bad_setting_of_its_own_is_one_clear_error(self):
        with pytest.raises(DevRunError, match="DEVRUN_STOP_GRACE: Input should be greater than 0"):
            devrun_settings({"DEVRUN_STOP_GRACE": "0"})
