//! The module layers of `strata-common`: imports only point down.
//!
//! It reads `common/src/**/*.rs`, collects every `crate::<module>` path per top-level module
//! (`use crate::{a, b::c}` groups included, comments skipped), and asserts that no module
//! names one declared above it in [`LAYERS`] (a file's `mod tests` may reach any layer).
//! Inside the directory modules of [`DIRECTORIES`]
//! it collects `super::<file>` paths between sibling files and asserts they form no
//! cycle. A failure names the file, the line and the two modules.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules, lowest first: a module may import those before it, never one after.
const LAYERS: &[&str] = &[
    // The shared vocabulary of logging and metrics.
    "telemetry",
    "metrics",
    // The replicated store, then the QUIC transport.
    "store",
    "transport",
    // Readiness is a pure function of store and cluster facts (the node copies them in).
    "readiness",
    // Membership, broadcast and sync over the transport into the store.
    "cluster",
    // Configuration gathers the sections of the layers below.
    "config",
    // Serving: the gRPC API, the admin listener, the watchdog.
    "api",
    "admin",
    "watchdog",
    // Assembly, then the command line.
    "node",
    "cli",
];

/// Known upward imports on this branch, as (file, imported module): each is another part's
/// work and is removed once it lands.
const KNOWN_EXCEPTIONS: &[(&str, &str)] = &[];

/// Directory modules whose files' `super::` imports must not form a cycle. The others still
/// have cycles between sibling files on this branch, which their owners are restructuring
/// (add each here once it is acyclic): `transport/` (error <-> tls, error <-> frame), `store/`
/// (schema -> value -> error -> schema, apply <-> waiting), `cluster/` (core <-> broadcast,
/// core <-> membership, core <-> sync).
const DIRECTORIES: &[&str] = &["api"];

/// Known cycles between sibling files of a checked directory (the files of the cycle, sorted).
const KNOWN_CYCLES: &[&[&str]] = &[];

/// One import: where it is and what it names.
#[derive(Debug, Clone)]
struct Import {
    /// Path under `common/src`.
    file: String,
    /// 1-based.
    line: usize,
    /// The module named after `crate::` or `super::`.
    module: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// Every file under `common/src`, as (path relative to it, text).
fn sources() -> Vec<(String, String)> {
    let root = src_dir();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let relative = path.strip_prefix(&root).unwrap();
            let relative = relative.to_string_lossy().replace('\\', "/");
            (relative, text)
        })
        .collect()
}

/// The text with every comment (`//`, `///`, `//!` to the end of the line) removed, lines
/// kept in place. A `//` inside a string (a URL) cuts the rest of its line too, which at worst
/// misses an import written after a URL on the same line.
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The identifier at the start of `text` (after whitespace).
fn ident(text: &str) -> Option<&str> {
    let text = text.trim_start();
    let end = text.find(|c: char| !is_ident(c)).unwrap_or(text.len());
    (end > 0).then(|| &text[..end])
}

/// Every module named after `prefix` (`crate::` or `super::`) in `text`, with its line:
/// `prefix::name` and each first segment of a group `prefix::{a, b::c, d::{e}}`.
fn paths(file: &str, text: &str, prefix: &str) -> Vec<Import> {
    let line_of = |offset: usize| text[..offset].matches('\n').count() + 1;
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find(prefix) {
        let start = from + at;
        from = start + prefix.len();
        // `foo_crate::` or `a::super::` are other paths.
        let before = text[..start].chars().next_back();
        if before.is_some_and(|c| is_ident(c) || c == ':') {
            continue;
        }
        let rest = &text[from..];
        if let Some(group) = rest.strip_prefix('{') {
            // Walk the group: a name starts after `{` or `,` at depth 1.
            let mut depth = 1;
            let mut expect_name = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => expect_name = true,
                    c if c.is_whitespace() => {}
                    _ if expect_name && depth == 1 => {
                        expect_name = false;
                        if let Some(name) = ident(&group[i..])
                            && name != "self"
                        {
                            found.push(Import {
                                file: file.to_owned(),
                                line: line_of(from + 1 + i),
                                module: name.to_owned(),
                            });
                        }
                    }
                    _ => {}
                }
            }
        } else if let Some(name) = ident(rest) {
            found.push(Import {
                file: file.to_owned(),
                line: line_of(start),
                module: name.to_owned(),
            });
        }
    }
    found
}

/// The top-level module a file belongs to (`store/writer.rs` -> `store`), `None` for `lib.rs`.
fn top_module(file: &str) -> Option<&str> {
    match file.split_once('/') {
        Some((dir, _)) => Some(dir),
        None if file == "lib.rs" => None,
        None => file.strip_suffix(".rs"),
    }
}

#[test]
fn every_top_level_module_is_declared_in_the_layers() {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).unwrap();
    let declared: BTreeSet<&str> = lib
        .lines()
        .filter_map(|line| line.trim().strip_prefix("pub mod "))
        .filter_map(|rest| rest.strip_suffix(';'))
        .collect();
    let layered: BTreeSet<&str> = LAYERS.iter().copied().collect();
    assert_eq!(
        declared, layered,
        "lib.rs declares these modules; LAYERS in tests/layers.rs must list each exactly once"
    );
    assert_eq!(LAYERS.len(), layered.len(), "a module is listed twice");
}

