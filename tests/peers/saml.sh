#!/usr/bin/env bash
# The test SAML 2.0 IdP: Debian's SimpleSAMLphp 1.19 under PHP's built-in server on
# 127.0.0.1:8443 (no Apache), with its own config dir.
#
#   tests/peers/saml.sh [install|start|stop|reset]
#
# IdP entity ID = metadata URL  http://127.0.0.1:8443/saml2/idp/metadata.php
# SSO (Redirect/POST)           http://127.0.0.1:8443/saml2/idp/SSOService.php
# SP entity ID  SP_ENTITY  (default http://127.0.0.1:8080/auth/saml/saml/metadata: an IdP named
# SP ACS        SP_ACS     (default http://127.0.0.1:8080/auth/saml/saml/acs)     "saml")
# People alice/alicepw bob/bobpw carol/carolpw; attributes uid, mail, cn, displayName, groups.
# Response and Assertion signed (RSA-SHA256) by $PEERS_DIR/saml/cert/idp.crt.
# SAML_AUTH=ldap authenticates against tests/peers/ldap.sh's slapd instead (needs php8.2-ldap).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/peers/common.sh
. "$HERE/common.sh"

SAML_DIR=$PEERS_DIR/saml
SAML_PORT=${SAML_PORT:-8443}
BASE=http://127.0.0.1:$SAML_PORT
SP_ENTITY=${SP_ENTITY:-http://127.0.0.1:8080/auth/saml/saml/metadata}
SP_ACS=${SP_ACS:-http://127.0.0.1:8080/auth/saml/saml/acs}
SSP=/usr/share/simplesamlphp
SAML_AUTH=${SAML_AUTH:-static}   # static | ldap
LDAP_PORT=${LDAP_PORT:-3389}
PIDFILE=$SAML_DIR/php.pid
META_URL=$BASE/saml2/idp/metadata.php

install() {
  if [[ ! -d $SSP/www ]] || ! command -v php >/dev/null || ! php -m | grep -qi '^dom$'; then
    # simplesamlphp depends on "apache2 | httpd": keep apache2 from starting while it installs
    # (it is never used) with a temporary policy-rc.d, unless the host already has one.
    tmp_policy=
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      tmp_policy=1
    fi
    apt_install simplesamlphp php8.2-cli php8.2-xml php8.2-mbstring php8.2-curl openssl curl
    if [[ -n $tmp_policy ]]; then rm -f /usr/sbin/policy-rc.d; fi
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
      systemctl disable --now apache2 >/dev/null 2>&1 || true
    fi
  fi
}

case "${1:-start}" in
  install) install; exit 0 ;;
  stop)  stop_pid "$PIDFILE" group; exit 0 ;;
  reset) stop_pid "$PIDFILE" group; rm -rf "$SAML_DIR" ;;
  start) ;;
  *) echo "usage: $0 [install|start|stop|reset]" >&2; exit 2 ;;
esac
install

if [[ $SAML_AUTH == ldap ]] && ! php -m | grep -qi '^ldap$'; then
  apt_install php8.2-ldap
fi

if pid_alive "$PIDFILE" && curl -fsS -o /dev/null "$META_URL"; then
  log "SimpleSAMLphp already running: $BASE"
  exit 0
fi
stop_pid "$PIDFILE" group

mkdir -p "$SAML_DIR"/{config,metadata,cert,log,data,tmp}
cd "$SAML_DIR"

# IdP signing key/cert (kept across restarts)
if [[ ! -f cert/idp.crt ]]; then
  openssl req -x509 -newkey rsa:2048 -sha256 -nodes -days 3650 -subj "/CN=test-idp.example.org" \
    -keyout cert/idp.key -out cert/idp.crt 2>/dev/null
  chmod 600 cert/idp.key
fi

# config.php = Debian's + overrides
grep -v "secrets.inc.php" /etc/simplesamlphp/config.php > config/config.php
cat >> config/config.php <<EOF
\$config['baseurlpath'] = '$BASE/';
\$config['certdir'] = '$SAML_DIR/cert/';
\$config['loggingdir'] = '$SAML_DIR/log/';
\$config['datadir'] = '$SAML_DIR/data/';
\$config['tempdir'] = '$SAML_DIR/tmp/';
\$config['metadatadir'] = '$SAML_DIR/metadata/';
\$config['attributenamemapdir'] = '/etc/simplesamlphp/attributemap/';
\$config['secretsalt'] = 'test-salt-not-secret-0123456789';
\$config['auth.adminpassword'] = 'adminpw';
\$config['admin.checkforupdates'] = false;
\$config['timezone'] = 'UTC';
\$config['logging.handler'] = 'file';
\$config['logging.level'] = SimpleSAML\Logger::INFO;
\$config['enable.saml20-idp'] = true;
\$config['module.enable'] = ['exampleauth' => true, 'core' => true, 'saml' => true, 'admin' => true, 'ldap' => true];
\$config['store.type'] = 'phpsession';
\$config['session.phpsession.savepath'] = '$SAML_DIR/tmp';
\$config['session.cookie.secure'] = false;
\$config['session.cookie.samesite'] = null;
\$config['statistics.out'] = [];
\$config['trusted.url.domains'] = ['127.0.0.1:8080', '127.0.0.1:$SAML_PORT'];
EOF

