#!/usr/bin/env bash
# Sets up openCryptoki's software token ("swtok", slot 3) for the test suite, as root:
#   opencryptoki-token.sh reset LABEL SO_PIN USER_PIN   fresh token with these PINs (4-8 chars)
#   opencryptoki-token.sh stop                          stop the slot daemon, remove the token state
#   opencryptoki-token.sh daemon-stop | daemon-start    only the slot daemon (token loss tests)
# The token state is machine-global (one swtok per machine): callers serialise on a lock file.
# Writes a minimal /etc/opencryptoki/opencryptoki.conf naming only the soft token (the original
# is kept once as opencryptoki.conf.orig), creates the folders, (re)starts pkcsslotd (it must run
# before C_Initialize), and initialises the token. pkcsconf exits 0 even when a PIN change
# failed, so the token flags are checked afterwards.
set -euo pipefail
CONF=/etc/opencryptoki/opencryptoki.conf
SLOT=3
DEFAULT_SO_PIN=87654321
PIDFILE=/var/run/pkcsslotd.pid

die() { echo "opencryptoki-token: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (the slot daemon and token folders are root's)"
command -v pkcsslotd >/dev/null || die "pkcsslotd not found (install the opencryptoki package)"
command -v pkcsconf >/dev/null || die "pkcsconf not found (install the opencryptoki package)"

stop_daemon() {
    if [ -f "$PIDFILE" ]; then
        pid=$(cat "$PIDFILE" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        fi
        rm -f "$PIDFILE"
    fi
}

case "${1:-}" in
reset)
    [ $# -eq 4 ] || die "usage: $0 reset LABEL SO_PIN USER_PIN"
    label=$2 so_pin=$3 user_pin=$4
    mkdir -p /etc/opencryptoki
    wanted=$'version opencryptoki-3.1\n\nslot 3\n{\nstdll = libpkcs11_sw.so\n}\n'
    if [ "$(cat "$CONF" 2>/dev/null || true)"$'\n' != "$wanted" ]; then
        [ -f "$CONF" ] && [ ! -f "$CONF.orig" ] && cp -p "$CONF" "$CONF.orig"
        printf '%s' "$wanted" > "$CONF"
    fi
    getent group pkcs11 >/dev/null || groupadd -r pkcs11
    stop_daemon
    rm -rf /var/lib/opencryptoki/swtok /var/lock/opencryptoki/swtok
    rm -f /dev/shm/*swtok* /dev/shm/var.lib.opencryptoki* 2>/dev/null || true
    for d in /var/lock/opencryptoki /var/lock/opencryptoki/swtok /var/lib/opencryptoki \
             /var/lib/opencryptoki/swtok /var/lib/opencryptoki/swtok/TOK_OBJ /var/log/opencryptoki; do
        mkdir -p "$d"; chown root:pkcs11 "$d"; chmod 0770 "$d"
    done
    pkcsslotd
    echo "$label" | pkcsconf -I -c "$SLOT" -S "$DEFAULT_SO_PIN" >/dev/null
    pkcsconf -P -c "$SLOT" -S "$DEFAULT_SO_PIN" -n "$so_pin" >/dev/null
    pkcsconf -u -c "$SLOT" -S "$so_pin" -n "$user_pin" >/dev/null
    flags=$(pkcsconf -t -c "$SLOT")
    grep -q USER_PIN_INITIALIZED <<<"$flags" || die "user PIN not initialised (PIN change refused)"
    grep -q "Label: $label" <<<"$flags" || die "token label not set"
    echo "opencryptoki-token: token $label ready in slot $SLOT"
    ;;
daemon-stop)
    # Only the slot daemon (token state kept): openCryptoki cannot be initialised without it.
    stop_daemon
    ;;
daemon-start)
    [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null || pkcsslotd
    ;;
stop)
    # Stop the daemon and remove the token state (objects, PINs, the /dev/shm cache).
    stop_daemon
    rm -rf /var/lib/opencryptoki/swtok/TOK_OBJ/* /var/lib/opencryptoki/swtok/NVTOK.DAT \
        /var/lib/opencryptoki/swtok/MK_* 2>/dev/null || true
    rm -f /dev/shm/*swtok* /dev/shm/var.lib.opencryptoki* 2>/dev/null || true
    ;;
*)
    die "usage: $0 reset LABEL SO_PIN USER_PIN | stop | daemon-stop | daemon-start"
    ;;
esac
