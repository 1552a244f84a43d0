"""Haraka 3 as a peer: installed from npm into ~/.cache/kurrier, run from its own directory.

It relays for 127.0.0.0/8 (the `relay` plugin's ACL) through its outbound
queue, the durable path: each message becomes a queue file written with
haraka-utils' FsyncWriteStream (fsync before close), renamed into the queue
directory, and only then answered 250 (outbound/index.js,
`process_delivery`). The rename is not followed by an fsync of the
directory, and at start Haraka deletes the dot-files a rename never
finished, so a power cut can lose a message whose rename the filesystem had
not yet committed (ext4 commits its journal every 5 s, and at the next
fsync of any file). A small plugin of this module's own sends every
message to the bench sink instead of looking up MX records.

Haraka runs `nodes=cpus` (one worker process per core, its advice for
throughput), each with an equal share of the 20 connections to the sink
(`concurrency_max`; Haraka opens one connection per delivery and does not
keep them).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from bench.systems import DESTINATION_CONCURRENCY, PeerProcess

VERSION = "3.3.4"
CACHE = Path.home() / ".cache" / "kurrier" / f"haraka-{VERSION}"
DURABILITY = "power cut, but renames of the last 5 s (file fsynced, rename not)"

NEXT_HOP_PLUGIN = """\
// Written by bench/haraka.py: every domain's next hop is the bench sink.
exports.register = function () {
  this.register_hook('get_mx', 'bench_sink')
}
exports.bench_sink = function (next, hmail, domain) {
  next(OK, { exchange: '127.0.0.1', port: %(sink_port)d, priority: 0 })
}
"""


def haraka_bin() -> Path:
    return CACHE / "node_modules" / "Haraka" / "bin" / "haraka"


def install_haraka() -> str:
    """Haraka VERSION from npm into the cache (once); returns its version."""
    if not haraka_bin().exists():
        if shutil.which("npm") is None:
            raise RuntimeError("Haraka needs Node.js and npm (Debian: apt-get install nodejs npm)")
        print(f"installing Haraka {VERSION} from npm into {CACHE} ...", flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "npm",
                "install",
                "--prefix",
                str(CACHE),
                "--no-audit",
                "--no-fund",
                f"Haraka@{VERSION}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return VERSION


class Haraka(PeerProcess):
    """A private Haraka (`haraka -c DIR`) with its config, plugin and queue in DIR."""

    name = "haraka"
    durability = DURABILITY

    def _write_config(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        # `haraka -i` writes its default configuration (connection.ini and the rest);
        # the files below replace the defaults that differ.
        subprocess.run(
            ["node", str(haraka_bin()), "-i", str(self.workdir)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        config = self.workdir / "config"
        plugins = self.workdir / "plugins"
        workers = os.cpu_count() or 1
        files = {
            "me": "haraka-bench.localdomain",
            "smtp.ini": f"listen=127.0.0.1:{self.smtp_port}\nnodes=cpus\n",
            "plugins": "relay\nbench_sink\n",
            # force_routing is on by default and would look for relay_dest_domains.ini.
            "relay.ini": "[relay]\nacl=true\nforce_routing=false\n",
            "relay_acl_allow": "127.0.0.0/8\n",
            "outbound.ini": (
                f"concurrency_max={max(1, DESTINATION_CONCURRENCY // workers)}\nenable_tls=false\n"
            ),
        }
        for name, text in files.items():
            (config / name).write_text(text)
        (plugins / "bench_sink.js").write_text(NEXT_HOP_PLUGIN % {"sink_port": self.sink_port})

    async def start(self) -> None:
        self._write_config()
        await self._launch(
            ["node", str(haraka_bin()), "-c", str(self.workdir)], "haraka.log", cwd=self.workdir
        )

    async def stop(self) -> None:
        # Haraka shuts down on SIGINT; SIGTERM would end the master without its workers.
        await self._signal_and_wait(signal.SIGINT)
