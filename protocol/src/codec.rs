//! Value compression: what the push job writes and the fast client reads.
//!
//! A store's [`Compression`](crate::meta::Compression) is fixed per version. Values are
//! compressed by the push job (so the topic, the servers' disks and the network all carry
//! compressed bytes) and decompressed by the client; servers never look inside. Each value is one
//! zstd frame with its content size in the header; with a dictionary, the dictionary is trained by
//! the push job on a sample of the version's values and shipped in START_OF_PUSH (servers keep it
//! and hand it to clients).
//!
//! Decompression never trusts sizes from the network: a frame that announces more than the
//! version's largest value (or no size at all) is refused.

use std::sync::Arc;

use thiserror::Error;
use zstd_safe::{CCtx, CDict, DCtx, DDict};

use crate::envelope::DICTIONARY_BYTES_MAX;

/// zstd level used by the push job: a good ratio at a few hundred MB/s.
pub const DEFAULT_LEVEL: i32 = 3;
/// Default size of a trained dictionary.
pub const DEFAULT_DICTIONARY_BYTES: usize = 64 * 1024;
/// Values sampled for training at most.
pub const TRAINING_SAMPLES_MAX: usize = 20_000;
/// Bytes sampled for training at most.
pub const TRAINING_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Errors of value compression.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("zstd could not compress a value: {0}")]
    Compress(&'static str),
    #[error("value is not a valid zstd frame: {0}")]
    Corrupt(&'static str),
    #[error("compressed value does not state its size")]
    UnknownSize,
    #[error("compressed value would expand to {size} bytes, over the limit of {max}")]
    TooLarge { size: u64, max: usize },
    #[error("cannot train a dictionary: {0}")]
    Training(String),
    #[error("dictionary of {len} bytes is over the limit of {max}")]
    DictionaryTooLarge { len: usize, max: usize },
    #[error("zstd refused the dictionary")]
    BadDictionary,
}

/// Compresses values, with or without a dictionary. One per thread (it holds a zstd context).
pub struct ValueCompressor {
    cctx: CCtx<'static>,
    dictionary: Option<CDict<'static>>,
    level: i32,
}

impl ValueCompressor {
    /// A compressor at `level`, using `dictionary` if given.
    pub fn new(level: i32, dictionary: Option<&[u8]>) -> Result<ValueCompressor, CodecError> {
        let dictionary = match dictionary {
            Some(d) => {
                check_dictionary(d)?;
                Some(CDict::try_create(d, level).ok_or(CodecError::BadDictionary)?)
            }
            None => None,
        };
        Ok(ValueCompressor {
            cctx: CCtx::try_create().ok_or(CodecError::Compress("no memory for a context"))?,
            dictionary,
            level,
        })
    }

    /// Compresses `value` into one zstd frame (content size in its header).
    pub fn compress(&mut self, value: &[u8]) -> Result<Vec<u8>, CodecError> {
        let mut out = vec![0u8; zstd_safe::compress_bound(value.len())];
        let n = match &self.dictionary {
            Some(d) => self.cctx.compress_using_cdict(&mut out[..], value, d),
            None => self.cctx.compress(&mut out[..], value, self.level),
        }
        .map_err(|code| CodecError::Compress(zstd_safe::get_error_name(code)))?;
        out.truncate(n);
        Ok(out)
    }
}

/// A dictionary digested for decompression; shared by many [`ValueDecompressor`]s (threads).
pub struct DecompressionDictionary {
    ddict: DDict<'static>,
    len: usize,
}

impl std::fmt::Debug for DecompressionDictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecompressionDictionary({} bytes)", self.len)
    }
}

