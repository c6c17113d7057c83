//! A JSON document model that keeps numbers as their literal text.
//!
//! General-purpose JSON libraries turn every number into an `f64` or an integer as they parse,
//! before anyone knows what the number is for. A number meant as an Avro `float` is then rounded
//! twice (decimal to `f64`, `f64` to `f32`), a `long` beyond 2^53 written in exponent form is
//! rounded, and a parser tuned for speed over exactness changes the last digit of about one
//! double in ten (`serde_json` without its `float_roundtrip` feature did exactly that to pushed
//! values). Here a number stays text until [`avro_json`](crate::avro_json) converts it, once, to
//! the type the schema asks for.
//!
//! The parser is strict RFC 8259: one value, no trailing commas, no comments, no `NaN`, no
//! leading zeros, no control characters inside strings, at most [`DEPTH_MAX`] levels of nesting.
//! An object with a repeated member name is refused: which of the two values is meant cannot be
//! told, and silently keeping one would alter the data.

use std::fmt::Write as _;

use thiserror::Error;

/// Deepest nesting of arrays and objects accepted.
pub const DEPTH_MAX: usize = 128;

/// A JSON value; numbers keep their literal text (validated against JSON's number grammar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Json {
    Null,
    Bool(bool),
    /// The number exactly as written, e.g. `-0.9418320440936001` or `1e300`.
    Number(String),
    String(String),
    Array(Vec<Json>),
    /// Members in document order; names are unique.
    Object(Vec<(String, Json)>),
}

/// Why a text is not a JSON document.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid JSON at byte {at}: {detail}")]
pub struct JsonError {
    pub at: usize,
    pub detail: String,
}

impl Json {
    /// Parses one JSON document (surrounding whitespace allowed).
    pub fn parse(text: &str) -> Result<Json, JsonError> {
        let mut p = Parser {
            bytes: text.as_bytes(),
            text,
            at: 0,
            depth: 0,
        };
        p.whitespace();
        let value = p.value()?;
        p.whitespace();
        if p.at != p.bytes.len() {
            return Err(p.error("unexpected text after the JSON value"));
        }
        Ok(value)
    }

    /// The member `name` of an object.
    pub fn get(&self, name: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().find(|(n, _)| n == name).map(|(_, v)| v),
            _ => None,
        }
    }

    /// What kind of JSON value this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Number(_) => "a number",
            Json::String(_) => "a string",
            Json::Array(_) => "an array",
            Json::Object(_) => "an object",
        }
    }

    /// Compact JSON text.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    /// Appends compact JSON text to `out`.
    pub fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => out.push_str(n),
            Json::String(s) => write_string(s, out),
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Json::Object(members) => {
                out.push('{');
                for (i, (name, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_string(name, out);
                    out.push(':');
                    value.write(out);
                }
                out.push('}');
            }
        }
    }

    /// A short excerpt of the value for error messages (at most about 60 characters).
    pub fn excerpt(&self) -> String {
        let text = self.to_text();
        if text.chars().count() <= 60 {
            return text;
        }
        let cut: String = text.chars().take(57).collect();
        format!("{cut}...")
    }
}

/// Writes `s` as a JSON string: quotes, backslashes and control characters escaped, everything
/// else (including non-ASCII) as is.
pub fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Whether `text` is a number in JSON's grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
pub fn is_number_literal(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while matches!(b.get(i), Some(b'0'..=b'9')) {
                i += 1;
            }
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !matches!(b.get(i), Some(b'0'..=b'9')) {
            return false;
        }
        while matches!(b.get(i), Some(b'0'..=b'9')) {
            i += 1;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !matches!(b.get(i), Some(b'0'..=b'9')) {
            return false;
        }
        while matches!(b.get(i), Some(b'0'..=b'9')) {
            i += 1;
        }
    }
    i == b.len()
}

