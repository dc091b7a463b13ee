"""report.html: one self-contained page per report (audit, predict evaluation, compare) to click through.

Everything is inside the file: thumbnails are base64 JPEGs at a fixed size, charts are base64 PNGs, the sorting,
filtering and paging is a few lines of inline vanilla JavaScript, and a Content-Security-Policy forbids loading
anything else, so the page works from file:// with no server and no network. Rows are written as HTML (a table stays
readable with scripts off); the script only reorders and hides them.

Size stays bounded whatever the dataset: at most ``ROW_CAP`` rows per table and ``THUMB_CAP`` thumbnails per page
(the page says so; scores.csv / the prediction table list everything).
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ._io import MD_STAMP_PREFIX, atomic_write, safe_str, stamp

THUMB = 96  # thumbnails fit in THUMB x THUMB pixels, JPEG quality THUMB_QUALITY (~3 KB each)
THUMB_QUALITY = 70
THUMB_CAP = 600  # distinct thumbnails inlined per page (~2 MB); later rows say "not inlined"
ROW_CAP = 2000  # rows per table on the page (a 100,000-image table stays in scores.csv)
PAGE_ROWS = 50  # rows shown at once; the rest are a click on "next" away
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")


def html_is_ours(path) -> bool:
    """Recogniser for check_outputs: featx's stamp on the page's second line (after the doctype)."""
    from ._io import _html_is_ours

    return _html_is_ours(Path(path))


def esc(v) -> str:
    return html.escape(safe_str("" if v is None else str(v)), quote=True)


class Thumbnails:
    """Base64 JPEG thumbnails of image files, each encoded once, at most ``cap`` of them per page."""

    def __init__(self, root: Optional[Path] = None, cap: Optional[int] = None):
        self.root = None if root is None else Path(root)
        self.cap = THUMB_CAP if cap is None else cap
        self.cache: dict = {}
        self.refused = 0  # requests past the cap
        self.placed: dict = {}  # path -> thumbnail number, once its data: URI is on the page

    def file(self, path) -> Optional[Path]:
        if path is None:
            return None
        p = Path(path)
        return p if p.is_absolute() or self.root is None else self.root / p

    def want(self, path) -> None:
        """Encode ``path`` now if the cap allows (call in priority order before rendering)."""
        key = str(path)
        if key in self.cache:
            return
        if len(self.cache) >= self.cap:
            self.refused += 1
            return
        self.cache[key] = _encode(self.file(path))

    def img(self, path, alt: str = "") -> str:
        """The first <img> of an image carries its data: URI; later ones name it (``data-same``) and the page's
        script copies the URI over, so an image listed in three tables is stored once."""
        key = str(path)
        uri = self.cache.get(key)
        if uri is None:
            why = "not inlined (cap)" if key not in self.cache else "no image"
            return f'<span class="nothumb">{why}</span>'
        size = f'alt="{esc(alt)}" width="{THUMB}" height="{THUMB}"'
        if key in self.placed:
            return f'<img class="thumb" data-same="{self.placed[key]}" {size}>'
        self.placed[key] = n = len(self.placed)
        return f'<img class="thumb" data-thumb="{n}" src="{uri}" {size}>'

    @property
    def inlined(self) -> int:
        return sum(v is not None for v in self.cache.values())


def _encode(path: Optional[Path]) -> Optional[str]:
    """A data: URI of the image at ``path`` shrunk into THUMB x THUMB (letterboxed on grey: a fixed size), or None
    when there is no such file or it does not decode (a page must render whatever moved)."""
    if path is None:
        return None
    try:
        from PIL import Image

        from .data.decode import load_rgb

        img = load_rgb(path, draft_size=THUMB)
        img.thumbnail((THUMB, THUMB))
        tile = Image.new("RGB", (THUMB, THUMB), (224, 224, 224))
        tile.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
        buf = io.BytesIO()
        tile.save(buf, format="JPEG", quality=THUMB_QUALITY)
    except Exception:  # noqa: BLE001 - unreadable, moved, not an image: the row says "no image"
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_uri(path) -> Optional[str]:
    """A chart PNG featx wrote, inline (None when it is missing)."""
    try:
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except (OSError, TypeError):
        return None


@dataclass
class Table:
    """A sortable, filterable, paged table. ``rows``: lists of cell values; ``image``: per row, the image path whose
    thumbnail opens the row (None: no thumbnail column); ``numeric``: columns sorted as numbers."""

    title: str
    columns: Sequence[str]
    rows: list
    image: Optional[list] = None
    numeric: Sequence[str] = ()
    note: str = ""
    total: Optional[int] = None  # rows in the full list (when more than ROW_CAP were cut)
    marks: Optional[list] = None  # per row, a CSS class ("flagged") or None
    id: str = ""


@dataclass
class Page:
    title: str
    thumbs: Thumbnails
    parts: list = field(default_factory=list)
    n_tables: int = 0

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{esc(text)}</h{level}>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{esc(text)}</p>")

    def bullets(self, items: Iterable[str]) -> None:
        self.parts.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")

    def chart(self, path, alt: str) -> None:
        uri = png_uri(path)
        if uri:
            self.parts.append(f'<figure><img class="chart" src="{uri}" alt="{esc(alt)}"></figure>')

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def table(self, t: Table) -> None:
        self.n_tables += 1
        tid = t.id or f"t{self.n_tables}"
        shown = t.rows[:ROW_CAP]
        cut = (t.total if t.total is not None else len(t.rows))
        head = "".join(
            f'<th data-col="{i}" data-type="{"num" if c in t.numeric else "text"}" aria-sort="none" '
            f'title="click to sort">{esc(c)}</th>'
            for i, c in enumerate((["image"] if t.image is not None else []) + list(t.columns)))
        body = []
        for r, row in enumerate(shown):
            cells = []
            if t.image is not None:
                p = t.image[r]
                cells.append(f'<td class="img">{self.thumbs.img(p, alt=str(p)) if p is not None else ""}</td>')
            for c, v in zip(t.columns, row):
                if c in t.numeric:
                    sv = "" if v is None else int(v) if isinstance(v, bool) else esc(v)  # a flag sorts as 0 / 1
                    cells.append(f'<td class="num" data-v="{sv}">{_num(v)}</td>')
                else:
                    cells.append(f"<td>{esc(v)}</td>")
            mark = t.marks[r] if t.marks else None
            body.append(f'<tr{f" class={chr(34)}{mark}{chr(34)}" if mark else ""}>{"".join(cells)}</tr>')
        more = (f" Showing the first {len(shown)} of {cut} rows; the CSV lists all." if cut > len(shown) else "")
        self.parts.append(
            f'<section class="tbl" id="{tid}"><h3>{esc(t.title)}</h3>'
            f'<p class="note">{esc(t.note)}{esc(more)}</p>'
            f'<div class="ctl"><input type="search" class="filter" placeholder="filter rows (any text)"> '
            f'<button class="prev">&lt; prev</button> <span class="pos"></span> <button class="next">next &gt;</button>'
            f'</div><table class="sortable" data-rows="{len(shown)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></section>')

    def write(self, path) -> Path:
        cap = (f"Thumbnails: {self.thumbs.inlined} inlined at {THUMB} x {THUMB} pixels (at most {self.thumbs.cap} "
               f"per page{'; later rows say “not inlined (cap)”' if self.thumbs.refused else ''}); tables show at "
               f"most {ROW_CAP} rows, {PAGE_ROWS} at a time.")
        doc = (f"<!DOCTYPE html>\n{MD_STAMP_PREFIX} {stamp().split()[-1]} -->\n<html lang=\"en\"><head>"
               f'<meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{CSP}">'
               f'<meta name="generator" content="{esc(stamp())}">'
               f"<title>{esc(self.title)}</title><style>{_CSS}</style></head><body>"
               f"<h1>{esc(self.title)}</h1><p class=\"note\">{esc(cap)}</p>{''.join(self.parts)}"
               f"<script>{_JS.replace('PAGE_ROWS', str(PAGE_ROWS))}</script></body></html>\n")
        with atomic_write(path, "w") as fh:
            fh.write(doc)
        return Path(path)


def _num(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:.4g}"
    return esc(v)


def confusion(page: Page, classes: Sequence[str], items: list, cell_cap: int = 200) -> None:
    """The confusion matrix whose cells list their images: rows true class, columns predicted; a click on a cell
    opens the list of its images (thumbnails for the mistakes first, then the rest, as the cap allows)."""
    cells: dict = {}
    for it in items:
        cells.setdefault((it["true"], it["pred"]), []).append(it)
    for (t, p), lst in cells.items():
        lst.sort(key=lambda it: -(it.get("confidence") or 0.0))
    preds = list(classes) + sorted({p for (_, p) in cells} - set(classes))
    trues = list(classes) + sorted({t for (t, _) in cells} - set(classes))
    for wrong in (True, False):  # thumbnails for mistakes first: those are what a user opens
        for (t, p), lst in cells.items():
            if (t != p) == wrong:
                for it in lst[:cell_cap]:
                    page.thumbs.want(it.get("file", it["path"]))
    head = "".join(f"<th>{esc(p)}</th>" for p in preds)
    rows = []
    for t in trues:
        tds = []
        for p in preds:
            lst = cells.get((t, p), [])
            if not lst:
                tds.append('<td class="cm">0</td>')
                continue
            shown = "".join(
                f'<li>{page.thumbs.img(it.get("file", it["path"]), alt=str(it["path"]))}'
                f'<span>{esc(it["path"])}{"" if it.get("confidence") is None else " (" + _num(it["confidence"]) + ")"}'
                f"</span></li>" for it in lst[:cell_cap])
            more = f"<li>… {len(lst) - cell_cap} more (see the table)</li>" if len(lst) > cell_cap else ""
            cls = "cm ok" if t == p else "cm bad"
            tds.append(f'<td class="{cls}"><details><summary>{len(lst)}</summary><ul class="cell">{shown}{more}'
                       f"</ul></details></td>")
        rows.append(f"<tr><th>{esc(t)}</th>{''.join(tds)}</tr>")
    page.raw('<section class="confusion"><h2>Confusion matrix</h2><p class="note">rows: true class, columns: '
             'predicted; click a count to see its images</p><table class="cm"><thead><tr><th>true \\ predicted</th>'
             f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def evaluation_page(path, metrics: dict, items: list, *, title: str, notes: Sequence[str] = (),
                    score_name: str = "confidence") -> Path:
    """report.html of scoring a model on labelled images: summary, per-class table, the confusion matrix whose
    cells list their images, and every image as a sortable table (mistakes first). ``metrics``: as
    featx.report.classification_metrics returns them; ``items``: ``{"path", "file", "true", "pred", "confidence"}``
    for every evaluated image (``file``: the image to show, ``path``: as listed)."""
    page = Page(title=title, thumbs=Thumbnails())
    page.heading("Summary")
    nums = [f"{k.replace('_', ' ')}: {metrics[k]:.4f}" for k in ("accuracy", "balanced_accuracy", "macro_f1")
            if isinstance(metrics.get(k), float)]
    wrong = sum(it["true"] != it["pred"] for it in items)
    page.bullets([f"{metrics.get('n', len(items))} labelled images, {wrong} misclassified"] + nums + list(notes))
    per_class = metrics.get("per_class") or {}
    if per_class:
        page.table(Table("Per class", ["class", "precision", "recall", "f1", "support"],
                         [[c, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support")]
                          for c, v in per_class.items()], numeric=("precision", "recall", "f1", "support"),
                         id="per-class"))
    confusion(page, metrics.get("classes") or sorted({it["true"] for it in items}), items)
    ordered = sorted(items, key=lambda it: (it["true"] == it["pred"], -(it.get("confidence") or 0.0)))
    shown = ordered[:ROW_CAP]
    for it in shown:
        page.thumbs.want(it.get("file", it["path"]))
    page.table(Table("Every image (mistakes first)", ["path", "true", "predicted", score_name, "correct"],
                     [[it["path"], it["true"], it["pred"], it.get("confidence"), it["true"] == it["pred"]]
                      for it in shown], image=[it.get("file", it["path"]) for it in shown],
                     numeric=(score_name, "correct"), total=len(items),
                     marks=["flagged" if it["true"] != it["pred"] else None for it in shown], id="images"))
    return page.write(path)


def compare_page(path, *, title: str, summary: Sequence[str], columns: Sequence[str], rows: list,
                 numeric: Sequence[str] = (), charts: Sequence = (), notes: Sequence[str] = ()) -> Path:
    """report.html of `featx compare`: the summary, the methods as a sortable table and the charts, inline."""
    page = Page(title=title, thumbs=Thumbnails())
    page.heading("Summary")
    page.bullets(list(summary) + [f"note: {n}" for n in notes])
    page.table(Table("Methods (best first)", columns, rows, numeric=numeric, id="methods"))
    for chart, alt in charts:
        if chart is not None:
            page.chart(chart, alt)
    return page.write(path)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.2em;margin-top:1.6em}h3{font-size:1.05em;margin:1.2em 0 .3em}
.note{color:#666;font-size:.9em;margin:.2em 0}
table{border-collapse:collapse;margin:.4em 0}th,td{border:1px solid #ddd;padding:3px 6px;vertical-align:middle}
th{background:#f4f4f4;position:sticky;top:0}table.sortable th{cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.img{padding:1px}
img.thumb{width:96px;height:96px;display:block}img.chart{max-width:100%}
tr.flagged td{background:#fff1f0}.nothumb{color:#999;font-size:.8em}
.ctl{margin:.3em 0}.ctl input{width:20em}
td.cm{text-align:center;min-width:3em}td.cm.ok{background:#eef7ee}td.cm.bad{background:#fff1f0}
ul.cell{list-style:none;padding:0;margin:.3em 0;max-height:30em;overflow:auto;text-align:left}
ul.cell li{display:flex;gap:.4em;align-items:center;margin:2px 0}
"""

