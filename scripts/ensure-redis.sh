#!/usr/bin/env bash
# Make sure Redis answers at $REDIS_URL; start a local one if it is local and
# redis-server is installed; otherwise fail with a clear message (never skip).
set -euo pipefail
url=${REDIS_URL:-redis://127.0.0.1:6379/0}
hostport=${url#*://}; hostport=${hostport#*@}; hostport=${hostport%%/*}
host=${hostport%%:*}; port=${hostport##*:}
[ "$port" = "$hostport" ] && port=6379

ping() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(timeout 3 redis-cli -h "$host" -p "$port" ping 2>/dev/null)" = "PONG" ]
  else
    timeout 3 bash -c "exec 3<>/dev/tcp/$host/$port && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG"
  fi
}

ping && exit 0
case "$host" in 127.0.0.1|localhost|::1) ;; *)
  echo "Redis does not answer at $host:$port (REDIS_URL=$url) and it is not local: start it, or set REDIS_URL." >&2
  exit 1;;
esac
if ! command -v redis-server >/dev/null 2>&1; then
  echo "Redis does not answer at $host:$port and redis-server is not installed." >&2
  echo "Install it (apt-get install redis-server) or point REDIS_URL at a running Redis." >&2
  exit 1
fi
echo "Redis not answering at $host:$port: starting redis-server"
mkdir -p /tmp/seedream-redis
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
  --dir /tmp/seedream-redis --logfile /tmp/seedream-redis/redis.log
for _ in $(seq 1 100); do ping && exit 0; sleep 0.1; done
echo "redis-server was started but does not answer at $host:$port; see /tmp/seedream-redis/redis.log" >&2
exit 1
