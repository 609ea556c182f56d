// A real OpenID Connect / OAuth 2.0 authorization server (panva's oidc-provider, certified, from the npm registry)
// configured as a hospital's SMART authorization server for the tests: authorization code with PKCE for the
// viewer's public client, JWT access tokens (ES256, JWKS at /jwks) carrying the user's role, name, specialties and
// SMART scopes, and the EHR's launch context (`launch` -> `patient` in the token response, as SMART App Launch
// says). Its own development sign-in and consent pages stand in for the hospital's.
//
//   node tests/smart_auth_server.mjs <port> <config.json>
//   config: {client_id, redirect_uri, audience, user: {role, name, specialties}, launches: {<launch>: <patient id>},
//            scopes: [further scopes the client may ask for], cors_origins: [origins whose pages call the token endpoint]}
import { readFileSync } from "node:fs";
import { generateKeyPairSync } from "node:crypto";
import Provider from "oidc-provider";

const [port, configPath] = process.argv.slice(2);
const config = JSON.parse(readFileSync(configPath, "utf8"));
const issuer = `http://127.0.0.1:${port}`;
const signing = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey.export({ format: "jwk" });
const smartScopes = ["launch", "fhirUser", "user/Media.rs", "user/Patient.rs", "user/Media.r", "user/Patient.r", ...(config.scopes || [])];
const launchOf = new Map(); // account -> the launch it signed in under, to name the patient in its token

const provider = new Provider(issuer, {
  clients: [{
    client_id: config.client_id, token_endpoint_auth_method: "none", redirect_uris: [config.redirect_uri],
    grant_types: ["authorization_code"], response_types: ["code"], id_token_signed_response_alg: "ES256",
  }],
  jwks: { keys: [{ ...signing, kid: "smart-test", alg: "ES256", use: "sig" }] },
  scopes: ["openid", ...smartScopes],
  extraParams: ["launch", "aud"],
  // a browser app (the capture app) exchanges its code from its own origin
  clientBasedCORS: (ctx, origin) => (config.cors_origins || []).includes(origin),
  pkce: { required: () => true, methods: ["S256"] },
  features: {
    devInteractions: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => config.audience,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: smartScopes.join(" "), audience: config.audience, accessTokenFormat: "jwt", accessTokenTTL: 600,
        jwt: { sign: { alg: "ES256" } },
      }),
    },
  },
  async findAccount(ctx, sub) {
    // the EHR's launch travels with the authorization request: remember it for this user's token
    if (ctx.oidc?.params?.launch) launchOf.set(sub, ctx.oidc.params.launch);
    return { accountId: sub, async claims() { return { sub, name: config.user.name }; } };
  },
  async extraTokenClaims(ctx, token) {
    const patient = config.launches[launchOf.get(token.accountId)];
    return { role: config.user.role, name: config.user.name, specialties: config.user.specialties, ...(patient ? { patient } : {}) };
  },
});

// SMART App Launch: the token response names the patient of the EHR launch
provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === "/token" && ctx.status === 200 && ctx.body && ctx.body.access_token) {
    const payload = JSON.parse(Buffer.from(ctx.body.access_token.split(".")[1], "base64url"));
    if (payload.patient) ctx.body.patient = payload.patient;
  }
});

provider.listen(Number(port), "127.0.0.1", () => console.log(`ready ${issuer}`));
