//! Zero-shot classification helpers shared by the server and the trainer's
//! evaluation: CAPIVARA's Portuguese prompt templates, the class embedding (the
//! renormalised mean of a label's prompt embeddings, as CLIP does it) and a
//! numerically stable softmax.

/// The Portuguese prompt templates of zero-shot classification (CAPIVARA's
/// evaluation prompts start from "uma foto de um {}.").
pub const DEFAULT_TEMPLATES: &[&str] = &[
    "uma foto de um {}.",
    "uma foto ruim de um {}.",
    "uma foto de um {} grande.",
    "uma foto de um {} pequeno.",
    "uma arte de um {}.",
    "um {} em um videogame.",
    "um origami de um {}.",
];

/// `template` with its `{}` replaced by `label` (or `label` appended when the
/// template has no placeholder).
pub fn fill_template(template: &str, label: &str) -> String {
    if template.contains("{}") {
        template.replacen("{}", label, 1)
    } else {
        format!("{template} {label}")
    }
}

/// The class embedding of a label: the mean of its (normalised) prompt
/// embeddings, renormalised.
pub fn mean_normalized(rows: &[Vec<f32>]) -> Vec<f32> {
    let dim = rows.first().map(Vec::len).unwrap_or(0);
    let mut m = vec![0f32; dim];
    for r in rows {
        for (a, b) in m.iter_mut().zip(r) {
            *a += b;
        }
    }
    let norm = m.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    m.iter_mut().for_each(|x| *x /= norm);
    m
}

/// Numerically stable softmax.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// Reads a templates file: one template per line, blank lines and lines
/// starting with `#` skipped.
pub fn parse_templates(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_and_softmax() {
        assert_eq!(
            fill_template("uma foto de um {}.", "gato"),
            "uma foto de um gato."
        );
        assert_eq!(fill_template("foto", "gato"), "foto gato");
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[2] > p[1] && p[1] > p[0]);
        let m = mean_normalized(&[vec![1.0, 0.0], vec![0.0, 1.0]]);
        assert!((m[0] - 0.70710677).abs() < 1e-6 && (m[1] - m[0]).abs() < 1e-7);
        assert_eq!(
            parse_templates("# c\n\n uma foto de um {}. \nfoto {}\n"),
            ["uma foto de um {}.", "foto {}"]
        );
    }
}
