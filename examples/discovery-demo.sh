#!/usr/bin/env bash
# The discovery demo (`make demo`): a private etcd, a few registrations, and
# `weir discover --watch` following them live — adds, a lease that expires
# after its agent is killed, and a clean deregistration. Ends by itself and
# stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
WEIR=${WEIR:-target/debug/weir}
FAST=${DEMO_FAST:-0}
pause() { if [ "$FAST" = 1 ]; then sleep "${2:-1}"; else sleep "$1"; fi; }

work=$(mktemp -d -t weir-demo-XXXXXX)
pids=()
cleanup() {
  # Newest first: agents deregister while etcd still runs; etcd goes last.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    { kill "${pids[i]}" && wait "${pids[i]}"; } 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
client_port=$(free_port); peer_port=$(free_port)
etcd_url="http://127.0.0.1:$client_port"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "starting a private etcd on $etcd_url"
etcd --name demo --data-dir "$work/etcd" \
  --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "demo=http://127.0.0.1:$peer_port" --log-level error >"$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  etcdctl --endpoints "$etcd_url" endpoint health >/dev/null 2>&1 && break
  sleep 0.1
done

say "weir discover --watch follows /services (lines: + added, ~ changed, - removed)"
WEIR_LOG=warn "$WEIR" discover --etcd "$etcd_url" --prefix /services --watch &
pids+=($!)
pause 1

register() { WEIR_LOG=warn "$WEIR" register --etcd "$etcd_url" --prefix /services "$@" >/dev/null & pids+=($!); }

say "three instances of 'echo' register themselves (weights 100, 50, 25; zones a, b, b)"
register --service echo --addr 127.0.0.1:50061 --weight 100 --meta zone=a --ttl 3
a=${pids[-1]}
register --service echo --addr 127.0.0.1:50062 --weight 50 --meta zone=b --ttl 3
b=${pids[-1]}
register --service echo --addr 127.0.0.1:50063 --weight 25 --meta zone=b --ttl 3 --format etcd-naming
pause 2

say "a hand-written registration with etcdctl (no lease), and one unreadable value"
etcdctl --endpoints "$etcd_url" put /services/billing/127.0.0.1:50071 '{"weight":10,"status":"unhealthy"}' >/dev/null
etcdctl --endpoints "$etcd_url" put /services/billing/127.0.0.1:50072 '{broken json' >/dev/null
pause 2

say "the agent of 127.0.0.1:50061 is killed (SIGKILL): its key stays until its 3 s lease ends"
{ kill -KILL "$a" && wait "$a"; } 2>/dev/null || true
pause 5 4

say "the agent of 127.0.0.1:50062 stops cleanly (SIGTERM): its lease is revoked, gone at once"
kill -TERM "$b"
pause 2

say "the endpoint sets now, as JSON"
"$WEIR" discover --etcd "$etcd_url" --prefix /services --json --log error
say "demo finished; stopping etcd, the watcher and the agents"
