//! `report.html`: report.md rendered (pulldown-cmark) into one self-contained page — the
//! plots inlined as SVG, every table sortable by clicking a column header, nothing fetched
//! from anywhere. One description of the report (the Markdown); this is only its rendering.

use std::path::Path;

use anyhow::{Context, Result};
use pulldown_cmark::{html, CowStr, Event, Options, Parser, Tag, TagEnd};

use crate::fsutil::atomic_write;

const STYLE: &str = "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}\
th{background:#f2f2f2;cursor:pointer;user-select:none}th[data-order=asc]::after{content:' ▲'}\
th[data-order=desc]::after{content:' ▼'}figure{margin:1em 0}figure svg{max-width:100%;height:auto}\
figcaption{color:#555;font-size:90%}pre{background:#f6f6f6;padding:.5em}";

/// Clicking a header sorts the table's rows by that column (numbers by value, first click
/// ascending, then toggling); cells without a number sort after those with one.
const SORT: &str = r#"
document.querySelectorAll('table').forEach(function (table) {
  var heads = table.querySelectorAll('thead th');
  heads.forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var asc = th.dataset.order !== 'asc';
      heads.forEach(function (h) { delete h.dataset.order; });
      th.dataset.order = asc ? 'asc' : 'desc';
      var key = function (row) {
        var text = row.cells[col].textContent.trim().replace('\u2212', '-');
        var m = text.match(/^[+-]?\d+(\.\d+)?(e[+-]?\d+)?/);
        return m ? parseFloat(m[0]) : null;
      };
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x !== null && y !== null) { return asc ? x - y : y - x; }
        if (x !== null || y !== null) { return x === null ? 1 : -1; }
        var c = a.cells[col].textContent.localeCompare(b.cells[col].textContent);
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"#;

/// Writes `OUT/report.html` from the report's Markdown; each image `name.png` is replaced by
/// `OUT/name.svg` inline, its alt text the caption.
pub(super) fn write(out: &Path, title: &str, markdown: &str) -> Result<()> {
    let mut events = vec![];
    for event in Parser::new_ext(markdown, Options::ENABLE_TABLES) {
        match event {
            Event::Start(Tag::Image { dest_url, .. }) => {
                let name = Path::new(dest_url.as_ref())
                    .file_name()
                    .map(|n| Path::new(n).with_extension("svg"))
                    .context("an image without a file name in the report")?;
                let path = out.join(name);
                let svg = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                // the XML prolog is not allowed inside HTML
                let start = svg.find("<svg").unwrap_or(0);
                events.push(Event::Html(CowStr::from(format!(
                    "<figure>{}<figcaption>",
                    &svg[start..]
                ))));
            }
            Event::End(TagEnd::Image) => {
                events.push(Event::Html("</figcaption></figure>".into()));
            }
            e => events.push(e),
        }
    }
    let mut body = String::new();
    html::push_html(&mut body, events.into_iter());
    let page = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}<script>{SORT}</script>\n</body>\n</html>\n",
        html_escape(title)
    );
    atomic_write(&out.join("report.html"), page.as_bytes())
}

fn html_escape(text: &str) -> String {
    let mut escaped = String::new();
    html::push_html(&mut escaped, std::iter::once(Event::Text(text.into())));
    escaped
}
