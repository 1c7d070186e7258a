#!/usr/bin/env bash
# compare.sh: the SMTP edge beside its peers, in one run, on one machine.
#
# Starts one Postfix smtp-sink as the backend and, in front of it on their own
# loopback ports, with the same ECDSA P-256 certificate, TLS 1.2 as the floor:
#
#   edge 587 / edge 465      this repository's caddy (./cmd/caddy): the smtp
#                            handler with its backends option (it dials the
#                            sink and relays itself; no proxy handler)
#   nginx 587                nginx mail: starttls only, smtp_auth none, auth_http
#                            answered by nginx's own http block
#   haproxy 465              HAProxy, mode tcp, bind ... ssl crt
#   stunnel 587 / 465        stunnel, protocol = smtp (STARTTLS) and plain TLS
#   caddy-l4 465             plain caddy-l4: tls + proxy
#   ceiling 587 / 465        integration/bench/ceiling: TLS and SMTP in one Go
#                            process, no backend hop (what no proxy can beat)
#   backend (plain)          smtp-sink itself, no TLS: the reference
#
# and runs the same loads against each (integration/bench/loadgen), rotating
# the order of the peers in every case and repeating the cases in rounds, so
# that a noisy machine affects all of them alike. The load cases run with a
# full handshake for every session, and again with resumed sessions (loadgen
# -resume; each peer resumes as its defaults let it, and the table says what
# share of the handshakes it resumed). Prints one table (report): the median
# over the rounds, each peer's ratio to the edge (587 for STARTTLS, 465 for
# implicit TLS), the CPU time each session of the load runs cost the peer,
# the sink and loadgen, resumed ÷ full per peer, and the targets.
#
# Usage (as root, from anywhere; installs the peers from Debian if missing):
#
#   integration/bench/compare.sh [--quick] [--duration 10s] [--rounds 3]
#                                [--hold 5000] [--pinned] [--commit REV]
#                                [--out FILE] [--keep] [--profile]
#
#   --quick     a smoke run of a few minutes: 3 s per load, one round, 1,000 held sessions
#   --duration  time per load run (env BENCH_DURATION, default 10s)
#   --rounds    rounds of the load cases (env BENCH_ROUNDS, default 3)
#   --hold      sessions to hold open for the memory case (env BENCH_HOLD, default 5000)
#   --pinned    the peer under test on CPU 1 (all its processes and threads), loadgen
#               and the sink on CPU 0, in every case; the peers start on CPU 1 alone, so
#               that what each sizes by the CPUs it has (GOMAXPROCS, HAProxy's nbthread)
#               is sized for one, and nginx runs one worker (worker_processes 1, what
#               auto gives on a one-CPU machine; nginx 1.22 counts the online CPUs, not
#               its affinity). Without it (the default) the scheduler places everything
#               on all CPUs.
#   --commit    build caddy, loadgen, ceiling and report from this commit (git archive)
#               instead of the working tree, so that edits under way are not measured
#   --out       also write the table (and the machine) to FILE, and the raw results
#               beside it (FILE with .jsonl for .txt), so that report can reprint it
#   --keep      keep the work directory (configs, logs, raw results) and say where
#   --profile   save CPU profiles of the edge during its c=256 runs in round 1 and a
#               heap profile while it holds its sessions (implies --keep)
#
# Env BENCH_IP (default 127.0.0.2; must be a 127.0.0.x address) and
# BENCH_PORT_BASE (default 24000) choose where the peers listen: 14 ports from
# the base. A full run (3 rounds of 10 s) takes about 30 minutes.
set -euo pipefail

duration=${BENCH_DURATION:-10s}
rounds=${BENCH_ROUNDS:-3}
hold_n=${BENCH_HOLD:-5000}
ip=${BENCH_IP:-127.0.0.2}
base=${BENCH_PORT_BASE:-24000}
out_file= keep= profile= pinned= commit=
while [ $# -gt 0 ]; do
	case $1 in
	--quick) duration=3s rounds=1 hold_n=1000 ;;
	--duration) duration=$2; shift ;;
	--rounds) rounds=$2; shift ;;
	--hold) hold_n=$2; shift ;;
	--pinned) pinned=1 ;;
	--commit) commit=$2; shift ;;
	--out) out_file=$(realpath -m "$2"); shift ;;
	--keep) keep=1 ;;
	--profile) profile=1 keep=1 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "compare.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
	shift
