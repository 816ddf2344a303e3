//! The module layers of docs/ARCHITECTURE.md, checked on the source: no
//! import cycle between sluice's modules, and the data path, the meeting
//! point and the shared plain data never import the control plane.
//!
//! `cargo test --test it layers -- --nocapture` prints the module graph
//! (`SLUICE_SRC=DIR` reads another tree's `src/`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Per connection: accept, TLS, HTTP, pick, connect, tunnel.
const DATA_PATH: &[&str] = &[
    "listener",
    "proxy_protocol",
    "conn_limit",
    "sockopt",
    "tls",
    "http",
    "balance",
    "admission",
    "upstream",
    "tunnel",
    "access_log",
];
/// Where the data path and the control plane meet.
const MEETING_POINT: &[&str] = &["registry"];
/// Plain data and pure rules that every layer may use.
const SHARED: &[&str] = &["config", "pem", "error_chain", "health_state"];
/// Tasks and tools that act on the registry and read config.
const CONTROL_PLANE: &[&str] = &[
    "health",
    "drain",
    "rebalance",
    "reload",
    "upgrade",
    "acme",
    "notify",
    "admin",
    "metrics",
    "trim",
    "ctl",
    "demo",
    "cluster",
];
/// Modules that import nothing else of sluice.
const LEAVES: &[&str] = &[
    "pem",
    "error_chain",
    "health_state",
    "admission",
    "proxy_protocol",
    "conn_limit",
    "sockopt",
    "notify",
];

/// Top-level module of each file under `src/` (lib.rs and main.rs: none).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its unit tests (the
/// `#[cfg(test)]` module at the end, by the project's convention).
fn code(text: &str) -> String {
    let text = match text
        .find("#[cfg(test)]\nmod tests {")
        .or(text.find("#[cfg(test)]\npub(crate) mod tests {"))
    {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The top-level modules a piece of code names: `crate::x`, the first
/// names inside `crate::{x, y::z}`, and `super::x` from a `mod.rs` (its
/// parent is the crate root).
fn imports(code: &str, is_mod_rs: bool) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut prefixes = vec!["crate::"];
    if is_mod_rs {
        prefixes.push("super::");
    }
    for prefix in prefixes {
        for (at, _) in code.match_indices(prefix) {
            let rest = &code[at + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // Top-level names of the braced group.
                let mut depth = 0;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            found.insert(ident(item.trim()));
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 0 {
                        item.push(c);
                    }
                }
                found.insert(ident(item.trim()));
            } else {
                found.insert(ident(rest));
            }
        }
    }
    found.retain(|m| !m.is_empty() && m.chars().next().is_some_and(|c| c.is_ascii_lowercase()));
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    // SLUICE_SRC: another tree's src/, e.g. to see an older graph.
    let src = std::env::var_os("SLUICE_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read source");
        let is_mod_rs = file.file_name().is_some_and(|n| n == "mod.rs");
        let mut names = imports(&code(&text), is_mod_rs);
        names.remove(&module);
        graph.entry(module).or_default().extend(names);
    }
    // Names that are not modules (items of lib.rs, e.g. `crate::start`).
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    graph
}

/// Every cycle's modules, found by depth-first search.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        if let Some(at) = path.iter().position(|n| n == node) {
            found.push(path[at..].to_vec());
            return;
        }
        if done.contains(node) {
            return;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done, found);
        }
        path.pop();
        done.insert(node.to_string());
    }
    let mut found = Vec::new();
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, graph, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

#[test]
fn modules_form_layers_without_cycles() {
    let graph = graph();
    for (module, deps) in &graph {
        println!(
            "{module} -> {}",
            deps.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let layered: Vec<&str> = [DATA_PATH, MEETING_POINT, SHARED, CONTROL_PLANE].concat();
    let unplaced: Vec<&String> = graph
        .keys()
        .filter(|m| !layered.contains(&m.as_str()))
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules in no layer (add them to tests/it/layers.rs and docs/ARCHITECTURE.md): {unplaced:?}"
    );
    let cycles = cycles(&graph);
    assert!(cycles.is_empty(), "import cycles: {cycles:?}");
    let mut wrong = Vec::new();
    for (module, deps) in &graph {
        let lower = [DATA_PATH, MEETING_POINT, SHARED].concat();
        if lower.contains(&module.as_str()) {
            for dep in deps.iter().filter(|d| CONTROL_PLANE.contains(&d.as_str())) {
                wrong.push(format!("{module} imports the control plane's {dep}"));
            }
        }
        if LEAVES.contains(&module.as_str()) && !deps.is_empty() {
            wrong.push(format!("leaf {module} imports {deps:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn the_checker_sees_imports_and_cycles() {
    let names = imports("use crate::{a::{b, c}, d};\nlet x = crate::e::f();", false);
    assert_eq!(names, ["a", "d", "e"].map(String::from).into());
    assert_eq!(imports("use super::g;", true), ["g".to_string()].into());
    assert!(imports("use super::g;", false).is_empty());
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), ["b".to_string()].into()),
        ("b".to_string(), ["a".to_string()].into()),
        ("c".to_string(), BTreeSet::new()),
    ]
    .into();
    assert_eq!(cycles(&graph), vec![vec!["a".to_string(), "b".to_string()]]);
}
