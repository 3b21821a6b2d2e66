//! webdataset tar shards as CAPIVARA and img2dataset write them: members
//! `KEY.EXT` grouped into samples by key (`KEY.jpg` + `KEY.json`...). Used by
//! `capivara index` and by the trainer.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// The image extensions a sample's picture may have, in order of preference.
pub const IMAGE_EXTS: &[&str] = &["jpg", "jpeg", "png", "webp"];

/// webdataset's split of a member name: the key is everything up to the first
/// dot of the file name (directories included), the extension the rest
/// (lower-cased).
pub fn split_key(name: &str) -> Option<(String, String)> {
    let slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    let dot = name[slash..].find('.')? + slash;
    Some((
        name[..dot].to_string(),
        name[dot + 1..].to_ascii_lowercase(),
    ))
}

/// What to do with a member, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Read its bytes.
    Read,
    /// Record that it exists (its bytes are seeked over, left empty).
    Presence,
    /// Ignore it.
    Skip,
}

/// A sample: its key and its members by extension.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Group {
    pub key: String,
    pub parts: BTreeMap<String, Vec<u8>>,
}

impl Group {
    /// The sample's image member (extension and bytes), the preferred
    /// extension first.
    pub fn image(&self) -> Option<(&str, &[u8])> {
        IMAGE_EXTS
            .iter()
            .find_map(|e| self.parts.get(*e).map(|b| (*e, b.as_slice())))
    }
}

/// Reads a shard's members grouped by key, in key order. On an error (a file
/// that is not a tar, a shard cut short) the groups complete before it are
/// returned with the error: a damaged shard keeps what it had.
pub fn read_groups(
    path: &Path,
    want: impl Fn(&str) -> Want,
) -> (Vec<Group>, Option<std::io::Error>) {
    let mut groups: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    let mut read = || -> std::io::Result<()> {
        let file = std::fs::File::open(path)?;
        let mut archive = tar::Archive::new(std::io::BufReader::new(file));
        for entry in archive.entries_with_seek()? {
            let mut entry = entry?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry.path()?.to_string_lossy().into_owned();
            let Some((key, ext)) = split_key(&name) else {
                continue;
            };
            let bytes = match want(&ext) {
                Want::Skip => continue,
                Want::Presence => Vec::new(),
                Want::Read => {
                    let mut buf = Vec::with_capacity(entry.size().min(1 << 30) as usize);
                    entry.read_to_end(&mut buf)?;
                    buf
                }
            };
            groups.entry(key).or_default().insert(ext, bytes);
        }
        Ok(())
    };
    let err = read().err();
    let groups = groups
        .into_iter()
        .map(|(key, parts)| Group { key, parts })
        .collect();
    (groups, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(
            split_key("000/abc.jpg"),
            Some(("000/abc".into(), "jpg".into()))
        );
        assert_eq!(
            split_key("a.b/c.seg.JSON"),
            Some(("a.b/c".into(), "seg.json".into()))
        );
        assert_eq!(split_key("noext"), None);
    }

    #[test]
    fn groups_by_key_with_presence_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, data) in [
            ("b.png", &b"PNG-B"[..]),
            ("a.json", b"{}"),
            ("a.jpg", b"JPG-A"),
            ("a.txt", b"skip"),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        }
        b.finish().unwrap();
        let want = |e: &str| match e {
            "json" => Want::Read,
            "txt" => Want::Skip,
            _ => Want::Presence,
        };
        let (g, err) = read_groups(&path, want);
        assert!(err.is_none());
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].key, "a");
        assert_eq!(g[0].parts.keys().collect::<Vec<_>>(), ["jpg", "json"]);
        assert_eq!(g[0].image(), Some(("jpg", &b""[..])));
        assert_eq!(g[0].parts["json"], b"{}");
        let (g, _) = read_groups(&path, |_| Want::Read);
        assert_eq!(g[1].image(), Some(("png", &b"PNG-B"[..])));
        // Not a tar / missing: an error and nothing read.
        std::fs::write(dir.path().join("junk.tar"), vec![7u8; 1000]).unwrap();
        let (g, err) = read_groups(&dir.path().join("junk.tar"), |_| Want::Read);
        assert!(g.is_empty() && err.is_some());
        assert!(read_groups(&dir.path().join("none.tar"), |_| Want::Read)
            .1
            .is_some());
    }
}