done
case $ip in 127.0.0.[0-9]*) ;; *) echo "compare.sh: BENCH_IP must be a 127.0.0.x address" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "compare.sh: run as root (it installs packages and raises limits)" >&2; exit 2; }
# the CPUs of the machine (nproc would count only those this shell may use,
# one once --pinned has pinned it)
ncpu=$(nproc)
if [ -n "$pinned" ] && [ "$ncpu" -lt 2 ]; then echo "compare.sh: --pinned needs two CPUs" >&2; exit 2; fi
# --pinned: the CPU of the peer under test, and the one of loadgen and the sink
cpu_peer=1 cpu_load=0

repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/smtp-bench.XXXXXX)
chmod 755 "$work"
bin=$work/bin
mkdir -p "$bin"
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

# Every process we start is a child of this shell: stop them all on exit.
pids=()
cleanup() {
	local rc=$?
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	if [ -n "$keep" ]; then log "work directory kept: $work"; else rm -rf "$work"; fi
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- packages
need=()
command -v nginx >/dev/null || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_mail_module.so ] || need+=(libnginx-mod-mail)
command -v haproxy >/dev/null || need+=(haproxy)
command -v stunnel4 >/dev/null || need+=(stunnel4)
command -v smtp-sink >/dev/null || need+=(postfix)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
	log "installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 5,000 held sessions need 10,000 descriptors in a proxy (client and backend)
# and 5,000 in loadgen and in the sink. Raise the limit as far as we may (a
# container may cap the hard limit); the peers' own limits below stay under
# 20,000.
ulimit -Hn 65536 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge 20000 ] || log "warning: only $(ulimit -n) file descriptors; the hold case may fail"

# ---------------------------------------------------------------- build
# What is measured: a commit exported whole (--commit), or the working tree,
# with the files that differ from its commit named in the table's header.
src=$repo
if [ -n "$commit" ]; then
	commit=$(git -C "$repo" rev-parse --verify "$commit^{commit}")
	src=$work/src
	mkdir -p "$src"
	git -C "$repo" archive "$commit" | tar -x -C "$src"
	built="commit $(git -C "$repo" log -1 --format='%h %s' "$commit" | cut -c1-100) (built from git archive)"
else
	dirty=$(git -C "$repo" status --porcelain --untracked-files=all -- cmd modules integration/bench go.mod go.sum 2>/dev/null |
		awk '{print $2}' | paste -sd' ' -)
	built="commit $(git -C "$repo" log -1 --format='%h %s' 2>/dev/null | cut -c1-100 || echo '?') (working tree${dirty:+, changed: $dirty})"
fi
log "building caddy (./cmd/caddy), loadgen, ceiling and report: $built"
(cd "$src" && go build -o "$bin/caddy" ./cmd/caddy &&
	go build -o "$bin/" ./integration/bench/loadgen ./integration/bench/ceiling ./integration/bench/report)

# --pinned: this shell, and so loadgen and the sink, which it starts, on
# cpu_load; the peers start on cpu_peer (on_peer_cpu), so that GOMAXPROCS and
# HAProxy's nbthread are 1. pin_for below moves the sink to cpu_peer when it
# is the peer under test, and asserts the layout before every measurement.
on_peer_cpu=()
if [ -n "$pinned" ]; then
	taskset -p -c "$cpu_load" $$ >/dev/null
	on_peer_cpu=(taskset -c "$cpu_peer")
fi

# ---------------------------------------------------------------- certificate
# One ECDSA P-256 certificate for mail.test, signed by its own CA; every peer
# serves it, loadgen verifies it against the CA.
(
	cd "$work"
	openssl ecparam -name prime256v1 -genkey -noout -out ca.key
	openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=smtp bench CA" -out ca.pem \
		-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
	openssl ecparam -name prime256v1 -genkey -noout -out key.pem
	openssl req -new -key key.pem -subj "/CN=mail.test" -out leaf.csr
	printf '%s\n' "subjectAltName=DNS:mail.test" "basicConstraints=critical,CA:FALSE" \
		"keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >leaf.ext
	openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -sha256 \
		-extfile leaf.ext -out cert.pem 2>/dev/null
	cat cert.pem key.pem >haproxy.pem
	chmod 644 key.pem haproxy.pem # nginx and stunnel read them as root; the files live in our temp dir
) >/dev/null

# ---------------------------------------------------------------- ports
p_sink=$base
p_edge465=$((base + 1)) p_edge587=$((base + 2)) p_edge465_admin=$((base + 3)) p_edge587_admin=$((base + 4))
p_l4=$((base + 5)) p_l4_admin=$((base + 6))
p_nginx=$((base + 7)) p_nginx_auth=$((base + 8))
p_haproxy=$((base + 9))
p_stunnel465=$((base + 10)) p_stunnel587=$((base + 11))
p_ceiling465=$((base + 12)) p_ceiling587=$((base + 13))
for p in $(seq "$base" $((base + 13))); do
	if ss -Hltn "sport = :$p" | grep -q .; then
		echo "compare.sh: port $p is taken; choose another BENCH_PORT_BASE" >&2
		exit 1
	fi
