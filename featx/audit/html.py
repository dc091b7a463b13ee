"""The audit's report.html: summary, near-duplicate groups and every score's ranking as sortable tables with
thumbnails (featx.report_html does the page; this module decides what goes on it)."""
from __future__ import annotations

from pathlib import Path

from .. import report_html
from ..report_html import Page, Table, Thumbnails
from .report import RANKING_RANK, RANKING_TITLES, ordinal, ranking_explained

RANKING_COLUMNS = {
    "label": ["label_rank", "path", "split", "label_score", "given", "suggested", "given_probability",
              "neighbour_agreement", "label_flagged"],
    "outlier": ["outlier_rank", "path", "split", "label", "outlier_score", "outlier_percentile", "knn_distance",
                "class_knn_distance", "outlier_flagged"],
    "duplicate": ["duplicate_rank", "path", "split", "label", "nearest_similarity", "nearest", "duplicate_group",
                  "crosses_splits"],
}
TEXT = {"path", "split", "label", "given", "suggested", "nearest"}
FLAGS = {"label": "label_flagged", "outlier": "outlier_flagged", "duplicate": "duplicate_group"}


def write_page(res, path: Path) -> Path:
    info = res.info
    st = info["settings"]
    ran = info["checks"]
    page = Page(title=f"featx audit of {res.features_path or 'features in memory'}", thumbs=Thumbnails(res.root))
    summary = [f"{res.n_images} images; paths relative to the image root {res.root or '(unknown)'}. Read-only: "
               "nothing was moved or deleted."]
    if "duplicates" in ran:
        summary.append(f"near-duplicate groups: {len(res.duplicates)} ({len(res.leakage)} span splits = leakage), "
                       f"cosine >= {st['threshold']}")
    if "labels" in ran:
        summary.append(f"likely label errors (flagged): {len(res.label_issues)}")
    if "outliers" in ran:
        summary.append(f"outliers (flagged): {len(res.outliers)}, distance to the {ordinal(st['k'])} nearest image "
                       f"above {info.get('outlier_cut', '-')}")
    summary.append(f"splits as `featx fit` uses them: {info.get('split_rule')}")
    summary += [f"note: {n}" for n in info.get("notes", [])]
    summary.append("Every image has a row in scores.csv; flagged rows are tinted red below.")
    page.heading("Summary")
    page.bullets(summary)

    cap = report_html.ROW_CAP
    rankings = {} if res.scores is None else {n: res.scores.ranked(n, cap) for n in res.scores.available()}
    members = [(g, m) for g in res.duplicates[:cap] for m in g["members"]][:cap]
    # thumbnails in order of interest: duplicate groups (leakage first), then the rankings rank by rank
    for _, m in members[:200]:
        page.thumbs.want(m["path"])
    lists = list(rankings.values())
    for i in range(max([0] + [len(x) for x in lists])):
        for x in lists:
            if i < len(x):
                page.thumbs.want(x[i]["path"])
    for _, m in members[200:]:
        page.thumbs.want(m["path"])

    if "duplicates" in ran:
        page.heading("Near-duplicate groups (leakage first)")
        page.table(Table(
            "Near-duplicates", ["group", "leakage", "path", "split", "label", "similarity", "exact"],
            [[g["group"], g["leakage"], m["path"], m["role"] or m["split"], m["label"], m["similarity"], m["exact"]]
             for g, m in members], image=[m["path"] for _, m in members],
            numeric=("group", "leakage", "similarity", "exact"), total=sum(len(g["members"]) for g in res.duplicates),
            marks=["flagged" if g["leakage"] else None for g, _ in members], id="duplicates",
            note="members of each group side by side; groups that span splits (leakage) tinted"))
    page.heading("Every score, ranked (flagged or not)")
    for name, rows in rankings.items():
        cols = RANKING_COLUMNS[name]
        flag = FLAGS[name]
        total = sum(1 for v in res.scores.columns[RANKING_RANK[name]] if v == v)  # not NaN
        page.table(Table(
            RANKING_TITLES[name][0].format(n=len(rows)).replace(", top", ": top"),
            cols, [[_cell(r, c) for c in cols] for r in rows], image=[r["path"] for r in rows],
            numeric=[c for c in cols if c not in TEXT], total=total,
            marks=["flagged" if r[flag] not in (None, False) else None for r in rows], id=f"rank-{name}",
            note=ranking_explained(name)))
    return page.write(path)


def _cell(r: dict, c: str):
    v = r[c]
    if c == "split":
        return r["role"] or r["split"]
    return v
