"""`create_app(store, version)`: the read-only web app over one dataset version.

Two pages, both GET: `/` (the grid: filters, sort and page live in the query string, so a view is a
URL) and `/face/{face_id}` (one face: the whole image with its box, every candidate label, every
feature and the rule's decision). No route takes a path: faces are found by face_id in the
version's shards, images come from the face's own row. The docs / OpenAPI routes are off.
"""

from __future__ import annotations

import math
import socket
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

from pipeline.browse.images import ImageUnavailable, data_uri, points_path, read_image
from pipeline.browse.queries import PAGE_SIZE, STATUSES, BadView, VersionFaces, View, format_number
from pipeline.browse.templates import ENV, render
from pipeline.landmarks import YAW_BINS
from pipeline.store.layout import Store

# The label first, then the other landmarkers' opinions, then the reference: distinct on a photo.
_COLORS = ("#39ff14", "#ff3df0", "#00e5ff", "#ffb300", "#ff5252", "#b388ff", "#ffffff")
_HEAVY = {"crop", "landmarks", "landmark_scores", "alt_landmarks", "params_62", "ref_landmarks", "ref_params",
          "crop_affine"}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _url(path: str, params: list[tuple[str, str]]) -> str:
    return path + ("?" + urlencode(params) if params else "")


def face_href(face_id: str, view: View) -> str:
    return _url(f"/face/{quote(face_id, safe='')}", view.to_params())


def _card(row: dict, view: View, sort: str) -> dict:
    return {
        "face_id": row["face_id"], "source": row.get("source"), "keep": row.get("keep"),
        "reason": row.get("reject_reason"), "sort_value": _fmt(row.get(sort)),
        "href": face_href(row["face_id"], view),
        "crop": data_uri(row["crop"], "image/jpeg") if row.get("crop") else "",
        "error": row.get("_error") or "",
        "points": points_path(row.get("landmarks"), row.get("crop_affine")),
    }


def _range_inputs(columns: list[str], view: View) -> list[tuple[str, str, str]]:
    """(column, min, max) for the form's range inputs, the view's bounds filled in."""
    shown = {c: tuple("" if b is None else format_number(b) for b in (lo, hi)) for c, lo, hi in view.ranges}
    return [(c, *shown.get(c, ("", ""))) for c in columns]


def _candidates(face: dict) -> list[dict]:
    """The face's label, every alt_landmarks entry, and the reference where there is one."""
    label = f"{face.get('landmarker') or 'label'} (label)"
    out = [{"name": label, "points": face.get("landmarks"), "note": ""}]
    for alt in face.get("alt_landmarks") or []:
        out.append({"name": str(alt.get("name")), "points": alt.get("points"), "note": "second opinion"})
    if face.get("ref_landmarks") is not None:
        out.append({"name": "reference", "points": face["ref_landmarks"], "note": "from the source's labels"})
    for i, c in enumerate(out):
        c["color"] = _COLORS[i % len(_COLORS)]
        c["path"] = points_path(c.pop("points"))
    return out


def create_app(store: Store, version: int | None = None) -> FastAPI:
    faces = VersionFaces(store, version)
    faces.facets()  # the form's choices and the templates are ready before the first request
    for name in ("grid", "face", "message"):
        ENV.get_template(name)
    app = FastAPI(title=f"facecurate browse {faces.ref}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.faces = faces

    def page(status: int, title: str, message: str) -> HTMLResponse:
        return HTMLResponse(render("message", title=title, message=message, home="/"), status_code=status)

    @app.exception_handler(BadView)
    async def bad_view(request: Request, err: BadView):
        return page(400, "bad view", str(err))

    @app.get("/", response_class=HTMLResponse)
    def grid(request: Request):
        result = faces.page(View.from_params(request.query_params.multi_items()))
        view = result.view  # past the end: the last page
        facets = faces.facets()
        multi = [("source", facets["source"]), ("split", facets["split"]), ("reason", facets["reason"]),
                 ("yaw", list(YAW_BINS))]
        has_next = view.page < result.pages
        return render(
            "grid", ref=faces.ref, view=view, page=result, faces_total=facets["faces"],
            unavailable=faces.unavailable, multi_filters=multi, statuses=STATUSES,
            selected={"source": view.source, "split": view.split, "reason": view.reason, "yaw": view.yaw},
            sortable=faces.float_columns, default_sort=faces.default_sort, page_size=PAGE_SIZE,
            range_inputs=_range_inputs(faces.float_columns, view),
            cards=[_card(r, view, result.sort) for r in result.rows],
            prev_href=_url("/", view.to_params(page=view.page - 1)) if view.page > 1 else "",
            next_href=_url("/", view.to_params(page=view.page + 1)) if has_next else "",
        )

    @app.get("/face/{face_id}", response_class=HTMLResponse)
    def face_page(face_id: str, request: Request):
        view = View.from_params(request.query_params.multi_items())
        face = faces.face(face_id)
        if face is None:
            note = f" ({sum(s['rows'] for s in faces.unavailable)} faces are in unreadable shards)" \
                if faces.unavailable else ""
            return page(404, "no such face", f"{faces.ref} has no readable face {face_id!r}{note}")
        if face["_error"]:  # its shard went unreadable after opening
            return page(503, "face unavailable",
                        f"{face_id}: its shard cannot be read now ({face['_error']})")
        image, image_error = "", ""
        try:
            image = data_uri(*read_image(face["uri"]))
        except ImageUnavailable as err:
            image_error = str(err)
        left, top, right, bottom = face["bbox"]
        scalars = [(k, v) for k, v in face.items() if k not in _HEAVY and not k.startswith("_")]
        float_names = set(faces.float_columns)
        return render(
            "face", ref=faces.ref, face=face, back_href=_url("/", view.to_params()),
            remote_href=face["uri"] if face["uri"].startswith(("http://", "https://")) else "",
            weight=_fmt(face.get("weight")), image=image, image_error=image_error,
            box=(left, top, right - left, bottom - top),
            stroke=max(1.0, max(face["width"], face["height"]) / 400),
            candidates=_candidates(face), crop=data_uri(face["crop"], "image/jpeg"),
            features=[(k, _fmt(v)) for k, v in scalars if k in float_names],
            fields=[(k, _fmt(v)) for k, v in scalars if k not in float_names],
        )

    return app


class PortTaken(ValueError):
    pass


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts: a taken port is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn does: a server restarted at once can rebind; a port someone listens on still fails.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise PortTaken(f"cannot listen on {host}:{port} ({err.strerror or err}); "
                        f"is another server using it? pick another with --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(store: Store, version: int | None, host: str = "127.0.0.1", port: int = 8765,
          on_ready=None) -> None:
    """Serve the app until interrupted."""
    import uvicorn

    sock = bind(host, port)
    app = create_app(store, version)
    if on_ready:
        on_ready(f"http://{host}:{sock.getsockname()[1]}/", app.state.faces)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
