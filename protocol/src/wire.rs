//! HTTP/2 framing between `fast-client` and `rialto-server`.
//!
//! Endpoints (the protocol version is part of the path, so a rolling upgrade can serve `v1` and a
//! later `v2` side by side; a server meeting a version newer than [`PROTOCOL_VERSION`] answers
//! `unsupported_protocol` naming both versions, an unknown path `not_found`):
//!
//! | method, path | request body | response body |
//! |---|---|---|
//! | `GET /v2/get/{store}/{version}/{partition}/{key}` | – (the serialized key in the path, [lowercase hex](get_key_path)) | a [stored value](StoredValue) (200), or an [error body](ErrorBody) |
//! | `POST /v1/get/{store}/{version}/{partition}` | the serialized key | the same |
//! | `POST /v1/batch-get/{store}/{version}` | a [`BatchGetRequest`] | a stream of [`BatchGetFrame`]s ending with a trailer |
//! | `POST /v1/compute/{store}/{version}` | a [`ComputeRequest`](crate::compute::ComputeRequest), u32-length-prefixed, then a [`BatchGetRequest`] | batch-get frames whose records are `reader schema id ‖ the key's result` |
//! | `GET /health` | – | `ok` |
//! | `GET /metrics` | – | Prometheus text |
//!
//! `v2` adds the bodiless get, one HEADERS frame a request (a server answers it on the
//! connection's own task, without a body to wait for); a client sends it for keys of at most
//! [`PATH_KEY_BYTES_MAX`] bytes and the `v1` form for longer ones. Every other endpoint is the
//! same under `v1` and `v2`.
//!
//! Batch-get responses are streamed: the server writes record frames as it reads them (in chunks,
//! not one DATA frame per record) and ends with a trailer that says whether every key was
//! answered. A response that ends without a trailer is incomplete.

use crate::envelope::{EnvelopeError, Reader, KEY_BYTES_MAX};
use crate::ErrorCode;

/// The newest request protocol this code speaks (the `v2` of the paths; it serves `v1` too).
pub const PROTOCOL_VERSION: u32 = 2;
/// Longest key a client sends in a get's path (`v2`); a longer one goes in a `v1` body.
pub const PATH_KEY_BYTES_MAX: usize = 1024;
/// Path of the health endpoint (`GET`): `200 ok` while the server serves.
pub const HEALTH_PATH: &str = "/health";
/// Format byte at the start of a batch-get request body.
pub const BATCH_GET_FORMAT: u8 = 1;
/// Default ceiling of keys in one batch-get sent to one server.
pub const BATCH_GET_KEYS_MAX: usize = 10_000;
/// Default ceiling of a request body.
pub const REQUEST_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Header carrying the numeric error code on error responses.
pub const ERROR_CODE_HEADER: &str = "x-rialto-error";

/// Path of a single get with the key in its body (`POST`, protocol `v1`).
pub fn get_path(store: &str, version: u32, partition: u32) -> String {
    format!("/v1/get/{store}/{version}/{partition}")
}

/// Path of a bodiless single get (`GET`, protocol `v2`): the key in lowercase hex after the
/// partition. Keys longer than [`PATH_KEY_BYTES_MAX`] go in a [`get_path`] body instead.
pub fn get_key_path(store: &str, version: u32, partition: u32, key: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut path = format!("/v2/get/{store}/{version}/{partition}/");
    path.reserve(key.len() * 2);
    for &b in key {
        path.push(char::from(HEX[usize::from(b >> 4)]));
        path.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    path
}

/// Decodes the hex key of a [`get_key_path`] (either case); `None` if it is not hex of whole
/// bytes, or longer than [`KEY_BYTES_MAX`].
pub fn decode_path_key(hex: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let hex = hex.as_bytes();
    if hex.len() % 2 != 0 || hex.len() / 2 > KEY_BYTES_MAX {
        return None;
    }
    hex.chunks_exact(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

/// Path of a batch-get.
pub fn batch_get_path(store: &str, version: u32) -> String {
    format!("/v1/batch-get/{store}/{version}")
}

/// Path of a read-compute request.
pub fn compute_path(store: &str, version: u32) -> String {
    format!("/v1/compute/{store}/{version}")
}

/// Splits a compute request body into the encoded compute request and the batch-get part.
pub fn split_compute_body(body: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    let mut r = Reader::new(body);
    let spec = r.bytes("compute request", REQUEST_BYTES_MAX)?;
    Ok((spec, &body[4 + spec.len()..]))
}

/// Prefixes a compute request's body: `spec` length-prefixed (the keys follow).
pub fn compute_body_prefix(spec: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(spec.len() as u32).to_be_bytes());
    out.extend_from_slice(spec);
}

/// Path of a version's compression dictionary (`GET`): the raw dictionary bytes that the
/// version's START_OF_PUSH carried, from any server hosting an ONLINE replica of it.
pub fn dictionary_path(store: &str, version: u32) -> String {
    format!("/v1/dictionary/{store}/{version}")
}

/// A parsed request path.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Get {
        store: &'a str,
        version: u32,
        partition: u32,
        /// The key as hex text (`v2`, a bodiless GET); `None` when it is the body (`v1`).
        key: Option<&'a str>,
    },
    BatchGet {
        store: &'a str,
        version: u32,
    },
    Compute {
        store: &'a str,
        version: u32,
    },
    Dictionary {
        store: &'a str,
        version: u32,
    },
    Health,
    Metrics,
    /// A request of a protocol version newer than [`PROTOCOL_VERSION`].
    NewerProtocol {
        version: u32,
    },
}

