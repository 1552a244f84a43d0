#!/usr/bin/env bash
# `make up`: the relay end to end on this machine. Starts a development sink on
# 127.0.0.1:2526 and `kurrier up` with examples/local.yaml (SMTP on
# 127.0.0.1:2525), sends one mail through it, shows the delivered file, then
# keeps running until Ctrl-C so you can send more.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
SINK_DIR=${KURRIER_SINK_DIR:-/tmp/kurrier-sink}
DATA_DIR=${KURRIER_DATA_DIR:-.kurrier}
mkdir -p "$DATA_DIR"

"$BIN/kurrier" sink --listen 127.0.0.1:2526 --dir "$SINK_DIR" &
sink_pid=$!
ready_file="$DATA_DIR/up.out"
"$BIN/kurrier" up --config examples/local.yaml --data-dir "$DATA_DIR" --smtp 127.0.0.1:2525 \
  >"$ready_file" &
up_pid=$!
trap 'kill -TERM $up_pid 2>/dev/null; wait $up_pid; kill -TERM $sink_pid 2>/dev/null; wait $sink_pid' EXIT INT TERM

for _ in $(seq 1 600); do
  grep -q '^kurrier ready' "$ready_file" 2>/dev/null && break
  kill -0 "$up_pid" 2>/dev/null || { echo "kurrier up exited early" >&2; exit 1; }
  sleep 0.1
done
cat "$ready_file"

"$BIN/python" - "$SINK_DIR" <<'PY'
import pathlib, smtplib, sys, time
marker = f"hello-from-kurrier-{time.time_ns()}"
with smtplib.SMTP("127.0.0.1", 2525) as smtp:
    reply = smtp.sendmail("me@laptop.test", ["you@example.com"],
                          f"Subject: {marker}\r\n\r\nIt works.\r\n".encode())
print(f"sent {marker}")
sink = pathlib.Path(sys.argv[1])
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    for path in sink.glob("*.eml"):
        if marker.encode() in path.read_bytes():
            print(f"delivered to {path}:\n{path.read_text()}")
            sys.exit(0)
    time.sleep(0.1)
sys.exit("the test mail did not arrive within 30s")
PY
echo "Relay running: SMTP on 127.0.0.1:2525, mail lands in $SINK_DIR. Ctrl-C to stop."
wait "$up_pid"
