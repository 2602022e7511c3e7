#!/usr/bin/env bash
# PostgreSQL on 127.0.0.1 for the gateway's tests (every database test runs on SQLite and PostgreSQL) and for a
# PostgreSQL RECSYS_DATABASE_URL. `make setup` runs this. A server that already answers on the port is used as it
# is. Otherwise Debian's PostgreSQL (installed when missing, told not to create its own cluster) runs a cluster of
# the project's own, in var/postgres/: superuser `postgres`, trust authentication, listening on loopback only (the
# tests' default, postgresql://postgres@127.0.0.1:5432/postgres). Safe to rerun; after a reboot it starts the
# cluster again. POSTGRES_PORT and POSTGRES_DATA choose another port and data folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${POSTGRES_PORT:-5432}"
DATA="${POSTGRES_DATA:-$PWD/var/postgres/data}"
HOME_DIR="$(dirname "$DATA")"  # the log and the Unix socket go next to the data

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
bin_dir() { find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1; }

if listening; then
  echo "a server answers on 127.0.0.1:$PORT: using it"
  exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ -z "$(bin_dir)" ]; then
  # Debian's package would create and start a cluster "main" of its own, with password authentication on loopback.
  $SUDO mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.d/recsys.conf >/dev/null
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql
  if listening; then
    echo "installing PostgreSQL started a server on 127.0.0.1:$PORT: using it (the tests expect trust authentication"
    echo "for user postgres there; RECSYS_TEST_POSTGRES_URL names another server)"
    exit 0
  fi
fi
BIN="$(bin_dir)"
# PostgreSQL refuses to run as root: run as root, the cluster belongs to the package's `postgres` user.
AS=()
if [ "$(id -u)" -eq 0 ]; then AS=(runuser -u postgres --); fi
mkdir -p "$DATA"
[ "$(id -u)" -ne 0 ] || chown postgres: "$HOME_DIR" "$DATA"
chmod 700 "$DATA"
if [ ! -s "$DATA/PG_VERSION" ]; then
  "${AS[@]}" "$BIN/initdb" --pgdata "$DATA" --username postgres --auth trust --encoding UTF8 >/dev/null
fi
"${AS[@]}" "$BIN/pg_ctl" --pgdata "$DATA" --log "$HOME_DIR/postgres.log" --wait --silent start \
  -o "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories='$HOME_DIR'"
listening && echo "PostgreSQL cluster $DATA answers on 127.0.0.1:$PORT"
