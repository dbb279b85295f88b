//! Prompts into tokens (text, ids, chat turns re-rendered with the model's template, rolling
//! back cached tokens the new rendering no longer shares) and the history rule after a stop
//! string.

use super::{Prompt, Session};
use crate::backend::Token;
use crate::error::{Error, Result};

impl Session {
    /// Turns the prompt into tokens to append, rolling back cached tokens that a re-rendered
    /// chat no longer shares. Chat messages join the conversation here; a failed call restores it.
    pub(super) fn prepare_prompt(&mut self, prompt: &Prompt) -> Result<Vec<Token>> {
        let model = self.verifier.model().clone();
        match prompt {
            Prompt::Tokens(t) => {
                let n = model.n_vocab() as Token;
                if let Some(bad) = t.iter().find(|&&x| x < 0 || x >= n) {
                    return Err(Error::InvalidParam {
                        name: "tokens",
                        reason: format!("token id {bad} outside the vocabulary (0..{n})"),
                    });
                }
                Ok(t.clone())
            }
            Prompt::Text(s) => model.tokenize(s, self.history.is_empty(), true),
            Prompt::Chat(msgs) => {
                if msgs.is_empty() {
                    return Err(Error::InvalidParam { name: "messages", reason: "no messages".into() });
                }
                let mut all = self.messages.clone();
                all.extend(msgs.iter().cloned());
                let text = model.apply_chat_template(&all, true)?;
                let full = model.tokenize(&text, true, true)?;
                let common = self.history.iter().zip(full.iter()).take_while(|(a, b)| a == b).count();
                if common < self.history.len() {
                    self.truncate_history(common);
                }
                self.messages = all;
                Ok(full[common..].to_vec())
            }
        }
    }

    /// After a stop string: the history (which ends with the `generated` tokens, starting at
    /// `start`) is cut to the tokens whose text lies inside the returned `text`, plus the
    /// re-tokenized rest of `text` when a token straddled the stop string. Returns the
    /// generated tokens that remain.
    pub(super) fn cut_at_stop(&mut self, start: usize, generated: &[Token], text: &str) -> Result<Vec<Token>> {
        let model = self.verifier.model().clone();
        let mut ends = vec![0usize]; // byte offset in `text` after each kept token
        for &t in generated {
            let piece = if model.is_eog(t) { Vec::new() } else { model.token_to_piece(t) };
            let at = ends[ends.len() - 1];
            if at + piece.len() > text.len() || text.as_bytes()[at..at + piece.len()] != piece[..] {
                break;
            }
            ends.push(at + piece.len());
        }
        // A token may end inside a character: keep whole characters only.
        while ends.len() > 1 && !text.is_char_boundary(ends[ends.len() - 1]) {
            ends.pop();
        }
        let keep = ends.len() - 1;
        let bytes = ends[keep];
        let mut out = generated[..keep].to_vec();
        self.truncate_history(start + keep);
        if bytes < text.len() {
            let rest = model.tokenize(&text[bytes..], false, false)?;
            self.history.extend_from_slice(&rest);
            out.extend(rest);
        }
        Ok(out)
    }
}
