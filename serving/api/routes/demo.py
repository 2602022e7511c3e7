"""The demo page (report 5.5, figures 5.6 and 5.7): one validation user's recommendations against their clicks.

A plain browser opens it: without a key, `GET /demo` answers a form that takes one (read scope) and
`POST /demo/session` keeps it in an HttpOnly, SameSite=Strict cookie whose path is /demo, so the page's
own requests carry it and no other route accepts it (they read the `X-API-Key` header only); a client
sending the header works as before. `POST /demo/logout` drops the cookie.

`GET /demo?user=ID` renders, on the server, a picker of the demo users, then for the chosen one the final
recommendations the gateway's recommender answers that customer now (the precomputed nightly list with
the rules of the moment, as `GET /recommendations/{id}` does), the candidates the retrieval stage found
for them, the items they clicked in validation highlighted in both lists, the list's precision (clicked /
shown) and the retrieval stage's recall (clicked items retrieved / clicked items).

Validation clicks and retrieved candidates come from a `recsys demo-data` output (tasks/demo_data.py):
`RECSYS_DEMO_DIR`, or else the newest `<data root>/runs/<run>/demo`. It is read once and kept until that
output changes (a rerun swaps the output's link to a new folder). The page is plain HTML with its style
sheet inline: it loads nothing from elsewhere and works without internet access.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request, Security
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import APIKeyCookie
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from recsys.demo_format import METRICS_FILE, DemoData, DemoUser, hits, read_demo_data
from recsys.run_layout import RunLayout
from recsys.settings import Settings
from serving.api.auth import AUTH_ERRORS, Caller, Scope, caller_of, key_header
from serving.api.deps import SettingsDep
from serving.api.schemas import INT64_MAX, error_responses
from serving.recommender import Recommender, VisitorQuery

router = APIRouter(tags=["demo"], responses=error_responses(AUTH_ERRORS))

DEMO_COOKIE = "recsys_demo_key"
COOKIE_HOURS = 8
demo_cookie = APIKeyCookie(name=DEMO_COOKIE, auto_error=False, description="the key the demo's sign-in form keeps")

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"


@functools.cache
def _templates() -> Jinja2Templates:
    import jinja2

    # Every template is escaped, not only *.html: what the page shows never becomes markup.
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True)
    return Jinja2Templates(env=environment)


def demo_directory(settings: Settings) -> Path | None:
    """The demo data the page reads: the configured output, or the newest one under the data root's runs."""
    if settings.demo_dir is not None:
        return settings.demo_dir
    outputs = [run.demo / METRICS_FILE for run in RunLayout.every_run(settings.data_root)
               if (run.demo / METRICS_FILE).is_file()]  # fmt: skip
    if not outputs:
        return None
    return max(outputs, key=lambda path: path.stat().st_mtime).parent


async def _demo_data(request: Request, settings: Settings) -> DemoData | None:
    directory = demo_directory(settings)
    if directory is None or not (directory / METRICS_FILE).is_file():
        return None
    # A rerun of the step swaps the output's link to a new folder: the resolved path names one version.
    version = directory.resolve()
    cached: tuple[Path, DemoData] | None = getattr(request.app.state, "demo_data", None)
    if cached is None or cached[0] != version:
        cached = (version, await run_in_threadpool(read_demo_data, version))
        request.app.state.demo_data = cached
    return dataclasses.replace(cached[1], directory=directory)


@dataclasses.dataclass(frozen=True)
class ListedItem:
    item: int
    score: float
    clicked: bool
    probability: float | None = None
    promoted: bool = False
    recommended: bool = False


async def _user_view(recommender: Recommender, user: DemoUser, count: int, temperature: float, api_key: str
                     ) -> dict[str, Any]:  # fmt: skip
    query = VisitorQuery(customer_id=user.user_id, context={}, count=count, temperature=temperature, api_key=api_key)
    answer, probabilities, promoted = await recommender.recommend(query)
    final = [ListedItem(item, score, item in user.clicked, probability, flag)
             for item, score, probability, flag in zip(answer.items, answer.scores, probabilities, promoted,
                                                       strict=True)]  # fmt: skip
    recommended = set(answer.items)
    candidates = [ListedItem(item, score, item in user.clicked, recommended=item in recommended)
                  for item, score in zip(user.candidates, user.candidate_scores, strict=True)]  # fmt: skip
    final_hits, candidate_hits = hits(answer.items, user.clicked), hits(user.candidates, user.clicked)
    return {
        "user": user, "answer": answer, "final": final, "candidates": candidates,
        "final_hits": final_hits, "candidate_hits": candidate_hits,
        # The report's measures: precision of the list shown, recall of the retrieval stage.
        "precision": final_hits / len(final) if final else 0.0,
        "recall": candidate_hits / len(user.clicked) if user.clicked else 0.0,
        "clicked": sorted(user.clicked), "retrieved": set(user.candidates), "recommended": recommended,
    }  # fmt: skip


