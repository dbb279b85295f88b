//! Streaming text: committed token bytes become whole UTF-8 characters, and text that could
//! still turn into a stop string is held back until it cannot. Pure: no llama.cpp here.

/// Turns committed bytes into text pieces: whole UTF-8 characters only, and text that could
/// still become a stop string is held back until it cannot.
pub(crate) struct TextStream {
    stops: Vec<String>,
    bytes: Vec<u8>,
    /// Valid text decoded so far.
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    /// Where a stop string was found (text is cut there).
    cut: Option<usize>,
}

impl TextStream {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            bytes: Vec::new(),
            text: String::new(),
            emitted: 0,
            cut: None,
        }
    }

    /// Adds bytes; returns the text that can be shown now and whether a stop string appeared.
    pub(crate) fn push(&mut self, new: &[u8]) -> (String, bool) {
        self.bytes.extend_from_slice(new);
        // Decode like String::from_utf8_lossy over the whole stream, but keep an incomplete
        // trailing character for the next push, so chunking never changes the text.
        let mut decoded = String::new();
        loop {
            match std::str::from_utf8(&self.bytes) {
                Ok(s) => {
                    decoded.push_str(s);
                    self.bytes.clear();
                    break;
                }
                Err(e) => {
                    let ok = e.valid_up_to();
                    decoded.push_str(&String::from_utf8_lossy(&self.bytes[..ok]));
                    match e.error_len() {
                        Some(bad) => {
                            decoded.push(char::REPLACEMENT_CHARACTER);
                            self.bytes.drain(..ok + bad);
                        }
                        None => {
                            self.bytes.drain(..ok);
                            break;
                        }
                    }
                }
            }
        }
        let search_from = self.text.len().saturating_sub(self.stops.iter().map(String::len).max().unwrap_or(0));
        self.text.push_str(&decoded);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| {
                let mut from = search_from;
                while !self.text.is_char_boundary(from) {
                    from -= 1;
                }
                self.text[from..].find(s.as_str()).map(|p| p + from)
            })
            .min()
        {
            self.text.truncate(pos);
            self.cut = Some(pos);
            let piece = self.text[self.emitted.min(pos)..].to_string();
            self.emitted = pos;
            return (piece, true);
        }
        // Hold back a suffix that is a prefix of some stop string.
        let mut safe = self.text.len();
        for (i, _) in self.text.char_indices().rev().take(64) {
            let suffix = &self.text[i..];
            if self.stops.iter().any(|s| s.starts_with(suffix)) {
                safe = i;
            }
        }
        let safe = safe.max(self.emitted);
        let piece = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (piece, false)
    }

    /// Text not yet handed out (held-back stop-string prefixes, when no stop string followed).
    pub(crate) fn finish(&mut self) -> String {
        if self.cut.is_none() && !self.bytes.is_empty() {
            let rest = String::from_utf8_lossy(&self.bytes).into_owned();
            self.text.push_str(&rest);
            self.bytes.clear();
        }
        let end = self.cut.unwrap_or(self.text.len());
        let piece = self.text[self.emitted.min(end)..end].to_string();
        self.emitted = end;
        piece
    }

    pub(crate) fn text(&self) -> String {
        self.text.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stream_holds_back_possible_stop_strings() {
        let mut s = TextStream::new(vec!["\n\n".into()]);
        assert_eq!(s.push(b"abc\n"), ("abc".to_string(), false));
        assert_eq!(s.push(b"d"), ("\nd".to_string(), false));
        let (piece, stop) = s.push(b"e\n\nf");
        assert!(stop);
        assert_eq!(piece, "e");
        assert_eq!(s.text(), "abc\nde");
    }

    #[test]
    fn text_stream_waits_for_whole_utf8_characters() {
        let mut s = TextStream::new(vec![]);
        let euro = "€".as_bytes();
        assert_eq!(s.push(&euro[..1]).0, "");
        assert_eq!(s.push(&euro[1..]).0, "€");
        assert_eq!(s.finish(), "");
    }
}
