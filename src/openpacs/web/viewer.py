"""OHIF v3 hosting: install the prebuilt viewer from the npm package ``@ohif/app`` and serve it under ``/ohif/``.

The package's ``dist/`` is a complete production build, so no Node build is needed. That build hardcodes ``/`` as its
public path (``index.html`` asset URLs, webpack ``__webpack_require__.p``, one CSS font URL, the PWA manifest), so the
installer rewrites those few places to the URL prefix the server mounts it at, and checks that every rewrite happened:
a new OHIF version that moves things fails the install loudly instead of serving a half-broken viewer. The service
worker (it would precache the whole 200 MB build, ONNX runtime included) is replaced by a script that unregisters it.

``app-config.js`` is generated per request and points the viewer at this node's own DICOMweb root (same origin).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
# npm "dist.integrity" of the pinned tarball: verified whichever way the tarball was fetched.
OHIF_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
OHIF_PREFIX = "/ohif/"
MARKER = ".openpacs-ohif.json"
# bumped when patch_dist changes, so that installed trees are patched again (2: the microscopy viewer's import path;
# 3: _BUNDLE_FIXES, RT Dose frame positions and SR items without a concept name)
PATCH_LEVEL = 3
DEFAULT_REGISTRY = "https://registry.npmjs.org"

# Where the files are served from, and the browser-visible prefix, are both fixed at install time: the prefix is baked
# into the rewritten files, so the installed tree records it and the server checks it.
_COMPRESSIBLE = {".js", ".css", ".html", ".json", ".jsonc", ".svg", ".wasm", ".xml", ".map", ".webapp", ".txt"}
_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".jsonc": "application/json",
    ".map": "application/json",
    ".webapp": "application/x-web-app-manifest+json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
}
# Content-hashed build outputs never change under the same name: cache them for a year.
_IMMUTABLE = re.compile(r"(\.bundle\.[0-9a-f]{8,}\.js|^[0-9a-f]{16}\.(wasm|woff2))$")
# Never served: build leftovers and files replaced by generated ones.
_HIDDEN = {"_headers", "_redirects", "serve.json", "sw.js", MARKER}

_NOOP_SERVICE_WORKER = """\
// OpenPACS: the OHIF service worker is disabled (it would precache the whole viewer build).
// Unregister any worker left by an earlier deployment under this prefix.
if ('serviceWorker' in navigator) {
  navigator.serviceWorker.getRegistrations().then(function (registrations) {
    registrations.forEach(function (r) { r.unregister(); });
  }).catch(function () {});
}
"""


class OhifInstallError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------- install


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "openpacs"


def default_ohif_dir() -> Path:
    """User-level default install location, shared by every data directory of this user."""
    return default_cache_dir() / "ohif" / OHIF_VERSION


def find_ohif_dir(data_dir: Path | None = None, configured: Path | str | None = None) -> Path:
    """Where the server looks for the viewer: the setting, else OPENPACS_OHIF_DIR (either one is used as is), else the
    first of <data-dir>/ohif and the user default that holds an installed viewer (else <data-dir>/ohif, for messages)."""
    if configured:
        return Path(configured)
    env = os.environ.get("OPENPACS_OHIF_DIR")
    if env:
        return Path(env)
    candidates: list[Path] = []
    if data_dir is not None:
        candidates.append(Path(data_dir) / "ohif")
    candidates.append(default_ohif_dir())
    for c in candidates:
        if read_marker(c) is not None:
            return c
    return candidates[0]


def read_marker(dest: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((Path(dest) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not (Path(dest) / "index.html").is_file():
        return None
    return info


def _normalise_prefix(prefix: str) -> str:
    if not prefix.startswith("/") or any(c in prefix for c in "\"'<>\\ ?#") or ".." in prefix:
        raise ValueError(f"bad viewer URL prefix {prefix!r}: must be an absolute path like /ohif/")
    return prefix.rstrip("/") + "/"


def install_ohif(
    dest: Path | str | None = None,
    *,
    prefix: str = OHIF_PREFIX,
    version: str = OHIF_VERSION,
    integrity: str | None = None,
    cache_dir: Path | str | None = None,
    tarball: Path | str | None = None,
    force: bool = False,
    precompress: bool = True,
) -> Path:
    """Install the prebuilt OHIF viewer into ``dest`` (default: :func:`default_ohif_dir`), patched for ``prefix``.

    Idempotent: returns at once when ``dest`` already holds this version for this prefix. The npm tarball is cached in
    ``cache_dir`` (fetched with ``npm pack`` when npm is available, else straight from the registry) and its integrity
    checked against the pinned hash. The new tree is built beside ``dest`` and swapped in with a rename.
    """
    prefix = _normalise_prefix(prefix)
    dest = Path(dest) if dest is not None else default_ohif_dir()
    if integrity is None:
        integrity = OHIF_INTEGRITY if version == OHIF_VERSION else None
    info = read_marker(dest)
    if (not force and info and info.get("version") == version and info.get("prefix") == prefix
            and info.get("patch_level", 1) == PATCH_LEVEL):
        return dest

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "npm"
    tgz = Path(tarball) if tarball is not None else _fetch_tarball(version, cache)
    if integrity:
        _check_integrity(tgz, integrity)

    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    try:
        _extract_dist(tgz, work)
        patched = patch_dist(work, prefix)
        if precompress:
            _precompress(work)
        marker = {
            "package": OHIF_PACKAGE,
            "version": version,
            "prefix": prefix,
            "patched": patched,
            "integrity": integrity or "",
            "patch_level": PATCH_LEVEL,
        }
        (work / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            dest.rename(old)
        work.rename(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("installed OHIF %s into %s (prefix %s)", version, dest, prefix)
    return dest


def _fetch_tarball(version: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / f"ohif-app-{version}.tgz"
    if tgz.is_file() and tgz.stat().st_size > 0:
        return tgz
    npm = shutil.which("npm")
    if npm:
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            proc = subprocess.run(
                [npm, "pack", f"{OHIF_PACKAGE}@{version}", "--pack-destination", tmp, "--silent"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=900,
            )
            if proc.returncode != 0:
                raise OhifInstallError(f"npm pack {OHIF_PACKAGE}@{version} failed:\n{proc.stderr.strip()}")
            packed = Path(tmp) / f"ohif-app-{version}.tgz"
            if not packed.is_file():
                raise OhifInstallError(f"npm pack did not produce {packed.name}: {proc.stdout.strip()}")
            os.replace(packed, tgz)
        return tgz
    registry = os.environ.get("OPENPACS_NPM_REGISTRY", DEFAULT_REGISTRY).rstrip("/")
    url = f"{registry}/{OHIF_PACKAGE}/-/app-{version}.tgz"
    log.info("npm not found; downloading %s", url)
    part = tgz.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=120) as resp, open(part, "wb") as out:  # noqa: S310 (fixed https URL)
            shutil.copyfileobj(resp, out, 1 << 20)
        os.replace(part, tgz)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise OhifInstallError(f"could not download {url}: {exc}") from exc
    return tgz


def _check_integrity(tgz: Path, integrity: str) -> None:
    algo, _, expected = integrity.partition("-")
    h = hashlib.new(algo)
    with open(tgz, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if h.digest() != b64decode(expected):
        raise OhifInstallError(f"{tgz}: integrity mismatch (expected {integrity}); delete it and retry")


def _extract_dist(tgz: Path, work: Path) -> None:
    with tarfile.open(tgz, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith("package/dist/") or not (m.isfile() or m.isdir()):
                continue
            m.name = m.name[len("package/dist/") :]
            if m.name:
                members.append(m)
        if not any(m.name == "index.html" for m in members):
            raise OhifInstallError(f"{tgz}: no package/dist/index.html; not a built @ohif/app package")
        tar.extractall(work, members=members, filter="data")


@dataclass
class _Patch:
    pattern: str
    replacement: str
    required: bool = True  # at least one occurrence must exist


# Fixes of upstream bugs in the pinned build, as (what it fixes, the code as built, the code fixed). Each applies where
# its code is found verbatim, once in the whole build; a build without it (a later OHIF) is left alone, and the
# install logs it.
#
# RT Dose (OHIF 3.13 @ohif/core utils/combineFrameInstance): the frame positions of an RT Dose grid come from its Grid
# Frame Offset Vector (PS3.3 C.8.8.3.2), but the multi-frame branch before it also takes every NumberOfFrames > 1, so
# the RT Dose branch is never reached and every frame gets the first frame's position: the volume has zero slice
# spacing, and adding the dose as a foreground crashes the viewport ("Invalid typed array length: Infinity"). Once
# reached, that branch adds the offset to the already offset position of its cached frame object on every call, and
# reads a non-zero first offset (the absolute-z form) as relative; the fix adds (offset - first offset) to the grid's
# own Image Position (Patient), which covers both forms.
#
# SR (extension cornerstone-dicom-sr, OHIFCornerstoneSRContentItem): a content item without a Concept Name Code
# Sequence (type 1C: IMAGE and COMPOSITE items by reference may have none, e.g. pydicom's test-SR.dcm) threw in
# render and blanked the whole viewer; the fix shows such an item with an empty name, as its container code does.
_BUNDLE_FIXES: tuple[tuple[str, str, str], ...] = (
    (
        "RT Dose: frames positioned by Grid Frame Offset Vector",
        "hasDetectorButMissingSpatialInfo || NumberOfFrames > 1) {",
        "hasDetectorButMissingSpatialInfo || NumberOfFrames > 1 && !instance.GridFrameOffsetVector) {",
    ),
    (
        "RT Dose: offset from the grid's origin, once",
        "const origin = newInstance.ImagePositionPatient?.map(Number);\n"
        "    const orientation = newInstance.ImageOrientationPatient?.map(Number);\n"
        "    const offset = Number(instance.GridFrameOffsetVector[frameNumber - 1]);",
        "const origin = sharedInstance.ImagePositionPatient?.map(Number);\n"
        "    const orientation = newInstance.ImageOrientationPatient?.map(Number);\n"
        "    const offset = Number(instance.GridFrameOffsetVector[frameNumber - 1]) - "
        "Number(instance.GridFrameOffsetVector[0]);",
    ),
    (
        "SR: a content item without a Concept Name",
        "    CodeMeaning\n  } = ConceptNameCodeSequence;\n  const isChildFirstNode",
        "    CodeMeaning\n  } = ConceptNameCodeSequence ?? {};\n  const isChildFirstNode",
    ),
)


def _fix_bundles(root: Path, counts: dict[str, int]) -> None:
    """Apply :data:`_BUNDLE_FIXES` to the build's JavaScript (each where its code is, once)."""
    texts = {js: js.read_text(encoding="utf-8", errors="surrogateescape") for js in sorted(root.glob("*.js"))}
    changed: dict[Path, int] = {}
    for what, built, fixed in _BUNDLE_FIXES:
        where = [js for js, text in texts.items() if built in text]
        if len(where) != 1 or texts[where[0]].count(built) != 1:
            log.warning("OHIF build: %s not applied (its code found %d times)", what,
                        sum(t.count(built) for t in texts.values()))
            continue
        texts[where[0]] = texts[where[0]].replace(built, fixed)
        changed[where[0]] = changed.get(where[0], 0) + 1
    for js, n in changed.items():
        js.write_text(texts[js], encoding="utf-8", errors="surrogateescape")
        counts[f"fixes:{js.name}"] = n


