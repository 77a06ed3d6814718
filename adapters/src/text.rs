//! Text read from legacy sources: column bytes decoded with the source's `encoding`, and
//! paging keys that give back the exact bytes the source sent.
//!
//! Sources hand Bulwark bytes, and legacy databases do not always know what their bytes
//! mean: a SQLite file filled by an old ERP export holds Latin-1 in TEXT columns, a
//! PostgreSQL `SQL_ASCII` database stores whatever it was given, a MySQL binary column has
//! no character set. Bulwark reads every column as bytes and decodes them here:
//!
//! - bytes that are valid UTF-8 are UTF-8 (a server that knows its columns' character set,
//!   PostgreSQL with a real encoding or MySQL with a declared charset, already converted
//!   them to UTF-8 for the connection);
//! - other bytes are decoded with the configured `encoding` (`windows-1252`, `latin1`,
//!   `iso-8859-15`, `shift_jis`, … any ASCII-compatible WHATWG label), so a database half
//!   converted to UTF-8 reads right too;
//! - with the default `utf-8`, or bytes that are not valid in the configured encoding
//!   either, the value cannot be read: the row is rejected, naming the column.
//!
//! The paging key is different: it goes back to the source as the cursor, so it must be
//! the exact bytes. [`key_token`] keeps it as text when it is valid UTF-8 (always, but
//! for the cases above) and as an escaped form otherwise; [`token_bytes`] reverses it.

use encoding_rs::Encoding;

/// How a source's column bytes become text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TextDecoding {
    /// What bytes that are not UTF-8 are (None: nothing else, they are rejected).
    fallback: Option<&'static Encoding>,
}

impl TextDecoding {
    /// From a WHATWG encoding label (`utf-8`, `latin1`, `windows-1252`, `iso-8859-2`, …).
    pub fn from_label(label: &str) -> Result<Self, String> {
        let enc = Encoding::for_label_no_replacement(label.trim().as_bytes()).ok_or_else(|| {
            format!(
                "encoding {label:?} is not known: use a WHATWG label such as \"utf-8\", \"windows-1252\", \"latin1\", \"iso-8859-15\" or \"shift_jis\""
            )
        })?;
        if enc == encoding_rs::UTF_8 {
            return Ok(Self::default());
        }
        if !enc.is_ascii_compatible() {
            return Err(format!(
                "encoding {label:?} ({}) is not ASCII-compatible: SQL sources send SKUs and numbers as ASCII",
                enc.name()
            ));
        }
        Ok(Self {
            fallback: Some(enc),
        })
    }

    /// The encoding's canonical name (`UTF-8`, `windows-1252`, …).
    pub fn name(&self) -> &'static str {
        self.fallback.unwrap_or(encoding_rs::UTF_8).name()
    }

    /// Decode one value; the error says why (the caller adds the column).
    pub fn decode(&self, bytes: &[u8]) -> Result<String, String> {
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => {
                if let Some(enc) = self.fallback
                    && let Some(s) = enc.decode_without_bom_handling_and_without_replacement(bytes)
                {
                    return Ok(s.into_owned());
                }
                let at = e.valid_up_to();
                let bad: Vec<String> = bytes[at..]
                    .iter()
                    .take(4)
                    .map(|b| format!("{b:02x}"))
                    .collect();
                Err(match self.fallback {
                    None => format!(
                        "bytes are not valid UTF-8 (byte {at}: {}); set the source's encoding (e.g. \"windows-1252\") if the database holds another one",
                        bad.join(" ")
                    ),
                    Some(enc) => format!(
                        "bytes are neither UTF-8 nor {} (byte {at}: {})",
                        enc.name(),
                        bad.join(" ")
                    ),
                })
            }
        }
    }
}

/// Starts a key token that spells bytes which are not UTF-8.
const RAW: &str = "bytes:";

/// The text form of a paging key: the key itself when it is UTF-8 (and does not start
/// with `bytes:`), otherwise `bytes:` and the key with each byte that is not UTF-8
/// written `\xNN` and each backslash `\\` (`bytes:M\xdcLLER-1`). Distinct keys give
/// distinct tokens, and the form is readable in messages.
pub fn key_token(raw: &[u8]) -> String {
    match std::str::from_utf8(raw) {
        Ok(s) if !s.starts_with(RAW) => s.to_string(),
        _ => {
            let mut out = String::from(RAW);
            for chunk in raw.utf8_chunks() {
                out.push_str(&chunk.valid().replace('\\', "\\\\"));
                for b in chunk.invalid() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            }
            out
        }
    }
}

/// The bytes of a key token ([`key_token`]'s inverse).
pub fn token_bytes(token: &str) -> Vec<u8> {
    let Some(rest) = token.strip_prefix(RAW) else {
        return token.as_bytes().to_vec();
    };
    let mut out = Vec::with_capacity(rest.len());
    let mut it = rest.as_bytes().iter().copied().peekable();
    while let Some(c) = it.next() {
        if c != b'\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some(b'x') => {
                let hex: Vec<u8> = it.by_ref().take(2).collect();
                match std::str::from_utf8(&hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => out.push(b),
                    None => out.extend_from_slice(&hex),
                }
            }
            Some(other) => out.push(other),
            None => out.push(b'\\'),
        }
    }
    out
}

/// Whether a token is text the source can be given as a string parameter.
pub fn token_is_text(token: &str) -> bool {
    !token.starts_with(RAW)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_first_then_the_configured_encoding() {
        let utf8 = TextDecoding::default();
        assert_eq!(utf8.decode("Müller".as_bytes()).unwrap(), "Müller");
        let err = utf8.decode(b"M\xfcller").unwrap_err();
        assert!(
            err.contains("not valid UTF-8") && err.contains("byte 1: fc"),
            "{err}"
        );
        let latin = TextDecoding::from_label("latin1").unwrap();
        assert_eq!(latin.name(), "windows-1252");
        assert_eq!(latin.decode(b"M\xfcller \x80").unwrap(), "Müller €");
        assert_eq!(latin.decode("Müller".as_bytes()).unwrap(), "Müller");
        let sjis = TextDecoding::from_label("shift_jis").unwrap();
        assert!(sjis.decode(b"\x82").unwrap_err().contains("Shift_JIS"));
        assert!(
            TextDecoding::from_label("klingon")
                .unwrap_err()
                .contains("windows-1252")
        );
        assert!(
            TextDecoding::from_label("utf-16le")
                .unwrap_err()
                .contains("ASCII")
        );
    }

    #[test]
    fn key_tokens_round_trip_every_byte_string() {
        for raw in [
            b"SKU-1".to_vec(),
            b"M\xdcLLER-1".to_vec(),
            b"".to_vec(),
            b"bytes:41".to_vec(),
            b"bytes:\\x41\\".to_vec(),
            b"a\\b\xff\\x".to_vec(),
            b"\xff\xfe".to_vec(),
        ] {
            let t = key_token(&raw);
            assert_eq!(token_bytes(&t), raw, "{t:?}");
        }
        assert_eq!(key_token(b"SKU-1"), "SKU-1");
        assert_eq!(key_token(b"M\xdcLLER-1"), "bytes:M\\xdcLLER-1");
        assert!(token_is_text("SKU-1"));
        assert!(!token_is_text(&key_token(b"\xff")));
        assert_ne!(key_token(b"bytes:41"), key_token(b"A"));
    }
}