/// Parses a request path; `None` for anything that is not a known endpoint.
pub fn parse_route(path: &str) -> Option<Route<'_>> {
    let mut parts = path.trim_start_matches('/').split('/');
    // `v2` differs from `v1` only in the get, whose key it carries in the path.
    let (first, v2) = match parts.next()? {
        "v2" => ("v1", true),
        other => (other, false),
    };
    match (first, parts.next()) {
        ("health", None) => Some(Route::Health),
        ("metrics", None) => Some(Route::Metrics),
        ("v1", Some("get")) => {
            let store = parts.next().filter(|s| !s.is_empty())?;
            let version = parts.next()?.parse().ok()?;
            let partition = parts.next()?.parse().ok()?;
            let key = if v2 { Some(parts.next()?) } else { None };
            parts.next().is_none().then_some(Route::Get {
                store,
                version,
                partition,
                key,
            })
        }
        ("v1", Some("batch-get")) => {
            let store = parts.next().filter(|s| !s.is_empty())?;
            let version = parts.next()?.parse().ok()?;
            parts
                .next()
                .is_none()
                .then_some(Route::BatchGet { store, version })
        }
        ("v1", Some("compute")) => {
            let store = parts.next().filter(|s| !s.is_empty())?;
            let version = parts.next()?.parse().ok()?;
            parts
                .next()
                .is_none()
                .then_some(Route::Compute { store, version })
        }
        ("v1", Some("dictionary")) => {
            let store = parts.next().filter(|s| !s.is_empty())?;
            let version = parts.next()?.parse().ok()?;
            parts
                .next()
                .is_none()
                .then_some(Route::Dictionary { store, version })
        }
        (v, Some(_)) => v
            .strip_prefix('v')
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|&n| n > PROTOCOL_VERSION)
            .map(|version| Route::NewerProtocol { version }),
        _ => None,
    }
}

/// A value as stored by the server and returned to the client: `schema_id u32` then the bytes.
///
/// The server stores exactly these bytes, so a read copies them to the socket untouched.
pub struct StoredValue;

impl StoredValue {
    /// Builds the stored form of a value.
    pub fn encode(schema_id: u32, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + value.len());
        out.extend_from_slice(&schema_id.to_be_bytes());
        out.extend_from_slice(value);
        out
    }

    /// Splits a stored value into schema id and value bytes.
    pub fn decode(stored: &[u8]) -> Result<(u32, &[u8]), EnvelopeError> {
        if stored.len() < 4 {
            return Err(EnvelopeError::Truncated {
                needed: 4,
                at: 0,
                len: stored.len(),
            });
        }
        let schema_id = u32::from_be_bytes([stored[0], stored[1], stored[2], stored[3]]);
        Ok((schema_id, &stored[4..]))
    }
}

/// A batch-get request: keys with their partitions, in the caller's order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchGetRequest {
    pub keys: Vec<(u32, Vec<u8>)>,
}

impl BatchGetRequest {
    /// Appends the encoded request for `keys` (partition, key) to `out`.
    pub fn encode_keys<'a>(
        keys: impl ExactSizeIterator<Item = (u32, &'a [u8])>,
        out: &mut Vec<u8>,
    ) {
        out.push(BATCH_GET_FORMAT);
        out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
        for (partition, key) in keys {
            out.extend_from_slice(&partition.to_be_bytes());
            out.extend_from_slice(&(key.len() as u32).to_be_bytes());
            out.extend_from_slice(key);
        }
    }

