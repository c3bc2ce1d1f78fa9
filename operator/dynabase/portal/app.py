"""The portal's routes, served under /portal/ by `dynabase portal` and on headless mode's port.

- ``GET login`` / ``POST login``: the form; its CSRF token is a random value in a
  short-lived SameSite=Strict cookie and in the form, compared on POST (and the
  Origin header, when sent, must be this host): another site cannot log a browser
  in as someone else.
- ``GET t/<namespace>/<name>``: the tenant's page, for its own session only (403
  otherwise); without a session, a redirect to the log-in.
- ``POST logout``: ends the session; carries the session's CSRF token.

The session cookie is HttpOnly, SameSite=Lax, Path=/portal/, Secure whenever the
request came over https (directly or per X-Forwarded-Proto). Nothing secret is put
in a URL or a log line. Every response forbids framing, scripts and caching.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import asyncpg
from aiohttp import web

from dynabase.backends.events_pg import PostgresEventLog
from dynabase.backends.portal_pg import PortalStore
from dynabase.desired.effective import ResolveError

from . import render
from .auth import LoginThrottle, log_in, same_token
from .data import Declarations, Declared, Models, find_tenant, tenant_page
from .usage import MonthDocs

log = logging.getLogger(__name__)
BASE = "/portal/"
SESSION_COOKIE, LOGIN_COOKIE = "dynabase_session", "dynabase_login"
SECURITY_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; style-src '{render.CSS_HASH}'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make browsers send "Origin: null" on our own forms
    "Cache-Control": "no-store",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Portal:
    declarations: Declarations
    store: PortalStore
    events: PostgresEventLog | None = None
    month_docs: MonthDocs | None = None
    models: Models | None = None
    secure_cookies: Literal["auto", "always"] = "auto"
    session_lifetime: dt.timedelta = dt.timedelta(hours=8)
    clock: Callable[[], dt.datetime] = utcnow
    throttle: LoginThrottle = field(default_factory=LoginThrottle)


def _secure(portal: Portal, request: web.Request) -> bool:
    return portal.secure_cookies == "always" or request.secure or \
        request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def _cookie(portal: Portal, request: web.Request, response: web.StreamResponse, name: str, value: str,
            max_age: int, same_site: str) -> None:
    response.set_cookie(name, value, max_age=max_age, path=BASE, httponly=True, samesite=same_site,
                        secure=_secure(portal, request))


def _page(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _same_origin(request: web.Request) -> bool:
    """What the browser says of where a POST came from: Sec-Fetch-Site, else Origin (absent from old clients)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


