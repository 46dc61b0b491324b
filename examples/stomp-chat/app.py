"""The controller of the original Spring STOMP chat page, rewritten for Beeline (aiohttp).

The page (``static/index.html`` + ``static/app.js``) is the original design's, script unchanged: it opens
``new SockJS('/chat-websocket')``, runs STOMP over it with ``connect({}, ...)`` (no token in the frame),
subscribes to ``/user/topic/reply``, sends by posting a form to ``/wsTemplate/sendToUser`` and, once
connected, posts to ``/wsTemplate/pullUnreadMessage``. What changed is behind it:

- ``/chat-websocket`` is proxied by nginx to the Beeline gateways (``nginx.conf.template``), not to this app.
- ``/login`` is a user-name-only login (an example, not an identity provider: anyone may be anyone) that
  sets the ``beeline_token`` cookie to a JWT of the user (HS256 with the gateways' BEELINE_JWT_SECRET,
  ``sub`` = the user id). The browser sends that cookie on the SockJS requests, which is how the gateway
  authenticates a page that sends no token; this app reads the same cookie to know who the user is.
- ``sendToUser`` (Spring's ``convertAndSendToUser(receiver, "/topic/reply", ...)``) calls the router API
  ``POST /v1/messages`` with channel ``reply``, the channel ``/user/topic/reply`` subscribes to.
- ``pullUnreadMessage`` returns nothing: Beeline delivers a channel's unread messages on SUBSCRIBE.

Invariants: the token and the message text are never logged; every endpoint except the login page, its
form and the static files answers 401 (or redirects to ``/login``) without a valid cookie; the cookie is
HttpOnly and SameSite=Lax, so another site can neither read it nor post the send form with it.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
from aiohttp import web

from shared.auth import TokenVerifier, mint_token
from shared.errors import AuthError, InvalidRequest
from shared.logs import configure_logging, get_logger
from shared.protocol import valid_user_id

log = get_logger("beeline.examples.stomp_chat")

HERE: Final = Path(__file__).resolve().parent
STATIC_DIR: Final = HERE / "static"
NODE_MODULES: Final = HERE / "node_modules"
TOKEN_COOKIE: Final = "beeline_token"
TOKEN_TTL_S: Final = 12 * 3600
ROUTER_TIMEOUT_S: Final = 5.0
REPLY_CHANNEL: Final = "reply"
"""The Beeline channel of the page's ``/user/topic/reply`` subscription."""

# The original page loads its libraries from Spring's webjars paths; the same paths are served here from
# the npm packages pinned in package.json (jquery 3.3.1, sockjs-client 1.1.4, stompjs 2.3.3).
LIBRARIES: Final = {
    "/webjars/jquery/jquery.min.js": NODE_MODULES / "jquery" / "dist" / "jquery.min.js",
    "/webjars/sockjs-client/sockjs.min.js": NODE_MODULES / "sockjs-client" / "dist" / "sockjs.min.js",
    "/webjars/stomp-websocket/stomp.min.js": NODE_MODULES / "stompjs" / "lib" / "stomp.min.js",
}


@dataclass(frozen=True, slots=True)
class ChatConfig:
    """Where the router is and the secrets shared with it (API key) and with the gateways (JWT secret)."""

    router_url: str
    api_key: str
    jwt_secret: str
    token_cookie: str = TOKEN_COOKIE
    secure_cookie: bool = False  # set behind HTTPS; the example runs on plain loopback HTTP


CONFIG_KEY: Final = web.AppKey("stomp_chat_config", ChatConfig)
VERIFIER_KEY: Final = web.AppKey("stomp_chat_verifier", TokenVerifier)
ROUTER_SESSION_KEY: Final = web.AppKey("stomp_chat_router_session", aiohttp.ClientSession)


def current_user(request: web.Request) -> str | None:
    """The user whose valid token is in the cookie, else None."""
    token = request.cookies.get(request.app[CONFIG_KEY].token_cookie)
    if not token:
        return None
    try:
        return request.app[VERIFIER_KEY].verify(token).user_id
    except AuthError:
        return None


def _page(name: str, **values: str) -> str:
    text = (STATIC_DIR / name).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", html.escape(value))
    return text


