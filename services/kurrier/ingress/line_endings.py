"""Line-ending normalisation of DATA, the defence against SMTP smuggling.

aiosmtpd ends DATA only on <CRLF>.<CRLF>, but a bare LF or CR inside the data
could be read as a line end by the next hop and end the message early there
(SEC Consult, Dec 2023). Like Postfix's smtpd_forbid_bare_newline=normalize,
every bare LF and bare CR becomes CRLF before the message is stored.
"""

from __future__ import annotations

import re

_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def normalise_line_endings(data: bytes) -> bytes:
    # Three C-speed scans decide the common, clean case without a regex pass.
    crlf = data.count(b"\r\n")
    if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
        return data
    return _BARE_NEWLINE.sub(b"\r\n", data)