    /// Encodes into a fresh buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(5 + self.keys.iter().map(|(_, k)| 8 + k.len()).sum::<usize>());
        Self::encode_keys(self.keys.iter().map(|(p, k)| (*p, k.as_slice())), &mut out);
        out
    }

    /// Decodes a request without copying keys; `keys_max` bounds the key count.
    pub fn decode(body: &[u8], keys_max: usize) -> Result<Vec<(u32, &[u8])>, WireError> {
        let mut r = Reader::new(body);
        let format = r.u8()?;
        if format != BATCH_GET_FORMAT {
            return Err(WireError::UnsupportedFormat(format));
        }
        let count = r.u32()? as usize;
        if count > keys_max {
            return Err(WireError::TooManyKeys {
                count,
                max: keys_max,
            });
        }
        // Every key takes at least 8 bytes: refuse counts the body cannot hold before allocating.
        if count > r.remaining() / 8 {
            return Err(WireError::Malformed(EnvelopeError::Truncated {
                needed: count * 8,
                at: r.pos,
                len: body.len(),
            }));
        }
        let mut keys = Vec::with_capacity(count);
        for _ in 0..count {
            let partition = r.u32()?;
            let key = r.bytes("key", KEY_BYTES_MAX)?;
            keys.push((partition, key));
        }
        if r.remaining() != 0 {
            return Err(WireError::Malformed(EnvelopeError::TrailingBytes(
                r.remaining(),
            )));
        }
        Ok(keys)
    }
}

/// Errors decoding wire messages.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("malformed message: {0}")]
    Malformed(#[from] EnvelopeError),
    #[error("unsupported batch-get format {0}")]
    UnsupportedFormat(u8),
    #[error("batch-get of {count} keys exceeds the limit of {max}")]
    TooManyKeys { count: usize, max: usize },
    #[error("unknown frame tag {0}")]
    UnknownFrame(u8),
}

impl WireError {
    /// The error code a server answers with.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooManyKeys { .. } => ErrorCode::TooManyKeys,
            WireError::UnsupportedFormat(_) => ErrorCode::UnsupportedProtocol,
            _ => ErrorCode::BadRequest,
        }
    }
}

const TAG_RECORD: u8 = 1;
const TAG_MISSING: u8 = 2;
const TAG_KEY_ERROR: u8 = 3;
const TAG_TRAILER: u8 = 0xFF;

/// One frame of a streamed batch-get response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchGetFrame<'a> {
    /// The key at `key_index` of the request has this [stored value](StoredValue).
    Record { key_index: u32, stored: &'a [u8] },
    /// The key at `key_index` is not in the store.
    Missing { key_index: u32 },
    /// The key at `key_index` could not be answered by this server.
    KeyError { key_index: u32, code: ErrorCode },
    /// End of response: every key of the request was answered (found, missing or error).
    Trailer(BatchGetTrailer),
}

/// Totals sent at the end of a batch-get response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchGetTrailer {
    pub keys_total: u32,
    pub found: u32,
    pub missing: u32,
    pub errors: u32,
}

/// Writes batch-get frames into a reusable buffer.
pub struct BatchGetFrameWriter;

