"""A refused MAIL or RCPT is logged with why and for whom, as Postfix logs its rejects:
no message exists yet, so the log is the only place an operator can look."""

from __future__ import annotations

from tests.ingress.conftest import HostileRelay, fresh_ip
from tests.ingress.smtp_probe import SmtpProbe
from tests.support.processes import wait_until


def test_refused_mail_and_rcpt_are_logged_with_the_reply_and_the_envelope(
    hostile_relay: HostileRelay,
) -> None:
    ip = fresh_ip()
    with SmtpProbe(hostile_relay.smtp_port, ip) as smtp:
        assert smtp.reply().code == 220
        smtp.command("EHLO refused.test")
        mail = smtp.command("MAIL FROM:<ceo@alice.test>")  # alice's domain, without her login
        assert mail.code >= 500, mail.text
        assert smtp.command("MAIL FROM:<someone@client.test>").code == 250
        rcpt = smtp.command("RCPT TO:<victim@elsewhere.test>")
        assert rcpt.startswith("554 5.7.1"), rcpt.text
        assert smtp.command("RCPT TO:<user@example.com>").code == 250
    wanted = [
        f"refused MAIL from {ip}: {mail.lines[-1]}; from=<ceo@alice.test> helo=<refused.test>",
        f"refused RCPT from {ip}: {rcpt.lines[-1]}; from=<someone@client.test>"
        " to=<victim@elsewhere.test> helo=<refused.test>",
    ]

    def logged() -> bool:
        text = hostile_relay.ingress_log.read_text()
        return all(line in text for line in wanted)

    wait_until(logged, 10, "both refusals in the ingress log")
    accepted = [line for line in hostile_relay.ingress_log.read_text().splitlines() if ip in line]
    assert not [line for line in accepted if "user@example.com" in line], "accepted: not logged"
