//! What the trainer's integration tests share: the tiny fixture model and
//! running `capivara-train`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny")
}

pub struct Out {
    pub ok: bool,
    pub json: Value,
    pub stderr: String,
}

pub fn cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_capivara-train"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let json = if o.status.success() {
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stderr}"))
    } else {
        Value::Null
    };
    Out {
        ok: o.status.success(),
        json,
        stderr,
    }
}

pub fn ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Value {
    let o = cli(args);
    assert!(
        o.ok,
        "capivara-train {:?} failed: {}",
        shown(args),
        o.stderr
    );
    o.json
}

fn shown<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vec<String> {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect()
}

pub fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Runs `capivara-train` expecting a failure; its stderr.
pub fn fails<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let o = cli(args);
    assert!(!o.ok, "capivara-train {:?} should have failed", shown(args));
    o.stderr
}
