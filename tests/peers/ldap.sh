#!/usr/bin/env bash
# OpenLDAP (Debian's slapd) on loopback for the tests, from its own slapd.conf and data dir:
# the system instance (/etc/ldap/slapd.d) is never touched.
#
#   tests/peers/ldap.sh [install|start|stop|reset]
#
# ldap://127.0.0.1:3389 (StartTLS) and ldaps://127.0.0.1:6636; base dc=example,dc=org.
# A throwaway CA signs the server certificate: $PEERS_DIR/ldap/tls/ca.crt.
# Service account cn=broker,ou=services,dc=example,dc=org / brokerpw (read-only).
# People alice/alicepw bob/bobpw carol/carolpw; groups (groupOfNames, memberOf overlay):
#   admins{alice} staff{alice,bob,carol} mdm-users{bob,carol};
#   vpn-users (groupOfUniqueNames){alice}; developers (posixGroup, memberUid){carol}.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/peers/common.sh
. "$HERE/common.sh"

DIR=$PEERS_DIR/ldap
PORT=${LDAP_PORT:-3389}
LDAPS_PORT=${LDAPS_PORT:-6636}
URI=ldap://127.0.0.1:$PORT
LDAPS_URI=ldaps://127.0.0.1:$LDAPS_PORT
BASE=dc=example,dc=org
ROOTDN="cn=admin,$BASE"
ROOTPW=adminpw
PIDFILE=$DIR/slapd.pid

install() {
  if [[ ! -x /usr/sbin/slapd ]] || ! command -v ldapsearch >/dev/null; then
    # No system instance: the package is only the binaries for us.
    echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
    apt_install slapd ldap-utils openssl
  fi
}

case "${1:-start}" in
  install) install; exit 0 ;;
  stop) stop_pid "$PIDFILE"; exit 0 ;;
  reset) stop_pid "$PIDFILE"; rm -rf "$DIR" ;;
  start) ;;
  *) echo "usage: $0 [install|start|stop|reset]" >&2; exit 2 ;;
esac
install
export PATH=/usr/sbin:$PATH

answers() { ldapsearch -x -LLL -H "$URI" -b "" -s base namingContexts; }
if pid_alive "$PIDFILE" && answers >/dev/null 2>&1; then
  log "slapd already running: $URI"
  exit 0
fi
stop_pid "$PIDFILE"
rm -rf "$DIR"
mkdir -p "$DIR"/{db,tls}
cd "$DIR"

# A CA and a leaf for 127.0.0.1/localhost (webpki refuses a self-signed leaf as its own root).
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=trustbroker test LDAP CA" \
  -keyout tls/ca.key -out tls/ca.crt -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout tls/server.key \
  -out tls/server.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >tls/ext.cnf
openssl x509 -req -in tls/server.csr -CA tls/ca.crt -CAkey tls/ca.key -CAcreateserial \
  -days 3650 -extfile tls/ext.cnf -out tls/server.crt 2>/dev/null
chmod 600 tls/*.key

cat >slapd.conf <<CONF
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
pidfile  $PIDFILE
argsfile $DIR/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
moduleload refint
TLSCACertificateFile  $DIR/tls/ca.crt
TLSCertificateFile    $DIR/tls/server.crt
TLSCertificateKeyFile $DIR/tls/server.key
database mdb
maxsize 104857600
suffix "$BASE"
rootdn "$ROOTDN"
rootpw $(slappasswd -s "$ROOTPW")
directory $DIR/db
# The broker's account may page through any number of entries (group sync of large groups);
# an unpaged search stays at the default 500, so a sync that did not page would be cut short.
limits dn.exact="cn=broker,ou=services,$BASE" size.prtotal=unlimited
index objectClass eq
index uid,mail,cn eq,sub
index member,uniqueMember,memberUid,memberOf eq
overlay memberof
memberof-group-oc groupOfNames
memberof-member-ad member
memberof-memberof-ad memberOf
memberof-refint TRUE
overlay refint
refint_attributes member
access to dn.base="" by * read
access to dn.base="cn=Subschema" by * read
access to attrs=userPassword
  by self write
  by anonymous auth
  by * none
access to *
  by self read
  by users read
  by * none
CONF
slaptest -u -f slapd.conf >/dev/null 2>&1 || { slaptest -u -f slapd.conf; exit 1; }

# Foreground (-d) so the PID is ours; setsid detaches it from this shell.
setsid nohup slapd -f "$DIR/slapd.conf" -h "$URI/ $LDAPS_URI/" -d stats \
  >"$DIR/slapd.log" 2>&1 </dev/null &
wait_for slapd answers || { cat "$DIR/slapd.log" >&2; exit 1; }

# Seed online (slapadd would bypass the memberOf overlay).
pw() { slappasswd -s "$1"; }
person() { # uid cn sn given mail number password
  printf 'dn: uid=%s,ou=people,%s\nobjectClass: inetOrgPerson\nuid: %s\ncn: %s\nsn: %s\ngivenName: %s\nmail: %s\nemployeeNumber: %s\nuserPassword: %s\n\n' \
    "$1" "$BASE" "$1" "$2" "$3" "$4" "$5" "$6" "$(pw "$7")"
}
{
  printf 'dn: %s\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\no: Example Org\ndc: example\n\n' "$BASE"
  for ou in people groups services; do
    printf 'dn: ou=%s,%s\nobjectClass: organizationalUnit\nou: %s\n\n' "$ou" "$BASE" "$ou"
  done
  printf 'dn: cn=broker,ou=services,%s\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: broker\ndescription: read-only bind account for the MDM broker\nuserPassword: %s\n\n' "$BASE" "$(pw brokerpw)"
  person alice "Alice Anderson" Anderson Alice alice@example.org 1001 alicepw
  person bob "Bob Brown" Brown Bob bob@example.org 1002 bobpw
  person carol "Carol Clark" Clark Carol carol@example.org 1003 carolpw
} >seed-1.ldif
member() { printf 'member: uid=%s,ou=people,%s\n' "$1" "$BASE"; }
{
  printf 'dn: cn=admins,ou=groups,%s\nobjectClass: groupOfNames\ncn: admins\n%s\n\n' "$BASE" "$(member alice)"
  printf 'dn: cn=staff,ou=groups,%s\nobjectClass: groupOfNames\ncn: staff\n%s\n%s\n%s\n\n' "$BASE" "$(member alice)" "$(member bob)" "$(member carol)"
  printf 'dn: cn=mdm-users,ou=groups,%s\nobjectClass: groupOfNames\ncn: mdm-users\n%s\n%s\n\n' "$BASE" "$(member bob)" "$(member carol)"
  printf 'dn: cn=vpn-users,ou=groups,%s\nobjectClass: groupOfUniqueNames\ncn: vpn-users\nuniqueMember: uid=alice,ou=people,%s\n\n' "$BASE" "$BASE"
  printf 'dn: cn=developers,ou=groups,%s\nobjectClass: posixGroup\ncn: developers\ngidNumber: 5000\nmemberUid: carol\n\n' "$BASE"
} >seed-2.ldif
ldapadd -x -H "$URI" -D "$ROOTDN" -w "$ROOTPW" -f seed-1.ldif >/dev/null
ldapadd -x -H "$URI" -D "$ROOTDN" -w "$ROOTPW" -f seed-2.ldif >/dev/null
log "slapd started: PID $(cat "$PIDFILE") $URI $LDAPS_URI CA=$DIR/tls/ca.crt"
