// The test OpenID Provider: panva's certified `oidc-provider` (pinned 9.13.3) with the test people.
// Listens on 127.0.0.1 only.  Env:
//   OIDC_PORT (4444)  OIDC_ISSUER (http://127.0.0.1:$OIDC_PORT)  OIDC_STATE_DIR (for jwks.json)
//   OIDC_CLIENT_ID (mdm-broker)  OIDC_CLIENT_SECRET (mdm-broker-secret)
//   OIDC_REDIRECT_URIS (comma-separated; default: the broker's callback for an IdP named "oidc"
//                       on the example config's public URL, plus the legacy unnamed path)
//   OIDC_AUTO_CONSENT (1)  -> first-party client gets its grant without the consent screen
//   OIDC_CHECK_PASSWORD (1) -> devInteractions login form also checks the password below
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import querystring from 'node:querystring';
import Provider from 'oidc-provider';

const PORT = Number(process.env.OIDC_PORT || 4444);
const HOST = '127.0.0.1';
const ISSUER = process.env.OIDC_ISSUER || `http://${HOST}:${PORT}`;
const STATE_DIR = process.env.OIDC_STATE_DIR || process.cwd();
const CLIENT_ID = process.env.OIDC_CLIENT_ID || 'mdm-broker';
const CLIENT_SECRET = process.env.OIDC_CLIENT_SECRET || 'mdm-broker-secret';
const REDIRECT_URIS = (process.env.OIDC_REDIRECT_URIS ||
  'http://127.0.0.1:8080/auth/oidc/oidc/callback,http://127.0.0.1:8080/auth/oidc/callback')
  .split(',').map((u) => u.trim()).filter(Boolean);
const AUTO_CONSENT = (process.env.OIDC_AUTO_CONSENT ?? '1') === '1';
const CHECK_PASSWORD = (process.env.OIDC_CHECK_PASSWORD ?? '1') === '1';

// Same people as the LDAP seed (start-ldap.sh).
const USERS = {
  alice: { password: 'alicepw', name: 'Alice Anderson', given_name: 'Alice', family_name: 'Anderson', email: 'alice@example.org', groups: ['admins', 'staff'] },
  bob:   { password: 'bobpw',   name: 'Bob Brown',      given_name: 'Bob',   family_name: 'Brown',    email: 'bob@example.org',   groups: ['staff', 'mdm-users'] },
  carol: { password: 'carolpw', name: 'Carol Clark',    given_name: 'Carol', family_name: 'Clark',    email: 'carol@example.org', groups: ['staff', 'mdm-users'] },
};

// Stable signing key across restarts (so a test can cache JWKS): RS256 + ES256.
const jwksFile = path.join(STATE_DIR, 'jwks.json');
if (!fs.existsSync(jwksFile)) {
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  fs.writeFileSync(jwksFile, JSON.stringify({ keys: [
    { ...rsa, kid: 'test-rsa-1', use: 'sig', alg: 'RS256' },
    { ...ec, kid: 'test-ec-1', use: 'sig', alg: 'ES256' },
  ] }, null, 2), { mode: 0o600 });
}
const jwks = JSON.parse(fs.readFileSync(jwksFile, 'utf8'));

const configuration = {
  clients: [{
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
    redirect_uris: REDIRECT_URIS,
    post_logout_redirect_uris: ['http://127.0.0.1:8080/'],
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic', // client_secret_post also accepted below
  }],
  clientDefaults: { id_token_signed_response_alg: 'RS256' },
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'none'],
  jwks,
  cookies: { keys: ['test-cookie-key-not-secret'] },
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'given_name', 'family_name', 'preferred_username'],
    groups: ['groups'],
  },
  // Default true => in the code flow, scope claims go ONLY to /userinfo, not the ID token.
  // false => email/groups/... are also placed in the ID token.
  conformIdTokenClaims: false,
  pkce: { required: () => false }, // S256 only; used when the client sends code_challenge
  features: {
    devInteractions: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    rpInitiatedLogout: { enabled: true },
    claimsParameter: { enabled: true },
  },
  ttl: { AccessToken: 3600, AuthorizationCode: 600, IdToken: 3600, Interaction: 3600, Session: 86400, Grant: 86400, RefreshToken: 86400 },
  async findAccount(ctx, sub) {
    const u = USERS[sub];
    if (!u) return undefined;
    return {
      accountId: sub,
      async claims(use, scope) {
        return {
          sub,
          preferred_username: sub,
          name: u.name, given_name: u.given_name, family_name: u.family_name,
          email: u.email, email_verified: true,
          groups: u.groups,
        };
      },
    };
  },
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    if (AUTO_CONSENT && ctx.oidc.client.clientId === CLIENT_ID) {
      const grant = new ctx.oidc.provider.Grant({ clientId: CLIENT_ID, accountId: ctx.oidc.session.accountId });
      grant.addOIDCScope('openid offline_access email profile groups');
      grant.addOIDCClaims(['email', 'email_verified', 'name', 'given_name', 'family_name', 'preferred_username', 'groups']);
      await grant.save();
      return grant;
    }
    return undefined;
  },
};

const provider = new Provider(ISSUER, configuration);

// Optional: make the devInteractions login form check the password (so wrong-password tests work).
if (CHECK_PASSWORD) {
  provider.use(async (ctx, next) => {
    if (ctx.method === 'POST' && /^\/interaction\/[^/]+$/.test(ctx.path)) {
      const chunks = [];
      for await (const c of ctx.req) chunks.push(c);
      const raw = Buffer.concat(chunks).toString();
      const body = querystring.parse(raw);
      if (body.prompt === 'login') {
        const u = USERS[body.login];
        if (!u || u.password !== body.password) {
          ctx.status = 401; ctx.type = 'text/plain'; ctx.body = 'invalid credentials';
          return;
        }
      }
      ctx.req.body = raw; // oidc-provider falls back to an already-read body (logs a one-time warning)
    }
    await next();
  });
}

provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.listen(PORT, HOST, () => {
  console.log(`oidc-provider listening on ${ISSUER} (discovery: ${ISSUER}/.well-known/openid-configuration) pid=${process.pid}`);
});
