//! The module graph of `src/`: data flows one way (config → data → model → loss → loop →
//! metrics / export), so no two top-level modules may reach each other, directly or through
//! others. Read from the `crate::` paths outside comments, tests included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a source text names through `crate::` paths (`crate::a::b`,
/// `crate::{a, b::c}`), comments skipped.
fn referenced_modules(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or("");
                for item in group.split(',') {
                    out.insert(ident(item.trim()));
                }
            } else {
                out.insert(ident(rest));
            }
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Edges `module → modules it uses` among the top-level modules of `src/`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let top = |p: &Path| -> String {
        let rel = p.strip_prefix(&src).expect("under src/");
        let first = rel.components().next().expect("a component");
        first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string()
    };
    let modules: BTreeSet<String> = files.iter().map(|f| top(f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = top(f);
        if from == "main" || from == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(f).expect("a readable source file");
        let edges = graph.entry(from.clone()).or_default();
        for m in referenced_modules(&text) {
            if m != from && modules.contains(&m) {
                edges.insert(m);
            }
        }
    }
    graph
}

/// A path `from → … → to` in the graph, if any.
fn path(graph: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> Option<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![vec![from.to_string()]];
    while let Some(route) = stack.pop() {
        let last = route.last().expect("non-empty").clone();
        for next in graph.get(&last).into_iter().flatten() {
            if next == to {
                let mut found = route.clone();
                found.push(next.clone());
                return Some(found);
            }
            if seen.insert(next.clone()) {
                let mut longer = route.clone();
                longer.push(next.clone());
                stack.push(longer);
            }
        }
    }
    None
}

#[test]
fn the_reader_sees_plain_and_grouped_paths_and_skips_comments() {
    let text = "use crate::a::B;\nuse crate::{c, d::E};\n// crate::f\nlet x = crate::g::h(); // crate::i\n";
    let found: Vec<String> = referenced_modules(text).into_iter().collect();
    assert_eq!(found, ["a", "c", "d", "g"]);
}

#[test]
fn a_cycle_is_found() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    graph.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    graph.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(
        path(&graph, "a", "a").expect("a cycle"),
        ["a", "b", "c", "a"]
    );
    graph.get_mut("c").expect("c").clear();
    assert!(path(&graph, "a", "a").is_none());
}

#[test]
fn no_import_cycle_among_the_top_level_modules() {
    let graph = module_graph();
    assert!(graph.len() > 10, "the source tree was not read: {graph:?}");
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| path(&graph, m, m))
        .map(|route| route.join(" → "))
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}
