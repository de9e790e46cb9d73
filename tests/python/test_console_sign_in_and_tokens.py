"""Console sign-in against real servers: the authorization-code flow with PKCE through
panva's oidc-provider (its login and consent forms filled in as a browser would), sessions
and logout, Bearer access tokens from oidc-provider and from a Cognito user pool on moto's
server (tenant looked up with GetUser), and each token that must be refused.

NEEDS THE CONSOLE: these tests drive `shardlake console PIPELINE --listen 127.0.0.1:PORT`
and its `GET /api/fleet` (JSON, needs a user), which are built on main; on the console-auth
branch alone (src/console/auth, no `console` subcommand yet) they fail at the first start.

Exercises src/console/auth/ (sign-in, sessions, verification, the cross-site check) and
src/config/resolve/console.rs.
"""

from __future__ import annotations

import base64
import json
import subprocess

from harness import free_port, pipeline_env, write_test_pipeline
from oidc import FLEET, Browser, CognitoPool, call, console, jwt_claims


def test_no_sign_in_is_refused_off_loopback_and_serves_a_local_admin_on_it(
        tmp_path, shardlake_bin):
    pipeline = write_test_pipeline(tmp_path / "p.yaml", max_bytes="1MiB", max_age="1s")
    out = subprocess.run(
        [str(shardlake_bin), "console", str(pipeline), "--listen", f"0.0.0.0:{free_port()}"],
        env=pipeline_env(tmp_path / "data"), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out
    assert "only allowed on a loopback address" in out.stderr, out.stderr

    port = free_port()
    with console(shardlake_bin, pipeline, tmp_path / "data", port):
        status, _, body = call(f"http://127.0.0.1:{port}{FLEET}")
        assert status == 200, body
        json.loads(body)
        # A page served from another name that resolves to 127.0.0.1 reads nothing.
        status, _, _ = call(f"http://127.0.0.1:{port}{FLEET}",
                            headers={"Host": f"rebound.example:{port}"})
        assert status == 403


def test_sign_in_through_oidc_provider_then_logout_ends_the_session(
        tmp_path, shardlake_bin, oidc_provider):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    provider = oidc_provider([f"{base}/auth/callback"])
    pipeline = write_test_pipeline(tmp_path / "p.yaml", max_bytes="1MiB", max_age="1s",
                                   extra=provider.console_auth())
    env = {"OIDC_CLIENT_SECRET": provider.client_secret}
    with console(shardlake_bin, pipeline, tmp_path / "data", port, env):
        status, headers, body = call(f"{base}{FLEET}")
        assert status == 401, body
        assert headers.get("www-authenticate", "").startswith("Bearer")

        browser = Browser()
        page = browser.sign_in(f"{base}/auth/login?next={FLEET}", "alice@tenant-a:operators")
        assert page.status == 200 and page.url == f"{base}{FLEET}", (page.status, page.url,
                                                                     browser.visited)
        json.loads(page.body)
        session = [c for c in browser.cookies if c.name == "shardlake_session"]
        assert len(session) == 1, list(browser.cookies)
        cookie = session[0]
        # Plain http on loopback: no Secure; HttpOnly and SameSite=Lax always.
        assert not cookie.secure
        assert cookie.has_nonstandard_attr("HttpOnly")
        assert cookie.get_nonstandard_attr("SameSite") == "Lax"
        authorize = next(u for u in browser.visited if u.startswith(provider.issuer + "/auth?"))
        assert "code_challenge_method=S256" in authorize and "nonce=" in authorize, authorize

        # The callback cannot be replayed: its state was used.
        callback = next(u for u in browser.visited if u.startswith(f"{base}/auth/callback"))
        assert browser.request(callback).status == 400

        # Logout from another site is refused; from the console's page it ends the session.
        page = browser.request(f"{base}/auth/logout", method="POST", data={},
                               headers={"Origin": "http://evil.example"})
        assert page.status == 403
        assert browser.request(f"{base}{FLEET}").status == 200
        page = browser.request(f"{base}/auth/logout", method="POST", data={},
                               headers={"Origin": base})
        assert page.status == 303
        status, _, _ = call(f"{base}{FLEET}",
                            headers={"Cookie": f"shardlake_session={cookie.value}"})
        assert status == 401
        assert browser.request(f"{base}{FLEET}").status == 401

        # A user without a tenant who is no platform admin is refused after signing in.
        page = Browser().sign_in(f"{base}/auth/login", "mallory:operators")
        assert page.status == 403, (page.status, page.body)
        assert "no tenant" in page.body


def test_bearer_tokens_from_oidc_provider_and_the_ones_refused(
        tmp_path, shardlake_bin, oidc_provider):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    provider = oidc_provider([f"{base}/auth/callback"])
    pipeline = write_test_pipeline(tmp_path / "p.yaml", max_bytes="1MiB", max_age="1s",
                                   extra=provider.console_auth())
    tokens = provider.tokens("bob@tenant-b")
    with console(shardlake_bin, pipeline, tmp_path / "data", port,
                 {"OIDC_CLIENT_SECRET": provider.client_secret}):
        status, _, body = call(f"{base}{FLEET}", token=tokens["access_token"])
        assert status == 200, body
        # The ID token's audience is the client, not the API.
        status, _, body = call(f"{base}{FLEET}", token=tokens["id_token"])
        assert status == 401 and "audience" in body, body
        # A changed payload breaks the signature.
        head, payload, sig = tokens["access_token"].split(".")
        claims = jwt_claims(tokens["access_token"]) | {"custom:tenant": "tenant-a"}
        forged = ".".join([head, base64.urlsafe_b64encode(json.dumps(claims).encode())
                           .rstrip(b"=").decode(), sig])
        status, _, body = call(f"{base}{FLEET}", token=forged)
        assert status == 401 and "signature" in body, body
        # alg: none.
        none = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
        status, _, body = call(f"{base}{FLEET}", token=f"{none}.{payload}.")
        assert status == 401, body


def test_cognito_access_tokens_from_moto_and_the_ones_refused(tmp_path, shardlake_bin, moto):
    pool = CognitoPool.create(moto)
    pool.add_user("carol", "Passw0rd!carol", tenant="tenant-c", groups=["operators"])
    pool.add_user("dave", "Passw0rd!dave", tenant=None)
    pool.add_user("root", "Passw0rd!root", tenant=None, groups=["platform-admins"])
    other_client = CognitoPool(moto, pool.pool_id, moto.client("cognito-idp")
                               .create_user_pool_client(
                                   UserPoolId=pool.pool_id, ClientName="other",
                                   ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH",
                                                      "ALLOW_REFRESH_TOKEN_AUTH"])
                               ["UserPoolClient"]["ClientId"], None)
    other_pool = CognitoPool.create(moto)
    other_pool.add_user("carol", "Passw0rd!carol", tenant="tenant-c", groups=["operators"])

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    pipeline = write_test_pipeline(tmp_path / "p.yaml", max_bytes="1MiB", max_age="1s",
                                   extra=pool.console_auth(f"{base}/auth/callback"))
    carol = pool.tokens("carol", "Passw0rd!carol")
    # The tenant is not in Cognito's access token: the console asks GetUser (moto).
    assert "custom:tenant" not in jwt_claims(carol["AccessToken"])
    with console(shardlake_bin, pipeline, tmp_path / "data", port, moto.env()):
        status, _, body = call(f"{base}{FLEET}", token=carol["AccessToken"])
        assert status == 200, body
        status, _, body = call(f"{base}{FLEET}",
                               token=pool.tokens("root", "Passw0rd!root")["AccessToken"])
        assert status == 200, body

        refused = {
            "an ID token (token_use id)": (carol["IdToken"], 401, "token_use"),
            "another app client of the pool": (
                other_client.tokens("carol", "Passw0rd!carol")["AccessToken"], 401,
                "client_id"),
            # moto signs every pool with one key: only `iss` tells them apart.
            "another pool": (other_pool.tokens("carol", "Passw0rd!carol")["AccessToken"], 401,
                             "issuer"),
            "a user without a tenant": (pool.tokens("dave", "Passw0rd!dave")["AccessToken"],
                                        403, "no tenant"),
        }
        for what, (token, want, reason) in refused.items():
            status, _, body = call(f"{base}{FLEET}", token=token)
            assert (status, reason in body) == (want, True), f"{what}: {status} {body}"

        # A POST that carries a cookie but neither Origin nor Sec-Fetch-Site is refused (a
        # client without a cookie has no ambient credential to abuse).
        status, _, _ = call(f"{base}/auth/logout", method="POST", data={},
                            headers={"Cookie": "shardlake_session=whatever"})
        assert status == 403


