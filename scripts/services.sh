#!/usr/bin/env bash
# Make sure Redis and Postgres are reachable for streamsrv (development and tests).
#
#   scripts/services.sh up    [STATE_DIR]  use $REDIS_URL / $DATABASE_URL when they answer,
#                                          else start private instances under STATE_DIR;
#                                          writes STATE_DIR/services.env with the URLs to use
#   scripts/services.sh down  [STATE_DIR]  stop the private instances started there (data kept)
#   scripts/services.sh purge [STATE_DIR]  down, then delete STATE_DIR's data
#   scripts/services.sh packages PKG...    apt-get install those Debian packages not installed
#
# STATE_DIR defaults to .run. Missing Debian packages (redis-server, postgresql) are installed
# with apt-get. Progress goes to stderr; stdout gets one line per service saying what is used.
set -euo pipefail

cmd=${1:-}
STATE_DIR=${2:-.run}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
DATABASE_URL=${DATABASE_URL:-postgresql://localhost/streamsrv}

log() { echo "services.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

apt_install() {
    log "installing $* with apt-get"
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y)
    as_root "${apt[@]}" install --no-install-recommends "$@" >&2 ||
        { as_root "${apt[@]}" update >&2 && as_root "${apt[@]}" install --no-install-recommends "$@" >&2; }
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local port=$1
    while port_in_use "$port"; do port=$((port + 1)); done
    echo "$port"
}

# True when the process in pidfile $1 is alive and its command line contains $2.
pid_alive() {
    local pid
    [[ -f $1 ]] && pid=$(<"$1") && [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
}

# ---------------------------------------------------------------- Redis

redis_ping() { [[ $(timeout 5 redis-cli "$@" ping 2>/dev/null) == PONG ]]; }

# True when our private redis-server (pidfile in $1) is the one answering on port $2.
redis_ours() {
    local pid
    pid_alive "$1/redis.pid" redis-server && pid=$(<"$1/redis.pid") &&
        timeout 5 redis-cli -p "$2" info server 2>/dev/null | tr -d '\r' | grep -qx "process_id:$pid"
}

redis_up() {
    command -v redis-cli >/dev/null || apt_install redis-tools
    if redis_ping -u "$REDIS_URL"; then
        echo "redis: using $REDIS_URL"
        redis_env=$REDIS_URL
        return
    fi
    local dir=$STATE_DIR/redis port db
    db=${REDIS_URL##*/}
    [[ $db =~ ^[0-9]+$ ]] || db=0
    mkdir -p "$dir"
    if [[ -f $dir/port ]] && port=$(<"$dir/port") && redis_ours "$dir" "$port"; then
        echo "redis: private redis-server already running on 127.0.0.1:$port ($REDIS_URL does not answer)"
    else
        command -v redis-server >/dev/null || apt_install redis-server
        for _ in 1 2 3 4 5; do
            port=$(free_port 6390)
            rm -f "$dir/redis.pid"
            redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --dir "$dir" \
                --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --save "" --appendonly no >&2
            for _ in $(seq 50); do
                redis_ours "$dir" "$port" && break 2
                sleep 0.1
            done
            log "redis-server on port $port did not answer (see $dir/redis.log), retrying"
        done
        redis_ours "$dir" "$port" || die "could not start redis-server (see $dir/redis.log)"
        echo "$port" >"$dir/port"
        echo "redis: started private redis-server on 127.0.0.1:$port ($REDIS_URL does not answer)"
    fi
    redis_env=redis://127.0.0.1:$port/$db
}

redis_down() {
    local dir=$STATE_DIR/redis
    if pid_alive "$dir/redis.pid" redis-server; then
        local pid
        pid=$(<"$dir/redis.pid")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        echo "redis: stopped private redis-server (pid $pid)"
    fi
    rm -f "$dir/redis.pid"
}

# ---------------------------------------------------------------- Postgres

pg_ok() { PGCONNECT_TIMEOUT=5 psql "$1" -XAtq -c 'select 1' >/dev/null 2>&1; }

# URL $1 with its database replaced by $2 (query string kept).
pg_url_with_db() {
    [[ $1 =~ ^([a-z]+://[^/?]*)(/[^?]*)?(\?.*)?$ ]] || die "cannot parse database URL $1"
    echo "${BASH_REMATCH[1]}/$2${BASH_REMATCH[3]}"
}

pg_dbname() {
    [[ $1 =~ ^[a-z]+://[^/?]*/([^?]+) ]] && echo "${BASH_REMATCH[1]}" || echo streamsrv
}

# Create database $2 through the server's maintenance database URL $1 unless it exists.
pg_create_db() {
    psql "$1" -XAtq -v ON_ERROR_STOP=1 -v db="$2" >/dev/null <<'SQL'
SELECT format('CREATE DATABASE %I', :'db')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\gexec
SQL
}

# Run a Postgres server binary as the cluster owner: the postgres system user when root.
pg_run() { if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# The directory holding the private cluster: STATE_DIR/pg, or a symlink from there to /tmp
# when the cluster owner cannot reach STATE_DIR or its socket path would be too long.
pg_home() {
    local link=$STATE_DIR/pg
    if [[ -L $link || -d $link ]]; then
        (cd "$link" && pwd -P)
        return
    fi
    mkdir -p "$link"
    [[ $EUID -eq 0 ]] && chown postgres: "$link"
    if ((${#link} > 80)) || ! pg_run test -w "$link" -a -x "$link"; then
        rmdir "$link"
        local tmp
        tmp=/tmp/streamsrv-pg-$(printf %s "$STATE_DIR" | sha1sum | cut -c1-12)
        mkdir -p "$tmp"
        [[ $EUID -eq 0 ]] && chown postgres: "$tmp"
        chmod 700 "$tmp"
        ln -s "$tmp" "$link"
        log "postgres cluster for $STATE_DIR lives in $tmp"
    fi
    (cd "$link" && pwd -P)
}

pg_bindir() {
    local version
    [[ -f $1/data/PG_VERSION ]] && version=$(<"$1/data/PG_VERSION") &&
        [[ -x /usr/lib/postgresql/$version/bin/initdb ]] &&
        { echo "/usr/lib/postgresql/$version/bin"; return; }
    find /usr/lib/postgresql -path '*/bin/initdb' 2>/dev/null | sort -V | tail -n 1 | xargs -r dirname
}

pg_up() {
    command -v psql >/dev/null || apt_install postgresql-client
    local db admin
    db=$(pg_dbname "$DATABASE_URL")
    if pg_ok "$DATABASE_URL"; then
        echo "postgres: using $DATABASE_URL"
        pg_env=$DATABASE_URL
        return
    fi
    admin=$(pg_url_with_db "$DATABASE_URL" postgres)
    if pg_ok "$admin" && pg_create_db "$admin" "$db" && pg_ok "$DATABASE_URL"; then
        echo "postgres: created database $db, using $DATABASE_URL"
        pg_env=$DATABASE_URL
        return
    fi

    local home bin port url
    if [[ -z $(pg_bindir /nonexistent) ]] || { [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; }; then
        apt_install postgresql
    fi
    home=$(pg_home)
    bin=$(pg_bindir "$home")
    [[ -n $bin ]] || die "no initdb found under /usr/lib/postgresql"
    if [[ ! -f $home/data/PG_VERSION ]]; then
        pg_run "$bin/initdb" -D "$home/data" -U postgres --auth=trust -E UTF8 >"$home/initdb.log"
        cat >>"$home/data/postgresql.conf" <<EOF
# streamsrv private instance (scripts/services.sh)
listen_addresses = '127.0.0.1'
unix_socket_directories = '${home//\'/\'\'}'
EOF
    fi
    if pg_run "$bin/pg_ctl" status -D "$home/data" >/dev/null 2>&1; then
        port=$(sed -n 4p "$home/data/postmaster.pid")
        echo "postgres: private server already running on 127.0.0.1:$port ($DATABASE_URL does not answer)"
    else
        for _ in 1 2 3 4 5; do
            port=$(free_port 5440)
            pg_run "$bin/pg_ctl" start -s -D "$home/data" -l "$home/postgres.log" -w -t 60 \
                -o "-p $port" >&2 && break
            log "postgres on port $port did not start (see $home/postgres.log), retrying"
            port=
        done
        [[ -n $port ]] || die "could not start postgres (see $home/postgres.log)"
        echo "postgres: started private server on 127.0.0.1:$port ($DATABASE_URL does not answer)"
    fi
    url=postgresql://postgres@127.0.0.1:$port
    pg_create_db "$url/postgres" "$db" || die "could not create database $db"
    pg_env=$url/$db
}

pg_down() {
    local link=$STATE_DIR/pg home bin
    [[ -f $link/data/postmaster.pid ]] || return 0
    home=$(cd "$link" && pwd -P)
    bin=$(pg_bindir "$home")
    if pg_run "$bin/pg_ctl" status -D "$home/data" >/dev/null 2>&1; then
        pg_run "$bin/pg_ctl" stop -s -D "$home/data" -m fast -w >&2
        echo "postgres: stopped private server"
    fi
}

# ---------------------------------------------------------------- main

if [[ $cmd == packages ]]; then
    shift
    missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
    exit 0
fi
mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
case $cmd in
    up)
        redis_up
        pg_up
        printf "REDIS_URL='%s'\nDATABASE_URL='%s'\n" "$redis_env" "$pg_env" >"$STATE_DIR/services.env.tmp"
        mv "$STATE_DIR/services.env.tmp" "$STATE_DIR/services.env"
        ;;
    down | purge)
        redis_down
        pg_down
        rm -f "$STATE_DIR/services.env"
        if [[ $cmd == purge ]]; then
            [[ -L $STATE_DIR/pg ]] && rm -rf "$(readlink "$STATE_DIR/pg")"
            rm -rf "$STATE_DIR/pg" "$STATE_DIR/redis"
        fi
        ;;
    *)
        echo "usage: $0 up|down|purge [STATE_DIR] | packages PKG..." >&2
        exit 2
        ;;
esac