done
sink=$ip:$p_sink

# ---------------------------------------------------------------- configs
# The edge, one caddy per port so that each hold case measures a fresh
# process. The certificate is loaded from the file (tls app load_files), so
# the smtp app sees the name covered and obtains nothing. Logging at WARN:
# no peer logs per session. The smtp handler relays to the sink itself (its
# backends option, the recommended configuration: its own copy loop holds
# less memory per idle session than caddy-l4's proxy); caddy-l4's proxy
# behind smtp is measured no more, plain caddy-l4 below still uses it.
# require_auth off: loadgen sends mail without AUTH, as it does to every peer
# (nginx with smtp_auth none and its auth_http, HAProxy, stunnel, caddy-l4 and
# the ceiling take mail unauthenticated), so that the comparison stays like
# for like; smtp-sink could not authenticate a client anyway (it answers
# AUTH with 250, not 235). The auth guard stays on, as by default: it is
# asked at connect, and never counts a failure here (no 535). A build from
# before require_auth (--commit) would refuse the unknown field.
edge_auth=
if grep -q 'json:"require_auth' "$src/modules/l4smtp/handler.go"; then
	edge_auth=', "require_auth": false'
fi
edge_config() { # <listen port> <admin port> <implicit: true|false>
	cat <<EOF
{
  "admin": {"listen": "$ip:$2", "origins": ["$ip:$2"]},
  "logging": {"logs": {"default": {"level": "WARN"}}},
  "storage": {"module": "file_system", "root": "$work/caddy-$1"},
  "apps": {
    "tls": {"certificates": {"load_files": [{"certificate": "$work/cert.pem", "key": "$work/key.pem"}]}},
    "layer4": {"servers": {"smtp": {
      "listen": ["$ip:$1"],
      "routes": [{"handle": [
        {"handler": "smtp", "hostnames": ["mail.test"], "implicit_tls": $3, "backends": ["$sink"]$edge_auth}
      ]}]
    }}}
  }
}
EOF
}
edge_config "$p_edge465" "$p_edge465_admin" true >"$work/edge465.json"
edge_config "$p_edge587" "$p_edge587_admin" false >"$work/edge587.json"

# Plain caddy-l4, as users run it today for 465: tls + proxy, Caddy's default
# connection policy (TLS 1.2 minimum) with the same certificate.
cat >"$work/l4.json" <<EOF
{
  "admin": {"listen": "$ip:$p_l4_admin", "origins": ["$ip:$p_l4_admin"]},
  "logging": {"logs": {"default": {"level": "WARN"}}},
  "storage": {"module": "file_system", "root": "$work/caddy-l4"},
  "apps": {
    "tls": {"certificates": {"load_files": [{"certificate": "$work/cert.pem", "key": "$work/key.pem"}]}},
    "layer4": {"servers": {"smtps": {
      "listen": ["$ip:$p_l4"],
      "routes": [{"handle": [
        {"handler": "tls"},
        {"handler": "proxy", "upstreams": [{"dial": ["$sink"]}]}
      ]}]
    }}}
  }
}
EOF

# nginx mail. worker_processes auto = one worker per core, as Go uses every
# core and HAProxy one thread per core (--pinned: 1, see above). Connection limits raised for the hold
# case. smtp_auth none: nginx answers the dialogue itself until RCPT, asks
# auth_http (its own http block here) for the backend, then connects and
# replays HELO/MAIL/RCPT: that is nginx's design, measured as it is.
# xclient off (the edge sends nothing either); proxy_protocol to the backend
# is off by default. Everything else is nginx's default (ssl_session_tickets on,
# ssl_session_cache none, tcp_nodelay as nginx mail does it).
nginx_workers=auto
[ -z "$pinned" ] || nginx_workers=1
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
worker_processes $nginx_workers;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 9000; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  server {
    listen $ip:$p_nginx_auth;
    location = /auth {
      add_header Auth-Status OK;
      add_header Auth-Server $ip;
      add_header Auth-Port $p_sink;
      return 200;
    }
  }
}
mail {
  server_name mail.test;
  auth_http $ip:$p_nginx_auth/auth;
  proxy_pass_error_message on;
  xclient off;
  server {
    listen $ip:$p_nginx;
    protocol smtp;
    smtp_auth none;
    starttls only;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
  }
}
EOF

