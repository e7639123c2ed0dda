//! Streaming detokenization: text pieces as tokens arrive, never half a UTF-8 character, never
//! a dropped or doubled space, and never text a stop string could still claim.

use crate::EngineError;
use crate::tokenizer::Tokenizer;

/// Turns a growing list of token ids into text pieces.
///
/// Decoding a single token loses context (SentencePiece drops a leading space at the start of
/// a decode; a byte token may be half a character). So each step decodes a short window of
/// recent tokens twice — with and without the new ones — and emits the difference once it no
/// longer ends in an incomplete character.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// Tokens up to here have been emitted.
    read_offset: usize,
}

impl Detokenizer {
    /// Starts after `context` (e.g. the prompt's last tokens), which is never emitted.
    pub fn with_context(context: &[u32]) -> Detokenizer {
        // A few tokens of context are enough to fix leading-space handling.
        let keep = context.len().min(4);
        let ids = context[context.len() - keep..].to_vec();
        Detokenizer { prefix_offset: 0, read_offset: ids.len(), ids }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, EngineError> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else if !full.starts_with(&prefix) && !full.ends_with('\u{FFFD}') {
            // The tokenizer rewrote earlier text (rare normalisation): resynchronise.
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(full.get(prefix.len().min(full.len())..).unwrap_or_default().to_string())
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back (an incomplete character at the end), flushed as is.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, EngineError> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// Holds back text that might be the start of a stop string, and finds stop strings.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What a piece of text amounts to once stop strings are considered.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Emit this text (possibly empty) and go on.
    Continue(String),
    /// Emit this text, then stop: a stop string was found (and is not part of the text).
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher { stops, pending: String::new() }
    }

    /// Feeds newly decoded text.
    pub fn feed(&mut self, text: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(text.to_string());
        }
        self.pending.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return StopCheck::Stop(out);
        }
        // Keep the longest tail that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if s.starts_with(tail) {
                    hold = hold.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopCheck::Continue(out)
    }

    /// Text held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_split_across_pieces_are_found_and_held_back() {
        let mut m = StopMatcher::new(vec!["\nUser:".into()]);
        assert_eq!(m.feed("Hello"), StopCheck::Continue("Hello".into()));
        assert_eq!(m.feed(" there\nUs"), StopCheck::Continue(" there".into()));
        assert_eq!(m.feed("er: hi"), StopCheck::Stop(String::new()));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.feed("abcE"), StopCheck::Continue("abc".into()));
        assert_eq!(m.feed("x"), StopCheck::Continue("Ex".into()));
        assert_eq!(m.feed("yyEN"), StopCheck::Continue("yy".into()));
        assert_eq!(m.flush(), "EN");
    }

    #[test]
    fn the_earliest_stop_wins() {
        let mut m = StopMatcher::new(vec!["cd".into(), "b".into()]);
        assert_eq!(m.feed("abcd"), StopCheck::Stop("a".into()));
    }
}
