#!/usr/bin/env bash
# cost.sh: what the access log and the metrics cost the edge, in CPU time per
# session: the edge built at BASE (before them) beside the edge built from the
# working tree with its access log written to a file at INFO (the metrics are
# always on), on one machine, in alternating rounds, each against the same
# Postfix smtp-sink, loaded by loadgen with full handshakes. With --bulk, what
# a change costs the 25 MiB case of compare.sh instead.
#
# Usage (as root, from anywhere):
#
#   integration/bench/cost.sh [--base REV] [--rounds 5] [--duration 10s] [--concurrency 256]
#   integration/bench/cost.sh --bulk [--base REV] [--rounds 10]
#
#   --base         the commit to compare with (default 2ad8ea3: the edge before the
#                  access log and the metrics; with --bulk 6e74df0: the edge
#                  before issue 13's reading of the client's stream)
#   --rounds       rounds; each runs both edges, implicit TLS and STARTTLS, in an
#                  order that alternates from round to round (default 5)
#   --duration     time per load run (default 10s)
#   --concurrency  loadgen's concurrent sessions (default 256)
#   --no-access-log  the working tree's edge without its access log too (the
#                  metrics' share of the cost)
#   --bulk         compare.sh's bulk case instead of load runs: per edge and
#                  mode, one session of loadgen bulk with three 25 MiB
#                  messages (the median message's MiB/s, from DATA to the 250
#                  after the dot); both edges without an access log, as
#                  compare.sh runs them
#
# It prints, per edge and mode, the median over the rounds of the caddy
# process's CPU time (user + system, from /proc/<pid>/stat) divided by the
# sessions completed (--bulk: the sum over the rounds divided by the MiB sent,
# since a run takes only a few clock ticks), and sessions/s (--bulk: MiB/s),
# and the ratios of the working tree's to BASE's; per run, the share of the
# CPUs that other processes took. Everything listens on 127.0.0.3 (BENCH_IP),
# ports from 25000.
set -euo pipefail

base_rev= rounds=5 duration=10s conc=256 access=yes bulk=no
while [ $# -gt 0 ]; do
	case $1 in
	--base) base_rev=$2; shift ;;
	--rounds) rounds=$2; shift ;;
	--duration) duration=$2; shift ;;
	--concurrency) conc=$2; shift ;;
	--no-access-log) access=no ;;
	--bulk) bulk=yes access=no ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "cost.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
	shift
done
if [ -z "$base_rev" ]; then
	base_rev=2ad8ea3
	[ "$bulk" = no ] || base_rev=6e74df0
fi
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
sink_pid=$!

# require_auth off where the build has it: loadgen sends mail without AUTH
# (as compare.sh does to every peer), and smtp-sink answers AUTH with 250,
# not the 235 the edge waits for. A build from before it would refuse the
# unknown field.
auth_of() { # <source tree>
	if grep -q 'json:"require_auth' "$1/modules/l4smtp/handler.go"; then
		echo ', "require_auth": false'
	fi
}
auth_base=$(auth_of "$work/base")
auth_head=$(auth_of "$repo")

