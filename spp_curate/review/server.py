"""``spp-curate review DIR``: a local web page to accept, reject or skip a build's pairs.

The page (``page.html``) talks to a small JSON API (FastAPI, served by
uvicorn). Nothing in a request names a file: pairs are asked for by pair id,
pictures by index id, and each is looked up in the build's own tables; the
pictures are read from the build's source through the project's one decode
path. Each decision is written to ``DIR/reviews.parquet`` before the answer is
sent (``store.record``).
"""

from __future__ import annotations

import functools
import io
import socket
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import FastAPI, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from .. import layout
from ..errors import UserError, brief
from ..files import read_json
from ..images import BadImage, load_image
from . import estimate as E
from . import store

PAGE = Path(__file__).with_name("page.html")
#: Longest side of a picture on the page; small ones are enlarged by the browser, pixel for pixel.
PICTURE_SIDE = 512


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pair_id: int = Field(ge=0, lt=2**63)
    decision: Literal["accept", "reject", "skip"]


class Build:
    """A build directory's pairs, image keys and figures, read once when the server starts."""

    def __init__(self, build_dir: Path) -> None:
        from ..curate.sources import open_source
        from ..config import load_recipe

        self.dir = build_dir
        self.recipe = load_recipe(build_dir)
        if not (build_dir / layout.PAIRS).is_file():
            raise UserError(f"{build_dir} has no pairs yet; run `spp-curate build` (or `spp-curate mine`) first",
                            option="DIR")
        try:
            index = pq.read_table(build_dir / layout.INDEX, columns=["id", "key", "label", "label_name"]).to_pandas()
            pairs = pq.read_table(build_dir / layout.PAIRS).to_pandas()
            self.stats = read_json(build_dir / layout.MINE_STATS)
            if not isinstance(self.stats, dict):
                raise ValueError(f"{layout.MINE_STATS} holds no mapping")
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            first = brief(exc, 160)
            raise UserError(f"{build_dir} is not a complete build ({type(exc).__name__}: {first}); run "
                            "`spp-curate build` on it again", option="DIR") from None
        self.keys = dict(zip(index.id.tolist(), index.key.tolist()))
        names = dict(zip(index.label.tolist(), index.label_name.tolist()))
        pairs["anchor_key"] = pairs.anchor_id.map(self.keys)
        pairs["positive_key"] = pairs.positive_id.map(self.keys)
        pairs["positive_label_name"] = pairs.positive_label.map(names).fillna("")
        pairs["key"] = store.pair_key(pairs.anchor_key, pairs.positive_key)
        pairs["disagree"] = (pairs.label >= 0) & (pairs.positive_label >= 0) & (pairs.label != pairs.positive_label)
        self.pairs = pairs.set_index("pair_id", drop=False)
        self.key_set = set(pairs.key.tolist())
        self.source = open_source(self.recipe)

    def decisions(self, reviewer: str | None) -> tuple[pd.Series, pd.Series]:
        """Per pair key: this reviewer's last decision, and the consensus of all reviewers."""
        last = store.last_decisions(store.read_reviews(self.dir))
        mine = last[last.reviewer == reviewer].set_index("pair").decision if reviewer is not None else pd.Series()
        return mine, store.consensus(last)


def counts(build: Build, reviewer: str) -> dict[str, Any]:
    mine, verdict = build.decisions(reviewer)
    mine = mine[[k in build.key_set for k in mine.index.tolist()]]
    verdict = verdict[[k in build.key_set for k in verdict.index.tolist()]]
    return {
        "pairs": len(build.pairs),
        "reviewer": reviewer,
        "reviewed": int(len(mine)),
        "accepted": int((mine == "accept").sum()),
        "rejected": int((mine == "reject").sum()),
        "skipped": int((mine == "skip").sum()),
        "all_reviewers": {"accepted": int((verdict == "accepted").sum()),
                          "rejected": int((verdict == "rejected").sum())},
    }