impl BatchGetFrameWriter {
    pub fn record(out: &mut Vec<u8>, key_index: u32, stored: &[u8]) {
        out.push(TAG_RECORD);
        out.extend_from_slice(&key_index.to_be_bytes());
        out.extend_from_slice(&(stored.len() as u32).to_be_bytes());
        out.extend_from_slice(stored);
    }
    pub fn missing(out: &mut Vec<u8>, key_index: u32) {
        out.push(TAG_MISSING);
        out.extend_from_slice(&key_index.to_be_bytes());
    }
    pub fn key_error(out: &mut Vec<u8>, key_index: u32, code: ErrorCode) {
        out.push(TAG_KEY_ERROR);
        out.extend_from_slice(&key_index.to_be_bytes());
        out.extend_from_slice(&code.as_u16().to_be_bytes());
    }
    pub fn trailer(out: &mut Vec<u8>, t: &BatchGetTrailer) {
        out.push(TAG_TRAILER);
        for v in [t.keys_total, t.found, t.missing, t.errors] {
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

/// The length of the frame at the front of `buf`, once enough of it is there to tell (its tag,
/// and for a record its value length): `Ok(None)` before that. Fails on an unknown tag or a
/// value over the limit, so a reader never waits for bytes that can't be a valid frame.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    match tag {
        TAG_RECORD => {
            let Some(len) = buf.get(5..9) else {
                return Ok(None);
            };
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            if len > crate::stored::STORED_VALUE_BYTES_MAX {
                return Err(WireError::Malformed(EnvelopeError::TooLarge {
                    what: "value",
                    len,
                    max: crate::stored::STORED_VALUE_BYTES_MAX,
                }));
            }
            Ok(Some(9 + len))
        }
        TAG_MISSING => Ok(Some(5)),
        TAG_KEY_ERROR => Ok(Some(7)),
        TAG_TRAILER => Ok(Some(17)),
        other => Err(WireError::UnknownFrame(other)),
    }
}

/// Decodes the next complete frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (read more bytes), or the frame and
/// the number of bytes it used.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(BatchGetFrame<'_>, usize)>, WireError> {
    let Some(used) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < used {
        return Ok(None);
    }
    let u32_at = |at: usize| u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    let frame = match buf[0] {
        TAG_RECORD => BatchGetFrame::Record {
            key_index: u32_at(1),
            stored: &buf[9..used],
        },
        TAG_MISSING => BatchGetFrame::Missing {
            key_index: u32_at(1),
        },
        TAG_KEY_ERROR => BatchGetFrame::KeyError {
            key_index: u32_at(1),
            code: ErrorCode::from_u16(u16::from_be_bytes([buf[5], buf[6]]))
                .unwrap_or(ErrorCode::Internal),
        },
        TAG_TRAILER => BatchGetFrame::Trailer(BatchGetTrailer {
            keys_total: u32_at(1),
            found: u32_at(5),
            missing: u32_at(9),
            errors: u32_at(13),
        }),
        other => return Err(WireError::UnknownFrame(other)),
    };
    Ok(Some((frame, used)))
}

