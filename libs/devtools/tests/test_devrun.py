"""`make run`'s environment: the addresses that follow from the ports, unless set."""

from booking.devtools.devrun import child_environment


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