async def demo_caller(request: Request, header: Annotated[str | None, Security(key_header)],
                      cookie: Annotated[str | None, Security(demo_cookie)]) -> Caller | None:  # fmt: skip
    """The caller by the `X-API-Key` header, else by the demo's cookie; None without a valid key."""
    secret = header or cookie
    return await caller_of(request, secret) if secret else None


def _sign_in_page(request: Request, problem: str | None, status: int) -> HTMLResponse:
    context = {"login_action": request.url_for("demo_session").path, "problem": problem, "hours": COOKIE_HOURS}
    return _templates().TemplateResponse(request, "demo_login.html", context, status_code=status)


@router.post("/demo/session", response_class=HTMLResponse, name="demo_session",
             responses={303: {"description": "signed in: on to the demo page with the cookie set"}})  # fmt: skip
async def demo_session(request: Request, api_key: Annotated[str, Form(max_length=200)]) -> Response:
    """Check the key of the sign-in form; keep it in the demo's cookie and go on to the page."""
    caller = await caller_of(request, api_key.strip())
    if caller is None:
        return _sign_in_page(request, "Unknown or revoked API key.", 401)
    if Scope.READ not in caller.scopes:
        return _sign_in_page(request, f"API key {caller.name!r} lacks the read scope.", 403)
    page = RedirectResponse(request.url_for("demo_page").path, status_code=303)
    page.set_cookie(DEMO_COOKIE, api_key.strip(), max_age=COOKIE_HOURS * 3600, path="/demo", httponly=True,
                    samesite="strict", secure=request.url.scheme == "https")  # fmt: skip
    return page


@router.post("/demo/logout", response_class=HTMLResponse, responses={303: {"description": "the cookie dropped"}})
async def demo_logout(request: Request) -> Response:
    page = RedirectResponse(request.url_for("demo_page").path, status_code=303)
    page.delete_cookie(DEMO_COOKIE, path="/demo", httponly=True, samesite="strict")
    return page


@router.get("/demo", response_class=HTMLResponse, name="demo_page",
            responses={404: {"description": "the user is not among the demo users"},
                       503: {"description": "no demo data: run `recsys demo-data` on a run"}})  # fmt: skip
async def demo_page(
    request: Request,
    settings: SettingsDep,
    caller: Annotated[Caller | None, Depends(demo_caller)],
    user: Annotated[int | None, Query(gt=0, le=INT64_MAX, description="a demo user (raw id)")] = None,
    count: Annotated[int, Query(ge=1, le=100, description="recommendations shown")] = 10,
    temperature: Annotated[float, Query(ge=0, le=100, description="softmax sampling; 0 = ranked order")] = 0.0,
) -> HTMLResponse:
    """The demo page: a user picker, then that user's recommendations, candidates, clicks and measures; the
    sign-in form without a valid key."""
    if caller is None:
        return _sign_in_page(request, None, 401)
    if Scope.READ not in caller.scopes:
        return _sign_in_page(request, f"API key {caller.name!r} lacks the read scope.", 403)
    context: dict[str, Any] = {"form_action": request.url.path, "count": count, "temperature": temperature,
                               "choices": [], "user": None, "demo": None, "problem": None}  # fmt: skip
    status = 200
    demo = await _demo_data(request, settings)
    if demo is None:
        status = 503
        context["problem"] = ("No demo data yet: run `.venv-trainer/bin/recsys demo-data --input <run> --output "
                              "<run>/demo` on a trained run, or set RECSYS_DEMO_DIR.")  # fmt: skip
    else:
        top_k = demo.metrics.get("top_k")
        context.update(demo=demo, choices=list(demo.users.values()),
                       mean_recall=demo.metrics.get(f"mean_retrieval_recall_at_{top_k}"))  # fmt: skip
        if user is not None and user not in demo.users:
            status = 404
            context["problem"] = f"User {user} is not among the demo users: pick one from the list."
        elif user is not None:
            context.update(await _user_view(request.app.state.recommender, demo.users[user], count, temperature,
                                            caller.name))  # fmt: skip
    return _templates().TemplateResponse(request, "demo.html", context, status_code=status)