struct Parser<'a> {
    bytes: &'a [u8],
    text: &'a str,
    at: usize,
    depth: usize,
}

impl Parser<'_> {
    fn error(&self, detail: impl Into<String>) -> JsonError {
        JsonError {
            at: self.at,
            detail: detail.into(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn literal(&mut self, word: &str, value: Json) -> Result<Json, JsonError> {
        if self.bytes[self.at..].starts_with(word.as_bytes()) {
            self.at += word.len();
            Ok(value)
        } else {
            Err(self.error("expected a JSON value"))
        }
    }

    fn value(&mut self) -> Result<Json, JsonError> {
        match self.peek() {
            None => Err(self.error("unexpected end of input")),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'"') => Ok(Json::String(self.string()?)),
            Some(b'[') => self.array(),
            Some(b'{') => self.object(),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(c) => Err(self.error(format!(
                "unexpected character `{}`",
                char::from(c).escape_default()
            ))),
        }
    }

    fn enter(&mut self) -> Result<(), JsonError> {
        self.depth += 1;
        if self.depth > DEPTH_MAX {
            return Err(self.error(format!("nested deeper than {DEPTH_MAX} levels")));
        }
        Ok(())
    }

    fn array(&mut self) -> Result<Json, JsonError> {
        self.enter()?;
        self.at += 1; // [
        let mut items = Vec::new();
        self.whitespace();
        if self.peek() == Some(b']') {
            self.at += 1;
            self.depth -= 1;
            return Ok(Json::Array(items));
        }
        loop {
            self.whitespace();
            items.push(self.value()?);
            self.whitespace();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    break;
                }
                _ => return Err(self.error("expected `,` or `]` in an array")),
            }
        }
        self.depth -= 1;
        Ok(Json::Array(items))
    }

    fn object(&mut self) -> Result<Json, JsonError> {
        self.enter()?;
        self.at += 1; // {
        let mut members: Vec<(String, Json)> = Vec::new();
        self.whitespace();
        if self.peek() == Some(b'}') {
            self.at += 1;
            self.depth -= 1;
            return Ok(Json::Object(members));
        }
        loop {
            self.whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a member name in double quotes"));
            }
            let name_at = self.at;
            let name = self.string()?;
            self.whitespace();
            if self.peek() != Some(b':') {
                return Err(self.error("expected `:` after a member name"));
            }
            self.at += 1;
            self.whitespace();
            let value = self.value()?;
            if members.iter().any(|(n, _)| *n == name) {
                return Err(JsonError {
                    at: name_at,
                    detail: format!("member `{name}` appears twice in one object"),
                });
            }
            members.push((name, value));
            self.whitespace();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    break;
                }
                _ => return Err(self.error("expected `,` or `}` in an object")),
            }
        }
        self.depth -= 1;
        Ok(Json::Object(members))
    }

    fn number(&mut self) -> Result<Json, JsonError> {
        let start = self.at;
        while matches!(
            self.peek(),
            Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
        ) {
            self.at += 1;
        }
        let literal = &self.text[start..self.at];
        if !is_number_literal(literal) {
            return Err(JsonError {
                at: start,
                detail: format!("`{literal}` is not a JSON number"),
            });
        }
        Ok(Json::Number(literal.to_string()))
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let digits = self
            .bytes
            .get(self.at..self.at + 4)
            .ok_or_else(|| self.error("truncated \\u escape"))?;
        let mut v = 0u32;
        for &d in digits {
            let n = char::from(d)
                .to_digit(16)
                .ok_or_else(|| self.error("bad hex digit in a \\u escape"))?;
            v = v * 16 + n;
        }
        self.at += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String, JsonError> {
        self.at += 1; // opening quote
        let mut out = String::new();
        loop {
            // Copy the run of plain characters at once.
            let run = self.at;
            let rest = &self.bytes[run..];
            let plain = rest
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                .unwrap_or(rest.len());
            self.at += plain;
            out.push_str(&self.text[run..self.at]);
            match self.peek() {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.at += 1;
                    let escape = self
                        .peek()
                        .ok_or_else(|| self.error("unterminated string"))?;
                    self.at += 1;
                    match escape {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{08}'),
                        b'f' => out.push('\u{0c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let first = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&first) {
                                if !self.bytes[self.at..].starts_with(b"\\u") {
                                    return Err(self.error("unpaired surrogate in a \\u escape"));
                                }
                                self.at += 2;
                                let second = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&second) {
                                    return Err(self.error("unpaired surrogate in a \\u escape"));
                                }
                                0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
                            } else {
                                first
                            };
                            let c = char::from_u32(code)
                                .ok_or_else(|| self.error("unpaired surrogate in a \\u escape"))?;
                            out.push(c);
                        }
                        other => {
                            return Err(self.error(format!(
                                "unknown escape `\\{}`",
                                char::from(other).escape_default()
                            )))
                        }
                    }
                }
                Some(_) => {
                    return Err(self.error("control character inside a string (escape it)"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_their_literal_text() {
        let j =
            Json::parse(r#"{"a": 0.9418320440936001, "b": -1e300, "c": 12345678901234567890123}"#)
                .unwrap();
        assert_eq!(j.get("a"), Some(&Json::Number("0.9418320440936001".into())));
        assert_eq!(j.get("b"), Some(&Json::Number("-1e300".into())));
        assert_eq!(
            j.get("c"),
            Some(&Json::Number("12345678901234567890123".into()))
        );
    }

    #[test]
    fn strings_unescape_including_surrogate_pairs() {
        let j = Json::parse(r#""a\"b\\c\/\n\u00e9\ud83d\ude80 中""#).unwrap();
        assert_eq!(j, Json::String("a\"b\\c/\né🚀 中".into()));
        let text = j.to_text();
        assert_eq!(Json::parse(&text).unwrap(), j);
    }

    #[test]
    fn invalid_documents_are_refused_with_a_position() {
        for bad in [
            "",
            "01",
            "1.",
            ".5",
            "+1",
            "-",
            "1e",
            "NaN",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{a:1}",
            "\"\\x\"",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"a\u{1}\"",
            "[1] 2",
            "tru",
            "{\"a\":1,\"a\":2}",
        ] {
            assert!(Json::parse(bad).is_err(), "{bad:?} parsed");
        }
        let err = Json::parse("{\"a\":1,\"a\":2}").unwrap_err();
        assert!(err.detail.contains("appears twice"), "{err}");
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = "[".repeat(DEPTH_MAX + 1) + &"]".repeat(DEPTH_MAX + 1);
        assert!(Json::parse(&deep).is_err());
        let ok = "[".repeat(DEPTH_MAX) + &"]".repeat(DEPTH_MAX);
        assert!(Json::parse(&ok).is_ok());
    }

    #[test]
    fn written_text_is_valid_json_for_other_parsers() {
        let j = Json::Object(vec![
            ("s".into(), Json::String("\u{1}\u{7f}\"\\\t".into())),
            ("n".into(), Json::Number("-0.0".into())),
            (
                "a".into(),
                Json::Array(vec![Json::Null, Json::Bool(true), Json::Object(vec![])]),
            ),
        ]);
        let text = j.to_text();
        let other: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(other["s"], "\u{1}\u{7f}\"\\\t");
        assert_eq!(Json::parse(&text).unwrap(), j);
    }

    #[test]
    fn number_grammar() {
        for ok in [
            "0",
            "-0",
            "1.5",
            "-12e+3",
            "1E-7",
            "0.000",
            "9007199254740993",
        ] {
            assert!(is_number_literal(ok), "{ok}");
        }
        for bad in ["00", "1.e5", "1e+", "--1", "1-", "", "0x10", "1.5.5"] {
            assert!(!is_number_literal(bad), "{bad}");
        }
    }
}
