//! The repository carries its own design and rules reference (`docs/`): no tracked file cites a
//! document that is not in the repository, and every citation of a page of `docs/`, or of a
//! section of one (`#heading`), names a page and a heading that exist.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The documents that once lived outside the repository, and how they were cited. Spelled in
/// pieces so that this file does not cite them itself.
const OUTSIDE: [&str; 6] = [
    concat!("DESIGN", ".md"),
    concat!("POLICY", ".md"),
    concat!("STACK", ".md"),
    concat!("TESTING", ".md"),
    concat!("../", "shared"),
    concat!("DESIGN", " §"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

/// The tracked files (`git ls-files`), relative to the root; outside a git checkout, every file
/// but build output, fuzzing output and dot-directories.
fn files(root: &Path) -> Vec<PathBuf> {
    let listed = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["ls-files", "-z"])
        .output();
    if let Ok(out) = listed {
        if out.status.success() {
            return out
                .stdout
                .split(|&b| b == 0)
                .filter(|p| !p.is_empty())
                .map(|p| PathBuf::from(String::from_utf8_lossy(p).into_owned()))
                .collect();
        }
    }
    let mut found = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(root.join(&dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = dir.join(&name);
            let skip = name.starts_with('.')
                || name == "target"
                || path == Path::new("fuzz/corpus")
                || path == Path::new("fuzz/artifacts");
            match entry.file_type() {
                Ok(t) if t.is_dir() && !skip => dirs.push(path),
                Ok(t) if t.is_file() => found.push(path),
                _ => {}
            }
        }
    }
    found
}

/// Each tracked file's text with its path (files that are gone or not text are left out).
fn texts() -> Vec<(PathBuf, String)> {
    let root = root();
    let files = files(&root);
    assert!(
        files.iter().any(|f| f == Path::new("docs/architecture.md")),
        "docs/architecture.md is not among the files of {}",
        root.display()
    );
    files
        .into_iter()
        .filter_map(|f| {
            let bytes = std::fs::read(root.join(&f)).ok()?;
            Some((f, String::from_utf8(bytes).ok()?))
        })
        .collect()
}

#[test]
fn no_file_cites_a_document_outside_the_repository() {
    let mut found = Vec::new();
    for (path, text) in texts() {
        for (n, line) in text.lines().enumerate() {
            for pattern in OUTSIDE {
                if line.contains(pattern) {
                    found.push(format!("{}:{}: {pattern}", path.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "cite docs/architecture.md or docs/rules.md instead:\n{}",
        found.join("\n")
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown page's headings (outside code blocks).
fn anchors(page: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in page.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.push(slug(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn citations_of_docs_name_pages_and_headings_that_exist() {
    let root = root();
    let mut found = Vec::new();
    let mut cited = 0;
    for (path, text) in texts() {
        for (n, line) in text.lines().enumerate() {
            for (at, _) in line.match_indices("docs/") {
                let rest = &line[at + "docs/".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                    .collect();
                let Some(page) = name.strip_suffix(".md").map(|_| name.as_str()) else {
                    continue;
                };
                cited += 1;
                let place = format!("{}:{}", path.display(), n + 1);
                let Ok(doc) = std::fs::read_to_string(root.join("docs").join(page)) else {
                    found.push(format!("{place}: docs/{page} does not exist"));
                    continue;
                };
                let Some(anchor) = rest[name.len()..].strip_prefix('#') else {
                    continue;
                };
                let anchor: String = anchor
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || matches!(c, '_' | '-'))
                    .collect();
                if !anchors(&doc).contains(&anchor) {
                    found.push(format!("{place}: docs/{page} has no heading #{anchor}"));
                }
            }
        }
    }
    assert!(cited > 0, "no citation of docs/ found at all");
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn headings_become_github_anchors() {
    assert_eq!(slug(" Failure modes"), "failure-modes");
    assert_eq!(slug("rules.toml reference"), "rulestoml-reference");
    assert_eq!(
        anchors("# A\n```\n# not a heading\n```\n## Test layers\n"),
        ["a", "test-layers"]
    );
}
