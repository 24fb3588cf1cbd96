#!/usr/bin/env bash
# `make demo`: a private etcd, three example backends that register themselves,
# the gateway, and a client driving calls through it, while `weir discover
# --watch` follows the endpoint sets live. Ends by itself and stops everything
# it started. DEMO_FAST=1 shortens the pauses (the test suite runs it so).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
WEIR=${WEIR:-$BIN/weir}
SERVER=${SERVER:-$BIN/examples/echo_server}
CLIENT=${CLIENT:-$BIN/examples/echo_client}
FAST=${DEMO_FAST:-0}
pause() { if [ "$FAST" = 1 ]; then sleep "${2:-0.5}"; else sleep "$1"; fi; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

work=$(mktemp -d -t weir-demo-XXXXXX)
pids=()
cleanup() {
  # Newest first: the gateway and agents stop while etcd still runs; etcd last.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    { kill "${pids[i]}" && wait "${pids[i]}"; } 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_port=$(free_port); peer_port=$(free_port); grpc_port=$(free_port); admin_port=$(free_port)
etcd_url="http://127.0.0.1:$etcd_port"

say "a private etcd on $etcd_url"
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

say "weir discover --watch follows /services (+ added, ~ changed, - removed)"
WEIR_LOG=warn "$WEIR" discover --etcd "$etcd_url" --prefix /services --watch &
pids+=($!)
pause 1

say "three echo servers register themselves (weights 100, 50, 25; zones a, b, b)"
"$SERVER" --name b1 --etcd "$etcd_url" --weight 100 --meta zone=a --ttl 3 &
pids+=($!); b1=$!
"$SERVER" --name b2 --etcd "$etcd_url" --weight 50 --meta zone=b --ttl 3 &
pids+=($!); b2=$!
"$SERVER" --name b3 --etcd "$etcd_url" --weight 25 --meta zone=b --ttl 3 &
pids+=($!)
pause 2 1

cat >"$work/weir.toml" <<TOML
listen = "127.0.0.1:$grpc_port"
admin = "127.0.0.1:$admin_port"
[etcd]
endpoints = ["$etcd_url"]
prefix = "/services"
[health_check]
interval = "500ms"
[[route]]
match = "/weir.example.v1.Echo/"
service = "echo"
policy = "round-robin"
TOML
say "weir serve: gRPC on 127.0.0.1:$grpc_port, admin on 127.0.0.1:$admin_port"
WEIR_LOG=warn "$WEIR" serve --config "$work/weir.toml" &
pids+=($!)
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

say "300 calls through the gateway: round-robin spreads them evenly"
"$CLIENT" --target "127.0.0.1:$grpc_port" --calls 300
pause 2

say "b1 is killed (SIGKILL, no deregistration): its calls move at once, none fails"
{ kill -KILL "$b1" && wait "$b1"; } 2>/dev/null || true
"$CLIENT" --target "127.0.0.1:$grpc_port" --calls 300
say "... and its endpoint disappears when its 3 s lease ends"
pause 5 4

say "b2 stops cleanly (SIGTERM): its lease is revoked, gone at once"
kill -TERM "$b2"
wait "$b2" 2>/dev/null || true
pause 1
"$CLIENT" --target "127.0.0.1:$grpc_port" --calls 100

say "a hand-written registration with etcdctl, and one unreadable value (skipped, logged)"
etcdctl --endpoints "$etcd_url" put /services/billing/127.0.0.1:50071 '{"weight":10,"status":"unhealthy"}' >/dev/null
etcdctl --endpoints "$etcd_url" put /services/billing/127.0.0.1:50072 '{broken json' >/dev/null
pause 2

say "what the gateway counted (GET /metrics)"
curl -fs "http://127.0.0.1:$admin_port/metrics" | grep -E '^weir_(calls_total|discovery_skipped_values_total|ejections_total)' | grep -v ' 0$' || true
say "demo finished; stopping the gateway, the servers, the watcher and etcd"