/// Body of every non-200 response: `code u16, retryable u8, message (UTF-8, rest of body)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 + self.message.len());
        out.extend_from_slice(&self.code.as_u16().to_be_bytes());
        out.push(u8::from(self.code.retryable()));
        out.extend_from_slice(self.message.as_bytes());
        out
    }

    /// Decodes an error body; unknown codes become `Internal` so that old clients stay safe.
    pub fn decode(body: &[u8]) -> Result<ErrorBody, WireError> {
        let mut r = Reader::new(body);
        let raw = r.u16()?;
        let _retryable = r.u8()?;
        let message = String::from_utf8_lossy(&body[3..]).into_owned();
        Ok(ErrorBody {
            code: ErrorCode::from_u16(raw).unwrap_or(ErrorCode::Internal),
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_reject_junk() {
        assert_eq!(
            parse_route("/v1/get/ads/3/7"),
            Some(Route::Get {
                store: "ads",
                version: 3,
                partition: 7,
                key: None,
            })
        );
        assert_eq!(
            parse_route("/v2/get/ads/3/7/6b31"),
            Some(Route::Get {
                store: "ads",
                version: 3,
                partition: 7,
                key: Some("6b31"),
            })
        );
        assert_eq!(
            parse_route("/v2/batch-get/ads/3"),
            Some(Route::BatchGet {
                store: "ads",
                version: 3
            })
        );
        assert_eq!(
            parse_route("/v1/batch-get/ads/3"),
            Some(Route::BatchGet {
                store: "ads",
                version: 3
            })
        );
        assert_eq!(parse_route("/health"), Some(Route::Health));
        assert_eq!(
            parse_route("/v3/get/ads/3/7"),
            Some(Route::NewerProtocol { version: 3 })
        );
        assert_eq!(parse_route("/v0/get/ads/3/7"), None);
        assert_eq!(
            parse_route(&dictionary_path("ads", 4)),
            Some(Route::Dictionary {
                store: "ads",
                version: 4
            })
        );
        for junk in [
            "/v1/dictionary/ads",
            "/v1/dictionary/ads/4/5",
            "/",
            "",
            "/v1/get/ads",
            "/v1/get/ads/x/1",
            "/v1/get//1/1",
            "/v1/get/a/1/2/3",
            "/v2/get/a/1/2",
            "/v2/get/a/1/2/6b/31",
            "/v2",
            "/vx/get/a/1/1",
            "/v1/batch-get/a/-1",
        ] {
            assert_eq!(parse_route(junk), None, "{junk}");
        }
    }

    #[test]
    fn a_key_in_a_get_path_round_trips() {
        let keys: [&[u8]; 4] = [b"", b"k1", &[0x00, 0xff, 0x7f, 0x80, b'/'], &[0xab; 1024]];
        for key in keys {
            let path = get_key_path("ads", 3, 7, key);
            let Some(Route::Get { key: Some(hex), .. }) = parse_route(&path) else {
                panic!("{path} is not a get");
            };
            // The oracle: the hex text of the key, as Python's `bytes.hex()` writes it.
            let expected: String = key.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, expected);
            assert_eq!(decode_path_key(hex).as_deref(), Some(key));
        }
        assert_eq!(decode_path_key("6B31").as_deref(), Some(&b"k1"[..]));
        for junk in ["6", "6g", "zz", "6b3", "\u{e9}", "0x"] {
            assert_eq!(decode_path_key(junk), None, "{junk}");
        }
        assert_eq!(decode_path_key(&"00".repeat(KEY_BYTES_MAX + 1)), None);
    }

    #[test]
    fn batch_request_round_trips() {
        let req = BatchGetRequest {
            keys: vec![(0, b"a".to_vec()), (5, vec![]), (7, vec![0xff; 300])],
        };
        let bytes = req.encode();
        let keys = BatchGetRequest::decode(&bytes, 10).unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[2], (7, &[0xff; 300][..]));
        assert!(matches!(
            BatchGetRequest::decode(&bytes, 2),
            Err(WireError::TooManyKeys { count: 3, max: 2 })
        ));
    }

    #[test]
    fn batch_request_decoding_never_panics_on_truncation() {
        let bytes = BatchGetRequest {
            keys: vec![(1, b"abc".to_vec()), (2, b"defg".to_vec())],
        }
        .encode();
        for len in 0..bytes.len() {
            assert!(BatchGetRequest::decode(&bytes[..len], 100).is_err());
        }
        let mut huge = vec![BATCH_GET_FORMAT];
        huge.extend_from_slice(&5_000u32.to_be_bytes());
        assert!(BatchGetRequest::decode(&huge, 10_000).is_err());
    }

    #[test]
    fn frames_stream_in_any_chunking() {
        let mut out = Vec::new();
        BatchGetFrameWriter::record(&mut out, 0, &StoredValue::encode(1, b"value-0"));
        BatchGetFrameWriter::missing(&mut out, 1);
        BatchGetFrameWriter::key_error(&mut out, 2, ErrorCode::PartitionNotServed);
        let trailer = BatchGetTrailer {
            keys_total: 3,
            found: 1,
            missing: 1,
            errors: 1,
        };
        BatchGetFrameWriter::trailer(&mut out, &trailer);
        // Feed the stream one byte at a time: a partial frame is never decoded.
        let mut frames = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        for b in &out {
            buf.push(*b);
            while let Some((frame, used)) = decode_frame(&buf).unwrap() {
                frames.push(format!("{frame:?}"));
                buf.drain(..used);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(frames.len(), 4);
        assert!(frames[3].contains("Trailer"));
        assert!(decode_frame(&[9]).is_err());
    }

    #[test]
    fn a_frames_length_is_known_from_its_header() {
        let mut out = Vec::new();
        BatchGetFrameWriter::record(&mut out, 0, &StoredValue::encode(1, b"value-0"));
        let record = out.len();
        BatchGetFrameWriter::missing(&mut out, 1);
        BatchGetFrameWriter::key_error(&mut out, 2, ErrorCode::PartitionNotServed);
        BatchGetFrameWriter::trailer(&mut out, &BatchGetTrailer::default());
        assert_eq!(record, 9 + 4 + 7);
        assert_eq!(frame_len(&[]).unwrap(), None);
        for header in 1..9 {
            assert_eq!(frame_len(&out[..header]).unwrap(), None, "{header} bytes");
        }
        assert_eq!(frame_len(&out[..9]).unwrap(), Some(record));
        assert_eq!(frame_len(&out[record..record + 1]).unwrap(), Some(5));
        assert_eq!(frame_len(&out[record + 5..record + 6]).unwrap(), Some(7));
        assert_eq!(frame_len(&out[record + 12..]).unwrap(), Some(17));
        assert_eq!(record + 12 + 17, out.len());
        assert!(frame_len(&[9]).is_err());
        let mut huge = vec![TAG_RECORD, 0, 0, 0, 0];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(frame_len(&huge).is_err());
    }

    #[test]
    fn error_body_round_trips() {
        let e = ErrorBody {
            code: ErrorCode::UnknownStore,
            message: "store `x` is not hosted".into(),
        };
        assert_eq!(ErrorBody::decode(&e.encode()).unwrap(), e);
        assert!(ErrorBody::decode(&[0]).is_err());
    }
}
