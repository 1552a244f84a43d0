"""TLS reporting (RFC 8460) data: each session to an MX host counted by policy domain
and result, as a metric and as the day's JSON report on delivery's /tlsrpt.

The whole relay (`kurrier up`) delivers by MX to real sinks: one with a
certificate of the test's CA, one self-signed, one without STARTTLS; the
MTA-STS policy host is a real HTTPS server. Only DNS is the test's own
server (tests/support/dns_server.py): real DNS is not reachable here.
"""

from __future__ import annotations

import datetime
import json
import smtplib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.delivery.attempts import publish_sts, sts_policy
from tests.support.certs import TestCA, self_signed_context
from tests.support.dns_server import DnsServer
from tests.support.metrics import value
from tests.support.policy_server import PolicyServer
from tests.support.processes import free_ports
from tests.support.relay import UpRelay, documents, mx_route, trusting, wait_until_drained
from tests.support.sink import Sink


def _get(address: str, path: str) -> Any:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as response:
        assert response.headers["Content-Type"] == "application/json"
        return json.load(response)


def test_sessions_to_mx_hosts_are_counted_per_policy_domain_and_reported(
    tmp_path: Path, dns_server: DnsServer, mx_port: int, test_ca: TestCA
) -> None:
    publish_sts(dns_server, "sts.test", "127.0.1.30")  # mx1 127.0.0.2, mx2 127.0.0.3
    dns_server.add("plain.test", "MX", "10 mx.plain.test.")
    dns_server.add("mx.plain.test", "A", "127.0.0.4")
    config = documents(mx_route("by-mx", ["*"], tls="opportunistic"), trusting("127.0.0.0/8"))
    base = free_ports(3)
    with (
        PolicyServer(
            "127.0.1.30",
            test_ca.server_context("mta-sts.sts.test"),
            sts_policy("enforce", "mx1.sts.test", "mx2.sts.test"),
        ),
        Sink(mx_port, "127.0.0.2", tls_context=self_signed_context(tmp_path, "mx1.sts.test")),
        Sink(mx_port, "127.0.0.3", tls_context=test_ca.server_context("mx2.sts.test")) as good,
        Sink(mx_port, "127.0.0.4") as plain,  # no STARTTLS
        UpRelay(
            tmp_path,
            config,
            "--dns-resolver",
            dns_server.address,
            "--mx-port",
            str(mx_port),
            "--tls-ca-file",
            str(test_ca.ca_file),
            "--metrics-base-port",
            str(base),
        ) as relay,
    ):
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
            smtp.sendmail(
                "s@senders.test", ["a@sts.test", "b@plain.test"], b"Subject: r\r\n\r\nx\r\n"
            )
        good.wait_for(1)
        plain.wait_for(1)
        wait_until_drained(relay.nats_url, 30)
        metrics = relay.state["metrics"]
        assert isinstance(metrics, dict)
        delivery = str(metrics["delivery"])
        today = datetime.datetime.now(datetime.UTC).date().isoformat()
        report = _get(delivery, f"/tlsrpt?day={today}")
        assert _get(delivery, "/tlsrpt") == report  # today by default
        assert _get(delivery, "/tlsrpt?day=2001-01-01")["policies"] == []
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(delivery, "/tlsrpt?day=yesterday")
        assert refused.value.code == 400
        port = int(delivery.rsplit(":", 1)[1])
        untrusted = value(
            port,
            "kurrier_delivery_tls_sessions_total",
            policy_type="sts",
            result="certificate-not-trusted",
        )
    assert untrusted == 1
    assert report["date-range"] == {
        "start-datetime": f"{today}T00:00:00Z",
        "end-datetime": f"{today}T23:59:59Z",
    }
    assert report["report-id"].startswith(today)
    # One entry per policy domain, in domain order.
    no_policy, sts = report["policies"]
    assert sts["policy"] == {
        "policy-type": "sts",
        "policy-string": [
            "version: STSv1",
            "mode: enforce",
            "mx: mx1.sts.test",
            "mx: mx2.sts.test",
            "max_age: 86400",
        ],
        "policy-domain": "sts.test",
        "mx-host": ["mx1.sts.test", "mx2.sts.test"],
    }
    assert sts["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 1,
    }
    assert sts["failure-details"] == [
        {
            "result-type": "certificate-not-trusted",
            "receiving-mx-hostname": "mx1.sts.test",
            "receiving-ip": "127.0.0.2",
            "failed-session-count": 1,
        }
    ]
    assert no_policy["policy"] == {"policy-type": "no-policy-found", "policy-domain": "plain.test"}
    assert no_policy["summary"]["total-failure-session-count"] == 1
    assert no_policy["failure-details"][0]["result-type"] == "starttls-not-supported"