# Sorting: a click on a header orders the rows by that column (numbers as numbers, empty cells last), a second
# click reverses; the filter keeps rows whose text contains every word typed; paging shows PAGE_ROWS at a time.
_JS = r"""
(function(){
document.querySelectorAll('img[data-same]').forEach(function(im){
  var src=document.querySelector('img[data-thumb="'+im.getAttribute('data-same')+'"]'); if(src) im.src=src.src;});
document.querySelectorAll('section.tbl').forEach(function(sec){
  var table=sec.querySelector('table'), tbody=table.tBodies[0], rows=Array.prototype.slice.call(tbody.rows);
  var filter=sec.querySelector('.filter'), pos=sec.querySelector('.pos'), page=0, size=PAGE_ROWS, kept=rows;
  function key(r,c,num){var td=r.cells[c]; if(!td) return num?null:'';
    if(num){var v=td.getAttribute('data-v'); return (v===null||v==='')?null:parseFloat(v);}
    return td.textContent.toLowerCase();}
  function show(){var pages=Math.max(1,Math.ceil(kept.length/size)); page=Math.min(Math.max(page,0),pages-1);
    rows.forEach(function(r){r.style.display='none';});
    kept.slice(page*size,(page+1)*size).forEach(function(r){r.style.display='';});
    pos.textContent=kept.length?('rows '+(page*size+1)+'-'+Math.min(kept.length,(page+1)*size)+' of '+kept.length)
      :'no rows';}
  function refilter(){var words=filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    kept=rows.filter(function(r){var t=r.textContent.toLowerCase();
      return words.every(function(w){return t.indexOf(w)>=0;});});
    page=0; show();}
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th){
    th.addEventListener('click',function(){
      var c=th.cellIndex, num=th.getAttribute('data-type')==='num', dir=th.getAttribute('aria-sort')==='ascending'?-1:1;
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(h){h.setAttribute('aria-sort','none');});
      th.setAttribute('aria-sort',dir===1?'ascending':'descending');
      rows.sort(function(a,b){var x=key(a,c,num),y=key(b,c,num);
        if(x===null&&y===null) return 0; if(x===null) return 1; if(y===null) return -1;
        return x<y?-dir:x>y?dir:0;});
      rows.forEach(function(r){tbody.appendChild(r);}); refilter();});});
  filter.addEventListener('input',refilter);
  sec.querySelector('.prev').addEventListener('click',function(){page--;show();});
  sec.querySelector('.next').addEventListener('click',function(){page++;show();});
  refilter();
});
})();
"""
