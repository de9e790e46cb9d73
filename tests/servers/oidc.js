// A local OpenID Connect provider for the console's sign-in tests: panva's oidc-provider
// (a certified implementation), with its built-in development login and consent pages.
//
//   OIDC_CLIENT_SECRET=... node oidc.js PORT CLIENT_ID REDIRECT_URI [REDIRECT_URI...]
//
// Binds 127.0.0.1:PORT; the issuer is http://127.0.0.1:PORT. One confidential client
// (client_secret_basic), code flow only, PKCE (S256) required. A fresh RS256 key per start
// (keys, sessions and grants are in memory). ID tokens carry every claim
// (conformIdTokenClaims: false), so the console needs no userinfo call; access tokens are
// RS256 JWTs for the resource OIDC_AUDIENCE (default `urn:shardlake:console-api`, a resource indicator is a URI), so they can
// be sent as Bearer tokens. OIDC_TTL_SECONDS (default 3600) sets both tokens' lifetime.
//
// Login names say who the user is: `USER[@TENANT][:GROUP[+GROUP...]]`. The dev login page
// takes any password. `sub` is the whole login name (oidc-provider makes `sub` the account
// id, which is what the login page was given). For example:
//   alice@tenant-a:operators     name alice, custom:tenant tenant-a, groups [operators]
//   bob@tenant-b                 name bob, custom:tenant tenant-b, groups []
//   root:platform-admins         name root, no tenant, groups [platform-admins]
// The claims: sub, name (USER), email (USER@example.com), custom:tenant, groups. Access
// tokens carry custom:tenant and groups too (extraTokenClaims), as a Cognito pool's
// pre-token-generation trigger would add them.
//
// Redirect URIs match exactly: one registered with 127.0.0.1 does not match localhost.
//
// Prints `ready http://127.0.0.1:PORT` once it listens.

'use strict';

const crypto = require('node:crypto');

function account(login) {
  const [who, groupText = ''] = login.split(':', 2);
  const [user, tenant] = who.split('@', 2);
  const groups = groupText.split('+').filter(Boolean);
  const claims = { sub: login, name: user, email: `${user}@example.com`, groups };
  if (tenant) claims['custom:tenant'] = tenant;
  return claims;
}

async function main() {
  const [port, clientId, ...redirectUris] = process.argv.slice(2);
  if (!port || !clientId || redirectUris.length === 0) {
    console.error('usage: OIDC_CLIENT_SECRET=... node oidc.js PORT CLIENT_ID REDIRECT_URI...');
    process.exit(2);
  }
  const secret = process.env.OIDC_CLIENT_SECRET;
  if (!secret) {
    console.error('OIDC_CLIENT_SECRET is not set');
    process.exit(2);
  }
  const audience = process.env.OIDC_AUDIENCE || 'urn:shardlake:console-api';
  const ttl = Number(process.env.OIDC_TTL_SECONDS || 3600);
  const { default: Provider } = await import('oidc-provider');
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = {
    ...privateKey.export({ format: 'jwk' }),
    kid: `test-${crypto.randomBytes(4).toString('hex')}`, alg: 'RS256', use: 'sig',
  };
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: clientId,
      client_secret: secret,
      redirect_uris: redirectUris,
      response_types: ['code'],
      grant_types: ['authorization_code'],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    jwks: { keys: [jwk] },
    cookies: { keys: [crypto.randomBytes(16).toString('hex')] },
    pkce: { required: () => true },
    conformIdTokenClaims: false,
    claims: { openid: ['sub', 'name', 'email', 'custom:tenant', 'groups'] },
    findAccount: async (ctx, id) => ({
      accountId: id,
      claims: async () => account(id),
    }),
    extraTokenClaims: async (ctx, token) => {
      if (token.kind !== 'AccessToken' || !token.accountId) return undefined;
      const { groups, 'custom:tenant': tenant } = account(token.accountId);
      return tenant ? { groups, 'custom:tenant': tenant } : { groups };
    },
    ttl: { IdToken: ttl, AccessToken: ttl, Session: 3600, Grant: 3600, Interaction: 600 },
    features: {
      devInteractions: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => audience,
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({
          scope: 'openid profile email',
          audience,
          accessTokenFormat: 'jwt',
          accessTokenTTL: ttl,
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
  });
  // Development warnings (dev interactions, in-memory adapter) are expected here.
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  provider.listen(Number(port), '127.0.0.1', () => console.log(`ready ${issuer}`));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
