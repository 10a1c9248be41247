//! The crate's module graph runs one way: plan (with the leaf helpers text and charts), then api,
//! worker and serving, then controller, loadgen and bench, then cli, then the binaries. A module
//! may import from its own layer's peers only where listed, and from lower layers freely; never
//! from a higher one. Test modules (`#[cfg(test)]` onward) may reach up to build fixtures.

use std::path::Path;

/// Layer of each top-level module of the library, and of `bin`.
const LAYERS: &[(&str, u32)] = &[
    ("plan", 0),
    ("text", 0),
    ("charts", 0),
    ("api", 1),
    ("worker", 1),
    ("serving", 1),
    ("controller", 2),
    ("ep", 2),
    ("loadgen", 2),
    ("bench", 2),
    ("cli", 3),
    ("bin", 4),
];

fn layer(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// The top-level modules `code` (one file of module `from`) imports from a higher layer.
fn upward_imports(from: &str, code: &str) -> Vec<String> {
    let code = code.split("#[cfg(test)]").next().unwrap_or("");
    let own = layer(from).unwrap_or_else(|| panic!("module {from} has no layer in LAYERS"));
    let mut found = Vec::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        for prefix in ["crate::", "moe_operator::"] {
            for (i, _) in line.match_indices(prefix) {
                let rest = &line[i + prefix.len()..];
                let target: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                match layer(&target) {
                    Some(l) if l > own => found.push(format!("{from} -> {target}: {line}")),
                    None if !target.is_empty() => {
                        found.push(format!("{from} -> {target} (no layer in LAYERS): {line}"))
                    }
                    _ => {}
                }
            }
        }
    }
    found
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_from_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut bad = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel.iter().next().unwrap().to_str().unwrap();
        let module = top.trim_end_matches(".rs");
        if module == "lib" {
            continue;
        }
        let code = std::fs::read_to_string(f).unwrap();
        bad.extend(upward_imports(module, &code));
    }
    assert!(
        bad.is_empty(),
        "imports that run up the layers:\n{}",
        bad.join("\n")
    );
    assert!(files.len() > 50, "walked only {} files", files.len());
}

#[test]
fn the_check_sees_an_upward_import() {
    assert_eq!(
        upward_imports("serving", "use crate::cli::kube_view::table;").len(),
        1
    );
    assert!(upward_imports("cli", "use crate::plan::ExpertPlan;").is_empty());
    assert!(upward_imports(
        "plan",
        "// see crate::cli\n#[cfg(test)]\nuse crate::api::X;"
    )
    .is_empty());
    assert_eq!(upward_imports("plan", "use crate::nowhere::X;").len(), 1);
}
