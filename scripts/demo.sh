#!/usr/bin/env bash
# The main job, on CPU: start the vnpd daemon with a small random-weight test model,
# submit the example FASTA files, show the published HDF5 outputs, stop cleanly.
# Everything lives under ./demo-run (removed and made anew each time).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

RUN=$PWD/demo-run
rm -rf "$RUN"
mkdir -p "$RUN"
vnpd make-test-model "$RUN/model/esm2_demo.pt" --layers 4 --dim 128 --heads 8

cat > "$RUN/config.toml" <<TOML
[paths]
inbox = "$RUN/inbox"
outbox = "$RUN/outbox"
state = "$RUN/state"
failed = "$RUN/failed"

[model]
checkpoint = "$RUN/model/esm2_demo.pt"
dtype = "float32"

[workers]
devices = ["cpu", "cpu"]

[inbox]
settle_s = 0.5

[metrics]
listen = "127.0.0.1:0"

[logging]
format = "json"
level = "info"
TOML

vnpd validate-config "$RUN/config.toml"
echo "== starting the daemon (JSON logs in $RUN/daemon.log)"
vnpd run --config "$RUN/config.toml" >"$RUN/daemon.log" 2>&1 &
DAEMON=$!
trap 'kill -TERM $DAEMON 2>/dev/null || true' EXIT

for _ in $(seq 1 600); do
  grep -q '"event": "daemon_ready"' "$RUN/daemon.log" 2>/dev/null && break
  kill -0 $DAEMON 2>/dev/null || { echo "daemon exited early:"; cat "$RUN/daemon.log"; exit 1; }
  sleep 0.2
done

echo "== submitting the example files"
vnpd submit examples/*.fasta examples/*.faa --config "$RUN/config.toml"
printf '>broken record\nMKV1LL\n' > "$RUN/not-a-protein.fasta"
vnpd submit "$RUN/not-a-protein.fasta" --config "$RUN/config.toml"

expected=$(ls examples | wc -l)
for _ in $(seq 1 1200); do
  [ "$(ls "$RUN/outbox" | wc -l)" -ge "$expected" ] && [ -e "$RUN/failed/not-a-protein.fasta.error.json" ] && break
  kill -0 $DAEMON 2>/dev/null || { echo "daemon exited early:"; tail -50 "$RUN/daemon.log"; exit 1; }
  sleep 0.25
done

sleep 1.5  # the daemon rewrites its status snapshot every second
echo "== vnpd status"
vnpd status --config "$RUN/config.toml"
echo "== published outputs"
python - "$RUN/outbox" <<'PY'
import sys
from pathlib import Path
from vnpd.output.verify import read_output
for path in sorted(Path(sys.argv[1]).iterdir()):
    emb, ids, lengths, attrs = read_output(path)
    print(f"{path.name}: embeddings {emb.shape} {emb.dtype}, first id {ids[0]!r}, "
          f"model {attrs['model'].rsplit('/', 1)[-1]}, layer {attrs['layer']}, "
          f"attention {attrs['attention_backend']}, source {attrs['source_name']}")
PY
echo "== refused input (failed/)"
cat "$RUN/failed/not-a-protein.fasta.error.json"
echo "== per-job summaries"
python - "$RUN/daemon.log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e.get("event") == "job_published":
        print(f"{e['file']}: {e['sequences']} sequences, {e['tokens']} tokens, "
              f"{e['seconds']} s, {e['tokens_per_s']} tok/s")
PY
echo "== stopping (SIGTERM)"
kill -TERM $DAEMON
code=0
wait $DAEMON || code=$?
trap - EXIT
echo "daemon exited with $code"
exit $code
