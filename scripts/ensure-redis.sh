#!/usr/bin/env bash
# Make sure a Redis answers at 127.0.0.1:6379 (the tests use a real one).
# Starts one without persistence if none answers; installs it if missing.
set -euo pipefail

# A listener that never answers must not hang the build: give it 2 s.
ping() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG" 2>/dev/null; }

if ping; then exit 0; fi
if ! command -v redis-server >/dev/null; then
  echo "redis-server not found; installing it" >&2
  if command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "install Redis 7 and start it on 127.0.0.1:6379" >&2; exit 1
  fi
fi
mkdir -p /tmp/tidegate-redis
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
  --dir /tmp/tidegate-redis --logfile /tmp/tidegate-redis/redis.log
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "Redis did not come up on 127.0.0.1:6379 (see /tmp/tidegate-redis/redis.log)" >&2
exit 1
