"""Hostile DICOM values (script tags, quotes, unicode, control characters) are escaped in every page; served files
have their preamble zeroed (no PE/ELF polyglot)."""

from __future__ import annotations

import io

from pydicom import dcmread
from starlette.testclient import TestClient

from openpacs.services.types import Source
from openpacs.web.app import build_app

from .conftest import bearer, part10

HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(2)>',
    "'; DROP TABLE studies; --",
    "Zoë^Ωμέγα^中文",
    "</title><svg/onload=alert(3)>",
]


def test_hostile_values_escaped_in_pages(world) -> None:
    ctx = world.ctx
    for i, value in enumerate(HOSTILE):
        data, *_ = part10("CT", f"HOST{i:02d}", patient_name=value[:60], description=value[:60])
        assert ctx.ingest.store_file(data, Source(protocol="TEST")).ok
    client = TestClient(build_app(ctx))
    pages = [
        client.get("/ui/studies", headers=bearer(world.tokens["admin"])),
        client.get("/ui/studies?PatientName=*script*", headers=bearer(world.tokens["admin"])),
        client.get("/login?next=%22%3E%3Cscript%3Ealert(1)%3C/script%3E"),
        client.get("/logout", headers=bearer(world.tokens["admin"])),
        client.get("/admin/audit?format=xml", headers=bearer(world.tokens["admin"])),
    ]
    for r in pages:
        assert r.status_code in (200, 303), r.status_code
        body = r.text
        for needle in ("<script>", "<img", "<svg", "onerror=alert(2)>", '"><img'):
            assert needle not in body, (r.url, needle)
        csp = r.headers.get("content-security-policy", "")
        assert "script-src 'unsafe-inline'" not in csp
    page = pages[0].text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Ωμέγα" in page and "中文" in page
    # the JSON APIs are typed, not HTML: served as JSON with nosniff, never as text/html
    r = client.get("/dicom-web/studies?PatientName=*script*", headers=bearer(world.tokens["admin"]))
    assert r.headers["content-type"].startswith("application/dicom+json")
    assert r.headers["x-content-type-options"] == "nosniff"


def test_served_files_have_zeroed_preamble(world) -> None:
    client = TestClient(build_app(world.ctx))
    st, se, sop = world.studies["radiology"]
    stored = world.ctx.retrieve.read_file(world.ctx.retrieve.list_instances(st, se, sop)[0])
    assert bytes(stored[:2]) == b"MZ"  # stored as received...
    r = client.get(
        f"/wado?requestType=WADO&studyUID={st}&seriesUID={se}&objectUID={sop}&contentType=application/dicom",
        headers=bearer(world.tokens["admin"]),
    )
    assert r.status_code == 200
    assert r.content[:128] == b"\0" * 128 and r.content[128:132] == b"DICM"  # ...but never served with it
    r = client.get(
        f"/dicom-web/studies/{st}/series/{se}/instances/{sop}",
        headers={**bearer(world.tokens["admin"]), "Accept": 'multipart/related; type="application/dicom"'},
    )
    assert r.status_code == 200
    i = r.content.index(b"DICM")
    assert r.content[i - 128 : i] == b"\0" * 128
    dcmread(io.BytesIO(r.content[i - 128 :]), force=True)