def patch_dist(root: Path, prefix: str) -> dict[str, int]:
    """Rewrite the build's absolute ``/`` public path to ``prefix`` and apply :data:`_BUNDLE_FIXES`; returns
    replacement counts per file."""
    prefix = _normalise_prefix(prefix)
    counts: dict[str, int] = {}
    _fix_bundles(root, counts)

    def apply(path: Path, patches: list[_Patch]) -> None:
        text = path.read_text(encoding="utf-8")
        total = 0
        for p in patches:
            text, n = re.subn(p.pattern, p.replacement, text)
            if p.required and n == 0:
                raise OhifInstallError(f"OHIF build layout changed: {p.pattern!r} not found in {path.name}")
            total += n
        path.write_text(text, encoding="utf-8")
        counts[path.relative_to(root).as_posix()] = total

    (root / "init-service-worker.js").write_text(_NOOP_SERVICE_WORKER)
    (root / "sw.js").unlink(missing_ok=True)
    if prefix == "/":
        return counts
    p = re.escape(prefix)
    esc = prefix.replace("\\", "\\\\")
    apply(
        root / "index.html",
        [
            _Patch(r'((?:href|src)=")/(?!/)', rf"\g<1>{esc}"),
            _Patch(r'window\.PUBLIC_URL="/"', f'window.PUBLIC_URL="{esc}"'),
            _Patch(r'(content=")/assets/', rf"\g<1>{esc}assets/", required=False),
        ],
    )
    leftovers = re.findall(r'(?:href|src|content)="/(?!/)(?!' + p[1:] + r")", (root / "index.html").read_text())
    if leftovers:
        raise OhifInstallError(f"index.html still has root-relative URLs after patching: {leftovers[:3]}")
    for js in sorted(root.glob("*.js")):
        text = js.read_text(encoding="utf-8", errors="surrogateescape")
        n = 0
        if '__webpack_require__.p = "/";' in text:
            text = text.replace('__webpack_require__.p = "/";', f'__webpack_require__.p = "{esc}";')
            n += 1
        # the microscopy extension imports its viewer from a hard-coded root path (not the webpack public path)
        text, m = re.subn(r"(['\"])/dicom-microscopy-viewer/", rf"\g<1>{esc}dicom-microscopy-viewer/", text)
        n += m
        if n:
            js.write_text(text, encoding="utf-8", errors="surrogateescape")
            counts[js.name] = n
    if not any(k.startswith("app.bundle.") for k in counts):
        raise OhifInstallError("OHIF build layout changed: webpack public path not found in app.bundle")
    for css in sorted(root.glob("*.css")):
        text = css.read_text(encoding="utf-8")
        new, n = re.subn(r"url\(([\"']?)/(?!/)", rf"url(\g<1>{esc}", text)
        if n:
            css.write_text(new, encoding="utf-8")
            counts[css.name] = n
    for manifest in (
        root / "manifest.json",
        root / "assets" / "manifest.webapp",
        root / "assets" / "yandex-browser-manifest.json",
    ):
        if manifest.is_file():
            text = manifest.read_text(encoding="utf-8")
            new, n = re.subn(r'"/assets/', f'"{esc}assets/', text)
            if n:
                manifest.write_text(new, encoding="utf-8")
                counts[manifest.relative_to(root).as_posix()] = n
    return counts


