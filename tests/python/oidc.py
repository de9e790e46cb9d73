"""Sign-in servers for the console's tests: panva's oidc-provider (tests/servers/oidc.js, a
certified OpenID provider serving the whole authorization-code flow) and Cognito user pools
on moto's server (users, groups, `custom:tenant`, InitiateAuth, JWKS; no hosted UI, so the
code flow runs against oidc-provider and Cognito's token shapes come from moto).

- `start_oidc(tmp_path_factory, redirect_uris)` starts oidc-provider and waits until its
  discovery document answers; `OidcProvider.stop()` ends it (conftest.py's `oidc_provider`
  fixture does both).
- `Browser` follows a sign-in the way a browser does, without one: redirects, cookies, and
  the provider's login and consent forms (`sign_in`). `OidcProvider.tokens(login)` runs the
  flow straight against the provider and returns its tokens (for Bearer requests).
- `console(...)` runs `shardlake console` on loopback until a block ends; `call` makes one
  request to it (with a Bearer token, say).
- `CognitoPool.create(moto)` makes a pool with a `custom:tenant` attribute, an app client
  and groups; `add_user` and `tokens` (USER_PASSWORD_AUTH) give a user's ID and access
  tokens.

Login names at oidc-provider say who the user is: `USER[@TENANT][:GROUP[+GROUP...]]`, e.g.
`alice@tenant-a:operators` is name `alice`, `custom:tenant` `tenant-a`, groups `[operators]`;
`sub` is the whole login name (see tests/servers/oidc.js). Its access tokens are RS256 JWTs
for the audience `urn:shardlake:console-api` that carry `custom:tenant` and `groups` too.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import http.cookiejar
import json
import os
import re
import secrets
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import free_port, pipeline_env, wait_until

SERVERS = Path(__file__).resolve().parents[1] / "servers"
CLIENT_ID = "shardlake-console"
# A console API route that needs a user (JSON).
FLEET = "/api/fleet"


# --------------------------------------------------------------------------------------------
# A browser without a browser: redirects by hand, cookies, the provider's forms


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@dataclass
class Page:
    status: int
    url: str
    headers: dict[str, str]
    body: str


class Browser:
    """Follows redirects one at a time with a cookie jar, fills in oidc-provider's dev login
    and consent forms, and stops where `stop(url)` says (or at the first page that is
    neither a redirect nor a form)."""

    def __init__(self):
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.cookies), _NoRedirect)
        self.visited: list[str] = []

    def request(self, url: str, *, data: dict | None = None, method: str | None = None,
                headers: dict[str, str] | None = None) -> Page:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        if body is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            resp = self.opener.open(req, timeout=30)
        except urllib.error.HTTPError as e:
            resp = e
        with resp:
            text = resp.read().decode("utf-8", "replace")
            return Page(resp.status, url, {k.lower(): v for k, v in resp.headers.items()}, text)

    def sign_in(self, url: str, login: str, password: str = "any-password",
                stop=lambda url: False, max_steps: int = 20) -> Page:
        """Starts at `url` (the console's /auth/login, or an authorization URL) and signs in
        as `login`; returns the last page (a redirect whose target `stop` accepts, or the
        first page that needs nothing more)."""
        page = self.request(url)
        for _ in range(max_steps):
            self.visited.append(page.url)
            if page.status in (301, 302, 303, 307, 308):
                target = urllib.parse.urljoin(page.url, page.headers["location"])
                if stop(target):
                    page.headers["location"] = target
                    return page
                page = self.request(target)
                continue
            form = re.search(r'<form[^>]*action="([^"]+)"[^>]*method="post"', page.body)
            prompt = re.search(r'name="prompt" value="(\w+)"', page.body)
            if page.status == 200 and form and prompt:
                action = urllib.parse.urljoin(page.url, html.unescape(form.group(1)))
                fields = {"prompt": prompt.group(1)}
                if prompt.group(1) == "login":
                    fields |= {"login": login, "password": password}
                page = self.request(action, data=fields)
                continue
            return page
        pytest.fail(f"the sign-in did not finish in {max_steps} steps: {self.visited}")


# --------------------------------------------------------------------------------------------
# oidc-provider


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_claims(token: str) -> dict:
    """A JWT's payload, unverified (for assertions about what a server issued)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@dataclass
class OidcProvider:
    port: int
    client_id: str
    client_secret: str
    redirect_uris: list[str]
    audience: str
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    _log: object = field(default=None, repr=False)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def discovery(self) -> dict:
        with urllib.request.urlopen(f"{self.issuer}/.well-known/openid-configuration",
                                    timeout=5) as r:
            return json.load(r)

    def console_auth(self) -> str:
        """The pipeline's `console:` section for this provider (flow YAML); the secret comes
        from OIDC_CLIENT_SECRET."""
        return (f"console:\n  auth:\n    oidc:\n      issuer: {self.issuer}\n"
                f"      client_id: {self.client_id}\n"
                f"      client_secret: ${{OIDC_CLIENT_SECRET}}\n"
                f"      redirect_url: {self.redirect_uris[0]}\n"
                f"      audience: {self.audience}\n")

    def tokens(self, login: str) -> dict:
        """The code flow straight against the provider (PKCE, state, nonce): its token
        response (`id_token`, `access_token`, ...)."""
        d = self.discovery()
        verifier = _b64url(secrets.token_bytes(32))
        challenge = _b64url(hashlib.sha256(verifier.encode()).digest())
        state, nonce = secrets.token_hex(16), secrets.token_hex(16)
        redirect = self.redirect_uris[0]
        url = d["authorization_endpoint"] + "?" + urllib.parse.urlencode({
            "response_type": "code", "client_id": self.client_id, "redirect_uri": redirect,
            "scope": "openid profile email", "state": state, "nonce": nonce,
            "code_challenge": challenge, "code_challenge_method": "S256"})
        page = Browser().sign_in(url, login, stop=lambda u: u.startswith(redirect))
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(page.headers["location"]).query)
        assert query.get("state") == [state], query
        assert "code" in query, query
        basic = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        req = urllib.request.Request(d["token_endpoint"], data=urllib.parse.urlencode({
            "grant_type": "authorization_code", "code": query["code"][0],
            "redirect_uri": redirect, "code_verifier": verifier}).encode(),
            headers={"Authorization": f"Basic {basic}",
                     "Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(req, timeout=10) as r:
            tokens = json.load(r)
        assert jwt_claims(tokens["id_token"])["nonce"] == nonce
        return tokens

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def start_oidc(tmp_path_factory, redirect_uris: list[str], *, ttl_seconds: int = 3600,
               client_secret: str | None = None,
               audience: str = "urn:shardlake:console-api") -> OidcProvider:
    """Starts oidc-provider on a free port with one client for `redirect_uris` and waits
    (60 s at most) until its discovery document answers."""
    if not (SERVERS / "node_modules" / "oidc-provider").is_dir():
        pytest.fail(f"{SERVERS}/node_modules/oidc-provider is missing; run "
                    f"`npm ci --prefix {SERVERS}` (scripts/test does)")
    server = OidcProvider(free_port(), CLIENT_ID, client_secret or "cs-" + secrets.token_hex(16),
                          list(redirect_uris), audience)
    server.log_path = tmp_path_factory.mktemp("oidc") / "oidc.log"
    server._log = open(server.log_path, "wb")
    env = {**os.environ, "OIDC_CLIENT_SECRET": server.client_secret,
           "OIDC_AUDIENCE": audience, "OIDC_TTL_SECONDS": str(ttl_seconds)}
    server.proc = subprocess.Popen(
        ["node", str(SERVERS / "oidc.js"), str(server.port), server.client_id, *redirect_uris],
        stdout=server._log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while True:
        try:
            if server.discovery()["issuer"] == server.issuer:
                return server
        except (OSError, ValueError):
            pass
        if server.proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"oidc-provider did not start:\n{server.log_path.read_text()[-3000:]}")
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# Cognito user pools on moto's server


@dataclass
class CognitoPool:
    moto: object
    pool_id: str
    client_id: str
    client_secret: str | None
    region: str = "us-east-1"

    @property
    def issuer(self) -> str:
        # moto names AWS's issuer, not its own address.
        return f"https://cognito-idp.{self.region}.amazonaws.com/{self.pool_id}"

    @property
    def jwks_url(self) -> str:
        return f"{self.moto.url}/{self.pool_id}/.well-known/jwks.json"

    @classmethod
    def create(cls, moto, *, groups=("operators", "platform-admins", "viewers"),
               client_secret: bool = False) -> "CognitoPool":
        idp = moto.client("cognito-idp")
        pool = idp.create_user_pool(
            PoolName=f"console-{secrets.token_hex(4)}",
            Schema=[{"Name": "tenant", "AttributeDataType": "String", "Mutable": True}],
        )["UserPool"]["Id"]
        client = idp.create_user_pool_client(
            UserPoolId=pool, ClientName="console", GenerateSecret=client_secret,
            ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
        )["UserPoolClient"]
        for g in groups:
            idp.create_group(UserPoolId=pool, GroupName=g)
        return cls(moto, pool, client["ClientId"], client.get("ClientSecret"))

    def console_auth(self, redirect_url: str) -> str:
        """The pipeline's `console:` section for this pool (the JWKS from moto)."""
        secret = "      client_secret: ${COGNITO_CLIENT_SECRET}\n" if self.client_secret else ""
        return (f"console:\n  auth:\n    cognito:\n      user_pool_id: {self.pool_id}\n"
                f"      region: {self.region}\n      client_id: {self.client_id}\n{secret}"
                f"      domain: console-test.auth.{self.region}.amazoncognito.com\n"
                f"      redirect_url: {redirect_url}\n      jwks_url: {self.jwks_url}\n")

    def add_user(self, username: str, password: str, *, tenant: str | None,
                 groups: list[str] = ()) -> None:
        idp = self.moto.client("cognito-idp")
        attrs = [{"Name": "email", "Value": f"{username}@example.com"}]
        if tenant is not None:
            attrs.append({"Name": "custom:tenant", "Value": tenant})
        idp.admin_create_user(UserPoolId=self.pool_id, Username=username,
                              UserAttributes=attrs, MessageAction="SUPPRESS")
        idp.admin_set_user_password(UserPoolId=self.pool_id, Username=username,
                                    Password=password, Permanent=True)
        for g in groups:
            idp.admin_add_user_to_group(UserPoolId=self.pool_id, Username=username, GroupName=g)

    def tokens(self, username: str, password: str) -> dict:
        """InitiateAuth (USER_PASSWORD_AUTH): `IdToken`, `AccessToken`, `RefreshToken`."""
        import hmac
        params = {"USERNAME": username, "PASSWORD": password}
        if self.client_secret:
            digest = hmac.new(self.client_secret.encode(), (username + self.client_id).encode(),
                              hashlib.sha256).digest()
            params["SECRET_HASH"] = base64.b64encode(digest).decode()
        resp = self.moto.client("cognito-idp").initiate_auth(
            ClientId=self.client_id, AuthFlow="USER_PASSWORD_AUTH", AuthParameters=params)
        return resp["AuthenticationResult"]


# --------------------------------------------------------------------------------------------
# The console (`shardlake console`, built on main)


@contextlib.contextmanager
def console(shardlake_bin, pipeline, data_dir, port, env=None):
    """Runs `shardlake console` on 127.0.0.1:`port` until the block ends; waits until it
    answers HTTP. Yields the process; its stderr is collected in `proc.log` afterwards."""
    log_path = data_dir / f"console-{port}.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(shardlake_bin), "console", str(pipeline), "--listen", f"127.0.0.1:{port}"],
            env=pipeline_env(data_dir, env), stdout=log, stderr=subprocess.STDOUT)
        try:
            def up():
                if proc.poll() is not None:
                    pytest.fail(f"the console exited ({proc.returncode}):\n"
                                f"{log_path.read_text()[-3000:]}")
                try:
                    # Not followed: /auth/login redirects to the issuer.
                    Browser().request(f"http://127.0.0.1:{port}/auth/login")
                except OSError:
                    return False
                return True
            wait_until("the console to answer", up, timeout=60)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.log = log_path.read_text()


def call(url, *, token=None, headers=None, method="GET", data=None):
    """(status, headers, body) of one request, without following redirects."""
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    page = Browser().request(url, headers=h, method=method, data=data)
    return page.status, page.headers, page.body
