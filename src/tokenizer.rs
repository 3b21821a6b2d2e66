//! Text -> token ids as open_clip's `HFTokenizer` does it for CAPIVARA: its text
//! cleaning, the XLM-R `tokenizer.json`, truncation to the context length (77)
//! keeping `<s>` and `</s>`, and padding with `<pad>` — to the longest text in
//! the batch only (masked attention and masked mean pooling make the padding
//! length irrelevant to the result).

use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};

/// A padded batch of token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    /// Row-major `(batch, len)`.
    pub ids: Vec<u32>,
    pub batch: usize,
    pub len: usize,
    /// Tokens per text before padding.
    pub lengths: Vec<usize>,
}

impl TokenBatch {
    /// The ids as a `(batch, len)` u32 tensor.
    pub fn to_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.ids, (self.batch, self.len), device)
    }

    /// Row `i` without padding.
    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * self.len..i * self.len + self.lengths[i]]
    }
}

/// The XLM-R tokenizer with open_clip's cleaning and truncation.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    context_length: usize,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`. `pad_id` is the text tower's `pad_token_id`; it must
    /// be the tokenizer's `<pad>` when the tokenizer has one.
    pub fn from_file(path: &Path, context_length: usize, pad_id: u32) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::new(inner, context_length, pad_id)
    }

    /// Wraps a loaded tokenizer.
    pub fn new(mut inner: Tokenizer, context_length: usize, pad_id: u32) -> Result<Self> {
        if context_length < 2 {
            return Err(Error::Tokenizer(format!(
                "context length {context_length} leaves no room for <s> and </s>"
            )));
        }
        if let Some(id) = inner.token_to_id("<pad>") {
            if id != pad_id {
                return Err(Error::Tokenizer(format!(
                    "the tokenizer's <pad> is id {id} but the text tower pads with {pad_id}"
                )));
            }
        }
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: context_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Self {
            inner,
            pad_id,
            context_length,
        })
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids of one text (cleaned, with `<s>`/`</s>`, truncated), unpadded.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(clean_text(text), true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids of a batch, padded to its longest text.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<TokenBatch> {
        let rows = texts
            .iter()
            .map(|t| self.encode(t.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.pad(&rows))
    }

    /// Rows of ids padded with `<pad>` to the longest.
    pub fn pad(&self, rows: &[Vec<u32>]) -> TokenBatch {
        let len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * len);
        let mut lengths = Vec::with_capacity(rows.len());
        for r in rows {
            lengths.push(r.len());
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(self.pad_id, len - r.len()));
        }
        TokenBatch {
            ids,
            batch: rows.len(),
            len,
            lengths,
        }
    }
}

/// open_clip's `HFTokenizer` cleaning (`clean='whitespace'`): `ftfy.fix_text`,
/// `html.unescape` twice, strip, then runs of whitespace collapsed to one space.
/// Of ftfy's fixes, the ones that change ordinary text are done here (HTML
/// entities, Latin ligatures, full-width characters, curly quotes, control
/// characters); its repair of mis-decoded text (mojibake) is not.
pub fn clean_text(text: &str) -> String {
    // ftfy: unescape HTML unless the text looks like HTML.
    let mut s = if text.contains('<') {
        text.to_string()
    } else {
        html_escape::decode_html_entities(text).into_owned()
    };
    s = s
        .chars()
        .filter_map(ftfy_char)
        .fold(String::with_capacity(s.len()), |mut acc, c| {
            match c {
                Fixed::One(c) => acc.push(c),
                Fixed::Str(t) => acc.push_str(t),
            }
            acc
        });
    // open_clip: html.unescape(html.unescape(text)).strip()
    let s = html_escape::decode_html_entities(&s).into_owned();
    let s = html_escape::decode_html_entities(&s).into_owned();
    // whitespace_clean: " ".join(text.split()).strip()
    s.split(is_py_whitespace)
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

enum Fixed {
    One(char),
    Str(&'static str),
}

/// ftfy's per-character fixes: ligatures, character width, quotes, line breaks,
/// control characters. `None` drops the character.
fn ftfy_char(c: char) -> Option<Fixed> {
    use Fixed::*;
    let fixed = match c {
        // fix_latin_ligatures
        'Ĳ' => Str("IJ"),
        'ĳ' => Str("ij"),
        'ŉ' => Str("ʼn"),
        'Ǳ' => Str("DZ"),
        'ǲ' => Str("Dz"),
        'ǳ' => Str("dz"),
        'Ǆ' => Str("DŽ"),
        'ǅ' => Str("Dž"),
        'ǆ' => Str("dž"),
        'Ǉ' => Str("LJ"),
        'ǈ' => Str("Lj"),
        'ǉ' => Str("lj"),
        'Ǌ' => Str("NJ"),
        'ǋ' => Str("Nj"),
        'ǌ' => Str("nj"),
        'ﬀ' => Str("ff"),
        'ﬁ' => Str("fi"),
        'ﬂ' => Str("fl"),
        'ﬃ' => Str("ffi"),
        'ﬄ' => Str("ffl"),
        'ﬅ' => Str("ſt"),
        'ﬆ' => Str("st"),
        // fix_character_width: full-width ASCII and the ideographic space
        '\u{3000}' => One(' '),
        '\u{FF01}'..='\u{FF5E}' => One(char::from_u32(c as u32 - 0xFEE0).unwrap_or(c)),
        // uncurl_quotes
        '\u{02BC}' | '\u{2018}'..='\u{201B}' => One('\''),
        '\u{201C}'..='\u{201F}' => One('"'),
        // fix_line_breaks
        '\r' | '\u{2028}' | '\u{2029}' | '\u{0085}' => One('\n'),
        // remove_control_chars (C0 except tab/LF/FF/CR, DEL, BOM and the
        // Unicode "interlinear annotation"/deprecated format characters)
        '\u{0000}'..='\u{0008}' | '\u{000B}' | '\u{000E}'..='\u{001F}' | '\u{007F}' => return None,
        '\u{206A}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFC}' => return None,
        '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E007F}' => return None,
        _ => One(c),
    };
    Some(fixed)
}

/// `str.split()` with no argument splits on these.
fn is_py_whitespace(c: char) -> bool {
    c.is_whitespace() || matches!(c, '\u{1C}'..='\u{1F}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning() {
        assert_eq!(
            clean_text("  muitos   espaços \n\t quebra  "),
            "muitos espaços quebra"
        );
        assert_eq!(clean_text("pão &amp; manteiga"), "pão & manteiga");
        assert_eq!(clean_text("&amp;amp;"), "&");
        assert_eq!(clean_text("“olá” ‘mundo’"), "\"olá\" 'mundo'");
        assert_eq!(clean_text("ﬁm ＡＢＣ"), "fim ABC");
        assert_eq!(clean_text(""), "");
        assert_eq!(clean_text("a\u{0007}b"), "ab");
    }
}
