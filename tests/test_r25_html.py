"""Issue 25.3: report.html for audit, predict evaluations and compare: self-contained (thumbnails inline, nothing
loaded from elsewhere), every row present up to the cap, sortable in a real browser (marked ``browser``)."""
from __future__ import annotations

import importlib.util
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from featx import report_html
from featx.audit import audit
from featx.report import classification_metrics
from tests.imagegen import make_image
from tests.test_audit import planted_store


class PageParser(HTMLParser):
    """Every tag with its attributes, the tables (by section id) and their body rows."""

    def __init__(self):
        super().__init__()
        self.tags, self.rows, self.section, self.in_body = [], {}, None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "section" and "id" in a:
            self.section = a["id"]
            self.rows[self.section] = 0
        elif tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body and self.section:
            self.rows[self.section] += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.in_body = False
        elif tag == "section":
            self.section = None


def parse(path: Path) -> PageParser:
    p = PageParser()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def assert_self_contained(p: PageParser) -> list:
    """No src/href that leaves the file; every thumbnail a data: URI or a copy of one. Returns the <img> attrs."""
    for tag, a in p.tags:
        assert tag not in ("link", "iframe", "object", "embed", "base"), tag
        for key in ("src", "href", "srcset", "action", "poster"):
            if key in a:
                assert a[key].startswith("data:") or (key == "href" and a[key].startswith("#")), (tag, key, a[key][:60])
    imgs = [a for tag, a in p.tags if tag == "img"]
    sources = {a["data-thumb"] for a in imgs if "data-thumb" in a}
    for a in imgs:
        assert a.get("src", "").startswith("data:image/") or a.get("data-same") in sources
    csp = [a for tag, a in p.tags if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    return imgs


def _with_real_images(tmp_path):
    """planted_store's files are placeholder bytes: make them tiny real JPEGs (the exact copy stays byte-equal)."""
    fs, truth = planted_store(tmp_path)
    root = tmp_path / "images"
    for i, rel in enumerate(fs.paths):
        make_image(root / rel, size=(40, 30), seed=i, fmt="JPEG")
    shutil.copyfile(root / truth["exact"][0], root / truth["exact"][1])
    (root / fs.paths[0]).unlink()  # a file that moved since extraction: its row says "no image"
    return fs, truth


@pytest.fixture()
def audited(tmp_path):
    fs, truth = _with_real_images(tmp_path)
    checks = ["duplicates", "outliers"] + (["labels"] if importlib.util.find_spec("cleanlab") else [])
    res = audit(tmp_path / "features.npz", k=3, checks=checks)
    return fs, truth, res


def test_audit_page_is_self_contained_with_every_row_and_thumbnail(audited):
    fs, truth, res = audited
    page = res.report_dir / "report.html"
    assert page in res.files
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "written by featx" in text.splitlines()[1]
    p = parse(page)
    imgs = assert_self_contained(p)
    n = len(fs)
    for name in res.scores.available():
        assert p.rows[f"rank-{name}"] == n  # every image has its row (n < ROW_CAP)
    assert p.rows["duplicates"] == sum(g["size"] for g in res.duplicates)
    # one thumbnail per image that exists, each image's data stored once; the moved file has none
    assert len({a["data-thumb"] for a in imgs if "data-thumb" in a}) == n - 1
    assert all(a["width"] == a["height"] == str(report_html.THUMB) for a in imgs)
    assert "no image" in text and "not inlined (cap)" not in text
    assert f"{n - 1} inlined at {report_html.THUMB} x {report_html.THUMB} pixels" in text


def test_audit_page_caps_thumbnails_and_rows_and_says_so(tmp_path, monkeypatch):
    _with_real_images(tmp_path)
    monkeypatch.setattr(report_html, "ROW_CAP", 12)
    monkeypatch.setattr(report_html, "THUMB_CAP", 5)
    res = audit(tmp_path / "features.npz", k=3, checks=["duplicates", "outliers"])
    p = parse(res.report_dir / "report.html")
    imgs = assert_self_contained(p)
    assert p.rows["rank-outlier"] == 12
    assert len({a["data-thumb"] for a in imgs if "data-thumb" in a}) <= 5
    text = (res.report_dir / "report.html").read_text()
    assert "not inlined (cap)" in text and "at most 5 per page" in text
    assert f"Showing the first 12 of {res.n_images} rows" in text


def _evaluation_items(tmp_path, n=30):
    rng = np.random.default_rng(0)
    classes = ["ant", "bee", "wasp [vespa]"]
    items = []
    for i in range(n):
        true = classes[i % 3]
        pred = true if rng.random() < 0.7 else classes[(i + 1) % 3]
        f = make_image(tmp_path / "imgs" / true / f"img{i}.jpg", size=(24, 24), seed=i, fmt="JPEG")
        items.append({"path": f"{true}/img{i}.jpg", "file": f, "true": true, "pred": pred,
                      "confidence": float(rng.random())})
    return classes, items


def test_evaluation_page_confusion_cells_list_their_images(tmp_path):
    classes, items = _evaluation_items(tmp_path)
    metrics = classification_metrics([it["true"] for it in items], [it["pred"] for it in items], classes)
    page = report_html.evaluation_page(tmp_path / "out" / "report.html", metrics, items, title="eval <test>")
    p = parse(page)
    assert_self_contained(p)
    assert p.rows["images"] == len(items)
    text = page.read_text()
    assert "eval &lt;test&gt;" in text and "wasp [vespa]" in text
    # each cell lists exactly its images: count the <li> paths between the cell's <details> tags
    cells = text.split('<table class="cm">')[1].split("</table>")[0]
    for it in items:
        assert f"<span>{it['path']} (" in cells
    wrong = sum(it["true"] != it["pred"] for it in items)
    assert cells.count('class="cm bad"') == len({(it["true"], it["pred"]) for it in items if it["true"] != it["pred"]})
    assert f"{wrong} misclassified" in text


def test_compare_page_holds_the_table_and_the_charts(tmp_path):
    from PIL import Image

    chart = tmp_path / "accuracy.png"
    Image.new("RGB", (20, 10), "red").save(chart)
    page = report_html.compare_page(
        tmp_path / "report.html", title="featx compare", summary=["images: 10 train"],
        columns=["method", "val accuracy"], rows=[["heads:logistic", 0.9], ["scratch:lenet5", 0.5]],
        numeric=("val accuracy",), charts=[(chart, "validation accuracy"), (None, "learning curve")])
    p = parse(page)
    assert_self_contained(p)
    assert p.rows["methods"] == 2
    assert [a for t, a in p.tags if t == "img" and a.get("src", "").startswith("data:image/png")]


def test_a_page_featx_did_not_write_is_never_replaced(tmp_path):
    from featx.errors import UsageError

    planted_store(tmp_path)
    mine = tmp_path / "features-audit" / "report.html"
    mine.parent.mkdir()
    mine.write_text("<html>my own notes</html>")
    with pytest.raises(UsageError, match="not written by featx"):
        audit(tmp_path / "features.npz", k=3, checks=["duplicates"])
    assert mine.read_text() == "<html>my own notes</html>"
    assert not (tmp_path / "features-audit" / "scores.csv").exists()


def _browser():
    """(playwright module, executable or None) or skip: a system Chromium, else playwright's own download."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    exe = os.environ.get("FEATX_CHROMIUM") or next(
        (shutil.which(n) for n in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
         if shutil.which(n)), None)
    return sync_playwright, exe


@pytest.mark.browser
def test_audit_page_renders_offline_in_headless_chromium_and_sorts(audited):
    sync_playwright, exe = _browser()
    fs, truth, res = audited
    page_path = res.report_dir / "report.html"
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        except Exception as exc:  # noqa: BLE001 - no browser binary: skipped, as the marker says
            pytest.skip(f"no headless Chromium could start: {str(exc).splitlines()[0]}")
        try:
            page = browser.new_page()
            requests, errors = [], []
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            # every visible thumbnail decoded (copies filled in by the script too)
            widths = page.evaluate("Array.from(document.querySelectorAll('img.thumb'))"
                                   ".filter(i => i.offsetParent !== null).map(i => i.naturalWidth)")
            assert widths and all(w == 96 for w in widths)
            copies = page.evaluate("Array.from(document.querySelectorAll('img[data-same]')).map(i => i.naturalWidth)")
            assert all(w == 96 for w in copies)
            sec = "#rank-outlier"
            col = "outlier_score"
            idx = page.evaluate(f"Array.from(document.querySelectorAll('{sec} thead th')).map(t => t.textContent)"
                                f".indexOf('{col}')")

            def column():
                return page.evaluate(
                    f"Array.from(document.querySelectorAll('{sec} tbody tr')).filter(r => r.style.display !== 'none')"
                    f".map(r => parseFloat(r.cells[{idx}].getAttribute('data-v')))")

            page.click(f"{sec} thead th:nth-child({idx + 1})")
            up = column()
            assert up == sorted(up) and len(up) == min(report_html.PAGE_ROWS, len(fs))
            assert page.get_attribute(f"{sec} thead th:nth-child({idx + 1})", "aria-sort") == "ascending"
            page.click(f"{sec} thead th:nth-child({idx + 1})")
            down = column()
            assert down == sorted(down, reverse=True) and down[0] == max(res.scores.columns[col])
            # the filter keeps the rows that contain the text
            page.fill(f"{sec} input.filter", "foreign")
            shown = page.evaluate(f"Array.from(document.querySelectorAll('{sec} tbody tr'))"
                                  ".filter(r => r.style.display !== 'none').length")
            assert shown == len(truth["foreign"])
            assert not errors, errors
            assert all(u.startswith(("file:", "data:")) for u in requests), requests
        finally:
            browser.close()


def test_predict_evaluation_writes_report_html_with_the_confusion_images(tmp_path):
    import featx
    from tests.imagegen import class_color, make_folder

    data = make_folder(tmp_path / "data", classes=("ant", "bee"), n_per_class=4, splits=("train", "val"), size=32)
    bb = featx.create_backbone("efficientnet_lite0", image_size=32)
    featx.extract_features(data / "train", tmp_path / "f.npz", backbone=bb, workers=0)
    featx.fit_head(tmp_path / "f.npz", output=tmp_path / "head.skops", C=1.0, cv=0)
    make_image(data / "val" / "bee" / "odd.jpg", size=32, color=class_color(0), seed=999)  # an ant filed as bee
    res = featx.predict_folder(data / "val", tmp_path / "head.skops", output=tmp_path / "preds.csv", workers=0)
    page = res.report_dir / "report.html"
    p = parse(page)
    assert_self_contained(p)
    assert p.rows["images"] == res.metrics["n"] == 5 + 4
    cells = page.read_text().split('<table class="cm">')[1].split("</table>")[0]
    assert "<span>bee/odd.jpg (" in cells and cells.count('<img class="thumb"') == 9


def test_compare_writes_report_html_beside_report_md(tmp_path):
    from featx.comparison.core import CompareResult, CompareSettings, MethodResult
    from featx.comparison.render import write_outputs

    rows = [MethodResult(method="heads:logistic", accuracy=0.9, balanced_accuracy=0.88, seconds=3.0,
                         trainable_params=2562, family="heads", best_in_family=True, artifact="h.skops"),
            MethodResult(method="scratch:lenet5", accuracy=None, balanced_accuracy=None, seconds=0.0,
                         trainable_params=None, family="scratch", skipped="the --budget was spent")]
    result = CompareResult(run_dir=tmp_path, rows=rows, report_path=tmp_path / "report.md", chart_path=None,
                           split="val/ folder", n_train=10, n_val=4, seconds=5.0, settings=CompareSettings())
    write_outputs(result)
    p = parse(tmp_path / "report.html")
    assert_self_contained(p)
    assert p.rows["methods"] == 2
    text = (tmp_path / "report.html").read_text()
    assert "heads:logistic" in text and "skipped (the --budget was spent)" in text
    assert [a for t, a in p.tags if t == "img" and a.get("src", "").startswith("data:image/png")]  # the chart


def test_markup_in_file_names_is_shown_as_text_not_run(tmp_path):
    from featx.features.store import FeatureSet, save_features

    names = ["a<b>bold.jpg", "x<script>alert(1)<\\script>.jpg", 'q"uote&amp.jpg', "caf\udce9.jpg", "plain.jpg"]
    X = np.random.default_rng(0).random((len(names), 16)).astype(np.float32)
    save_features(FeatureSet(features=X, paths=names, labels=None, splits=None, classes=[],
                             meta={"backbone": "synthetic"}), tmp_path / "f.npz")
    res = audit(tmp_path / "f.npz", k=2)
    p = parse(res.report_dir / "report.html")
    assert_self_contained(p)
    assert not [t for t, _ in p.tags if t in ("b",)]
    assert [t for t, _ in p.tags].count("script") == 1  # the page's own, nothing from a name
    text = (res.report_dir / "report.html").read_text(encoding="utf-8")
    assert "a&lt;b&gt;bold.jpg" in text and "q&quot;uote&amp;amp.jpg" in text and "caf\ufffd.jpg" in text