async def index(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    if user is None:
        raise web.HTTPSeeOther("/login")
    return web.Response(
        text=_page("index.html", user=user), content_type="text/html", headers={"Cache-Control": "no-store"}
    )


async def app_js(_request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "app.js", headers={"Content-Type": "application/javascript"})


async def library(request: web.Request) -> web.StreamResponse:
    path = LIBRARIES[request.path]
    if not path.is_file():
        return web.Response(status=404, text="missing: run `npm ci --prefix examples/stomp-chat`\n")
    return web.FileResponse(path, headers={"Content-Type": "application/javascript"})


async def favicon(_request: web.Request) -> web.StreamResponse:
    return web.Response(status=204)  # none, and no 404 in the browser's console either


async def login_form(_request: web.Request) -> web.StreamResponse:
    return web.Response(text=_page("login.html", error=""), content_type="text/html")


async def login(request: web.Request) -> web.StreamResponse:
    """Form ``username``: sets the token cookie (the gateway's credential and this app's session)."""
    cfg = request.app[CONFIG_KEY]
    form = await request.post()
    try:
        user = valid_user_id(str(form.get("username", "")).strip(), "username")
    except InvalidRequest as e:
        page = _page("login.html", error=e.message)
        return web.Response(status=400, text=page, content_type="text/html")
    response = web.HTTPSeeOther("/")
    response.set_cookie(
        cfg.token_cookie,
        mint_token(cfg.jwt_secret, user, ttl_s=TOKEN_TTL_S),
        max_age=TOKEN_TTL_S,
        path="/",
        httponly=True,  # only the gateway and this app read it; the page's script never needs it
        samesite="Lax",
        secure=cfg.secure_cookie,
    )
    log.info("user_logged_in", user_id=user)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther("/login")
    response.del_cookie(request.app[CONFIG_KEY].token_cookie, path="/")
    raise response


async def send_to_user(request: web.Request) -> web.StreamResponse:
    """Form ``receiver``, ``msg``: what ``convertAndSendToUser(receiver, "/topic/reply", ...)`` did, as a
    router API call; answers ``ok`` once the router has put the message in the receiver's mailbox."""
    sender = current_user(request)
    if sender is None:
        return web.json_response({"code": "401", "msg": "not logged in"}, status=401)
    cfg = request.app[CONFIG_KEY]
    form = await request.post()
    receiver = str(form.get("receiver", "")).strip()
    text = str(form.get("msg", ""))
    body = {"to": receiver, "channel": REPLY_CHANNEL, "payload": {"content": f"{sender} say: {text}"}, "from": sender}
    headers = {"Authorization": f"Bearer {cfg.api_key}"}
    session = request.app[ROUTER_SESSION_KEY]
    try:
        async with session.post(f"{cfg.router_url}/v1/messages", json=body, headers=headers) as response:
            if response.status == 202:
                log.info("message_sent", user_id=sender, to=receiver)
                return web.Response(text="ok")
            error = await response.json(content_type=None)
            status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        log.warning("router_call_failed", user_id=sender, error=type(e).__name__)
        return web.json_response({"code": "502", "msg": "router unreachable"}, status=502)
    # A refused send (say, an empty receiver) is the sender's to fix: pass the router's reason on.
    reason = error.get("error") if isinstance(error, dict) else None
    message = str(reason.get("message", "refused")) if isinstance(reason, dict) else "refused"
    log.info("message_refused", user_id=sender, status=status)
    return web.json_response({"code": str(status), "msg": message}, status=400 if status < 500 else 502)


async def pull_unread_message(request: web.Request) -> web.StreamResponse:
    """Always ``{"code": "200", "result": []}``, the original's shape with nothing in it.

    In the original design unread messages sat in a Redis list that the page pulled after connecting. In
    Beeline they stay in the user's mailbox and the gateway delivers a channel's unread messages itself
    when the page SUBSCRIBEs to it (here ``/user/topic/reply``), before this request is even sent. Pulling
    them here too would show each one twice; returning them instead of the gateway would lose the mailbox's
    read cursor. So nothing is pulled, and the page's loop over ``result`` shows nothing.
    """
    if current_user(request) is None:
        return web.json_response({"code": "401", "msg": "not logged in"}, status=401)
    return web.json_response({"code": "200", "result": []})


def create_app(
    router_url: str, api_key: str, jwt_secret: str, *, token_cookie: str = TOKEN_COOKIE, secure_cookie: bool = False
) -> web.Application:
    """The example's web app: the page, its libraries, the login and the two controller endpoints.
    ``token_cookie`` must match the gateways' BEELINE_TOKEN_COOKIE; ``secure_cookie`` behind HTTPS."""
    app = web.Application()
    app[CONFIG_KEY] = ChatConfig(router_url.rstrip("/"), api_key, jwt_secret, token_cookie, secure_cookie)
    app[VERIFIER_KEY] = TokenVerifier(secret=jwt_secret)

    async def router_session(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ROUTER_TIMEOUT_S)) as session:
            app[ROUTER_SESSION_KEY] = session
            yield

    app.cleanup_ctx.append(router_session)
    app.router.add_get("/", index)
    app.router.add_get("/app.js", app_js)
    for path in LIBRARIES:
        app.router.add_get(path, library)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_get("/logout", logout)
    app.router.add_post("/wsTemplate/sendToUser", send_to_user)
    app.router.add_post("/wsTemplate/pullUnreadMessage", pull_unread_message)
    return app


def missing_libraries() -> list[str]:
    return [str(path.relative_to(HERE)) for path in LIBRARIES.values() if not path.is_file()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The original STOMP chat page's controller on Beeline (put nginx.conf.template in front).",
        epilog="BEELINE_JWT_SECRET (the gateways') and BEELINE_API_KEYS (the router's; the first key is used) "
        "are read from the environment.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--router-url", default="http://127.0.0.1:8090")
    ns = parser.parse_args(argv)
    secret = os.environ.get("BEELINE_JWT_SECRET", "").split(",")[0].strip()
    api_key = os.environ.get("BEELINE_API_KEYS", "").split(",")[0].strip()
    if not secret or not api_key:
        print("stomp-chat: BEELINE_JWT_SECRET and BEELINE_API_KEYS must be set", file=sys.stderr)
        return 2
    configure_logging(os.environ.get("BEELINE_LOG_LEVEL", "info"), os.environ.get("BEELINE_LOG_FORMAT", "json"))
    if missing := missing_libraries():
        log.warning("libraries_missing", files=missing, fix="npm ci --prefix examples/stomp-chat")
    web.run_app(create_app(ns.router_url, api_key, secret), host=ns.host, port=ns.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