def _precompress(root: Path) -> None:
    """Write ``.gz`` siblings of the large text/wasm assets the viewer loads (not the rarely used ONNX runtime)."""
    for path in root.rglob("*"):
        if (
            path.is_file()
            and path.suffix in _COMPRESSIBLE
            and path.stat().st_size >= 1024
            and path.relative_to(root).parts[0] != "ort"
        ):
            data = path.read_bytes()
            packed = gzip.compress(data, compresslevel=6, mtime=0)
            if len(packed) < len(data) * 0.9:
                path.with_name(path.name + ".gz").write_bytes(packed)


# ----------------------------------------------------------------------------------------------------------- serve


def app_config_js(
    dicomweb_root: str, *, wado_uri_root: str | None = None, router_basename: str = "/ohif", name: str = "OpenPACS"
) -> str:
    """The ``window.config`` for OHIF, pointing at a DICOMweb root on the same origin as the page."""
    wado_uri = wado_uri_root if wado_uri_root is not None else dicomweb_root + "/wado"
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "openpacs",
        "configuration": {
            "friendlyName": name,
            "name": "openpacs",
            "qidoRoot": "__ORIGIN__" + dicomweb_root,
            "wadoRoot": "__ORIGIN__" + dicomweb_root,
            "wadoUriRoot": "__ORIGIN__" + wado_uri,
            "qidoSupportsIncludeField": True,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        },
    }
    config = {
        "name": "openpacs",
        "routerBasename": router_basename,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 75, "prefetch": 25},
        "showErrorDetails": "production",
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "openpacs",
        "dataSources": [source],
    }
    body = json.dumps(config, indent=2).replace('"__ORIGIN__', 'window.location.origin + "')
    # json.dumps escapes "<", so the values cannot close a <script>; roots come from our own settings anyway.
    return "/** Generated by OpenPACS. */\nwindow.config = " + body + ";\n"