#[test]
fn no_module_imports_one_above_it() {
    let rank: BTreeMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut upward = Vec::new();
    let mut excepted = BTreeSet::new();
    for (file, text) in sources() {
        let Some(from) = top_module(&file) else {
            continue;
        };
        let from_rank = rank[from];
        let text = without_comments(&text);
        // A file's unit tests may reach any layer (the registry's tests register a real
        // layer's series); only the code the crate ships is layered.
        let shipped = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default();
        for import in paths(&file, shipped, "crate::") {
            let Some(&to_rank) = rank.get(import.module.as_str()) else {
                continue; // a crate-level item, not a module
            };
            if to_rank <= from_rank {
                continue;
            }
            if KNOWN_EXCEPTIONS.contains(&(file.as_str(), import.module.as_str())) {
                excepted.insert((file.clone(), import.module.clone()));
                continue;
            }
            upward.push(format!(
                "common/src/{}:{}: {} imports {}, which is above it",
                import.file, import.line, from, import.module
            ));
        }
    }
    assert!(
        upward.is_empty(),
        "imports that point up the layers (lowest first: {}):\n{}",
        LAYERS.join(", "),
        upward.join("\n")
    );
    // An exception that no longer occurs must be removed, so the list stays the truth.
    for (file, module) in KNOWN_EXCEPTIONS {
        assert!(
            excepted.contains(&(file.to_string(), module.to_string())),
            "the known exception {file} -> {module} no longer occurs: remove it from \
             KNOWN_EXCEPTIONS"
        );
    }
}

#[test]
fn the_files_of_a_directory_module_import_each_other_without_cycles() {
    let files = sources();
    let mut problems = Vec::new();
    for dir in DIRECTORIES {
        let prefix = format!("{dir}/");
        let siblings: BTreeSet<String> = files
            .iter()
            .filter_map(|(file, _)| file.strip_prefix(&prefix))
            .filter(|rest| !rest.contains('/'))
            .filter_map(|rest| rest.strip_suffix(".rs"))
            .filter(|name| *name != "mod")
            .map(str::to_owned)
            .collect();
        // file -> sibling -> first line naming it
        let mut edges: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for (file, text) in &files {
            let Some(name) = file
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(".rs"))
            else {
                continue;
            };
            if !siblings.contains(name) {
                continue;
            }
            let text = without_comments(text);
            // `tests` modules inside a file see the file itself as `super`: only imports
            // before the first `#[cfg(test)]` count.
            let text = text.split("#[cfg(test)]").next().unwrap_or_default();
            let mut imports = paths(file, text, "super::");
            imports.extend(
                paths(file, text, &format!("crate::{dir}::"))
                    .into_iter()
                    .filter(|i| siblings.contains(&i.module)),
            );
            for import in imports {
                if siblings.contains(&import.module) && import.module != name {
                    edges
                        .entry(name.to_owned())
                        .or_default()
                        .entry(import.module)
                        .or_insert(import.line);
                }
            }
        }
        let mut reported = BTreeSet::new();
        for cycle in cycles(&edges) {
            let mut members: Vec<&str> = cycle.iter().map(String::as_str).collect();
            members.sort();
            members.dedup();
            if KNOWN_CYCLES.contains(&members.as_slice()) || !reported.insert(members.join(",")) {
                continue;
            }
            let steps: Vec<String> = cycle
                .windows(2)
                .map(|pair| {
                    let line = edges[&pair[0]][&pair[1]];
                    format!(
                        "common/src/{dir}/{}.rs:{line}: {} imports {}",
                        pair[0], pair[0], pair[1]
                    )
                })
                .collect();
            problems.push(format!("cycle in {dir}/:\n  {}", steps.join("\n  ")));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// One cycle per strongly connected group found by a depth-first search, as a closed walk
/// (`a, b, a`).
fn cycles(edges: &BTreeMap<String, BTreeMap<String, usize>>) -> Vec<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeMap<String, usize>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_owned());
            found.push(cycle);
            return;
        }
        if done.contains(node) {
            return;
        }
        stack.push(node.to_owned());
        for next in edges.get(node).into_iter().flat_map(|e| e.keys()) {
            visit(next, edges, stack, done, found);
        }
        stack.pop();
        done.insert(node.to_owned());
    }
    let mut found = Vec::new();
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        visit(node, edges, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

#[test]
fn the_import_scanner_reads_groups_and_skips_other_paths() {
    let text = "use crate::store::Store;\nuse crate::{api::{self, X}, cluster,\n  metrics};\n\
                let x = my_crate::node::f(); // crate::cli\n";
    let modules: Vec<(String, usize)> = paths("x.rs", &without_comments(text), "crate::")
        .into_iter()
        .map(|i| (i.module, i.line))
        .collect();
    assert_eq!(
        modules,
        vec![
            ("store".to_owned(), 1),
            ("api".to_owned(), 2),
            ("cluster".to_owned(), 2),
            ("metrics".to_owned(), 3)
        ]
    );
}
