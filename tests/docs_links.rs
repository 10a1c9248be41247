//! The README and docs/*.md point only at files that exist: every relative markdown link, and every
//! repository path written in backticks (`src/...`, `tests/...`, `scripts/...`, ...), resolves to a
//! file or directory of this repository. Paths outside it (`../shared/DESIGN.md`) are not checked.

use std::path::{Path, PathBuf};

/// Top-level directories of the repository whose paths, quoted in backticks, must exist.
const REPO_DIRS: &[&str] = &[
    "src/",
    "tests/",
    "scripts/",
    "e2e/",
    "benches/",
    "examples/",
    "charts/",
    "crds/",
    "images/",
    "docs/",
    ".ci/",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The documents checked: README.md and every docs/*.md.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md")];
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("read docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("md"))
        .collect();
    pages.sort();
    assert!(!pages.is_empty(), "docs/ has no .md pages");
    docs.extend(pages);
    docs
}

/// Targets of inline markdown links `[text](target)`, without `#fragment`, skipping URLs and
/// links to a fragment of the same page.
fn link_targets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = rest[..end].trim();
        rest = &rest[end..];
        let target = target.split('#').next().unwrap_or("");
        if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        out.push(target.to_string());
    }
    out
}

/// Repository paths quoted in backticks (`src/plan/limits.rs`), outside fenced code blocks. Paths
/// with placeholders or globs (`<name>`, `*`, `$OUT`, `...`) are skipped.
fn quoted_repo_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 0 {
                continue;
            }
            let span = span.trim();
            let placeholder = span
                .chars()
                .any(|c| matches!(c, '<' | '>' | '*' | '$' | ' ' | '[' | '{'))
                || span.contains("...");
            if placeholder || !REPO_DIRS.iter().any(|d| span.starts_with(d)) {
                continue;
            }
            out.push(span.to_string());
        }
    }
    out
}

/// Problems in one document: each reference that does not resolve, with what it is.
fn dangling(doc: &Path, text: &str, exists: impl Fn(&Path) -> bool) -> Vec<String> {
    let dir = doc.parent().expect("document has a directory");
    let mut problems = Vec::new();
    for target in link_targets(text) {
        if !exists(&dir.join(&target)) {
            problems.push(format!("link ({target})"));
        }
    }
    for path in quoted_repo_paths(text) {
        if !exists(&root().join(&path)) {
            problems.push(format!("path `{path}`"));
        }
    }
    problems
}

#[test]
fn readme_and_docs_point_at_files_that_exist() {
    let mut problems = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).expect("read document");
        for p in dangling(&doc, &text, |p| p.exists()) {
            problems.push(format!(
                "{}: {p}",
                doc.strip_prefix(root()).unwrap().display()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "references to files that are not in the repository:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_check_finds_dangling_references() {
    let text = "See [the API](api.md#spec), [a gone page](gone.md), [site](https://example.com), \
                [here](#top) and `src/no/such/file.rs`, but not `src/<module>.rs`.\n\
                ```sh\ncat src/fenced/is/skipped.rs\n```\n";
    let doc = root().join("docs/page.md");
    let exists = |p: &Path| p.ends_with("docs/api.md");
    assert_eq!(
        dangling(&doc, text, exists),
        vec![
            "link (gone.md)".to_string(),
            "path `src/no/such/file.rs`".to_string()
        ]
    );
}