def review_curve(build: Build) -> dict[str, Any]:
    """The mine stage's curve (labels) and precision as the reviews measure it, on the same thresholds."""
    curve = dict(build.stats["curve"])
    _, verdict = build.decisions(None)
    decided = build.pairs[build.pairs.key.map(verdict).isin(["accepted", "rejected"])]
    sims = decided.similarity.to_numpy(dtype=np.float64)
    good = (decided.key.map(verdict) == "accepted").to_numpy()
    reviewed, accepted = [], []
    for t in curve["threshold"]:
        above = sims >= t
        reviewed.append(int(above.sum()))
        accepted.append(int((good & above).sum()))
    curve["reviewed"] = reviewed
    curve["review_precision"] = [a / r if r else None for a, r in zip(accepted, reviewed)]
    # the reviewed random sample's estimate above each threshold, with its 95 % band (estimate mode's decisions)
    est = E.estimate_curve(build.pairs[["key", "similarity"]], store.read_reviews(build.dir), curve["threshold"])
    curve["estimate"], curve["estimate_low"], curve["estimate_high"] = est["value"], est["low"], est["high"]
    return curve


class Sampling:
    """Estimate mode: the seeded draw of the build's pairs (``estimate.sample_plan``) and when to stop."""

    def __init__(self, build: Build, target_pairs: int, half_width: float, seed: int) -> None:
        self.build, self.target_pairs, self.half_width, self.seed = build, target_pairs, half_width, seed
        self.plan = E.sample_plan(build.pairs.key.to_numpy(), build.pairs.similarity.to_numpy(), seed)
        self.plan_keys = self.plan.key.tolist()
        self.marks_of = {k: {"sample": True, "band": int(b), "draw": int(d)}
                         for k, b, d in zip(self.plan_keys, self.plan.band.tolist(), self.plan.draw.tolist())}
        self.pair_of_key = dict(zip(build.pairs.key.tolist(), build.pairs.pair_id.tolist()))

    def estimate(self) -> E.Estimate:
        return E.estimate_precision(self.build.pairs[["key", "similarity"]], store.read_reviews(self.build.dir))

    def state(self, reviewer: str) -> dict[str, Any]:
        """The next pair this reviewer has not judged in the draw, and the estimate so far."""
        reviews = store.read_reviews(self.build.dir)
        sample = reviews[reviews["sample"].fillna(False).astype(bool) & (reviews.reviewer == reviewer)]
        seen = set(store.pair_key(sample.anchor_key, sample.positive_key).tolist()) if len(sample) else set()
        est = E.estimate_precision(self.build.pairs[["key", "similarity"]], reviews)
        mine = sample[sample.decision != "skip"]
        judged = len(set(store.pair_key(mine.anchor_key, mine.positive_key))) if len(mine) else 0
        done = judged >= self.target_pairs or (est.half_width is not None and est.half_width <= self.half_width)
        nxt = None if done else next((k for k in self.plan_keys if k not in seen), None)
        return {"estimate": est.as_dict(), "judged": judged, "target_pairs": self.target_pairs,
                "half_width": self.half_width, "done": done or nxt is None,
                "next": None if nxt is None else {"pair_id": int(self.pair_of_key[nxt]), **self.marks_of[nxt]}}

    def marks(self, key: str) -> dict[str, Any]:
        """What a decision on the pair ``key`` records in estimate mode: it was drawn, its band and draw."""
        return dict(self.marks_of.get(key, {}))


def pair_row(r: Any, decision: Any, verdict: pd.Series) -> dict[str, Any]:
    return {"pair_id": int(r.pair_id), "anchor_id": int(r.anchor_id), "positive_id": int(r.positive_id),
            "anchor_key": r.anchor_key, "positive_key": r.positive_key, "similarity": float(r.similarity),
            "label_name": r.label_name, "positive_label_name": r.positive_label_name, "mutual": bool(r.mutual),
            "disagree": bool(r.disagree), "decision": None if decision is None or pd.isna(decision) else decision,
            "consensus": verdict.get(r.key)}


