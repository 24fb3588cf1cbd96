//! Tidy checks on the source tree (in the spirit of rust-analyzer's): every
//! import in `src/` points down the layers that ARCHITECTURE.md names.

use std::path::{Path, PathBuf};

/// The crate's modules, lowest layer first. A module may import from a
/// lower layer only: never from its own layer (that would let two modules
/// lean on each other) and never from a higher one.
const LAYERS: &[&[&str]] = &[
    &[
        "config",
        "metrics",
        "errors",
        "tls",
        "listener",
        "access_log",
    ],
    &["discovery", "upstream", "telemetry"],
    &["members"],
    &["balance"],
    &["policy", "proxy", "register"],
    &["admin", "data_path"],
    &["server", "client"],
    &["commands", "example", "testkit"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// An import that points up (or sideways).
#[derive(Debug, PartialEq)]
struct BackImport {
    line: usize,
    from: String,
    to: String,
}

/// The top-level modules `text` (a file of module `module`) names through
/// `crate::`, with their line numbers. Comments are skipped; grouped imports
/// (`crate::{a::X, b}`) name each group member.
fn crate_references(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut in_use_group: Option<usize> = None; // brace depth inside `crate::{`
    for (n, raw) in text.lines().enumerate() {
        let line = match raw.find("//") {
            Some(at) => &raw[..at],
            None => raw,
        };
        let mut rest = line;
        // Continue a `crate::{ ... }` group that spans lines.
        if let Some(depth) = in_use_group.as_mut() {
            let (names, ended) = group_members(rest, depth);
            found.extend(names.into_iter().map(|m| (n + 1, m)));
            if !ended {
                continue;
            }
            in_use_group = None;
            rest = "";
        }
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().last();
            rest = &rest[at + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // `$crate::`, `mycrate::`
            }
            if let Some(group) = rest.strip_prefix('{') {
                let mut depth = 1;
                let (names, ended) = group_members(group, &mut depth);
                found.extend(names.into_iter().map(|m| (n + 1, m)));
                if !ended {
                    in_use_group = Some(depth);
                }
                break;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push((n + 1, name));
            }
        }
    }
    found
}

/// The first path segment of each member of a brace group, reading from
/// inside it at `depth`; true when the group closed on this text.
fn group_members(text: &str, depth: &mut usize) -> (Vec<String>, bool) {
    let mut names = Vec::new();
    let mut expecting = *depth == 1;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '{' => {
                *depth += 1;
                expecting = false;
            }
            '}' => {
                *depth -= 1;
                if *depth == 0 {
                    if !current.is_empty() {
                        names.push(std::mem::take(&mut current));
                    }
                    return (names, true);
                }
            }
            ',' if *depth == 1 => {
                if !current.is_empty() {
                    names.push(std::mem::take(&mut current));
                }
                expecting = true;
            }
            c if expecting && (c.is_alphanumeric() || c == '_') => current.push(c),
            c if expecting && !current.is_empty() && !c.is_whitespace() => {
                names.push(std::mem::take(&mut current));
                expecting = false;
            }
            _ => {}
        }
    }
    if !current.is_empty() {
        names.push(current);
    }
    (names, false)
}

/// Imports in `text` (a file of top-level module `module`) that do not point down.
fn back_imports(module: &str, text: &str) -> Vec<BackImport> {
    let Some(own) = layer_of(module) else {
        return Vec::new();
    };
    crate_references(text)
        .into_iter()
        .filter(|(_, to)| to != module && to != "self")
        .filter(|(_, to)| layer_of(to).is_none_or(|theirs| theirs >= own))
        .map(|(line, to)| BackImport {
            line,
            from: module.to_owned(),
            to,
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/proxy/call.rs` → `proxy`; `None` for the crate root and the binary.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (name != "lib" && name != "main").then(|| name.to_owned())
}

#[test]
fn every_import_points_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    for file in &files {
        let Some(module) = top_module(&src, file) else {
            continue;
        };
        let shown = file
            .strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")))
            .unwrap();
        if layer_of(&module).is_none() {
            problems.push(format!(
                "{}: module `{module}` has no layer: add it to LAYERS in tests/it/tidy.rs and to ARCHITECTURE.md",
                shown.display()
            ));
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read source");
        for b in back_imports(&module, &text) {
            let theirs = layer_of(&b.to).map_or("no".to_owned(), |l| l.to_string());
            problems.push(format!(
                "{}:{}: `{}` (layer {}) imports `crate::{}` (layer {theirs}): imports must point to a lower layer",
                shown.display(),
                b.line,
                b.from,
                layer_of(&b.from).unwrap(),
                b.to
            ));
        }
    }
    assert!(
        files.len() > 40,
        "found only {} files under src/",
        files.len()
    );
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

#[test]
fn the_checker_finds_back_imports_in_every_form() {
    let text = "\
//! crate::server in a comment does not count
use crate::metrics::Thing;
use crate::proxy::services::Members;
use crate::{config::X, server::Gateway};
use crate::{
    metrics,
    admin::{AdminState, serve},
};
fn f() { crate::policy::set::valid_name(\"x\"); crate::members::Members::new(); }
";
    let found = back_imports("balance", text);
    let named: Vec<(usize, &str)> = found.iter().map(|b| (b.line, b.to.as_str())).collect();
    assert_eq!(
        named,
        [(3, "proxy"), (4, "server"), (7, "admin"), (9, "policy")],
        "{found:?}"
    );
    assert!(back_imports("proxy", "use crate::members::Members;").is_empty());
    assert_eq!(
        back_imports(
            "upstream",
            "use crate::upstream::x; use crate::discovery::y;"
        )
        .len(),
        1,
        "sideways imports are back imports too"
    );
}
