#!/usr/bin/env bash
# cost.sh: what the access log and the metrics cost the edge, in CPU time per
# session: the edge built at BASE (before them) beside the edge built from the
# working tree with its access log written to a file at INFO (the metrics are
# always on), on one machine, in alternating rounds, each against the same
# Postfix smtp-sink, loaded by loadgen with full handshakes.
#
# Usage (as root, from anywhere):
#
#   integration/bench/cost.sh [--base REV] [--rounds 5] [--duration 10s] [--concurrency 256]
#
#   --base         the commit to compare with (default 2ad8ea3: the edge before the
#                  access log and the metrics)
#   --rounds       rounds; each runs both edges, implicit TLS and STARTTLS, in an
#                  order that alternates from round to round (default 5)
#   --duration     time per load run (default 10s)
#   --concurrency  loadgen's concurrent sessions (default 256)
#   --no-access-log  the working tree's edge without its access log too (the
#                  metrics' share of the cost)
#
# It prints, per edge and mode, the median over the rounds of the caddy
# process's CPU time (user + system, from /proc/<pid>/stat) divided by the
# sessions completed, and sessions/s, and the ratio of the working tree's to
# BASE's. Everything listens on 127.0.0.3 (BENCH_IP), ports from 25000.
set -euo pipefail

base_rev=2ad8ea3 rounds=5 duration=10s conc=256 access=yes
while [ $# -gt 0 ]; do
	case $1 in
	--base) base_rev=$2; shift ;;
	--rounds) rounds=$2; shift ;;
	--duration) duration=$2; shift ;;
	--concurrency) conc=$2; shift ;;
	--no-access-log) access=no ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "cost.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
	shift
done
[ "$(id -u)" = 0 ] || { echo "cost.sh: run as root (it raises limits and runs smtp-sink as nobody)" >&2; exit 2; }
command -v smtp-sink >/dev/null || { echo "cost.sh: needs smtp-sink (Debian: postfix)" >&2; exit 2; }
ip=${BENCH_IP:-127.0.0.3}
case $ip in 127.0.0.[0-9]*) ;; *) echo "cost.sh: BENCH_IP must be a 127.0.0.x address" >&2; exit 2 ;; esac

repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/smtp-cost.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
ulimit -n 20000 2>/dev/null || true

log "building the edge at $base_rev and from the working tree, and loadgen"
mkdir -p "$work/base"
git -C "$repo" archive "$base_rev" | tar -x -C "$work/base"
(cd "$work/base" && go build -o "$work/caddy-base" ./cmd/caddy)
(cd "$repo" && go build -o "$work/caddy-head" ./cmd/caddy && go build -o "$work/loadgen" ./integration/bench/loadgen)

(
	cd "$work"
	openssl ecparam -name prime256v1 -genkey -noout -out ca.key
	openssl req -x509 -new -key ca.key -subj "/CN=cost CA" -days 2 -out ca.pem
	openssl ecparam -name prime256v1 -genkey -noout -out key.pem
	openssl req -new -key key.pem -subj "/CN=mail.test" -out leaf.csr
	printf 'subjectAltName=DNS:mail.test\n' >leaf.ext
	openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile leaf.ext -out cert.pem
) >/dev/null 2>&1

sink=$ip:25000
smtp-sink -u nobody -m 9000 "$sink" 4096 &
pids+=($!)