def test_in_the_browser_each_tenant_signs_in_and_sees_only_its_fleet_and_alerts(
        tmp_path, shardlake_bin, agent_bin, oidc_provider):
    """Two people sign in with Chromium through oidc-provider's login and consent pages: the
    operator of tenant acme sees acme's devices and alert only, the viewer of borealis only
    borealis' devices and no alert, each with their name on the page."""
    from console import ConsoleRun, browser_sign_in, chromium_driver, shoot, wait_in_page
    listen = f"127.0.0.1:{free_port()}"
    base = f"http://{listen}"
    provider = oidc_provider([f"{base}/auth/callback"])
    r = ConsoleRun(shardlake_bin, agent_bin, tmp_path, devices=6, listen=listen,
                   env={"OIDC_CLIENT_SECRET": provider.client_secret},
                   extra=provider.console_auth())
    drivers = []
    try:
        tenants = {t: sorted(d for d, tt in r.tenants().items() if tt == t)
                   for t in ("acme", "borealis")}
        assert all(tenants.values()), tenants
        pages = {}
        for tenant, login in (("acme", "alice@acme:operators"), ("borealis", "bob@borealis")):
            d = chromium_driver()
            drivers.append(d)
            browser_sign_in(d, f"{base}/#/fleet", login, base)
            pages[tenant] = d
        for tenant, page in pages.items():
            wait_in_page(page, f"{tenant}'s devices",
                         "[...document.querySelectorAll('#fleet-body tr')].map(tr => "
                         f"tr.dataset.device).sort().join(',') === '{','.join(tenants[tenant])}'",
                         timeout=60)
            shoot(page, tmp_path, f"fleet-{tenant}")
        r.append(tenants["acme"][0], pressure=9500.0, tenant="acme")
        for tenant, page in pages.items():
            page.execute_script("location.hash = '#/alerts'")
        wait_in_page(pages["acme"], "acme's alert",
                     "[...document.querySelectorAll('#alerts-body tr')].some(tr => "
                     f"tr.children[2].textContent === '{tenants['acme'][0]}')", timeout=60)
        # The alert reached every page that may see it; borealis' page had the same time
        # and its feed stays empty.
        assert pages["borealis"].execute_script(
            "return document.querySelectorAll('#alerts-body tr[data-alert]').length") == 0
        shoot(pages["acme"], tmp_path, "alerts-acme")
        shoot(pages["borealis"], tmp_path, "alerts-borealis")
        # The page shows who is signed in.
        who = "return document.getElementById('whoami').textContent"
        assert pages["acme"].execute_script(who) == "alice · acme · operator"
        assert pages["borealis"].execute_script(who) == "bob · borealis · viewer"
    finally:
        for d in drivers:
            d.quit()
        r.close()
