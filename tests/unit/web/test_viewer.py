"""OHIF install (patching a prebuilt dist for a URL prefix) and serving, on a miniature fake @ohif/app package."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from openpacs.web import viewer
from openpacs.web.viewer import MARKER, OhifInstallError, app_config_js, install_ohif, viewer_routes

INDEX = (
    '<!doctype html><html><head><meta name="msapplication-TileImage" content="/assets/mstile-144x144.png">'
    '<script>console.time("scriptToView"),window.PUBLIC_URL="/"</script><link rel="manifest" href="/manifest.json">'
    '<script rel="preload" as="script" src="/app-config.js"></script>'
    '<script>function browserImportFunction(n){return import(n)}window.PUBLIC_URL="/"</script>'
    '<script defer src="/app.bundle.0123456789abcdef.js"></script><link href="/app.bundle.css" rel="stylesheet">'
    '</head><body><div id="root"></div></body></html>'
)
BUNDLE = '(() => {\n__webpack_require__.p = "/";\n})();\n' + "console.log('x');\n" * 200
FILES = {
    "index.html": INDEX,
    "app.bundle.0123456789abcdef.js": BUNDLE,
    "1234.bundle.fedcba9876543210.js": "console.log('a chunk install_ohif leaves as built');\n" * 50,
    "app.bundle.css": "@font-face{src:url(/a34f9d1faa5f3315.woff2)}" + "body{color:red}" * 100,
    "manifest.json": json.dumps({"icons": [{"src": "/assets/a.png"}], "start_url": "./index.html"}),
    "app-config.js": "window.config = {};",
    "init-service-worker.js": "navigator.serviceWorker.register('/sw.js')",
    "sw.js": "precache([{url:'/app.bundle.css'}])",
    "_redirects": "/* /index.html 200",
    "0ddf166f7a343eda.wasm": "\0asm" + "\0" * 2000,
    "assets/a.png": "png",
}


def make_tarball(path: Path, files: dict[str, str] = FILES) -> tuple[Path, str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in {"package/package.json": "{}", **{f"package/dist/{k}": v for k, v in files.items()}}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path, "sha512-" + base64.b64encode(hashlib.sha512(buf.getvalue()).digest()).decode()


@pytest.fixture
def installed(tmp_path) -> Path:
    tgz, integrity = make_tarball(tmp_path / "app.tgz")
    return install_ohif(tmp_path / "ohif", tarball=tgz, integrity=integrity)


def test_install_patches_public_path(installed: Path):
    index = (installed / "index.html").read_text()
    assert 'window.PUBLIC_URL="/ohif/"' in index and 'window.PUBLIC_URL="/"' not in index
    assert 'src="/ohif/app-config.js"' in index and 'href="/ohif/manifest.json"' in index
    assert 'content="/ohif/assets/mstile-144x144.png"' in index
    assert '__webpack_require__.p = "/ohif/";' in (installed / "app.bundle.0123456789abcdef.js").read_text()
    assert "url(/ohif/a34f9d1faa5f3315.woff2)" in (installed / "app.bundle.css").read_text()
    assert '"/ohif/assets/a.png"' in (installed / "manifest.json").read_text()
    assert not (installed / "sw.js").exists()
    assert "unregister" in (installed / "init-service-worker.js").read_text()
    assert gzip.decompress((installed / "app.bundle.0123456789abcdef.js.gz").read_bytes()).decode().startswith("(()")
    marker = json.loads((installed / MARKER).read_text())
    assert marker["prefix"] == "/ohif/" and marker["version"] == viewer.OHIF_VERSION


def test_install_is_idempotent_and_reinstalls_for_another_prefix(tmp_path, installed: Path):
    before = (installed / MARKER).stat().st_mtime_ns
    assert install_ohif(installed, tarball=tmp_path / "missing.tgz") == installed  # no fetch, no work
    assert (installed / MARKER).stat().st_mtime_ns == before
    tgz, integrity = make_tarball(tmp_path / "app2.tgz")
    install_ohif(installed, tarball=tgz, integrity=integrity, prefix="/pacs/viewer")
    assert 'window.PUBLIC_URL="/pacs/viewer/"' in (installed / "index.html").read_text()
    assert not list(tmp_path.glob(".ohif.*"))  # no leftovers of the swap


def test_install_checks_integrity(tmp_path):
    tgz, _ = make_tarball(tmp_path / "app.tgz")
    bad = "sha512-" + base64.b64encode(b"\0" * 64).decode()
    with pytest.raises(OhifInstallError, match="integrity"):
        install_ohif(tmp_path / "ohif", tarball=tgz, integrity=bad)
    assert not (tmp_path / "ohif").exists()


def test_install_fails_loudly_when_the_build_layout_changes(tmp_path):
    files = dict(FILES)
    files["app.bundle.0123456789abcdef.js"] = "__webpack_require__.p = window.X;"
    tgz, integrity = make_tarball(tmp_path / "app.tgz", files)
    with pytest.raises(OhifInstallError, match="public path"):
        install_ohif(tmp_path / "ohif", tarball=tgz, integrity=integrity)
    assert not (tmp_path / "ohif").exists() and not list(tmp_path.glob(".ohif.new-*"))


@pytest.mark.parametrize("prefix", ["ohif", "/a b/", "/x/../y/", '/x"/'])
def test_bad_prefix_rejected(tmp_path, prefix):
    with pytest.raises(ValueError):
        install_ohif(tmp_path / "ohif", prefix=prefix, tarball=tmp_path / "none.tgz")


def test_app_config_points_at_same_origin_dicomweb():
    js = app_config_js("/dicom-web", wado_uri_root="/wado")
    assert 'window.location.origin + "/dicom-web"' in js and 'window.location.origin + "/wado"' in js
    assert '"routerBasename": "/ohif"' in js
    assert '"namespace": "@ohif/extension-default.dataSourcesModule.dicomweb"' in js
    for flag in (
        '"qidoSupportsIncludeField": true',
        '"imageRendering": "wadors"',
        '"staticWado": false',
        '"omitQuotationForMultipartRequest": true',
        '"enableStudyLazyLoad": true',
    ):
        assert flag in js


def client_for(root: Path) -> TestClient:
    return TestClient(Starlette(routes=viewer_routes(None, ohif_dir=root, wado_uri_path="/wado")))


def test_serving(installed: Path):
    c = client_for(installed)
    r = c.get("/ohif/viewer?StudyInstanceUIDs=1.2.3")
    assert r.status_code == 200 and 'window.PUBLIC_URL="/ohif/"' in r.text
    assert r.headers["cross-origin-embedder-policy"] == "require-corp"
    assert r.headers["cache-control"] == "no-cache"
    r = c.get("/ohif/")
    assert r.status_code == 200 and '<div id="root">' in r.text
    r = c.get("/ohif/1234.bundle.fedcba9876543210.js")  # as built: its hashed name names its content
    assert r.headers["content-type"].startswith("text/javascript") and "immutable" in r.headers["cache-control"]
    r = c.get("/ohif/app.bundle.0123456789abcdef.js")  # rewritten at install: revalidated, never kept a year
    assert r.headers["content-type"].startswith("text/javascript") and r.headers["cache-control"] == "no-cache"
    assert r.headers["content-encoding"] == "gzip" and r.headers["cross-origin-embedder-policy"] == "require-corp"
    assert '__webpack_require__.p = "/ohif/"' in r.text
    r2 = c.get("/ohif/app.bundle.0123456789abcdef.js", headers={"If-None-Match": r.headers["etag"]})
    assert r2.status_code == 304
    r = c.get("/ohif/0ddf166f7a343eda.wasm")
    assert r.headers["content-type"] == "application/wasm"
    r = c.get("/ohif/app-config.js")
    assert 'window.location.origin + "/dicom-web"' in r.text and r.headers["cache-control"] == "no-cache"
    assert "window.config = {};" not in r.text
    for bad in (
        "/ohif/sw.js",
        "/ohif/_redirects",
        f"/ohif/{MARKER}",
        "/ohif/missing.js",
        "/ohif/..%2f..%2fetc/passwd",
        "/ohif/assets/../../x.js",
    ):
        assert c.get(bad).status_code == 404, bad
    r = c.get("/viewer?StudyInstanceUIDs=1.2.3", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ohif/viewer?StudyInstanceUIDs=1.2.3"
    assert c.post("/ohif/").status_code == 405


def test_not_installed_or_wrong_prefix_is_a_clear_503(tmp_path, installed: Path, monkeypatch):
    monkeypatch.delenv("OPENPACS_OHIF_DIR", raising=False)
    r = client_for(tmp_path / "nothing").get("/ohif/viewer")
    assert r.status_code == 503 and "install-viewer" in r.text
    c = TestClient(Starlette(routes=viewer_routes(None, ohif_dir=installed, prefix="/other/")))
    r = c.get("/other/viewer")
    assert r.status_code == 503 and "--force" in r.text


def test_find_ohif_dir_prefers_configured_then_env_then_data_dir(tmp_path, installed: Path, monkeypatch):
    monkeypatch.delenv("OPENPACS_OHIF_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "data"
    assert viewer.find_ohif_dir(data) == data / "ohif"  # nothing installed anywhere: the first choice, for messages
    assert viewer.find_ohif_dir(data, configured=tmp_path / "x") == tmp_path / "x"  # explicit: used as is
    monkeypatch.setenv("OPENPACS_OHIF_DIR", str(installed))
    assert viewer.find_ohif_dir(data) == installed
    monkeypatch.delenv("OPENPACS_OHIF_DIR")
    user_default = viewer.default_ohif_dir()
    user_default.parent.mkdir(parents=True)
    installed.rename(user_default)
    assert viewer.find_ohif_dir(data) == user_default  # installed once per user, found from any data dir


def test_install_fixes_the_rt_dose_frame_positions(tmp_path):
    """The upstream RT Dose bug fixes apply to the app bundle where its code is as built (the real build is checked in
    Chromium: tests/integration/test_rt_dose_overlay.py), and a build without that code installs unchanged."""
    files = dict(FILES)
    files["app.bundle.0123456789abcdef.js"] = BUNDLE + "".join(built + "\n" for _what, built, _fixed in viewer._BUNDLE_FIXES)
    tgz, integrity = make_tarball(tmp_path / "app.tgz", files)
    text = (install_ohif(tmp_path / "ohif", tarball=tgz, integrity=integrity) / "app.bundle.0123456789abcdef.js").read_text()
    for _what, built, fixed in viewer._BUNDLE_FIXES:
        assert fixed in text and built not in text
    assert "NumberOfFrames > 1 && !instance.GridFrameOffsetVector" in text
    assert "- Number(instance.GridFrameOffsetVector[0])" in text
    marker = json.loads((tmp_path / "ohif" / MARKER).read_text())
    assert marker["patched"]["fixes:app.bundle.0123456789abcdef.js"] == len(viewer._BUNDLE_FIXES)
    assert marker["patch_level"] == viewer.PATCH_LEVEL


def test_install_without_the_upstream_code_leaves_the_bundle_alone(installed: Path):
    marker = json.loads((installed / MARKER).read_text())
    assert not any(k.startswith("fixes:") for k in marker["patched"])
    assert "GridFrameOffsetVector" not in (installed / "app.bundle.0123456789abcdef.js").read_text()


def test_cli_install_viewer_takes_its_options_first(tmp_path, monkeypatch):
    """`openpacs install-viewer --force` (options before DEST) reaches the installer: argparse's REMAINDER refused it."""
    from openpacs.cli.main import main

    calls = []
    monkeypatch.setattr(viewer, "install_ohif", lambda dest, **kw: calls.append((dest, kw)) or tmp_path / "ohif")
    assert main(["install-viewer", "--force", "--prefix", "/pacs/", str(tmp_path / "ohif")]) == 0
    assert calls == [(tmp_path / "ohif", {"prefix": "/pacs/", "tarball": None, "force": True})]