#: The host names a page on this machine is reached by; any other ``Host`` header is refused (DNS rebinding).
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def _host_name(value: str) -> str:
    """``name`` of a ``Host`` header or an origin's authority: ``[::1]:8765`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1: value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(build_dir: Path, reviewer: str, estimate: int | None = None, half_width: float = E.DEFAULT_HALF_WIDTH,
               seed: int = 0, hosts: frozenset[str] = LOOPBACK_NAMES) -> FastAPI:
    """The review page's API; with ``estimate`` (pairs to judge at most) in estimate mode, where the page shows
    pairs in the seeded stratified draw and decisions are recorded as sample decisions.

    Every request must name one of ``hosts`` in its ``Host`` header, so a page of another site whose name is
    made to resolve to this machine (DNS rebinding) can read nothing; a write must come from no browser page
    (no ``Origin``) or from this page's own origin, so another site cannot post decisions either."""
    build = Build(build_dir)
    sampling = Sampling(build, estimate, half_width, seed) if estimate else None
    app = FastAPI(title="spp-curate review", docs_url=None, redoc_url=None, openapi_url=None)
    from fastapi.responses import JSONResponse
    from urllib.parse import urlsplit

    @app.middleware("http")
    async def same_host_only(request, call_next):
        host = _host_name(request.headers.get("host", ""))
        if "*" not in hosts and host not in hosts:
            return JSONResponse({"detail": f"host {host!r} is not this review page's"}, status_code=403)
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin is not None:
            parts = urlsplit(origin)
            foreign = "*" not in hosts and (parts.hostname or "") not in hosts
            if foreign or parts.netloc.lower() != request.headers.get("host", "").lower():
                return JSONResponse({"detail": "cross-origin writes are refused"}, status_code=403)
        return await call_next(request)

    @app.exception_handler(UserError)
    async def user_error(request, exc: UserError):
        # a damaged reviews.parquet, say: the page shows the one-line message, not a 500
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        # FastAPI's own answer quotes the input back, and an input such as 1e400 or NaN cannot be written as
        # JSON (a 500): name the field and the rule instead.
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "request"
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'not a valid request')}"}, status_code=422)
    page = PAGE.read_text()

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/summary")
    def summary() -> dict[str, Any]:
        sims = build.pairs.similarity
        return {
            "name": build.recipe.name, "counts": counts(build, reviewer),
            "classes": sorted(build.pairs.label_name.unique().tolist()),
            "similarity": [float(sims.min()), float(sims.max())],
            "funnel": build.stats["funnel"], "thresholds": build.stats["thresholds"],
            "labels": bool((build.pairs.label >= 0).any()),
            "estimate": None if sampling is None else {"target_pairs": sampling.target_pairs,
                                                       "half_width": sampling.half_width, "seed": sampling.seed},
        }

    @app.get("/api/estimate")
    def estimate_now() -> dict[str, Any]:
        if sampling is None:
            est = E.estimate_precision(build.pairs[["key", "similarity"]], store.read_reviews(build.dir))
            return {"estimate": est.as_dict()}
        return sampling.state(reviewer)

    @app.get("/api/estimate/next")
    def estimate_next() -> dict[str, Any]:
        if sampling is None:
            raise HTTPException(409, "this page was started without --estimate")
        state = sampling.state(reviewer)
        pair = None
        if state["next"] is not None:
            r = build.pairs.loc[state["next"]["pair_id"]]
            _, verdict = build.decisions(None)
            pair = pair_row(r, None, verdict)
        return {**state, "pair": pair}

    @app.get("/api/curve")
    def curve() -> dict[str, Any]:
        return review_curve(build)

    @app.get("/api/pairs")
    def pairs(label: str | None = None, min_similarity: float | None = None, max_similarity: float | None = None,
              disagree: bool = False, mutual: Literal["any", "yes", "no"] = "any", unreviewed: bool = False,
              order: Literal["pair", "similarity", "-similarity"] = "pair",
              offset: int = Query(0, ge=0), limit: int = Query(200, ge=1, le=5000)) -> dict[str, Any]:
        chosen = build.pairs
        if label:
            chosen = chosen[chosen.label_name == label]
        if min_similarity is not None:
            chosen = chosen[chosen.similarity >= min_similarity]
        if max_similarity is not None:
            chosen = chosen[chosen.similarity <= max_similarity]
        if disagree:
            chosen = chosen[chosen.disagree]
        if mutual != "any":
            chosen = chosen[chosen.mutual == (mutual == "yes")]
        mine, verdict = build.decisions(reviewer)
        decision = chosen.key.map(mine)
        if unreviewed:
            chosen, decision = chosen[decision.isna()], decision[decision.isna()]
        if order != "pair":
            by = chosen.similarity.sort_values(ascending=order == "similarity", kind="stable").index
            chosen, decision = chosen.loc[by], decision.loc[by]
        page_rows = chosen.iloc[offset: offset + limit]
        return {"total": len(chosen), "offset": offset, "pairs": [
            pair_row(r, d, verdict) for r, d in zip(page_rows.itertuples(), decision.iloc[offset: offset + limit])]}

    @app.post("/api/decision")
    def decide(body: Decision) -> dict[str, Any]:
        if body.pair_id not in build.pairs.index:
            raise HTTPException(404, f"no pair {body.pair_id} in this build")
        row = build.pairs.loc[body.pair_id]
        marks = sampling.marks(row.key) if sampling is not None else {}
        store.record(build.dir, [{"pair_id": body.pair_id, "anchor_key": row.anchor_key,
                                  "positive_key": row.positive_key, "decision": body.decision,
                                  "reviewer": reviewer, **marks}])
        answer = {"pair_id": body.pair_id, "decision": body.decision, "counts": counts(build, reviewer)}
        if sampling is not None:
            state = sampling.state(reviewer)
            answer.update(estimate=state["estimate"], judged=state["judged"], done=state["done"])
        return answer

    @functools.lru_cache(maxsize=512)
    def picture(image_id: int) -> bytes:
        img = load_image(build.source, build.keys[image_id])
        img.thumbnail((PICTURE_SIDE, PICTURE_SIDE))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    @app.get("/image/{image_id}.png")
    def image(image_id: int) -> Response:
        if image_id not in build.keys:
            raise HTTPException(404, f"no image {image_id} in this build")
        try:
            data = picture(image_id)
        except (BadImage, OSError) as exc:
            raise HTTPException(410, f"image {image_id} cannot be read now: {exc}") from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return app


