"""The interim study list: every DICOM value escaped, links to the viewer, search through the query engine."""

from __future__ import annotations

from types import SimpleNamespace

from pydicom import Dataset
from starlette.applications import Starlette
from starlette.testclient import TestClient

from openpacs.services.query import QueryError
from openpacs.services.types import Query
from openpacs.web.studylist import studylist_routes


def study(uid: str, name: str, description: str = "CT HEAD", pid: str = "P1") -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = uid
    ds.PatientName = name
    ds.PatientID = pid
    ds.StudyDate = "20240131"
    ds.StudyDescription = description
    ds.ModalitiesInStudy = ["CT", "SR"]
    ds.NumberOfStudyRelatedSeries = 2
    ds.NumberOfStudyRelatedInstances = 10
    return ds


class FakeQuery:
    def __init__(self, results: list[Dataset], error: Exception | None = None) -> None:
        self.results = results
        self.error = error
        self.queries: list[Query] = []

    def find(self, query: Query):
        self.queries.append(query)
        if self.error:
            raise self.error
        end = None if query.limit is None else query.offset + query.limit
        return iter(self.results[query.offset : end])


def client(fake: FakeQuery) -> TestClient:
    return TestClient(Starlette(routes=studylist_routes(SimpleNamespace(query=fake))))


def test_lists_studies_linked_to_the_viewer():
    fake = FakeQuery([study("1.2.3", "DOE^JOHN"), study("1.2.4", "ROE^JANE")])
    r = client(fake).get("/ui/studies")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'href="/ohif/viewer?StudyInstanceUIDs=1.2.3"' in r.text and ">DOE, JOHN</a>" in r.text
    assert "2024-01-31" in r.text and "CT\\SR" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "frame-ancestors 'none'" in csp
    q = fake.queries[0]
    assert q.level == "STUDY" and q.filters == {} and "PatientName" in q.return_keys and q.limit == 51


def test_escapes_every_value():
    evil = study('1.2.3"><script>x()</script>', "<script>alert(1)</script>^<b>", "\"'><img src=x onerror=y>", "<i>")
    r = client(FakeQuery([evil])).get("/ui/studies?PatientID=%22%3E%3Cscript%3E")
    assert "<script" not in r.text and "<img" not in r.text and "<b>" not in r.text and "<i>" not in r.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
    assert 'value="&quot;&gt;&lt;script&gt;"' in r.text  # the search term echoed into the form
    assert "StudyInstanceUIDs=1.2.3%22%3E%3Cscript%3Ex%28%29%3C%2Fscript%3E" in r.text


def test_search_filters_and_paging():
    fake = FakeQuery([study(f"1.2.{i}", f"P^{i}") for i in range(7)])
    c = client(fake)
    r = c.get("/ui/studies?PatientName=DOE*&limit=3&offset=3&bogus=1")
    q = fake.queries[-1]
    assert q.filters == {"PatientName": "DOE*"} and q.limit == 4 and q.offset == 3
    assert "PatientName" not in q.return_keys  # already a matching key
    assert r.text.count("data-study-uid=") == 3
    assert 'rel="next" href="/ui/studies?PatientName=DOE%2A&amp;offset=6&amp;limit=3"' in r.text
    assert 'rel="prev" href="/ui/studies?PatientName=DOE%2A&amp;offset=0&amp;limit=3"' in r.text
    r = c.get("/ui/studies?limit=abc&offset=-5")
    assert r.status_code == 200 and fake.queries[-1].limit == 51 and fake.queries[-1].offset == 0


def test_bad_search_is_a_400_page_not_a_crash():
    fake = FakeQuery([], error=QueryError(0xA900, "bad date range <x>"))
    r = client(fake).get("/ui/studies?StudyDate=2024-")
    assert r.status_code == 400 and "bad date range &lt;x&gt;" in r.text