def portal_app(portal: Portal) -> web.Application:
    @web.middleware
    async def headers(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # redirects and errors are raised: they get the headers too
            exc.headers.update(SECURITY_HEADERS)
            raise
        response.headers.update(SECURITY_HEADERS)
        return response

    def unavailable(what: str, exc: BaseException) -> web.HTTPException:
        log.warning("portal: backend unavailable", extra={"what": what, "error": f"{type(exc).__name__}: {exc}"})
        return web.HTTPServiceUnavailable(text=render.error_page(
            "Not available right now", "The platform cannot show this page at the moment; try again shortly.",
            BASE), content_type="text/html", headers={"Retry-After": "30"})

    async def declared() -> Declared:
        """Tenants and tiers now; a source that cannot be read is a 503, not a 500 with a traceback."""
        try:
            return await portal.declarations.declared()
        except Exception as exc:
            raise unavailable("declarations", exc) from None

    async def session_of(request: web.Request) -> tuple[str, str, str] | None:
        """(token, tenant key, csrf) of the request's live session."""
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        try:
            session = await portal.store.session(token)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise unavailable("sessions", exc) from None
        return (token, session.tenant, session.csrf) if session is not None else None

    async def home(request: web.Request) -> web.StreamResponse:
        found = await session_of(request)
        raise web.HTTPSeeOther(f"{BASE}t/{found[1]}" if found else f"{BASE}login")

    async def login_form(request: web.Request, *, error: str | None = None, status: int = 200,
                         database: str = "") -> web.StreamResponse:
        csrf = secrets.token_urlsafe(24)
        response = _page(render.login_page(BASE, csrf, error=error, database=database), status)
        _cookie(portal, request, response, LOGIN_COOKIE, csrf, 3600, "Strict")
        return response

    async def show_login(request: web.Request) -> web.StreamResponse:
        return await login_form(request)

    async def login(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        database, password = str(form.get("database", "")).strip(), str(form.get("password", ""))
        if not _same_origin(request) or not same_token(str(form.get("csrf", "")), request.cookies.get(LOGIN_COOKIE)):
            return await login_form(request, error="The form expired; please log in again.", status=403)
        wait = portal.throttle.retry_after(database)
        if wait > 0:
            response = await login_form(request, error=f"Too many failed log-ins; try again in {wait / 60:.0f} "
                                        "minutes.", status=429, database=database)
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        _, tenants = await declared()
        logged_in = await log_in(portal.store, tenants, database, password, portal.session_lifetime, portal.clock())
        if logged_in is None:
            portal.throttle.failed(database)
            log.info("portal log-in refused", extra={"database": database[:63]})
            return await login_form(request, error="Wrong database name or password.", status=401, database=database)
        portal.throttle.succeeded(database)
        log.info("portal log-in", extra={"tenant": logged_in.tenant.key})
        response = web.HTTPSeeOther(f"{BASE}t/{logged_in.tenant.key}")
        _cookie(portal, request, response, SESSION_COOKIE, logged_in.token,
                int(portal.session_lifetime.total_seconds()), "Lax")
        response.del_cookie(LOGIN_COOKIE, path=BASE)
        raise response

    async def tenant(request: web.Request) -> web.StreamResponse:
        found = await session_of(request)
        if found is None:
            raise web.HTTPSeeOther(f"{BASE}login")
        _, owner, csrf = found
        key = f"{request.match_info['namespace']}/{request.match_info['name']}"
        if key != owner:
            log.info("portal: another tenant's page refused", extra={"tenant": owner, "asked": key})
            return _page(render.error_page("Not your page", "You can only see your own database's page.", BASE), 403)
        policies, tenants = await declared()
        found_tenant = find_tenant(tenants, key=key)
        if found_tenant is None:
            return _page(render.error_page("Not found", "This database is no longer declared.", BASE), 404)
        try:
            status = (await portal.declarations.statuses([key])).get(key)
            page = await tenant_page(found_tenant, policies, status, events=portal.events,
                                     month_docs=portal.month_docs, models=portal.models, now=portal.clock())
        except ResolveError as exc:
            return _page(render.error_page("Not available", exc.message, BASE), 503)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise unavailable("tenant page", exc) from None
        return _page(render.tenant_page(page, BASE, csrf))

    async def logout(request: web.Request) -> web.StreamResponse:
        found = await session_of(request)
        form = await request.post()
        if found is not None and _same_origin(request) and same_token(str(form.get("csrf", "")), found[2]):
            await portal.store.close(found[0])
        response = web.HTTPSeeOther(f"{BASE}login")
        response.del_cookie(SESSION_COOKIE, path=BASE)
        raise response

    application = web.Application(middlewares=[headers], client_max_size=16 * 1024)
    application.add_routes([
        web.get("/", home), web.get("/login", show_login), web.post("/login", login),
        web.get("/t/{namespace}/{name}", tenant), web.post("/logout", logout),
    ])
    return application


def standalone_app(portal: Portal) -> web.Application:
    """`dynabase portal`: the portal under /portal/, / redirecting to it, and /healthz."""

    async def root(_: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(BASE)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    application = web.Application()
    application.add_routes([web.get("/", root), web.get("/healthz", healthz)])
    application.add_subapp(BASE, portal_app(portal))
    return application