class OhifApp:
    """ASGI app serving an installed OHIF tree: static files, generated config, SPA fallback to index.html."""

    def __init__(
        self,
        root: Path,
        *,
        prefix: str = OHIF_PREFIX,
        dicomweb_path: str = "/dicom-web",
        wado_uri_path: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.prefix = _normalise_prefix(prefix)
        self.dicomweb_path = dicomweb_path
        self.wado_uri_path = wado_uri_path
        self._index: bytes | None = None
        self._checked: tuple[float, str | None] | None = None
        self._rewritten: frozenset[str] | None = None

    def _problem(self) -> str | None:
        """Why the viewer cannot be served (not installed, or installed for another prefix), else None."""
        info = read_marker(self.root)
        if info is None:
            return (
                f"The OHIF viewer is not installed in {self.root}.\n"
                f"Install it with: openpacs install-viewer  (or python -m openpacs.web.viewer {self.root})\n"
            )
        if info.get("prefix") != self.prefix:
            return (
                f"The OHIF viewer in {self.root} was installed for URL prefix {info.get('prefix')!r}, "
                f"but is served at {self.prefix!r}. Reinstall it with: openpacs install-viewer --force\n"
            )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = self.respond(request)
        await response(scope, receive, send)

    def respond(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return PlainTextResponse("Method Not Allowed", status_code=405, headers={"Allow": "GET, HEAD"})
        root_path = request.scope.get("root_path", "")
        rel = request.scope["path"][len(root_path) :] if request.scope["path"].startswith(root_path) else ""
        if rel == "":
            query = request.url.query
            return RedirectResponse(request.scope["path"] + "/" + ("?" + query if query else ""), status_code=308)
        problem = self._problem()
        if problem:
            return PlainTextResponse(problem, status_code=503, headers={"Cache-Control": "no-store"})
        rel = rel.lstrip("/")
        if rel == "app-config.js":
            outer_root = self._outer_root(request)
            return Response(
                app_config_js(
                    outer_root + self.dicomweb_path,
                    wado_uri_root=(outer_root + self.wado_uri_path) if self.wado_uri_path else None,
                    router_basename=outer_root + self.prefix.rstrip("/"),
                ),
                media_type="text/javascript; charset=utf-8",
                headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
            )
        path = self._lookup(rel)
        if path is None:
            last = posixpath.basename(rel)
            segments = rel.split("/")
            if ("." in last and not rel.endswith(".html")) or segments[0] in _HIDDEN or ".." in segments:
                return PlainTextResponse("Not Found", status_code=404)
            return self._index_response()
        if path.name == "index.html":
            return self._index_response()
        return self._file_response(request, path)

    def _outer_root(self, request: Request) -> str:
        """Path before our prefix as the browser sees it (a reverse proxy's --root-path), without trailing slash."""
        app_root = request.scope.get("app_root_path", "")
        return str(app_root).rstrip("/")

    def _lookup(self, rel: str) -> Path | None:
        norm = posixpath.normpath(rel)
        if norm.startswith("..") or norm.startswith("/") or "\\" in rel or "\x00" in rel:
            return None
        parts = norm.split("/")
        if parts[0] in _HIDDEN or any(p.startswith(".") for p in parts):
            return None
        path = self.root / norm
        if not path.is_file():
            return None
        try:
            path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return None
        return path

    def _index_response(self) -> Response:
        if self._index is None:
            self._index = (self.root / "index.html").read_bytes()
        return Response(self._index, media_type="text/html; charset=utf-8", headers=_html_headers())

    def _changed_at_install(self) -> frozenset[str]:
        """The files install_ohif rewrote (prefix, bundle fixes): their names are upstream's content hashes, which
        no longer name their content, so a browser must revalidate them (ETag) rather than keep an older install's."""
        if self._rewritten is None:
            patched = (read_marker(self.root) or {}).get("patched") or {}
            self._rewritten = frozenset(k.split(":", 1)[-1] for k in patched)
        return self._rewritten

    def _file_response(self, request: Request, path: Path) -> Response:
        media_type = _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
        immutable = _IMMUTABLE.search(path.name) and path.relative_to(self.root).as_posix() not in self._changed_at_install()
        headers = {
            "Cache-Control": "public, max-age=31536000, immutable" if immutable else "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Cross-Origin-Resource-Policy": "same-origin",
            "Vary": "Accept-Encoding",
        }
        if path.suffix == ".html":
            headers.update(_html_headers())
        elif path.suffix == ".js":
            # Worker scripts of a cross-origin isolated page must carry the same policies or Chromium blocks them.
            headers.update({k: v for k, v in _html_headers().items() if k.startswith("Cross-Origin")})
        gz = path.with_name(path.name + ".gz")
        if "gzip" in request.headers.get("accept-encoding", "") and gz.is_file():
            headers["Content-Encoding"] = "gzip"
            path = gz
        # stat up front so FileResponse sets ETag/Last-Modified now and the 304 check can see them
        return _conditional(
            request, FileResponse(path, media_type=media_type, headers=headers, stat_result=os.stat(path))
        )


def _html_headers() -> dict[str, str]:
    # COOP/COEP make the page cross-origin isolated, which OHIF needs for SharedArrayBuffer (volume/MPR rendering).
    return {
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Embedder-Policy": "require-corp",
        "Referrer-Policy": "same-origin",
        "X-Frame-Options": "SAMEORIGIN",
    }


def _conditional(request: Request, response: FileResponse) -> Response:
    """304 when the browser's validator still matches (FileResponse computes ETag/Last-Modified itself)."""
    etag = response.headers.get("etag")
    inm = request.headers.get("if-none-match")
    if etag and inm and etag in [t.strip() for t in inm.split(",")]:
        keep = {
            k: v
            for k, v in response.headers.items()
            if k in ("etag", "cache-control", "vary", "content-encoding", "last-modified")
        }
        return Response(status_code=304, headers=keep)
    return response


def viewer_routes(
    ctx: Any = None,
    *,
    ohif_dir: Path | str | None = None,
    prefix: str = OHIF_PREFIX,
    dicomweb_path: str = "/dicom-web",
    wado_uri_path: str | None = None,
) -> list[BaseRoute]:
    """Routes to include in the node's Starlette app: the viewer under ``prefix`` and ``/viewer`` → ``prefix/viewer``.

    ``ctx`` is the node's Context; its settings give the data directory (and ``ohif_dir`` once Settings has one).
    """
    prefix = _normalise_prefix(prefix)
    settings = getattr(ctx, "settings", None)
    root = find_ohif_dir(getattr(settings, "data_dir", None), ohif_dir or getattr(settings, "ohif_dir", None))
    app = OhifApp(root, prefix=prefix, dicomweb_path=dicomweb_path, wado_uri_path=wado_uri_path)
    mount = prefix.rstrip("/")

    async def viewer_shortcut(request: Request) -> Response:
        query = request.url.query
        return RedirectResponse(
            f"{request.scope.get('root_path', '')}{mount}/viewer" + ("?" + query if query else ""), status_code=307
        )

    return [Route("/viewer", viewer_shortcut, methods=["GET", "HEAD"]), Mount(mount, app=app)]


def viewer_url(study_instance_uid: str, prefix: str = OHIF_PREFIX) -> str:
    from urllib.parse import quote

    return f"{_normalise_prefix(prefix)}viewer?StudyInstanceUIDs={quote(study_instance_uid, safe='')}"


def main(argv: list[str] | None = None, *, out: Callable[[str], Any] = print) -> int:
    """``python -m openpacs.web.viewer [DEST] [--force] [--prefix /ohif/]``: install the viewer (for scripts/CI)."""
    import argparse

    parser = argparse.ArgumentParser(prog="openpacs-install-viewer", description=f"Install OHIF {OHIF_VERSION}")
    parser.add_argument(
        "dest",
        nargs="?",
        type=Path,
        default=None,
        help=f"install directory (default: $OPENPACS_OHIF_DIR or {default_ohif_dir()})",
    )
    parser.add_argument("--prefix", default=OHIF_PREFIX, help="URL prefix the viewer is served at (default /ohif/)")
    parser.add_argument("--tarball", type=Path, default=None, help="use this @ohif/app .tgz instead of fetching it")
    parser.add_argument("--force", action="store_true", help="reinstall even when already present")
    args = parser.parse_args(argv)
    dest = args.dest or (Path(os.environ["OPENPACS_OHIF_DIR"]) if os.environ.get("OPENPACS_OHIF_DIR") else None)
    try:
        path = install_ohif(dest, prefix=args.prefix, tarball=args.tarball, force=args.force)
    except (OhifInstallError, ValueError, OSError) as exc:
        out(f"error: {exc}")
        return 1
    out(f"OHIF {OHIF_VERSION} installed in {path} (served at {_normalise_prefix(args.prefix)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
