// Verifies one of the broker's per-device tokens with jose (an independent JWT implementation),
// as an app's back end would offline: against a JWKS, ES256 only, issuer and audience checked.
//
//   echo '{"jwks": {...}, "token": "...", "issuer": "https://...", "audience": "pingid"}' |
//     node verify.mjs
//
// Prints one JSON line: {"ok": true, "header": {...}, "payload": {...}} or
// {"ok": false, "code": "ERR_...", "message": "..."}; exits 2 only on bad input.
import { createLocalJWKSet, jwtVerify } from 'jose';

let input = '';
for await (const chunk of process.stdin) input += chunk;
let request;
try {
  request = JSON.parse(input);
} catch (e) {
  console.error(`verify.mjs: stdin is not JSON: ${e.message}`);
  process.exit(2);
}
const { jwks, token, issuer, audience } = request;
if (!jwks || typeof token !== 'string' || !issuer || !audience) {
  console.error('verify.mjs: give jwks, token, issuer and audience');
  process.exit(2);
}
try {
  const { payload, protectedHeader } = await jwtVerify(token, createLocalJWKSet(jwks), {
    issuer,
    audience,
    algorithms: ['ES256'],
    requiredClaims: ['iat', 'nbf', 'exp', 'jti', 'sub'],
  });
  console.log(JSON.stringify({ ok: true, header: protectedHeader, payload }));
} catch (e) {
  console.log(JSON.stringify({ ok: false, code: e.code ?? 'ERROR', message: e.message }));
}