# HAProxy: one process; nbthread is left to its default, one thread per CPU
# it may run on (2 here), like nginx's workers and Go's GOMAXPROCS.
cat >"$work/haproxy.cfg" <<EOF
global
  maxconn 9000
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode tcp
  maxconn 9000
  timeout connect 10s
  timeout client 10m
  timeout server 10m
frontend submissions
  bind $ip:$p_haproxy ssl crt $work/haproxy.pem
  default_backend sink
backend sink
  server sink $sink
EOF

# stunnel, one process per port (as for the edge). Debian's stunnel runs a
# thread per connection. TCP_NODELAY on both sides: Go, HAProxy and nginx
# set it, stunnel does not by default, and a Nagle stall is not what we
# compare. protocol = smtp is stunnel's server-side STARTTLS: it greets with
# the backend's greeting, answers EHLO and STARTTLS itself, and waits 200 ms
# on each connection first (to tell a client that starts TLS at once).
stunnel_config() { # <name> <port> [protocol]
	cat <<EOF
foreground = yes
debug = 3
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
[$1]
accept = $ip:$2
connect = $sink
cert = $work/cert.pem
key = $work/key.pem
sslVersionMin = TLSv1.2
EOF
	[ -z "${3:-}" ] || echo "protocol = $3"
}
stunnel_config submissions "$p_stunnel465" >"$work/stunnel465.conf"
stunnel_config submission "$p_stunnel587" smtp >"$work/stunnel587.conf"

# ---------------------------------------------------------------- start
start() { # <label> <log> <command...>: start in the background, remember the pid
	local label=$1 logf=$2
	shift 2
	"$@" >"$logf" 2>&1 &
	pids+=($!)
	PID[$label]=$!
}
declare -A PID MODE ADDR

# smtp-sink: -m raises its concurrency limit (default 256) above the held
# sessions, -t its idle timeout above the hold; 4096 is the listen backlog.
start "backend (plain)" "$work/sink.log" smtp-sink -u nobody -m 9000 -t 900 "$sink" 4096
start "edge 465" "$work/edge465.log" "${on_peer_cpu[@]}" env HOME="$work" XDG_DATA_HOME="$work" XDG_CONFIG_HOME="$work" \
	"$bin/caddy" run --config "$work/edge465.json"
start "edge 587" "$work/edge587.log" "${on_peer_cpu[@]}" env HOME="$work" XDG_DATA_HOME="$work" XDG_CONFIG_HOME="$work" \
	"$bin/caddy" run --config "$work/edge587.json"
start "caddy-l4 465" "$work/l4.log" "${on_peer_cpu[@]}" env HOME="$work" XDG_DATA_HOME="$work" XDG_CONFIG_HOME="$work" \
	"$bin/caddy" run --config "$work/l4.json"
start "nginx 587" "$work/nginx.log" "${on_peer_cpu[@]}" nginx -p "$work/nginx" -e "$work/nginx/error.log" -c "$work/nginx/nginx.conf" -g 'daemon off;'
start "haproxy 465" "$work/haproxy.log" "${on_peer_cpu[@]}" haproxy -db -f "$work/haproxy.cfg"
start "stunnel 465" "$work/stunnel465.log" "${on_peer_cpu[@]}" stunnel4 "$work/stunnel465.conf"
start "stunnel 587" "$work/stunnel587.log" "${on_peer_cpu[@]}" stunnel4 "$work/stunnel587.conf"
start "ceiling 465" "$work/ceiling465.log" "${on_peer_cpu[@]}" "$bin/ceiling" -cert "$work/cert.pem" -key "$work/key.pem" -implicit "$ip:$p_ceiling465"
start "ceiling 587" "$work/ceiling587.log" "${on_peer_cpu[@]}" "$bin/ceiling" -cert "$work/cert.pem" -key "$work/key.pem" -starttls "$ip:$p_ceiling587"

peer() { MODE[$1]=$2 ADDR[$1]=$ip:$3; }
peer "backend (plain)" plain "$p_sink"
peer "edge 587" starttls "$p_edge587"
peer "nginx 587" starttls "$p_nginx"
peer "stunnel 587" starttls "$p_stunnel587"
peer "ceiling 587" starttls "$p_ceiling587"
peer "edge 465" implicit "$p_edge465"
peer "haproxy 465" implicit "$p_haproxy"
peer "stunnel 465" implicit "$p_stunnel465"
peer "caddy-l4 465" implicit "$p_l4"
peer "ceiling 465" implicit "$p_ceiling465"
starttls_peers=("edge 587" "nginx 587" "stunnel 587" "ceiling 587" "backend (plain)")
implicit_peers=("edge 465" "haproxy 465" "caddy-l4 465" "stunnel 465" "ceiling 465" "backend (plain)")
# the resumed cases: the TLS peers (the backend has no TLS to resume)
starttls_tls_peers=("${starttls_peers[@]:0:4}")
implicit_tls_peers=("${implicit_peers[@]:0:5}")
all_peers=("edge 587" "edge 465" "nginx 587" "haproxy 465" "caddy-l4 465" "stunnel 587" "stunnel 465"
	"ceiling 587" "ceiling 465" "backend (plain)")

