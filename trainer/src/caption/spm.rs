//! The Marian (OPUS-MT) tokenizer from the files those repos ship: a
//! SentencePiece model (`source.spm`, a protobuf) for the pieces and
//! `vocab.json` for their ids — no `tokenizer.json`.
//!
//! The `.spm` is read here (a few protobuf fields) into a `tokenizers` Unigram
//! model with the same pieces and scores, behind SentencePiece's own
//! normalisation: the precompiled character map (NFKC for `nmt_nfkc`), extra
//! whitespace removed, a dummy `▁` prefix, spaces as `▁`. The pieces, unknown
//! ones too, are then mapped through `vocab.json` (a piece it lacks is `<unk>`) and `</s>` is
//! appended, as transformers' `MarianTokenizer` does. A target-language token
//! (`>>por<<`) is the first id when the model needs one.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::{Model, NormalizedString, Normalizer};

/// SentencePiece's piece types (`ModelProto.SentencePiece.Type`).
const NORMAL: u64 = 1;
const UNKNOWN: u64 = 2;
const USER_DEFINED: u64 = 4;

/// The parts of a SentencePiece `ModelProto` the encoder needs.
#[derive(Debug, Clone)]
pub struct SpmProto {
    /// (piece, score, type), in id order.
    pub pieces: Vec<(String, f32, u64)>,
    /// `trainer_spec.model_type`: 1 Unigram, 2 BPE, 3 word, 4 char.
    pub model_type: u64,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> anyhow::Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.b.get(self.pos) else {
                bail!("truncated varint");
            };
            self.pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("varint too long")
    }

    fn bytes(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            bail!("field runs past the end");
        };
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next field: (number, wire type, varint value or payload).
    fn field(&mut self) -> anyhow::Result<Option<(u64, Value<'a>)>> {
        if self.pos >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let v = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => Value::Fixed(self.bytes(8)?),
            2 => {
                let n = self.varint()? as usize;
                Value::Bytes(self.bytes(n)?)
            }
            5 => Value::Fixed(self.bytes(4)?),
            w => bail!("unsupported protobuf wire type {w}"),
        };
        Ok(Some((key >> 3, v)))
    }
}

enum Value<'a> {
    Varint(u64),
    Fixed(&'a [u8]),
    Bytes(&'a [u8]),
}

fn fields<'a>(b: &'a [u8]) -> anyhow::Result<Vec<(u64, Value<'a>)>> {
    let mut r = Reader { b, pos: 0 };
    let mut v = Vec::new();
    while let Some(f) = r.field()? {
        v.push(f);
    }
    Ok(v)
}