# <name> <implicit port> <starttls port> <admin port> <access log: yes|no>
config() {
	local logs='"default": {"level": "WARN"}'
	if [ "$5" = yes ]; then
		logs='"default": {"level": "WARN", "exclude": ["layer4.handlers.smtp.access"]},
    "access": {"level": "INFO", "writer": {"output": "file", "filename": "'"$work/$1-access.log"'"}, "include": ["layer4.handlers.smtp.access"]}'
	fi
	cat <<EOF
{
  "admin": {"listen": "$ip:$4"},
  "logging": {"logs": {$logs}},
  "storage": {"module": "file_system", "root": "$work/storage-$1"},
  "apps": {
    "tls": {"certificates": {"load_files": [{"certificate": "$work/cert.pem", "key": "$work/key.pem"}]}},
    "layer4": {"servers": {
      "implicit": {"listen": ["$ip:$2"], "routes": [{"handle": [
        {"handler": "smtp", "hostnames": ["mail.test"], "implicit_tls": true, "backends": ["$sink"]}]}]},
      "starttls": {"listen": ["$ip:$3"], "routes": [{"handle": [
        {"handler": "smtp", "hostnames": ["mail.test"], "backends": ["$sink"]}]}]}
    }}
  }
}
EOF
}
declare -A pid_of implicit_of starttls_of
start_edge() { # <name> <binary> <implicit port> <starttls port> <admin port> <access log>
	config "$1" "$3" "$4" "$5" "$6" >"$work/$1.json"
	"$2" run --config "$work/$1.json" >"$work/$1.log" 2>&1 &
	pid_of[$1]=$!
	pids+=($!)
	implicit_of[$1]=$ip:$3
	starttls_of[$1]=$ip:$4
}
start_edge base "$work/caddy-base" 25001 25002 25003 no
start_edge head "$work/caddy-head" 25004 25005 25006 "$access"
for a in "${implicit_of[@]}" "${starttls_of[@]}"; do
	for _ in $(seq 100); do
		(exec 3<>"/dev/tcp/${a%:*}/${a##*:}") 2>/dev/null && break
		sleep 0.1 # waiting for caddy to listen
	done
done

ticks() { # CPU ticks (user + system) of a process
	local f
	read -r -a f <"/proc/$1/stat"
	echo $((f[13] + f[14]))
}
hz=$(getconf CLK_TCK)
results=$work/results.txt
for round in $(seq "$rounds"); do
	order=(base head)
	[ $((round % 2)) = 0 ] && order=(head base)
	for name in "${order[@]}"; do
		for mode in implicit starttls; do
			addr=${implicit_of[$name]}
			[ "$mode" = starttls ] && addr=${starttls_of[$name]}
			before=$(ticks "${pid_of[$name]}")
			out=$("$work/loadgen" run -addr "$addr" -tls "$mode" -ca "$work/ca.pem" -c "$conc" -d "$duration" -json)
			after=$(ticks "${pid_of[$name]}")
			sessions=$(printf '%s' "$out" | sed -n 's/.*"sessions":\([0-9]*\).*/\1/p')
			rate=$(printf '%s' "$out" | sed -n 's/.*"sessions_per_s":\([0-9.]*\).*/\1/p')
			ms=$(awk -v t=$((after - before)) -v hz="$hz" -v n="$sessions" 'BEGIN { printf "%.4f", t * 1000 / hz / n }')
			log "round $round: $name $mode: $sessions sessions, $rate/s, $ms ms CPU per session"
			echo "$name $mode $ms $rate" >>"$results"
		done
	done
done
if [ "$access" = yes ]; then
	echo "the edge from the working tree wrote $(wc -l <"$work/head-access.log") access lines"
else
	echo "the edge from the working tree ran without its access log"
fi

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
printf '%-9s %-9s %14s %12s\n' edge mode "CPU ms/session" sessions/s
for mode in implicit starttls; do
	for name in base head; do
		cpu=$(awk -v n=$name -v m=$mode '$1 == n && $2 == m { print $3 }' "$results" | median)
		rate=$(awk -v n=$name -v m=$mode '$1 == n && $2 == m { print $4 }' "$results" | median)
		printf '%-9s %-9s %14s %12s\n' "$name" "$mode" "$cpu" "$rate"
		eval "cpu_$name=$cpu"
	done
	awk -v h="$cpu_head" -v b="$cpu_base" -v m=$mode 'BEGIN { printf "%s: CPU per session, working tree ÷ %s: %.3f\n", m, "base", h / b }'
done
echo "(base: $base_rev; working tree: $(git -C "$repo" log -1 --format='%h %s' | cut -c1-60); $rounds rounds of $duration at c=$conc; $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p'))"
