#!/bin/bash
# Entrypoint of micromsg/postgres:15: the subset of the official postgres image's behaviour
# that MicroMsg's compose file and tests use.
#
#   POSTGRES_PASSWORD          superuser password (required unless POSTGRES_HOST_AUTH_METHOD=trust)
#   POSTGRES_USER              superuser name (default postgres)
#   POSTGRES_DB                database created on first start (default: $POSTGRES_USER)
#   POSTGRES_INITDB_ARGS       extra initdb arguments
#   POSTGRES_HOST_AUTH_METHOD  auth for TCP connections (default scram-sha-256)
#   /docker-entrypoint-initdb.d/*.sql, *.sh   run once, after the first initdb
#
# On first start (no PG_VERSION in $PGDATA) it runs initdb, sets the password, creates the
# database, runs the init scripts on a socket-only server, then starts PostgreSQL listening on
# every address. Later starts go straight to PostgreSQL.
set -Eeuo pipefail

: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA

if [ "${1:-postgres}" != postgres ] && [ "${1#-}" = "${1:-}" ]; then
    exec "$@"   # some other command, for example bash or psql
fi
if [ "${1:-}" = postgres ]; then
    shift
fi

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 0700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" postgres "$@"
fi

log() { printf '%s [entrypoint] %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "$*" >&2; }

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    auth="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$auth" != trust ]; then
        log "error: the database is uninitialised and POSTGRES_PASSWORD is not set."
        log "       Set POSTGRES_PASSWORD (or POSTGRES_HOST_AUTH_METHOD=trust, which allows anyone"
        log "       who can reach the port to connect without a password)."
        exit 1
    fi
    log "initialising $PGDATA (superuser $user, database $db)"
    pwfile="$(mktemp)"
    printf '%s\n' "${POSTGRES_PASSWORD:-}" >"$pwfile"
    # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of words, as in the official image
    initdb --username="$user" --pwfile="$pwfile" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host="$auth" ${POSTGRES_INITDB_ARGS:-} >/dev/null
    rm -f "$pwfile"
    {
        echo
        echo "# Added by docker-entrypoint.sh: TCP connections from anywhere, $auth."
        echo "host all all all $auth"
    } >>"$PGDATA/pg_hba.conf"
    {
        echo
        echo "listen_addresses = '*'"
    } >>"$PGDATA/postgresql.conf"

    # A server on the socket only, for the setup below.
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k /var/run/postgresql" -w -t 60 start >/dev/null
    psql=(psql -v ON_ERROR_STOP=1 --no-psqlrc -h /var/run/postgresql -U "$user")
    if [ "$db" != postgres ]; then
        "${psql[@]}" -d postgres -q --set db="$db" <<<'CREATE DATABASE :"db";'
    fi
    shopt -s nullglob
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
        *.sql) log "running $f"; "${psql[@]}" -d "$db" -f "$f" ;;
        *.sh) log "running $f"; . "$f" ;;
        *) log "ignoring $f" ;;
        esac
    done
    shopt -u nullglob
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    log "initialised; starting PostgreSQL"
fi

exec postgres "$@"
