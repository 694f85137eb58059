#!/bin/sh
# Installs the Postern relay on this machine: the first of the volunteer guide's two
# commands (docs/volunteer-guide.md). The second is `sudo postern relay setup --domain NAME`.
#
# What it does, each step only if not done already (running it again is harmless, and is
# how you update: it replaces the binary and the unit, and keeps your configuration):
#   1. installs the postern binary as /usr/local/bin/postern
#   2. creates the system user and group "postern" (no login, no home)
#   3. creates the state directory /var/lib/postern-relay (owned by postern, mode 0700)
#   4. with systemd: installs /etc/systemd/system/postern-relay.service and enables it
set -eu

USER_NAME=postern
STATE=/var/lib/postern-relay
BIN=/usr/local/bin/postern
UNIT=/etc/systemd/system/postern-relay.service
DOC=/usr/local/share/doc/postern

usage() {
    cat <<USAGE
Usage: sudo deploy/install.sh [--binary FILE] [--prefix DIR] [--no-systemd]

Installs the Postern relay: the binary ($BIN), the system user "$USER_NAME", the state
directory $STATE and, where systemd runs, the service postern-relay (enabled; it starts
once \`postern relay setup\` has written $STATE/relay.toml). Idempotent: run it
again to update the binary and the unit; the configuration and secret are kept.

Options:
  --binary FILE   the postern binary to install. Default: ./postern next to this script,
                  else target/release/postern of this source tree, else \`postern\` on the PATH
                  (e.g. from \`cargo install --path crates/postern\`).
  --prefix DIR    install under DIR instead of / (DIR/usr/local/bin/postern, the user in
                  DIR/etc/passwd, ...): for images and tests. Nothing outside DIR is touched
                  and no service is started.
  --no-systemd    do not install or enable the systemd unit (containers, other init systems).
  -h, --help      this text.

Next: sudo postern relay setup --domain relay.example.org   (or without --domain: by IP)
USAGE
}

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

PREFIX=/
BINARY=
SYSTEMD=auto
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --binary) [ $# -ge 2 ] || die "--binary needs a FILE"; BINARY=$2; shift 2 ;;
        --binary=*) BINARY=${1#--binary=}; shift ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a DIR"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#--prefix=}; shift ;;
        --no-systemd) SYSTEMD=no; shift ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
if [ -z "$BINARY" ]; then
    for c in "$HERE/postern" "$HERE/../target/release/postern"; do
        if [ -x "$c" ]; then BINARY=$c; break; fi
    done
fi
if [ -z "$BINARY" ]; then
    BINARY=$(command -v postern 2>/dev/null || true)
fi
[ -n "$BINARY" ] || die "no postern binary found: build one (cargo build --release, or cargo install --path crates/postern) or pass --binary FILE"
[ -f "$BINARY" ] && [ -x "$BINARY" ] || die "--binary $BINARY is not an executable file"

[ -d "$PREFIX" ] || die "--prefix $PREFIX is not a directory"
PREFIX=$(cd "$PREFIX" && pwd)
if [ "$PREFIX" = / ]; then R=; else R=$PREFIX; fi
if [ "$(id -u)" -ne 0 ] && [ -z "$R" ]; then
    die "run it as root (sudo $0), or with --prefix DIR to install into a directory"
fi

# 1. The binary (replaced only when it differs: an update).
mkdir -p "$R${BIN%/*}"
if [ -f "$R$BIN" ] && cmp -s "$BINARY" "$R$BIN"; then
    say "$BIN is up to date"
else
    install -m 0755 "$BINARY" "$R$BIN.new"
    mv -f "$R$BIN.new" "$R$BIN"
    say "installed $BIN ($("$R$BIN" --version 2>/dev/null || echo postern))"
fi
mkdir -p "$R$DOC"
for f in volunteer-guide.md relay.md; do
    if [ -f "$HERE/../docs/$f" ]; then install -m 0644 "$HERE/../docs/$f" "$R$DOC/$f"; fi
done

# 2. The system user.
passwd_line() { grep "^$USER_NAME:" "$R/etc/passwd" 2>/dev/null || true; }
if [ -n "$(passwd_line)" ]; then
    say "user $USER_NAME exists"
else
    if [ -n "$R" ]; then
        [ -f "$R/etc/passwd" ] || die "--prefix $PREFIX has no etc/passwd to add the user to"
        set -- --prefix "$R"
    else
        set --
    fi
    command -v useradd >/dev/null 2>&1 || die "useradd not found (Debian/Ubuntu: apt-get install passwd)"
    useradd "$@" --system --user-group --no-create-home --home-dir "$STATE" \
        --shell /usr/sbin/nologin --comment "Postern relay" "$USER_NAME"
    say "created system user $USER_NAME"
fi
uid=$(passwd_line | cut -d: -f3)
gid=$(passwd_line | cut -d: -f4)
[ -n "$uid" ] || die "user $USER_NAME not found in $R/etc/passwd after creating it"

# 3. The state directory (configuration, secret, ACME account and certificates).
mkdir -p "$R$STATE"
chown "$uid:$gid" "$R$STATE"
chmod 0700 "$R$STATE"
say "state directory $STATE (owner $USER_NAME, 0700)"

# 4. The service.
if [ "$SYSTEMD" = auto ]; then
    if command -v systemctl >/dev/null 2>&1 && { [ -n "$R" ] || [ -d /run/systemd/system ]; }; then
        SYSTEMD=yes
    else
        SYSTEMD=no
    fi
fi
if [ "$SYSTEMD" = yes ]; then
    [ -f "$HERE/systemd/postern-relay.service" ] || die "$HERE/systemd/postern-relay.service is missing"
    mkdir -p "$R${UNIT%/*}"
    install -m 0644 "$HERE/systemd/postern-relay.service" "$R$UNIT"
    if [ -n "$R" ]; then
        systemctl --root="$R" enable postern-relay.service >/dev/null 2>&1 ||
            die "systemctl --root=$R enable postern-relay.service failed"
    else
        systemctl daemon-reload
        systemctl enable postern-relay.service >/dev/null 2>&1 ||
            die "systemctl enable postern-relay.service failed"
        if [ -f "$STATE/relay.toml" ]; then
            systemctl restart postern-relay.service
            say "restarted postern-relay with the new binary"
        fi
    fi
    say "service postern-relay installed and enabled ($UNIT)"
else
    say "no systemd: run the relay yourself, as user $USER_NAME: $BIN relay --config $STATE/relay.toml"
fi

echo
echo "Next: sudo postern relay setup --domain relay.example.org   (your relay's DNS name;"
echo "      without --domain it uses this machine's IP address and a self-signed certificate)"