def serve(build_dir: Path, host: str, port: int, reviewer: str, say=print, estimate: int | None = None,
          half_width: float = E.DEFAULT_HALF_WIDTH, seed: int = 0, allow_remote: bool = False) -> None:
    """Bind ``host:port`` (port 0: any free one), say the address, and serve until interrupted. Anything but a
    loopback address needs ``allow_remote``: the page has no authentication."""
    import uvicorn

    host = host.strip()
    if not host or not is_loopback(host):
        if not allow_remote:
            raise UserError(f"got {host!r}; accepted: a loopback address (127.0.0.1, ::1, localhost), or any "
                            "address with --allow-remote (the page has no authentication: anyone who reaches it "
                            "can read the build and record decisions)", option="--host")
        say(f"warning: serving on {host or 'every interface'} without authentication; anyone who reaches this "
            "port can read the build's pictures and record decisions")
    # Served beyond loopback, the names it is reached by are the network's: any Host, same-origin writes only.
    hosts = LOOPBACK_NAMES if host and is_loopback(host) else LOOPBACK_NAMES | {"*"}
    app = create_app(build_dir, reviewer, estimate, half_width, seed, hosts=hosts)
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", option="--port") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    say(f"review: http://{shown}:{bound}/ (reviewer {reviewer}; decisions go to {build_dir / layout.REVIEWS})")
    if estimate:
        say(f"estimate mode: pairs drawn at random (seed {seed}), stratified by similarity; stops at {estimate} "
            f"judged or an interval of +-{half_width}")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