cat > config/authsources.php <<'EOF'
<?php
$config = [
    'admin' => ['core:AdminPassword'],
    'example-userpass' => [
        'exampleauth:UserPass',
        'alice:alicepw' => [
            'uid' => ['alice'], 'mail' => ['alice@example.org'], 'cn' => ['Alice Anderson'],
            'displayName' => ['Alice Anderson'], 'eduPersonPrincipalName' => ['alice@example.org'],
            'groups' => ['admins', 'staff'],
        ],
        'bob:bobpw' => [
            'uid' => ['bob'], 'mail' => ['bob@example.org'], 'cn' => ['Bob Brown'],
            'displayName' => ['Bob Brown'], 'eduPersonPrincipalName' => ['bob@example.org'],
            'groups' => ['staff', 'mdm-users'],
        ],
        'carol:carolpw' => [
            'uid' => ['carol'], 'mail' => ['carol@example.org'], 'cn' => ['Carol Clark'],
            'displayName' => ['Carol Clark'], 'eduPersonPrincipalName' => ['carol@example.org'],
            'groups' => ['staff', 'mdm-users'],
        ],
    ],
];
EOF

cat >> config/authsources.php <<EOF
\$config['ldap-slapd'] = [
    'ldap:LDAP',
    'hostname' => '127.0.0.1', 'port' => $LDAP_PORT, 'enable_tls' => false,
    'dnpattern' => 'uid=%username%,ou=people,dc=example,dc=org',
    'search.enable' => false,
    'attributes' => ['uid', 'mail', 'cn', 'displayName', 'memberOf'],  // memberOf is operational: ask for it
];
EOF
if [[ $SAML_AUTH == ldap ]]; then AUTHSOURCE=ldap-slapd; else AUTHSOURCE=example-userpass; fi

cat > metadata/saml20-idp-hosted.php <<EOF
<?php
\$metadata['__DYNAMIC:1__'] = [
    'host' => '__DEFAULT__',
    'privatekey' => 'idp.key',
    'certificate' => 'idp.crt',
    'auth' => '$AUTHSOURCE',
    // LDAP mode: groups = CN of each memberOf DN (the static users already carry 'groups')
    'authproc' => [
        10 => ['class' => 'core:AttributeCopy', 'memberOf' => 'groups'],
        11 => ['class' => 'core:AttributeAlter', 'subject' => 'groups', 'pattern' => '/^cn=([^,]+),.*\$/i', 'replacement' => '\\1'],
    ],
    'signature.algorithm' => 'http://www.w3.org/2001/04/xmldsig-more#rsa-sha256',
    'saml20.sign.response' => true,
    'saml20.sign.assertion' => true,
    'NameIDFormat' => 'urn:oasis:names:tc:SAML:2.0:nameid-format:persistent',
    'attributes.NameFormat' => 'urn:oasis:names:tc:SAML:2.0:attrname-format:basic',
];
EOF

cat > metadata/saml20-sp-remote.php <<EOF
<?php
\$metadata['$SP_ENTITY'] = [
    'AssertionConsumerService' => [[
        'Binding' => 'urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST',
        'Location' => '$SP_ACS',
        'index' => 0,
    ]],
    'SingleLogoutService' => [],
    'NameIDFormat' => 'urn:oasis:names:tc:SAML:2.0:nameid-format:persistent',
    'simplesaml.nameidattribute' => 'uid',
    'simplesaml.attributes' => true,
    'validate.authnrequest' => false,
    'saml20.sign.response' => true,
    'saml20.sign.assertion' => true,
];
EOF

# start php -S (docroot = SSP www)
# PHP_CLI_SERVER_WORKERS: the built-in server is single-threaded by default; workers let parallel tests in.
PHP_CLI_SERVER_WORKERS=${PHP_WORKERS:-4} SIMPLESAMLPHP_CONFIG_DIR=$SAML_DIR/config setsid nohup \
  php -d variables_order=EGPCS -S 127.0.0.1:"$SAML_PORT" -t "$SSP/www" >"$SAML_DIR/log/php-server.log" 2>&1 </dev/null &
echo $! > "$PIDFILE"
wait_for "SimpleSAMLphp" curl -fsS -o /dev/null "$META_URL" || { cat "$SAML_DIR/log/"* >&2; exit 1; }
curl -fsS -o "$SAML_DIR/idp-metadata.xml" "$META_URL"
log "SimpleSAMLphp started (auth=$AUTHSOURCE): PID $(cat "$PIDFILE") $BASE cert $SAML_DIR/cert/idp.crt"