lg() { "$bin/loadgen" "$1" -json -ca "$work/ca.pem" -servername mail.test "${@:2}" 2>>"$work/loadgen.log"; }

# Wait for every port, then check every peer with one real session.
for label in "${all_peers[@]}"; do
	hp=${ADDR[$label]}
	for i in $(seq 100); do
		(exec 3<>"/dev/tcp/${hp%:*}/${hp#*:}") 2>/dev/null && break
		kill -0 "${PID[$label]}" 2>/dev/null || break
		sleep 0.2
	done
	if ! out=$(lg rtt -addr "$hp" -tls "${MODE[$label]}" -n 10); then
		log "$label on $hp does not work; its log:"
		tail -n 20 "$work"/*.log "$work/nginx/error.log" >&2 || true
		exit 1
	fi
done
log "all peers answer; results in $work/results.jsonl"

# ---------------------------------------------------------------- measuring
results=$work/results.jsonl
: >"$results"

# resident memory (KiB) of a peer: its process and all descendants (nginx's
# workers)
rss() {
	local total=0 p
	for p in $(descendants "$1"); do
		total=$((total + $(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
	done
	echo "$total"
}
descendants() {
	echo "$1"
	local c
	for c in $(pgrep -P "$1"); do descendants "$c"; done
}

# the edge listener a peer is compared with
base_of() { case $1 in *465) echo "edge 465" ;; *) echo "edge 587" ;; esac; }

record() { # <case> <title> <peer> <base> <round> <json fields>
	printf '{"case":"%s","title":"%s","peer":"%s","base":"%s","round":%d,%s%s}\n' "$1" "$2" "$3" "$4" "$5" \
		"${pinned:+\"pinned\":true,}" "$6" >>"$results"
}
failed() { printf '"failed":"%s"' "$(tail -1 "$work/loadgen.log" | tr -d '"\\' | cut -c1-160)"; }

# rotate <round> <peers...>: the peers, starting at a different one each round
rotate() {
	local r=$1
	shift
	local n=$# i
	local a=("$@")
	for ((i = 0; i < n; i++)); do echo "${a[(i + r) % n]}"; done
}

settle() { sleep 1; }

# pin <cpus> <pids...>: every thread of the processes and their descendants
all_cpus=0-$((ncpu - 1))
pin() {
	local cpus=$1 p q
	shift
	for p in "$@"; do
		for q in $(descendants "$p"); do taskset -a -p -c "$cpus" "$q" >/dev/null 2>&1 || true; done
	done
}
# pin_for <peer>: before each measurement of the peer, with --pinned, the
# peer on cpu_peer and the sink on cpu_load (the backend's own cases: the
# sink on cpu_peer, as the peer under test); loadgen runs on cpu_load, where
# this shell is. Without --pinned, nothing: everything may run on every CPU.
pin_for() {
	local sink_cpu
	[ -n "$pinned" ] || return 0
	sink_cpu=$cpu_load
	[ "$1" != "backend (plain)" ] || sink_cpu=$cpu_peer
	pin "$cpu_peer" "${PID[$1]}"
	pin "$sink_cpu" "${PID[backend (plain)]}"
}

# ---- hold: fresh processes (only the check sessions above have run), one
# peer at a time, N sessions open after TLS; RSS of the peer at N minus
# before, divided by N.
log "hold: $hold_n idle sessions after TLS against each peer"
for label in "${all_peers[@]}"; do
	pid=${PID[$label]}
	pin_for "$label"
	ready=$work/hold.ready
	rm -f "$ready"
	before=$(rss "$pid")
	"$bin/loadgen" hold -json -ca "$work/ca.pem" -servername mail.test -addr "${ADDR[$label]}" -tls "${MODE[$label]}" \
		-n "$hold_n" -c 64 -ready-file "$ready" -hold 10m -check >"$work/hold.out" 2>>"$work/loadgen.log" &
	lgpid=$!
	for i in $(seq 3000); do
		[ -e "$ready" ] || ! kill -0 "$lgpid" 2>/dev/null && break
		sleep 0.1
	done
	sleep 2 # let the peer finish its side (backend connections, buffers)
	after=$(rss "$pid")
	if [ -n "$profile" ] && [[ $label == edge* ]]; then
		admin=$p_edge587_admin
		[ "$label" = "edge 465" ] && admin=$p_edge465_admin
		curl -sf -o "$work/heap-${label// /-}.pprof" "http://$ip:$admin/debug/pprof/heap" || true
		curl -sf -o "$work/goroutine-${label// /-}.txt" "http://$ip:$admin/debug/pprof/goroutine?debug=1" || true
	fi
	kill -USR1 "$lgpid" 2>/dev/null || true
	title="hold $hold_n idle sessions after TLS (EHLO answered), then NOOP on each"
	if wait "$lgpid" && [ -s "$work/hold.out" ]; then
		record hold "$title" "$label" "$(base_of "$label")" 1 \
			"\"result\":$(cat "$work/hold.out"),\"rss_before_kib\":$before,\"rss_after_kib\":$after"
	else
		record hold "$title" "$label" "$(base_of "$label")" 1 "$(failed)"
	fi
	log "  $label: RSS $before -> $after KiB"
	sleep 3 # closed sessions wind down before the next peer
done

# ---- warm-up: one short run against every peer, not recorded
log "warm-up"
for label in "${all_peers[@]}"; do
	pin_for "$label"
	lg run -addr "${ADDR[$label]}" -tls "${MODE[$label]}" -c 8 -d 1s >/dev/null || true
done

# CPU profiles cover 5 s of a run, or all of a shorter one
profile_secs=5
if [[ $duration =~ ^([0-9]+)s$ ]] && [ "${BASH_REMATCH[1]}" -lt 5 ]; then profile_secs=${BASH_REMATCH[1]}; fi

# CPU time of the load runs, so that the table can show what a session costs
# the machine (the peer, the sink it relays to, and loadgen's client half)
# and so what bounds the sessions/s ratios when the CPUs are saturated. The
# times in /proc/<pid>/stat are in clock ticks.
clk_tck=$(getconf CLK_TCK)

# cpu_ticks <pids...>: sets ticks to the CPU time the processes have used so
# far: utime + stime (all threads of each) + cutime + cstime (the children
# each has waited for, so that a worker that exits during a run still
# counts; none of the peers does that in these runs). Builtins only: a
# command substitution here would be a child of this shell and land in the
# figure for loadgen below.
cpu_ticks() {
	local p line f
	ticks=0
	for p in "$@"; do
		read -r line 2>/dev/null <"/proc/$p/stat" || continue
		# the fields after "pid (comm) ": f[0] is field 3 (state), f[11]
		# field 14 (utime)
		read -r -a f <<<"${line##*) }"
		ticks=$((ticks + f[11] + f[12] + f[13] + f[14]))
	done
}
# shell_child_ticks: sets ticks to the CPU time of the children this shell
# has waited for (cutime + cstime). loadgen has exited by the time we could
# read its own stat; its time is then in ours, through the command
# substitution that ran it. (The background curl of --profile and the
# rotate below may be waited for during a run too: a few ms in all.)
shell_child_ticks() {
	local line f
	read -r line <"/proc/$$/stat"
	read -r -a f <<<"${line##*) }"
	ticks=$((f[13] + f[14]))
}

# cpu_fields <loadgen's JSON> <peer ticks> <sink ticks, or empty when the peer
# is the sink> <loadgen ticks>: the record's CPU times, ms per completed
# session; nothing if no session completed
cpu_fields() {
	local sessions
	sessions=$(grep -o '"sessions":[0-9]*' <<<"$1" | cut -d: -f2)
	awk -v n="${sessions:-0}" -v p="$2" -v s="$3" -v l="$4" -v hz="$clk_tck" 'BEGIN {
		if (n <= 0) exit
		f = 1000 / hz / n
		printf ",\"cpu_ms_per_session\":{\"peer\":%.4f,", p * f
		if (s != "") printf "\"sink\":%.4f,", s * f
		printf "\"loadgen\":%.4f}", l * f
	}'
}

load_case() { # <case> <title> <base> <round> <concurrency> <loadgen flags> <peers...>
	local c=$1 title=$2 base=$3 round=$4 conc=$5 label out ok
	local peer_pids sink_pids p0 p1 s0 s1 l0 l1 cpu
	local -a flags
	read -r -a flags <<<"$6"
	shift 6
	while read -r label; do
		pin_for "$label"
		settle
		local prof_pid=
		if [ -n "$profile" ] && [ "$round" = 1 ] && [ "$conc" = 256 ] && [ "$label" = "$base" ]; then
			local admin=$p_edge587_admin
			[ "$label" = "edge 465" ] && admin=$p_edge465_admin
			curl -sf -o "$work/cpu-$c.pprof" "http://$ip:$admin/debug/pprof/profile?seconds=$profile_secs" &
			prof_pid=$!
		fi
		# The sink is measured for every peer, the ceiling too, which
		# leaves it idle (nginx reaches it only after RCPT, but then in
		# every session). For the backend itself the peer is the sink.
		# The pids come from command substitutions, which this shell has
		# waited for before the run starts (pids split safely).
		# shellcheck disable=SC2207
		peer_pids=($(descendants "${PID[$label]}"))
		sink_pids=()
		# shellcheck disable=SC2207
		[ "$label" = "backend (plain)" ] || sink_pids=($(descendants "${PID[backend (plain)]}"))
		cpu_ticks "${peer_pids[@]}"; p0=$ticks
		cpu_ticks "${sink_pids[@]}"; s0=$ticks
		shell_child_ticks; l0=$ticks
		ok=1
		out=$(lg run -addr "${ADDR[$label]}" -tls "${MODE[$label]}" -c "$conc" -d "$duration" -size 4k "${flags[@]}") || ok=
		shell_child_ticks; l1=$ticks
		cpu_ticks "${peer_pids[@]}"; p1=$ticks
		cpu_ticks "${sink_pids[@]}"; s1=$ticks
		if [ -n "$ok" ]; then
			cpu=$(cpu_fields "$out" $((p1 - p0)) "${sink_pids[*]:+$((s1 - s0))}" $((l1 - l0)))
			record "$c" "$title" "$label" "$base" "$round" "\"result\":$out$cpu"
		else
			record "$c" "$title" "$label" "$base" "$round" "$(failed)"
		fi
		[ -z "$prof_pid" ] || wait "$prof_pid" || true
	done < <(rotate "$round" "$@")
}

# rtt: one session per peer, 2,000 timed NOOPs. On this VM a round trip
# between two processes costs ~10 µs when they share a CPU and ~65 µs when
# the wake-up crosses CPUs, and where the scheduler puts them is chance; so
# the case runs twice, as the processes fall (--pinned: the peer on its CPU,
# loadgen and the sink on theirs), and with loadgen, the peer's processes
# (all threads) and the sink pinned to one CPU, where the figure is the CPU
# work each hop adds.
rtt_case() { # <case> <title> <round> <cpu to pin to, or empty>
	local c=$1 title=$2 round=$3 cpu=$4 label out
	while read -r label; do
		pin_for "$label"
		settle
		if [ -n "$cpu" ]; then pin "$cpu" "${PID[$label]}" "${PID[backend (plain)]}"; fi
		if out=$(${cpu:+taskset -c "$cpu"} "$bin/loadgen" rtt -json -ca "$work/ca.pem" -servername mail.test \
			-addr "${ADDR[$label]}" -tls "${MODE[$label]}" -n 2000 2>>"$work/loadgen.log"); then
			record "$c" "$title" "$label" "$(base_of "$label")" "$round" "\"result\":$out"
		else
			record "$c" "$title" "$label" "$(base_of "$label")" "$round" "$(failed)"
		fi
		if [ -n "$cpu" ]; then
			pin "$all_cpus" "${PID[$label]}" "${PID[backend (plain)]}"
			pin_for "$label"
		fi
	done < <(rotate "$round" "${all_peers[@]}")
}

# machine_ticks: sets ticks to the CPU time the whole machine has used (all
# CPUs: user, nice, system, irq, softirq) and steal to the time the
# hypervisor took, from /proc/stat
machine_ticks() {
	local f
	read -r -a f </proc/stat
	ticks=$((f[1] + f[2] + f[3] + f[6] + f[7])) steal=${f[8]:-0}
}
# ours_ticks: sets ticks to the CPU time of every process of the run: the
# peers, the sink, and this shell's children (loadgen, curl, the commands of
# the script)
ours_ticks() {
	local p all=0 line f
	for p in "${PID[@]}"; do
		cpu_ticks $(descendants "$p")
		all=$((all + ticks))
	done
	read -r line <"/proc/$$/stat"
	read -r -a f <<<"${line##*) }"
	ticks=$((all + f[11] + f[12] + f[13] + f[14]))
}
# so that the header can say how much CPU other processes took during the
# rounds: the machine's CPU time less ours
machine_ticks; m0=$ticks st0=$steal
ours_ticks; o0=$ticks
t0=$(date +%s)

for round in $(seq "$rounds"); do
	log "round $round of $rounds ($duration per load)"
	# each case of full handshakes, then the same with resumed sessions
	# (the name with -resumed, which the report pairs with the first)
	for conc in 8 256; do
		load_case "starttls-c$conc" "STARTTLS (587), 4 KiB message, concurrency $conc" "edge 587" "$round" "$conc" "" "${starttls_peers[@]}"
		load_case "starttls-c$conc-resumed" "STARTTLS (587), 4 KiB message, concurrency $conc, TLS sessions resumed" \
			"edge 587" "$round" "$conc" -resume "${starttls_tls_peers[@]}"
	done
	for conc in 8 256; do
		load_case "implicit-c$conc" "implicit TLS (465), 4 KiB message, concurrency $conc" "edge 465" "$round" "$conc" "" "${implicit_peers[@]}"
		load_case "implicit-c$conc-resumed" "implicit TLS (465), 4 KiB message, concurrency $conc, TLS sessions resumed" \
			"edge 465" "$round" "$conc" -resume "${implicit_tls_peers[@]}"
	done
	title="one 25 MiB message, DATA to the 250 after the dot (median of 3 in one session)"
	while read -r label; do
		pin_for "$label"
		settle
		if out=$(lg bulk -addr "${ADDR[$label]}" -tls "${MODE[$label]}" -size 25m -n 3 -timeout 120s); then
			record bulk "$title" "$label" "$(base_of "$label")" "$round" "\"result\":$out"
		else
			record bulk "$title" "$label" "$(base_of "$label")" "$round" "$(failed)"
		fi
	done < <(rotate "$round" "${all_peers[@]}")
	rtt_case rtt "2,000 NOOP round trips after TLS, inside a transaction (after RCPT)" "$round" ""
	rtt_case rtt-1cpu "the same with loadgen, peer and sink all pinned to CPU 0" "$round" 0
done

machine_ticks; m1=$ticks st1=$steal
ours_ticks; o1=$ticks
t1=$(date +%s)
others=$(awk -v m=$((m1 - m0)) -v o=$((o1 - o0)) -v st=$((st1 - st0)) -v hz="$clk_tck" -v s=$((t1 - t0)) -v n="$ncpu" 'BEGIN {
	printf "%.0f s of CPU by other processes (%.1f%% of the %d CPUs), %.0f s stolen by the hypervisor, in %d s",
		(m - o) / hz, 100 * (m - o) / hz / (s * n), n, st / hz, s }')

# layout: how each peer ran: its processes, their threads, and the CPUs
# they may run on (each thread's affinity, all of them)
layout() {
	local label p t n threads cpus
	for label in "${all_peers[@]}"; do
		n=0 threads=0 cpus=()
		for p in $(descendants "${PID[$label]}"); do
			n=$((n + 1))
			for t in /proc/"$p"/task/*; do
				threads=$((threads + 1))
				cpus+=("$(awk '/^Cpus_allowed_list:/ {print $2}' "$t/status" 2>/dev/null)")
			done
		done
		printf '  %-16s %d process(es), %d threads, CPUs %s\n' "$label:" "$n" "$threads" \
			"$(printf '%s\n' "${cpus[@]}" | sort -u | paste -sd' ' -)"
	done
}

# ---------------------------------------------------------------- report
{
	echo "SMTP edge benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $built"
	echo "machine: nproc $ncpu, $(lscpu | sed -n 's/^Model name: *//p'), $(uname -sr), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM"
	lscpu | grep -E '^(CPU\(s\)|Model name|Thread\(s\) per core|Core\(s\) per socket|Hypervisor vendor|L2 cache|L3 cache):' | sed 's/^/  lscpu: /'
	echo "peers (Debian packages): $(dpkg-query -W -f '${Package} ${Version}, ' nginx libnginx-mod-mail haproxy stunnel4 postfix)$(go version | cut -d' ' -f3)"
	echo "runs: $duration per load, $rounds round(s), the order of the peers rotated each round; hold $hold_n sessions;"
	echo "      full handshakes, and resumed sessions in the cases that say so (loadgen -resume); curves X25519,P256 offered;"
	if [ -n "$pinned" ]; then
		echo "      pinned (--pinned): the peer under test on CPU $cpu_peer, loadgen and smtp-sink on CPU $cpu_load (for the"
		echo "      backend's own cases the sink on CPU $cpu_peer); the peers started on CPU $cpu_peer alone, nginx with 1 worker"
	else
		echo "      not pinned: loadgen, the sink and the peers share all $ncpu CPUs as the scheduler places them"
	fi
	echo "      during the rounds: $others"
	echo "how the peers ran (at the end of the run: processes, threads, the CPUs their threads may use):"
	layout
	echo
	"$bin/report" "$results"
} | if [ -n "$out_file" ]; then tee "$out_file"; else cat; fi
if [ -n "$out_file" ]; then cp "$results" "${out_file%.txt}.jsonl"; fi
if [ -n "$profile" ]; then log "profiles: $work/*.pprof (go tool pprof -top $bin/caddy FILE)"; fi
