//! Vocabulary compaction: the embedding and classifier cover only the tokens that occur in
//! the prepared corpus (the neural-engine trainer cut Llama 2's 32,000 to 9,200 this way), and
//! ids are mapped back to the full vocabulary for sampling, evaluation and export.

use crate::Result;

macro_rules! bail {
    ($($message:tt)*) => { $crate::fail!(Shape, $($message)*) };
}

/// A map between full-vocabulary ids and a compacted model's ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VocabMap {
    /// `full[model_id]`: the full-vocabulary id of each model token, ascending.
    full: Vec<u32>,
    /// `model[full_id]`: the model id, or `u32::MAX` for tokens the model does not have.
    model: Vec<u32>,
}

impl VocabMap {
    /// Keeps every id that occurs in `corpora` and each of `always` (BOS, EOS).
    pub fn from_corpora<'a>(
        full_vocab: usize,
        corpora: impl IntoIterator<Item = &'a [u32]>,
        always: &[u32],
    ) -> Self {
        let mut seen = vec![false; full_vocab];
        for tokens in corpora {
            tokens.iter().for_each(|&t| seen[t as usize] = true);
        }
        always
            .iter()
            .filter(|&&t| (t as usize) < full_vocab)
            .for_each(|&t| seen[t as usize] = true);
        Self::from_full_ids(
            full_vocab,
            seen.iter()
                .enumerate()
                .filter(|(_, &s)| s)
                .map(|(i, _)| i as u32)
                .collect(),
        )
    }

    /// Rebuilds the map from its saved form (the model-order list of full ids).
    pub fn from_full_ids(full_vocab: usize, full: Vec<u32>) -> Self {
        let mut model = vec![u32::MAX; full_vocab];
        for (i, &f) in full.iter().enumerate() {
            model[f as usize] = i as u32;
        }
        VocabMap { full, model }
    }

    pub fn full_ids(&self) -> &[u32] {
        &self.full
    }

    pub fn model_vocab(&self) -> usize {
        self.full.len()
    }

    pub fn to_model(&self, ids: &[u32]) -> Result<Vec<u32>> {
        ids.iter()
            .map(|&t| match self.model.get(t as usize) {
                Some(&m) if m != u32::MAX => Ok(m),
                _ => bail!("token {t} is not in the compacted vocabulary (it never occurs in the training corpus)"),
            })
            .collect()
    }

    pub fn to_full(&self, id: u32) -> u32 {
        self.full[id as usize]
    }
}

/// What the core needs of a tokenizer: the text of ids, the bytes each token stands for (bits
/// per byte), and the boundary token. The formats crate's `Tokenizer` implements it; the core
/// never reads a tokenizer file.
pub trait TokenText {
    /// The UTF-8 text of `ids` (full-vocabulary ids), invalid sequences replaced by U+FFFD.
    fn decode(&self, ids: &[u32]) -> String;
    /// Bytes of text that `token` stands for when it follows `prev`: its own piece, a
    /// SentencePiece leading space counted unless it is the dummy prefix after a boundary
    /// token, a byte-fallback token one byte, a control token none.
    fn token_bytes(&self, token: u32, prev: Option<u32>) -> usize;
    /// The beginning-of-sequence token, if the vocabulary has one.
    fn bos(&self) -> Option<u32>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_keeps_what_occurs_and_maps_both_ways() {
        let corpus = [5u32, 9, 5, 2];
        let map = VocabMap::from_corpora(10, [&corpus[..]], &[1]);
        assert_eq!(map.full_ids(), &[1, 2, 5, 9]);
        assert_eq!(map.to_model(&[9, 1, 5]).unwrap(), [3, 0, 2]);
        assert_eq!(map.to_full(3), 9);
        let e = map.to_model(&[7]).unwrap_err().to_string();
        assert!(e.contains("token 7"), "{e}");
        assert_eq!(VocabMap::from_full_ids(10, map.full_ids().to_vec()), map);
    }
}
