"""The DSN extension's parameters (RFC 3461): RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT.

Ingress reads them off the client's commands (strictly: a bad one is
refused), the queue keeps them in the message record, and delivery writes
them on to a next hop that offers DSN. ENVID and ORCPT travel as xtext on
the wire and are kept decoded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 3461 4.3 and 4.4: the longest ENVID and ORCPT values, as sent (xtext).
MAX_ENVID = 100
MAX_ORCPT = 500
# RFC 3461 4: what the parameters may add to MAIL's and RCPT's command lines.
MAIL_LINE_GROWTH = 110
RCPT_LINE_GROWTH = 500

MAIL_KEYWORDS = ("RET", "ENVID")
RCPT_KEYWORDS = ("NOTIFY", "ORCPT")
DSN_KEYWORDS = MAIL_KEYWORDS + RCPT_KEYWORDS
NOTIFY_CONDITIONS = ("SUCCESS", "FAILURE", "DELAY")
# RFC 3461 4.1 leaves the default to the MTA; as Postfix, a recipient that
# gave no NOTIFY hears of failures and delays.
DEFAULT_NOTIFY = frozenset({"FAILURE", "DELAY"})

_HEX = "0123456789ABCDEF"
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_ADDRESS_TYPE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


class BadParameter(ValueError):
    """A DSN parameter the client got wrong; str() is the reply's text."""


def xtext_decode(text: str) -> str:
    """The value xtext (RFC 3461 4) encodes; BadParameter unless text is xtext of
    printable ASCII (as Postfix requires: the value ends up in a report header)."""
    if not _XTEXT.fullmatch(text):
        raise BadParameter("not xtext")
    decoded = re.sub(r"\+([0-9A-F]{2})", lambda found: chr(int(found[1], 16)), text)
    if not _printable(decoded):
        raise BadParameter("not printable ASCII")
    return decoded


def xtext_encode(value: str) -> str:
    return "".join(
        char
        if "!" <= char <= "~" and char not in "+="
        else f"+{_HEX[ord(char) >> 4]}{_HEX[ord(char) & 15]}"
        for char in value
    )


def notify_allows(notify: str, condition: str) -> bool:
    """Whether a recipient's NOTIFY (as kept: "" when none was given) asks for condition."""
    if not notify:
        return condition in DEFAULT_NOTIFY
    return condition in notify.split(",")


@dataclass(frozen=True)
class MailParameters:
    ret: str = ""  # "FULL", "HDRS", or "" when not given
    envid: str = ""  # decoded


@dataclass(frozen=True)
class RcptParameters:
    notify: str = ""  # "NEVER", conditions in NOTIFY_CONDITIONS order, or "" when not given
    orcpt: str = ""  # "addr-type;address", decoded


def split_parameters(
    text: str, keywords: tuple[str, ...]
) -> tuple[str, list[tuple[str, str | None]]]:
    """(the other parameters, (KEYWORD, value or None) of each in keywords) from esmtp
    parameters.

    Keywords are case-insensitive, values are kept as sent: ENVID and ORCPT
    are case-sensitive, which is why they are taken out before anything
    upper-cases the line.
    """
    rest: list[str] = []
    found: list[tuple[str, str | None]] = []
    for parameter in text.split(" "):
        keyword, equals, value = parameter.partition("=")
        if keyword.upper() in keywords:
            found.append((keyword.upper(), value if equals else None))
        elif parameter:
            rest.append(parameter)
    return " ".join(rest), found


def given_once(found: list[tuple[str, str | None]]) -> dict[str, str]:
    """{KEYWORD: value} of parameters that each take a value and are given once."""
    given: dict[str, str] = {}
    for keyword, value in found:
        if keyword in given:
            raise BadParameter(f"{keyword} given twice")
        if value is None:
            raise BadParameter(f"{keyword} needs a value")
        given[keyword] = value
    return given


def mail_parameters(given: dict[str, str]) -> MailParameters:
    ret = given.get("RET", "").upper()
    if "RET" in given and ret not in ("FULL", "HDRS"):
        raise BadParameter("RET must be FULL or HDRS")
    envid = ""
    if "ENVID" in given:
        if not given["ENVID"] or len(given["ENVID"]) > MAX_ENVID:
            raise BadParameter(f"ENVID must be 1 to {MAX_ENVID} characters")
        envid = _decoded("ENVID", given["ENVID"])
    return MailParameters(ret=ret, envid=envid)


def rcpt_parameters(given: dict[str, str]) -> RcptParameters:
    notify = ""
    if "NOTIFY" in given:
        conditions = given["NOTIFY"].upper().split(",")
        if conditions == ["NEVER"]:
            notify = "NEVER"
        elif len(set(conditions)) != len(conditions) or not set(conditions) <= set(
            NOTIFY_CONDITIONS
        ):
            raise BadParameter("NOTIFY must be NEVER, or SUCCESS, FAILURE and DELAY")
        else:
            notify = ",".join(c for c in NOTIFY_CONDITIONS if c in conditions)
    orcpt = ""
    if "ORCPT" in given:
        address_type, semicolon, address = given["ORCPT"].partition(";")
        if (
            not semicolon
            or not _ADDRESS_TYPE.fullmatch(address_type)
            or not address
            or len(given["ORCPT"]) > MAX_ORCPT
        ):
            raise BadParameter("ORCPT must be addr-type;xtext, at most 500 characters")
        orcpt = f"{address_type.lower()};{_decoded('ORCPT', address)}"
    return RcptParameters(notify=notify, orcpt=orcpt)


def dsn_problem(ret: str, envid: str, recipients: list[tuple[str, str]]) -> str:
    """What is wrong with DSN parameters in the form they are kept in (a gRPC client's
    Envelope), or "" when nothing is: (NOTIFY, ORCPT) per recipient."""
    if ret not in ("", "FULL", "HDRS"):
        return "dsn_ret must be FULL, HDRS or empty"
    if len(xtext_encode(envid)) > MAX_ENVID or not _printable(envid):
        return f"dsn_envid must be printable ASCII, at most {MAX_ENVID} characters as xtext"
    for notify, orcpt in recipients:
        if notify and notify != "NEVER" and notify != rcpt_parameters({"NOTIFY": notify}).notify:
            return "notify must be NEVER or SUCCESS,FAILURE,DELAY (some, in that order)"
        address_type, semicolon, address = orcpt.partition(";")
        if orcpt and not (
            semicolon and _ADDRESS_TYPE.fullmatch(address_type) and address and _printable(address)
        ):
            return "orcpt must be addr-type;address in printable ASCII"
    return ""


def _printable(text: str) -> bool:
    return all(" " <= char <= "~" for char in text)


def mail_parameters_text(parameters: MailParameters) -> list[str]:
    """RET and ENVID as written on to a next hop that offers DSN."""
    written = [f"RET={parameters.ret}"] if parameters.ret else []
    if parameters.envid:
        written.append(f"ENVID={xtext_encode(parameters.envid)}")
    return written


def rcpt_parameters_text(parameters: RcptParameters) -> list[str]:
    """NOTIFY and ORCPT as written on to a next hop that offers DSN."""
    written = [f"NOTIFY={parameters.notify}"] if parameters.notify else []
    if parameters.orcpt:
        address_type, _, address = parameters.orcpt.partition(";")
        written.append(f"ORCPT={address_type};{xtext_encode(address)}")
    return written


def _decoded(keyword: str, text: str) -> str:
    try:
        return xtext_decode(text)
    except BadParameter as error:
        raise BadParameter(f"{keyword} is {error}") from None
