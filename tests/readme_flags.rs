//! README's flag tables agree with the binary's `--help`: every flag the
//! binary takes is documented in the table of its subcommand, with its
//! environment variable, and the tables list no flag the binary lacks.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Flags of `capivara <cmd> --help` with their env var, if any.
fn help_flags(cmd: &str) -> BTreeMap<String, Option<String>> {
    let out = Command::new(env!("CARGO_BIN_EXE_capivara"))
        .args([cmd, "--help"])
        .output()
        .expect("run capivara --help");
    assert!(out.status.success(), "capivara {cmd} --help failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut flags = BTreeMap::new();
    // The flag whose description is being read: clap writes `[env: NAME=]`
    // at the end of it, on the flag's line or (long help) a later one.
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim_start();
        // Option lines look like `-x, --name <V>  text [env: NAME=]` or `--name ...`.
        let t = match t.as_bytes() {
            [b'-', c, b',', b' ', ..] if *c != b'-' => &t[4..],
            _ => t,
        };
        if let Some(rest) = t.strip_prefix("--") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            current = (name != "help" && !name.is_empty()).then(|| format!("--{name}"));
            if let Some(flag) = &current {
                flags.insert(flag.clone(), None);
            }
        }
        if let (Some(flag), Some((_, e))) = (&current, line.split_once("[env: ")) {
            let name = e.split(['=', ']']).next().unwrap();
            flags.insert(flag.clone(), Some(name.to_string()));
        }
    }
    assert!(!flags.is_empty(), "no flags parsed from `{cmd} --help`");
    flags
}

/// The rows of the first flag table after the README heading that names `cmd`.
fn readme_rows(readme: &str, heading: &str) -> Vec<String> {
    let start = readme
        .lines()
        .position(|l| l.starts_with('#') && l.contains(heading))
        .unwrap_or_else(|| panic!("README has no heading with {heading}"));
    let lines: Vec<&str> = readme.lines().skip(start + 1).collect();
    let table = lines
        .iter()
        .position(|l| l.starts_with("| flag |"))
        .expect("a flag table after the heading");
    assert!(
        !lines[..table].iter().any(|l| l.starts_with("## ")),
        "the flag table after {heading} belongs to another section"
    );
    lines[table + 2..]
        .iter()
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.to_string())
        .collect()
}

fn flags_in(row: &str) -> Vec<String> {
    // The first cell: one or more `--flag` in backquotes.
    let cell = row.trim_start_matches('|').split('|').next().unwrap();
    cell.split('`')
        .filter(|s| s.starts_with("--"))
        .map(str::to_string)
        .collect()
}

fn check(cmd: &str, heading: &str) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let help = help_flags(cmd);
    let rows = readme_rows(&readme, heading);
    let mut documented = BTreeSet::new();
    for row in &rows {
        for flag in flags_in(row) {
            let env = help.get(&flag).unwrap_or_else(|| {
                panic!("README documents {flag} for `capivara {cmd}`, which has no such flag")
            });
            if let Some(env) = env {
                assert!(
                    row.contains(env.as_str()) || row.contains("as for `serve`"),
                    "README's row for {cmd} {flag} does not name its env var {env}: {row}"
                );
            }
            documented.insert(flag);
        }
    }
    for flag in help.keys() {
        assert!(
            documented.contains(flag),
            "`capivara {cmd}` takes {flag} but README's table under '{heading}' does not list it"
        );
    }
}

#[test]
fn serve_flags_are_documented() {
    check("serve", "`capivara serve` flags");
}

#[test]
fn index_flags_are_documented() {
    check("index", "`capivara index`");
}

#[test]
fn embed_flags_are_documented() {
    check("embed", "`capivara embed`");
}

#[test]
fn models_flags_are_documented() {
    check("models", "`capivara models`");
}

#[test]
fn migrate_flags_are_documented() {
    check("migrate", "`capivara migrate`");
}

/// The environment variables docker-compose.yml sets (or shows commented
/// out) are ones `capivara serve` reads.
#[test]
fn compose_env_vars_are_serve_flags() {
    let compose =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
            .unwrap();
    let known: BTreeSet<String> = help_flags("serve").into_values().flatten().collect();
    let mut seen = 0;
    for line in compose.lines() {
        let t = line.trim_start().trim_start_matches('#').trim_start();
        if let Some((name, _)) = t.split_once(':') {
            if name.starts_with("CAPIVARA_") {
                seen += 1;
                assert!(
                    known.contains(name),
                    "docker-compose.yml sets {name}, which `capivara serve` does not read"
                );
            }
        }
    }
    assert!(
        seen >= 3,
        "no CAPIVARA_ variables found in docker-compose.yml"
    );
}