# <name> <implicit port> <starttls port> <admin port> <access log: yes|no>
config() {
	local logs='"default": {"level": "WARN"}' auth
	auth=auth_$1
	auth=${!auth}
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
        {"handler": "smtp", "hostnames": ["mail.test"], "implicit_tls": true, "backends": ["$sink"]$auth}]}]},
      "starttls": {"listen": ["$ip:$3"], "routes": [{"handle": [
        {"handler": "smtp", "hostnames": ["mail.test"], "backends": ["$sink"]$auth}]}]}
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
# others: prints the CPU ticks the machine used (all CPUs: user, nice,
# system, irq, softirq, from /proc/stat) less ours: both caddies, the sink,
# and what this shell's children used (loadgen, once reaped)
others() {
	local m o f
	read -r -a f </proc/stat
	m=$((f[1] + f[2] + f[3] + f[6] + f[7]))
	o=$(($(ticks "${pid_of[base]}") + $(ticks "${pid_of[head]}") + $(ticks "$sink_pid")))
	read -r -a f <<<"$(sed 's/.*) //' "/proc/$$/stat")"
	echo $((m - o - f[11] - f[12] - f[13] - f[14]))
}
hz=$(getconf CLK_TCK) ncpu=$(nproc)
results=$work/results.txt
o_all0=$(others) t_all0=$EPOCHREALTIME
for round in $(seq "$rounds"); do
	order=(base head)
	[ $((round % 2)) = 0 ] && order=(head base)
	for name in "${order[@]}"; do
		for mode in implicit starttls; do
			addr=${implicit_of[$name]}
			[ "$mode" = starttls ] && addr=${starttls_of[$name]}
			o0=$(others) t0=$EPOCHREALTIME
			before=$(ticks "${pid_of[$name]}")
			if [ "$bulk" = yes ]; then
				out=$("$work/loadgen" bulk -addr "$addr" -tls "$mode" -ca "$work/ca.pem" -size 25m -n 3 -timeout 120s -json)
			else
				out=$("$work/loadgen" run -addr "$addr" -tls "$mode" -ca "$work/ca.pem" -c "$conc" -d "$duration" -json)
			fi
			after=$(ticks "${pid_of[$name]}")
			o1=$(others) t1=$EPOCHREALTIME
			busy=$(awk -v o=$((o1 - o0)) -v hz="$hz" -v s="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" -v n="$ncpu" \
				'BEGIN { printf "%.1f", 100 * o / hz / (s * n) }')
			if [ "$bulk" = yes ]; then
				rate=$(printf '%s' "$out" | sed -n 's/.*"mib_per_s":\([0-9.]*\).*/\1/p')
				ms=$(awk -v t=$((after - before)) -v hz="$hz" 'BEGIN { printf "%.4f", t * 1000 / hz / 75 }')
				log "round $round: $name $mode: $rate MiB/s (median of 3 x 25 MiB), $ms ms CPU per MiB, others took $busy% of the CPUs"
			else
				sessions=$(printf '%s' "$out" | sed -n 's/.*"sessions":\([0-9]*\).*/\1/p')
				rate=$(printf '%s' "$out" | sed -n 's/.*"sessions_per_s":\([0-9.]*\).*/\1/p')
				ms=$(awk -v t=$((after - before)) -v hz="$hz" -v n="$sessions" 'BEGIN { printf "%.4f", t * 1000 / hz / n }')
				log "round $round: $name $mode: $sessions sessions, $rate/s, $ms ms CPU per session, others took $busy% of the CPUs"
			fi
			echo "$name $mode $ms $rate $((after - before))" >>"$results"
		done
	done
done
o_all1=$(others) t_all1=$EPOCHREALTIME
if [ "$bulk" = yes ]; then
	echo "both edges ran without an access log"
elif [ "$access" = yes ]; then
	echo "the edge from the working tree wrote $(wc -l <"$work/head-access.log") access lines"
else
	echo "the edge from the working tree ran without its access log"
fi

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
per=session unit=sessions/s
[ "$bulk" = no ] || per=MiB unit=MiB/s
printf '%-9s %-9s %14s %12s\n' edge mode "CPU ms/$per" "$unit"
for mode in implicit starttls; do
	for name in base head; do
		cpu=$(awk -v n=$name -v m=$mode '$1 == n && $2 == m { print $3 }' "$results" | median)
		if [ "$bulk" = yes ]; then
			# a run of 75 MiB takes the edge a few clock ticks of CPU (10 ms
			# each): the sum over the rounds, not the median of coarse figures
			cpu=$(awk -v n=$name -v m=$mode -v hz="$hz" '$1 == n && $2 == m { t += $5; k++ } END { printf "%.4f", t * 1000 / hz / (75 * k) }' "$results")
		fi
		rate=$(awk -v n=$name -v m=$mode '$1 == n && $2 == m { print $4 }' "$results" | median)
		printf '%-9s %-9s %14s %12s\n' "$name" "$mode" "$cpu" "$rate"
		eval "cpu_$name=$cpu rate_$name=$rate"
	done
	awk -v h="$cpu_head" -v b="$cpu_base" -v m=$mode -v per=$per 'BEGIN { printf "%s: CPU per %s, working tree ÷ %s: %.3f\n", m, per, "base", h / b }'
	[ "$bulk" = no ] || awk -v h="$rate_head" -v b="$rate_base" -v m=$mode 'BEGIN { printf "%s: MiB/s, working tree ÷ base: %.3f\n", m, h / b }'
done
what="$rounds rounds of $duration at c=$conc"
[ "$bulk" = no ] || what="$rounds rounds of 3 x 25 MiB in one session"
awk -v o=$((o_all1 - o_all0)) -v hz="$hz" -v s="$(awk -v a="$t_all0" -v b="$t_all1" 'BEGIN { print b - a }')" -v n="$ncpu" \
	'BEGIN { printf "other processes took %.0f s of CPU during the rounds, %.1f%% of the %d CPUs in %.0f s\n", o / hz, 100 * o / hz / (s * n), n, s }'
echo "(base: $base_rev; working tree: $(git -C "$repo" log -1 --format='%h %s' | cut -c1-60); $what; $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p'))"
