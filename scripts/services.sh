#!/usr/bin/env bash
# Make sure Redis ($REDIS_URL) and PostgreSQL ($DATABASE_URL) answer; start private ones if not.
#
#   scripts/services.sh up      use what answers; otherwise start a private server under .run/
#                               (installing redis-server / postgresql with apt-get if missing),
#                               then create the database named in DATABASE_URL if needed, and
#                               make sure the binaries the tests need are installed
#   scripts/services.sh down    stop only the servers that `up` started; shared ones are left alone
#   scripts/services.sh status  print what answers and what `up` started
#   scripts/services.sh purge   `down`, then delete the private servers' data
#
# Needs only bash, coreutils and the system python3 (stdlib) — not the project venv.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN_DIR=${RUN_DIR:-$ROOT/.run}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
DATABASE_URL=${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/agent_sessions}

REDIS_DIR=$RUN_DIR/redis
REDIS_MARK=$RUN_DIR/redis.started       # exists <=> `up` started the Redis server
PG_MARK=$RUN_DIR/postgres.started       # exists <=> `up` started the Postgres server; holds its dir
APT_UPDATED=0

say() { echo "services: $*"; }
die() {
    echo "services: ERROR: $*" >&2
    exit 1
}

# ---------------------------------------------------------------------------- URL parsing
parse_urls() {
    local vars
    vars=$(python3 - "$REDIS_URL" "$DATABASE_URL" <<'PY'
import shlex
import sys
from urllib.parse import unquote, urlsplit

redis_url, db_url = urlsplit(sys.argv[1]), urlsplit(sys.argv[2])
out = {}
if redis_url.scheme == "unix":
    out.update(R_SOCKET=redis_url.path, R_HOST="", R_PORT="0")
elif redis_url.scheme in ("redis", "rediss"):
    host = redis_url.hostname or "127.0.0.1"
    out.update(R_SOCKET="", R_HOST="127.0.0.1" if host == "localhost" else host,
               R_PORT=str(redis_url.port or 6379))
else:
    sys.exit(f"services: ERROR: REDIS_URL must be redis://, rediss:// or unix://: {sys.argv[1]!r}")
out["R_PASSWORD"] = unquote(redis_url.password or "")

if db_url.scheme.split("+")[0] not in ("postgresql", "postgres"):
    sys.exit(f"services: ERROR: DATABASE_URL must be postgresql://...: {sys.argv[2]!r}")
user = unquote(db_url.username or "postgres")
name = unquote(db_url.path.lstrip("/")) or user
out.update(PG_HOST=db_url.hostname or "127.0.0.1", PG_PORT=str(db_url.port or 5432),
           PG_USER=user, PG_PASSWORD=unquote(db_url.password or ""), PG_DB=name,
           PG_DB_LITERAL="'" + name.replace("'", "''") + "'",
           PG_DB_IDENT='"' + name.replace('"', '""') + '"')
for key, value in out.items():
    print(f"{key}={shlex.quote(value)}")
PY
    )
    eval "$vars"
    if [[ -n $PG_PASSWORD ]]; then export PGPASSWORD=$PG_PASSWORD; fi
}