impl DecompressionDictionary {
    /// Digests `dictionary` (as trained by [`train_dictionary`]).
    pub fn new(dictionary: &[u8]) -> Result<DecompressionDictionary, CodecError> {
        check_dictionary(dictionary)?;
        Ok(DecompressionDictionary {
            ddict: DDict::try_create(dictionary).ok_or(CodecError::BadDictionary)?,
            len: dictionary.len(),
        })
    }
    /// Size of the dictionary as trained.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the dictionary is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Decompressors for many threads: a zstd context per concurrent call, kept for reuse.
pub struct DecompressorPool {
    dictionary: Option<Arc<DecompressionDictionary>>,
    contexts: std::sync::Mutex<Vec<ValueDecompressor>>,
}

impl std::fmt::Debug for DecompressorPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecompressorPool({:?})", self.dictionary)
    }
}

impl DecompressorPool {
    /// A pool decompressing with `dictionary` if given.
    pub fn new(dictionary: Option<Arc<DecompressionDictionary>>) -> DecompressorPool {
        DecompressorPool {
            dictionary,
            contexts: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// [`ValueDecompressor::decompress`] with a pooled context.
    pub fn decompress(&self, frame: &[u8], max: usize) -> Result<Vec<u8>, CodecError> {
        let pooled = self
            .contexts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let mut context = match pooled {
            Some(c) => c,
            None => ValueDecompressor::new(self.dictionary.clone())?,
        };
        let result = context.decompress(frame, max);
        self.contexts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(context);
        result
    }
}

/// Decompresses values, with or without a dictionary. One per thread (it holds a zstd context).
pub struct ValueDecompressor {
    dctx: DCtx<'static>,
    dictionary: Option<Arc<DecompressionDictionary>>,
}

impl ValueDecompressor {
    /// A decompressor using `dictionary` if given.
    pub fn new(
        dictionary: Option<Arc<DecompressionDictionary>>,
    ) -> Result<ValueDecompressor, CodecError> {
        Ok(ValueDecompressor {
            dctx: DCtx::try_create().ok_or(CodecError::Corrupt("no memory for a context"))?,
            dictionary,
        })
    }

    /// Decompresses what [`ValueCompressor::compress`] wrote: one frame, or several one after
    /// the other, read as one value (a chunked real-time value is compressed chunk by chunk, see
    /// [`crate::stored`]). A value that would expand beyond `max` bytes is refused before
    /// anything is allocated.
    pub fn decompress(&mut self, frames: &[u8], max: usize) -> Result<Vec<u8>, CodecError> {
        // One frame, as for every value but a chunked real-time one: sized by its header.
        let size = zstd_safe::get_frame_content_size(frames)
            .map_err(|_| CodecError::Corrupt("bad frame header"))?
            .ok_or(CodecError::UnknownSize)?;
        if size > max as u64 {
            return Err(CodecError::TooLarge { size, max });
        }
        let mut out = vec![0u8; size as usize];
        if self.decompress_frame(&mut out, frames).is_ok() {
            return Ok(out);
        }
        // More than one frame (or a corrupt one, which this finds too).
        self.decompress_frames(frames, max)
    }

    /// [`ValueDecompressor::decompress`] of frames one after the other: every frame's length
    /// and stated size checked before anything is allocated.
    fn decompress_frames(&mut self, frames: &[u8], max: usize) -> Result<Vec<u8>, CodecError> {
        let mut lengths = Vec::new();
        let mut total = 0u64;
        let mut rest = frames;
        while !rest.is_empty() {
            let (len, size) = frame_of(rest)?;
            total = total.saturating_add(size);
            if total > max as u64 {
                return Err(CodecError::TooLarge { size: total, max });
            }
            lengths.push((len, size as usize));
            rest = rest
                .get(len..)
                .ok_or(CodecError::Corrupt("truncated frame"))?;
        }
        let mut out = vec![0u8; total as usize];
        let (mut written, mut rest) = (0, frames);
        for (len, size) in lengths {
            let (frame, after) = rest.split_at(len);
            self.decompress_frame(&mut out[written..written + size], frame)?;
            written += size;
            rest = after;
        }
        Ok(out)
    }

    /// Decompresses one frame into `into`, which its stated size fills exactly.
    fn decompress_frame(&mut self, into: &mut [u8], frame: &[u8]) -> Result<(), CodecError> {
        let size = into.len();
        let n = match &self.dictionary {
            Some(d) => self.dctx.decompress_using_ddict(into, frame, &d.ddict),
            None => self.dctx.decompress(into, frame),
        }
        .map_err(|code| CodecError::Corrupt(zstd_safe::get_error_name(code)))?;
        if n != size {
            return Err(CodecError::Corrupt("frame shorter than its stated size"));
        }
        Ok(())
    }
}

/// The length and the stated content size of the frame `bytes` starts with.
fn frame_of(bytes: &[u8]) -> Result<(usize, u64), CodecError> {
    let size = zstd_safe::get_frame_content_size(bytes)
        .map_err(|_| CodecError::Corrupt("bad frame header"))?
        .ok_or(CodecError::UnknownSize)?;
    let len = zstd_safe::find_frame_compressed_size(bytes)
        .map_err(|_| CodecError::Corrupt("truncated frame"))?;
    Ok((len, size))
}

fn check_dictionary(d: &[u8]) -> Result<(), CodecError> {
    if d.len() > DICTIONARY_BYTES_MAX {
        return Err(CodecError::DictionaryTooLarge {
            len: d.len(),
            max: DICTIONARY_BYTES_MAX,
        });
    }
    Ok(())
}

/// Trains a zstd dictionary of at most `max_bytes` on `samples` (zstd's ZDICT). zstd needs a
/// reasonable number of samples (hundreds or more); too few or too uniform ones are an error.
pub fn train_dictionary(samples: &[Vec<u8>], max_bytes: usize) -> Result<Vec<u8>, CodecError> {
    let max_bytes = max_bytes.min(DICTIONARY_BYTES_MAX);
    let sizes: Vec<usize> = samples.iter().map(Vec::len).collect();
    let joined: Vec<u8> = samples.concat();
    let mut dict = vec![0u8; max_bytes];
    let n = zstd_safe::train_from_buffer(&mut dict[..], &joined, &sizes).map_err(|code| {
        CodecError::Training(format!(
            "{} ({} samples, {} bytes)",
            zstd_safe::get_error_name(code),
            samples.len(),
            joined.len()
        ))
    })?;
    dict.truncate(n);
    Ok(dict)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    /// Feature-like values: shared field names and vocabulary, varying numbers.
    fn samples(n: usize) -> Vec<Vec<u8>> {
        let words = [
            "sports", "news", "jobs", "feed", "video", "article", "member", "company",
        ];
        (0..n)
            .map(|i| {
                format!(
                    "{{\"member\":{i},\"topics\":[\"{}\",\"{}\"],\"score\":0.{:04},\"title\":\"{} of the {}\"}}",
                    words[i % 8],
                    words[(i / 8) % 8],
                    (i * 7919) % 10_000,
                    words[(i / 3) % 8],
                    words[(i / 5) % 8]
                )
                .into_bytes()
            })
            .collect()
    }

    #[test]
    fn values_roundtrip_with_and_without_a_dictionary() {
        let values = samples(2_000);
        let dict = train_dictionary(&values, 8 * 1024).unwrap();
        assert!(!dict.is_empty() && dict.len() <= 8 * 1024);
        for dictionary in [None, Some(dict.as_slice())] {
            let mut c = ValueCompressor::new(DEFAULT_LEVEL, dictionary).unwrap();
            let digested = dictionary.map(|d| Arc::new(DecompressionDictionary::new(d).unwrap()));
            let mut d = ValueDecompressor::new(digested).unwrap();
            for v in values.iter().take(200).chain([&Vec::new()]) {
                let frame = c.compress(v).unwrap();
                assert_eq!(&d.decompress(&frame, LIMIT).unwrap(), v);
            }
        }
    }

    #[test]
    fn a_dictionary_makes_small_values_smaller() {
        let values = samples(5_000);
        let dict = train_dictionary(&values, 16 * 1024).unwrap();
        let total = |dictionary: Option<&[u8]>| -> usize {
            let mut c = ValueCompressor::new(DEFAULT_LEVEL, dictionary).unwrap();
            values.iter().map(|v| c.compress(v).unwrap().len()).sum()
        };
        let (plain, with_dict) = (total(None), total(Some(&dict)));
        let raw: usize = values.iter().map(Vec::len).sum();
        assert!(
            with_dict * 2 < plain,
            "dictionary {with_dict} vs plain {plain} (raw {raw})"
        );
    }

    #[test]
    fn corrupt_frames_and_wrong_dictionaries_are_errors_not_panics() {
        let values = samples(1_000);
        let dict = train_dictionary(&values, 8 * 1024).unwrap();
        let mut c = ValueCompressor::new(DEFAULT_LEVEL, Some(&dict)).unwrap();
        let frame = c.compress(&values[0]).unwrap();
        let mut plain = ValueDecompressor::new(None).unwrap();
        assert!(
            plain.decompress(&frame, LIMIT).is_err(),
            "dictionary missing"
        );
        let mut d =
            ValueDecompressor::new(Some(Arc::new(DecompressionDictionary::new(&dict).unwrap())))
                .unwrap();
        assert!(d.decompress(b"", LIMIT).is_err());
        assert!(d.decompress(b"not zstd at all", LIMIT).is_err());
        for cut in [4, frame.len() / 2, frame.len() - 1] {
            assert!(
                d.decompress(&frame[..cut], LIMIT).is_err(),
                "truncated at {cut}"
            );
        }
        let mut flipped = frame.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x55;
        let _ = d.decompress(&flipped, LIMIT); // any result but a panic
    }

    #[test]
    fn frames_one_after_the_other_read_as_one_value() {
        let values = samples(1_000);
        let dict = train_dictionary(&values, 8 * 1024).unwrap();
        for dictionary in [None, Some(dict.as_slice())] {
            let mut c = ValueCompressor::new(DEFAULT_LEVEL, dictionary).unwrap();
            let digested = dictionary.map(|d| Arc::new(DecompressionDictionary::new(d).unwrap()));
            let mut d = ValueDecompressor::new(digested).unwrap();
            let mut frames = Vec::new();
            for v in &values[..3] {
                frames.extend_from_slice(&c.compress(v).unwrap());
            }
            // The oracle: the values themselves, one after the other.
            assert_eq!(d.decompress(&frames, LIMIT).unwrap(), values[..3].concat());
            let whole = values[..3].iter().map(Vec::len).sum::<usize>();
            assert!(matches!(
                d.decompress(&frames, whole - 1),
                Err(CodecError::TooLarge { .. })
            ));
            assert!(d.decompress(&frames[..frames.len() - 1], LIMIT).is_err());
            let mut trailing = frames.clone();
            trailing.extend_from_slice(b"junk");
            assert!(d.decompress(&trailing, LIMIT).is_err());
        }
    }

    #[test]
    fn a_frame_announcing_a_huge_value_is_refused() {
        let mut c = ValueCompressor::new(1, None).unwrap();
        let frame = c.compress(&vec![0u8; LIMIT + 1]).unwrap();
        let mut d = ValueDecompressor::new(None).unwrap();
        assert!(matches!(
            d.decompress(&frame, LIMIT),
            Err(CodecError::TooLarge { .. })
        ));
        assert_eq!(d.decompress(&frame, LIMIT + 1).unwrap().len(), LIMIT + 1);
    }

    #[test]
    fn too_few_samples_fail_training_with_a_message() {
        let err = train_dictionary(&samples(3), 4096).unwrap_err();
        assert!(err.to_string().contains("3 samples"), "{err}");
    }
}