impl SpmProto {
    /// Parses a serialized `ModelProto`.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Self> {
        let mut p = SpmProto {
            pieces: Vec::new(),
            model_type: 1,
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        for (n, v) in fields(bytes)? {
            match (n, v) {
                (1, Value::Bytes(b)) => {
                    let (mut piece, mut score, mut kind) = (String::new(), 0f32, NORMAL);
                    for (m, w) in fields(b)? {
                        match (m, w) {
                            (1, Value::Bytes(s)) => {
                                piece = String::from_utf8(s.to_vec()).context("a piece")?
                            }
                            (2, Value::Fixed(f)) if f.len() == 4 => {
                                score = f32::from_le_bytes(f.try_into().expect("4 bytes"))
                            }
                            (3, Value::Varint(t)) => kind = t,
                            _ => {}
                        }
                    }
                    p.pieces.push((piece, score, kind));
                }
                (2, Value::Bytes(b)) => {
                    for (m, w) in fields(b)? {
                        if let (3, Value::Varint(t)) = (m, w) {
                            p.model_type = t;
                        }
                    }
                }
                (3, Value::Bytes(b)) => {
                    for (m, w) in fields(b)? {
                        match (m, w) {
                            (2, Value::Bytes(c)) => p.precompiled_charsmap = c.to_vec(),
                            (3, Value::Varint(x)) => p.add_dummy_prefix = x != 0,
                            (4, Value::Varint(x)) => p.remove_extra_whitespaces = x != 0,
                            (5, Value::Varint(x)) => p.escape_whitespaces = x != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if p.pieces.is_empty() {
            bail!("no pieces: not a SentencePiece model");
        }
        Ok(p)
    }
}

/// A SentencePiece Unigram encoder: text -> pieces.
pub struct SpmEncoder {
    proto: SpmProto,
    normalizer: Option<Precompiled>,
    unigram: Unigram,
}

impl SpmEncoder {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::new(SpmProto::parse(&bytes).with_context(|| format!("{}", path.display()))?)
    }

    pub fn new(proto: SpmProto) -> anyhow::Result<Self> {
        if proto.model_type != 1 {
            bail!(
                "SentencePiece model type {} is not Unigram (the only one OPUS-MT uses)",
                proto.model_type
            );
        }
        // Control pieces (<s>, </s>) never match text: the lattice gets the
        // normal, user-defined and unknown pieces only.
        let mut vocab = Vec::new();
        let mut unk = None;
        for (piece, score, kind) in &proto.pieces {
            match *kind {
                UNKNOWN => {
                    unk = Some(vocab.len());
                    vocab.push((piece.clone(), f64::from(*score)));
                }
                NORMAL | USER_DEFINED => vocab.push((piece.clone(), f64::from(*score))),
                _ => {}
            }
        }
        let unk = unk.context("the SentencePiece model has no unknown piece")?;
        let unigram = Unigram::from(vocab, Some(unk), false)
            .map_err(|e| anyhow::anyhow!("building the Unigram model: {e}"))?;
        let normalizer = if proto.precompiled_charsmap.is_empty() {
            None
        } else {
            Some(
                Precompiled::from(&proto.precompiled_charsmap)
                    .map_err(|e| anyhow::anyhow!("the precompiled character map: {e}"))?,
            )
        };
        Ok(Self {
            proto,
            normalizer,
            unigram,
        })
    }

    /// SentencePiece's normalisation: the character map, then whitespace.
    pub fn normalize(&self, text: &str) -> anyhow::Result<String> {
        let mapped = match &self.normalizer {
            Some(n) => {
                let mut s = NormalizedString::from(text);
                n.normalize(&mut s)
                    .map_err(|e| anyhow::anyhow!("normalising: {e}"))?;
                s.get().to_string()
            }
            None => text.to_string(),
        };
        let mut out = if self.proto.remove_extra_whitespaces {
            mapped
                .split(' ')
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            mapped
        };
        if out.is_empty() {
            return Ok(out);
        }
        if self.proto.add_dummy_prefix {
            out.insert(0, ' ');
        }
        if self.proto.escape_whitespaces {
            out = out.replace(' ', "\u{2581}");
        }
        Ok(out)
    }

    /// Text -> pieces; an unknown stretch is one piece of its own characters
    /// (consecutive unknown characters fused, as in SentencePiece).
    pub fn pieces(&self, text: &str) -> anyhow::Result<Vec<String>> {
        let norm = self.normalize(text)?;
        if norm.is_empty() {
            return Ok(vec![]);
        }
        let toks = self
            .unigram
            .tokenize(&norm)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(toks.into_iter().map(|t| t.value).collect())
    }
}

/// transformers' `MarianTokenizer`: source pieces through `vocab.json`.
pub struct MarianTokenizer {
    source: SpmEncoder,
    vocab: HashMap<String, u32>,
    inverse: HashMap<u32, String>,
    pub eos: u32,
    pub unk: u32,
    pub pad: u32,
}

impl MarianTokenizer {
    /// `source.spm` and `vocab.json` (joint vocabulary).
    pub fn from_files(source_spm: &Path, vocab_json: &Path) -> anyhow::Result<Self> {
        let source = SpmEncoder::from_file(source_spm)?;
        let vocab: HashMap<String, u32> = serde_json::from_slice(
            &std::fs::read(vocab_json)
                .with_context(|| format!("reading {}", vocab_json.display()))?,
        )
        .with_context(|| format!("parsing {}", vocab_json.display()))?;
        let id = |t: &str| {
            vocab
                .get(t)
                .copied()
                .with_context(|| format!("{} has no `{t}`", vocab_json.display()))
        };
        let (eos, unk, pad) = (id("</s>")?, id("<unk>")?, id("<pad>")?);
        let inverse = vocab.iter().map(|(k, v)| (*v, k.clone())).collect();
        Ok(Self {
            source,
            vocab,
            inverse,
            eos,
            unk,
            pad,
        })
    }

    /// The target-language tokens (`>>por<<`) the vocabulary has.
    pub fn language_tokens(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .vocab
            .keys()
            .filter(|k| k.starts_with(">>") && k.ends_with("<<"))
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// Text -> ids ending in `</s>`. A leading `>>xx<<` is a language token, as
    /// in MarianTokenizer.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut text = text;
        if let Some(rest) = text.strip_prefix(">>") {
            if let Some(end) = rest.find("<<") {
                let code = &text[..end + 4];
                ids.push(self.vocab.get(code).copied().unwrap_or(self.unk));
                text = &text[end + 4..];
            }
        }
        // Every piece through vocab.json, unknown ones too: a character the
        // source model lacks may be a target piece of the joint vocabulary.
        for p in self.source.pieces(text)? {
            ids.push(self.vocab.get(&p).copied().unwrap_or(self.unk));
        }
        ids.push(self.eos);
        Ok(ids)
    }

    /// Ids -> text, special and language tokens skipped (`skip_special_tokens`).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut s = String::new();
        for id in ids {
            if [self.eos, self.unk, self.pad].contains(id) {
                continue;
            }
            if let Some(p) = self.inverse.get(id) {
                if p.starts_with(">>") && p.ends_with("<<") {
                    continue;
                }
                s.push_str(p);
            }
        }
        s.replace('\u{2581}', " ").trim().to_string()
    }
}