is_local_host() { [[ $1 == 127.* || $1 == localhost || $1 == ::1 || $1 == /* || -z $1 ]]; }

# ---------------------------------------------------------------------------- helpers
apt_install() {
    [[ $EUID -eq 0 ]] || die "need root to install: $* (apt-get install -y $*)"
    if [[ $APT_UPDATED -eq 0 ]]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" </dev/null
}

# wait_for SECONDS COMMAND...: poll COMMAND every 0.1 s until it succeeds or the deadline passes.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# pid_alive PID COMM: a live (non-zombie) process whose name is COMM.
pid_alive() {
    local stat
    [[ -n $1 && -r /proc/$1/stat ]] || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [[ $(cat "/proc/$1/comm" 2>/dev/null) == "$2"* ]] || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z && ${stat:0:1} != X ]]
}

pid_gone() { ! pid_alive "$@"; }

# ---------------------------------------------------------------------------- Redis
redis_answers() {
    if command -v redis-cli >/dev/null; then
        local reply
        if [[ -n $R_SOCKET ]]; then
            local auth=()
            if [[ -n $R_PASSWORD ]]; then auth=(-a "$R_PASSWORD" --no-auth-warning); fi
            reply=$(timeout 5 redis-cli -s "$R_SOCKET" "${auth[@]}" ping 2>/dev/null) || return 1
        else
            reply=$(timeout 5 redis-cli -u "$REDIS_URL" ping 2>/dev/null) || return 1
        fi
        [[ $reply == PONG ]]
    else  # no redis-cli yet: a raw inline PING over the socket
        python3 - "$R_SOCKET" "$R_HOST" "$R_PORT" <<'PY'
import socket
import sys

path, host, port = sys.argv[1:]
try:
    if path:
        conn = socket.socket(socket.AF_UNIX)
        conn.settimeout(3)
        conn.connect(path)
    else:
        conn = socket.create_connection((host, int(port)), timeout=3)
    with conn:
        conn.sendall(b"PING\r\n")
        sys.exit(0 if conn.recv(64).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
    fi
}

start_redis() {
    is_local_host "$R_HOST" || die "Redis at $REDIS_URL does not answer and is not on this machine"
    if ! command -v redis-server >/dev/null; then
        apt_install redis-server redis-tools
        if redis_answers; then
            say "redis: the redis-server package started a server at $REDIS_URL; using it"
            return 0
        fi
    elif ! command -v redis-cli >/dev/null; then
        apt_install redis-tools
    fi
    mkdir -p "$REDIS_DIR"
    local args=(--daemonize yes --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log"
        --dir "$REDIS_DIR" --save '' --appendonly no)
    if [[ -n $R_SOCKET ]]; then
        args+=(--port 0 --unixsocket "$R_SOCKET")
    else
        args+=(--bind "$R_HOST" --port "$R_PORT")
    fi
    if [[ -n $R_PASSWORD ]]; then args+=(--requirepass "$R_PASSWORD"); fi
    say "redis: starting a private redis-server for $REDIS_URL (log: $REDIS_DIR/redis.log)"
    redis-server "${args[@]}" || die "redis-server failed to start; see $REDIS_DIR/redis.log"
    if ! wait_for 20 redis_answers; then
        tail -n 20 "$REDIS_DIR/redis.log" >&2 || true
        die "private redis-server at $REDIS_URL does not answer; see $REDIS_DIR/redis.log"
    fi
    echo "$REDIS_URL" >"$REDIS_MARK"
    say "redis: private server up at $REDIS_URL (pid $(cat "$REDIS_DIR/redis.pid"))"
}

stop_redis() {
    if [[ ! -f $REDIS_MARK ]]; then
        say "redis: not started by services.sh; left alone"
        return 0
    fi
    local pid
    pid=$(cat "$REDIS_DIR/redis.pid" 2>/dev/null || true)
    if pid_alive "$pid" redis-server; then
        kill -TERM "$pid"
        if ! wait_for 20 pid_gone "$pid" redis-server; then
            say "redis: pid $pid ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" || true
        fi
        say "redis: stopped private server (pid $pid)"
    else
        say "redis: private server was not running"
    fi
    rm -f "$REDIS_MARK" "$REDIS_DIR/redis.pid"
}

# ---------------------------------------------------------------------------- PostgreSQL
find_pg_bin() {
    local dir best=""
    while read -r dir; do
        if [[ -x $dir/initdb && -x $dir/pg_ctl ]]; then best=$dir; fi
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V)
    [[ -n $best ]] && echo "$best"
}

# pg_tool NAME: path of a PostgreSQL client program (server bin dir first, then PATH).
pg_tool() {
    local bin
    if bin=$(find_pg_bin) && [[ -x $bin/$1 ]]; then
        echo "$bin/$1"
    else
        command -v "$1"
    fi
}

pg_answers() {
    local isready
    if isready=$(pg_tool pg_isready); then
        "$isready" -q -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -t 3
    else  # no client tools yet: is anything listening?
        python3 -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3).close()' \
            "$PG_HOST" "$PG_PORT" 2>/dev/null
    fi
}

# Run a command as the postgres OS user (Postgres refuses to run as root).
as_pg() {
    if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Directory for the private cluster: .run/postgres, unless the postgres user cannot reach it
# (e.g. the checkout is under /root) or the socket path would be too long; then /var/tmp.
pg_prepare_dir() {
    local dir=$RUN_DIR/postgres
    mkdir -p "$dir"
    if [[ $EUID -eq 0 ]]; then chown postgres:postgres "$dir"; fi
    if ((${#dir} > 80)) || ! as_pg test -w "$dir"; then
        dir=/var/tmp/asc-services-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)/postgres
        mkdir -p "$(dirname "$dir")"
        chmod 755 "$(dirname "$dir")"
        mkdir -p "$dir"
        if [[ $EUID -eq 0 ]]; then chown postgres:postgres "$dir"; fi
    fi
    echo "$dir"
}

start_postgres() {
    is_local_host "$PG_HOST" || die "Postgres at $DATABASE_URL does not answer and is not on this machine"
    local bin dir
    if ! bin=$(find_pg_bin); then
        apt_install postgresql
        if pg_answers; then
            say "postgres: the postgresql package started a server at $PG_HOST:$PG_PORT; using it"
            return 0
        fi
        bin=$(find_pg_bin) || die "postgresql installed but no initdb under /usr/lib/postgresql/*/bin"
    fi
    if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
        useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
    dir=$(pg_prepare_dir)
    if [[ ! -f $dir/data/PG_VERSION ]]; then
        say "postgres: initdb $dir/data"
        rm -rf "$dir/data"
        as_pg "$bin/initdb" -D "$dir/data" -A trust -U "$PG_USER" -E UTF8 --no-locale --no-sync \
            >"$RUN_DIR/initdb.log" 2>&1 || die "initdb failed; see $RUN_DIR/initdb.log"
    fi
    if as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        say "postgres: private cluster runs but does not answer at $PG_HOST:$PG_PORT; restarting it"
        as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    fi
    local listen="-c listen_addresses='$PG_HOST' -p $PG_PORT -c unix_socket_directories='$dir'"
    if [[ $PG_HOST == /* ]]; then
        listen="-c listen_addresses='' -p $PG_PORT -c unix_socket_directories='$PG_HOST'"
    fi
    say "postgres: starting a private cluster for $PG_HOST:$PG_PORT (log: $dir/postgres.log)"
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 -o "$listen" start >/dev/null ||
        die "pg_ctl start failed; see $dir/postgres.log"
    wait_for 30 pg_answers || die "private Postgres at $PG_HOST:$PG_PORT does not answer"
    echo "$dir" >"$PG_MARK"
    say "postgres: private server up at $PG_HOST:$PG_PORT (data: $dir/data)"
}

stop_postgres() {
    if [[ ! -f $PG_MARK ]]; then
        say "postgres: not started by services.sh; left alone"
        return 0
    fi
    local dir bin
    dir=$(cat "$PG_MARK")
    bin=$(find_pg_bin) || die "no pg_ctl under /usr/lib/postgresql/*/bin"
    if as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
        say "postgres: stopped private server (data: $dir/data)"
    else
        say "postgres: private server was not running"
    fi
    rm -f "$PG_MARK"
}

ensure_database() {
    local psql exists
    if ! psql=$(pg_tool psql); then
        apt_install postgresql-client
        psql=$(pg_tool psql) || die "psql not found after installing postgresql-client"
    fi
    local conn=(-X -q -w -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres)
    exists=$("$psql" "${conn[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = $PG_DB_LITERAL") ||
        die "cannot query Postgres at $PG_HOST:$PG_PORT as $PG_USER"
    if [[ $exists == 1 ]]; then
        say "postgres: database $PG_DB exists"
    elif "$psql" "${conn[@]}" -c "CREATE DATABASE $PG_DB_IDENT" >/dev/null; then
        say "postgres: created database $PG_DB"
    else
        die "could not create database $PG_DB"
    fi
}

# ---------------------------------------------------------------------------- commands
# The test suite always starts private servers too (tests/servers.py), so the binaries must be
# here even when shared servers answer.  A no-op when they are installed.
ensure_binaries() {
    local missing=()
    if ! command -v redis-server >/dev/null; then missing+=(redis-server redis-tools); fi
    if ! command -v redis-cli >/dev/null; then missing+=(redis-tools); fi
    if ! find_pg_bin >/dev/null; then missing+=(postgresql); fi
    if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
}

cmd_up() {
    mkdir -p "$RUN_DIR"
    if redis_answers; then
        say "redis: $REDIS_URL answers"
    else
        start_redis
    fi
    if pg_answers; then
        say "postgres: $PG_HOST:$PG_PORT answers"
    else
        start_postgres
    fi
    ensure_database
    ensure_binaries
}

cmd_down() {
    stop_redis
    stop_postgres
}

cmd_status() {
    local rc=0 who
    who=shared
    if [[ -f $REDIS_MARK ]]; then
        who="started by services.sh, pid $(cat "$REDIS_DIR/redis.pid" 2>/dev/null || echo "?")"
    fi
    if redis_answers; then
        say "redis: $REDIS_URL answers ($who)"
    else
        say "redis: $REDIS_URL does not answer"
        rc=1
    fi
    who=shared
    if [[ -f $PG_MARK ]]; then who="started by services.sh, data $(cat "$PG_MARK")/data"; fi
    if pg_answers; then
        say "postgres: $PG_HOST:$PG_PORT answers ($who)"
    else
        say "postgres: $PG_HOST:$PG_PORT does not answer"
        rc=1
    fi
    return "$rc"
}

cmd_purge() {
    cmd_down
    local extra
    extra=/var/tmp/asc-services-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)
    rm -rf "$RUN_DIR/redis" "$RUN_DIR/postgres" "$RUN_DIR/initdb.log" "$extra"
    say "purged private server data"
}

main() {
    parse_urls
    case ${1:-} in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        purge) cmd_purge ;;
        *) die "usage: $0 up|down|status|purge" ;;
    esac
}

main "$@"
