"""Debian's Postfix as a submitting client: a private instance that relays everything
its sendmail is given to one SMTP server (the relay under test).

`postfix -c DIR start-fg` runs master and its daemons from a configuration
and queue of the test's own, nothing of a system instance; its smtp client
then speaks to the relay as Postfix does to any relayhost (EHLO, PIPELINING,
the DSN parameters when offered). Needs root, as Postfix does.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.processes import stop_process, wait_until

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-client.test
mydomain = postfix-client.test
mydestination =
local_transport = error:no local delivery here
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
relayhost = [127.0.0.1]:{relay_port}
smtp_dns_support_level = disabled
smtp_tls_security_level = none
maillog_file_prefixes = {root}
maillog_file = {root}/postfix.log
biff = no
"""

# Debian's master.cf without chroot and without listeners: a client only.
MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixClient:
    def __init__(self, relay_port: int) -> None:
        # Not under pytest's tmp_path: Postfix's daemons run as the postfix user,
        # which may not enter root's private temporary directories.
        self.root = Path(tempfile.mkdtemp(prefix="kurrier-postfix-"))
        self.root.chmod(0o755)
        self.config = self.root / "etc"
        self.relay_port = relay_port
        self._master: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PostfixClient:
        for sub in ("etc", "spool", "data"):
            (self.root / sub).mkdir()
        shutil.chown(self.root / "data", "postfix", "postfix")
        (self.config / "main.cf").write_text(
            MAIN_CF.format(root=self.root, relay_port=self.relay_port)
        )
        (self.config / "master.cf").write_text(MASTER_CF)
        with (self.root / "start.log").open("wb") as log:
            self._master = subprocess.Popen(
                ["postfix", "-c", str(self.config), "start-fg"], stdout=log, stderr=log
            )
        # sendmail hands mail to pickup through this socket once master made it.
        pickup = self.root / "spool" / "public" / "pickup"
        master = self._master
        try:
            wait_until(lambda: pickup.exists() or master.poll() is not None, 30, "Postfix to start")
            assert master.poll() is None, f"Postfix did not start:\n{self.log}"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["postfix", "-c", str(self.config), "stop"], capture_output=True, timeout=30)
        if self._master is not None:
            stop_process(self._master)
        shutil.rmtree(self.root, ignore_errors=True)

    def sendmail(self, sender: str, recipients: list[str], message: bytes, *options: str) -> None:
        """Postfix's sendmail(1) with options (e.g. -N success,delay -V ID -R hdrs)."""
        subprocess.run(
            ["sendmail", "-C", str(self.config), "-f", sender, *options, "--", *recipients],
            input=message,
            check=True,
            capture_output=True,
            timeout=30,
        )

    @property
    def log(self) -> str:
        path = self.root / "postfix.log"
        return path.read_text(errors="replace") if path.exists() else ""
