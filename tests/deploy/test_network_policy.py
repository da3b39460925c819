"""deploy/k8s: who reaches whom. Only the gateway reaches the services, only the ingress
controller reaches the gateway, and the gateway believes X-Forwarded-For from its proxies only
(TRUSTED_PROXIES, never uvicorn's FORWARDED_ALLOW_IPS)."""

from __future__ import annotations

from typing import Any

import pytest

from booking.gateway.forwarded import parse_networks

OUTPUTS = ("base", "example")
SERVICES = ("orders", "payments", "calendar", "notifications")
INGRESS_NAMESPACE = {"kubernetes.io/metadata.name": "ingress-nginx"}


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def the_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector applied to `labels` (an empty selector selects all)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        present = key in labels
        if not {
            "In": present and labels.get(key) in (values or []),
            "NotIn": not present or labels[key] not in (values or []),
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def admitted(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The ingress rules of every NetworkPolicy selecting `name`'s pods (its own namespace)."""
    labels = pod_labels(of_kind(docs, "Deployment")[name])
    rules = []
    for policy in of_kind(docs, "NetworkPolicy").values():
        spec = policy["spec"]
        if selects(spec["podSelector"], labels):
            assert "Ingress" in spec["policyTypes"], policy["metadata"]["name"]
            rules += spec.get("ingress", [])
    return rules


@pytest.mark.parametrize("output", OUTPUTS)
class TestWhoReachesWhom:
    @pytest.mark.parametrize("name", SERVICES)
    def test_only_the_gateways_pods_reach_a_service_on_its_http_port(self, rendered, output, name):
        docs = rendered[output]
        rules = admitted(docs, name)
        assert rules, f"no NetworkPolicy selects {name}: anyone in the cluster reaches it"
        gateway = pod_labels(of_kind(docs, "Deployment")["gateway"])
        others = [pod_labels(d) for n, d in of_kind(docs, "Deployment").items() if n != "gateway"]
        ports = {p["name"] for p in the_container(of_kind(docs, "Deployment")[name])["ports"]}
        for rule in rules:
            assert rule.get("from"), f"{name}: a rule with no `from` admits everyone"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{name}: {peer} (other namespaces, IPs)"
                assert selects(peer["podSelector"], gateway)
                assert not any(selects(peer["podSelector"], o) for o in others), peer
            assert rule["ports"] == [{"protocol": "TCP", "port": "http"}]
            assert "http" in ports  # a named port: the container's

    def test_only_the_ingress_controller_reaches_the_gateway(self, rendered, output):
        docs = rendered[output]
        rules = admitted(docs, "gateway")
        assert rules, "no NetworkPolicy selects the gateway: X-Forwarded-For could come from anyone"
        for rule in rules:
            assert rule.get("from")
            for peer in rule["from"]:
                assert peer["namespaceSelector"] == {"matchLabels": INGRESS_NAMESPACE}
                assert "ipBlock" not in peer
            assert rule["ports"] == [{"protocol": "TCP", "port": "http"}]


@pytest.mark.parametrize("output", OUTPUTS)
class TestTheGatewaysClientAddress:
    def test_forwarded_headers_are_trusted_from_the_configured_proxies_only(self, rendered, output):
        env = {
            v["name"]: v.get("value")
            for v in the_container(of_kind(rendered[output], "Deployment")["gateway"])["env"]
        }
        trusted = parse_networks(env["TRUSTED_PROXIES"])  # what the gateway will read
        assert trusted, "TRUSTED_PROXIES empty: behind the ingress every client is the ingress"
        assert all(n.is_private for n in trusted), "a proxy inside the cluster, not the internet"
        assert parse_networks(env["KONNECT_WEBHOOK_SOURCES"]) == ()  # ops fill in Konnect's

    def test_uvicorn_is_never_told_to_trust_forwarded_headers(self, rendered, output):
        for doc in rendered[output]:
            text = repr(doc)
            assert "FORWARDED_ALLOW_IPS" not in text, doc["metadata"]["name"]
            assert "forwarded-allow-ips" not in text, doc["metadata"]["name"]


def test_nothing_else_sets_forwarded_allow_ips(compose):
    for name, service in compose["services"].items():
        assert "FORWARDED_ALLOW_IPS" not in (service.get("environment") or {}), name
