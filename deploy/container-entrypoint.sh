#!/bin/sh
# Entrypoint of the KMS container (deploy/Containerfile; see deploy/README.md).
#
#   (no arguments) | serve [ARGS]   initialise the home on first start, then `kms serve`
#   COMMAND [ARGS]                  any other `kms` command on the same home
#                                   (e.g. `endpoint add`, `endpoint list`, `tpk rotate`)
#
# First start (no kms.toml in $KMS_HOME):
#   with KMS_PKCS11_MODULE      an existing token: `kms init --module ... --token-label ...`
#                               (or --token-serial), PIN from KMS_PIN_FILE (a mounted secret
#                               file, preferred) or the variable KMS_PIN; kms.toml records
#                               only where the PIN comes from
#   without                     an embedded SoftHSM2 token in the home volume (PINs generated
#                               into $KMS_HOME/token, mode 0600): for trials
# and [server] gets KMS_LISTEN, the TLS files (KMS_TLS_CERT, KMS_TLS_KEY, KMS_TLS_CLIENT_CA)
# or, only if asked for, plaintext on a non-loopback address (KMS_ALLOW_PLAINTEXT=1).
set -eu

KMS_HOME="${KMS_HOME:-/var/lib/kms}"
KMS_LISTEN="${KMS_LISTEN:-0.0.0.0:50051}"
KMS_BIN="${KMS_BIN:-kms}"

fail() {
    echo "kms-entrypoint: error: $*" >&2
    exit 1
}

toml_set() { # toml_set KEY VALUE: replace the (possibly commented-out) line "KEY = ..."
    grep -Eq "^#? *$1 = " "$KMS_HOME/kms.toml" || fail "kms.toml has no $1 line"
    sed -i -E "s|^#? *$1 = .*$|$1 = $2|" "$KMS_HOME/kms.toml"
}

init_home() {
    set -- --kms-id "${KMS_ID:-kms:$(hostname)}"
    if [ -n "${KMS_PKCS11_MODULE:-}" ]; then
        [ -r "$KMS_PKCS11_MODULE" ] || fail "KMS_PKCS11_MODULE $KMS_PKCS11_MODULE is not readable"
        set -- "$@" --module "$KMS_PKCS11_MODULE"
        if [ -n "${KMS_TOKEN_SERIAL:-}" ]; then
            set -- "$@" --token-serial "$KMS_TOKEN_SERIAL"
        else
            set -- "$@" --token-label "${KMS_TOKEN_LABEL:?set KMS_TOKEN_LABEL or KMS_TOKEN_SERIAL}"
        fi
        if [ -n "${KMS_PIN_FILE:-}" ]; then
            set -- "$@" --pin-file "$KMS_PIN_FILE"
        elif [ -n "${KMS_PIN:-}" ]; then
            set -- "$@" --pin-env KMS_PIN
        else
            fail "an external token needs KMS_PIN_FILE (a mounted secret) or KMS_PIN"
        fi
    fi
    "$KMS_BIN" --home "$KMS_HOME" init "$@"

    toml_set listen "\"$KMS_LISTEN\""
    if [ -n "${KMS_TLS_CERT:-}" ] || [ -n "${KMS_TLS_KEY:-}" ]; then
        [ -n "${KMS_TLS_CERT:-}" ] && [ -n "${KMS_TLS_KEY:-}" ] ||
            fail "KMS_TLS_CERT and KMS_TLS_KEY go together"
        toml_set tls_cert "\"$KMS_TLS_CERT\""
        toml_set tls_key "\"$KMS_TLS_KEY\""
        if [ -n "${KMS_TLS_CLIENT_CA:-}" ]; then
            toml_set tls_client_ca "\"$KMS_TLS_CLIENT_CA\""
        fi
    elif [ "${KMS_ALLOW_PLAINTEXT:-0}" = 1 ]; then
        toml_set allow_plaintext_non_loopback true
    fi
}

if [ "$#" -eq 0 ] || [ "$1" = serve ]; then
    [ "$#" -gt 0 ] && shift
    umask 077
    if [ ! -e "$KMS_HOME/kms.toml" ]; then
        init_home
    fi
    # exec: `kms serve` is PID 1 and gets SIGTERM itself (drain, then exit 0).
    exec "$KMS_BIN" --home "$KMS_HOME" serve --listen "$KMS_LISTEN" "$@"
fi
exec "$KMS_BIN" --home "$KMS_HOME" "$@"
