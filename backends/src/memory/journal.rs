//! Append-only record files: what the memory backends keep on disk to survive a restart.
//!
//! A journal is a sequence of frames `[length: u32 LE][crc32c of payload: u32 LE][payload]`.
//! Every append is one `write` of a whole frame before the change it records is applied, so a
//! process killed at any point leaves every applied change on disk (in the OS's page cache:
//! a machine crash may lose the last writes, as a broker with Kafka's default flush policy
//! does). Opening reads every whole frame and cuts the file after the last one: a torn or
//! corrupt tail (a crash in the middle of a write) is dropped with a warning, never replayed.
//! [`Journal::rewrite`] replaces a file's content atomically (a temporary file, synced, then
//! renamed over it), which the backends use to compact.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const HEADER: usize = 8;
/// Largest payload read back; a longer length field means a corrupt frame.
pub(crate) const PAYLOAD_MAX: usize = 1 << 30;

pub(crate) struct Journal {
    file: File,
    path: PathBuf,
    bytes: u64,
}

impl Journal {
    /// Opens the journal at `path` (created if missing) and returns it with every payload it
    /// holds, in order. A torn or corrupt tail is cut off.
    pub(crate) fn open(path: &Path) -> io::Result<(Journal, Vec<Vec<u8>>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut content = Vec::new();
        file.read_to_end(&mut content)?;
        let (payloads, whole) = frames(&content);
        if whole < content.len() {
            tracing::warn!(
                journal = %path.display(),
                dropped_bytes = content.len() - whole,
                kept_records = payloads.len(),
                "the journal ends in a torn or corrupt record (a crash during a write?): cutting it off"
            );
            file.set_len(whole as u64)?;
            file.seek(SeekFrom::End(0))?;
        }
        let journal = Journal {
            file,
            path: path.to_path_buf(),
            bytes: whole as u64,
        };
        Ok((journal, payloads))
    }

    /// Appends one record.
    pub(crate) fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        if payload.len() > PAYLOAD_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a journal record of {} bytes is over the {PAYLOAD_MAX}-byte limit",
                    payload.len()
                ),
            ));
        }
        let frame = frame(payload);
        self.file.write_all(&frame)?;
        self.bytes += frame.len() as u64;
        Ok(())
    }

    /// Bytes in the file.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Replaces the journal's content with `payloads`, atomically: a reader (or a restart) sees
    /// either the old content or all of the new.
    pub(crate) fn rewrite<'a>(
        &mut self,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) -> io::Result<()> {
        *self = Journal::create(&self.path, payloads)?;
        Ok(())
    }

    /// Writes a new journal at `path` holding `payloads`, replacing any file there atomically.
    pub(crate) fn create<'a>(
        path: &Path,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) -> io::Result<Journal> {
        let temporary = path.with_extension("rewrite");
        let mut out = io::BufWriter::new(File::create(&temporary)?);
        let mut bytes = 0u64;
        for payload in payloads {
            let frame = frame(payload);
            out.write_all(&frame)?;
            bytes += frame.len() as u64;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&temporary, path)?;
        if let Some(dir) = path.parent() {
            // The rename itself must reach the disk before the old content is relied on gone.
            File::open(dir)?.sync_all()?;
        }
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            bytes,
        })
    }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The payloads of the whole, intact frames at the start of `content`, and where they end.
fn frames(content: &[u8]) -> (Vec<Vec<u8>>, usize) {
    let mut payloads = Vec::new();
    let mut at = 0;
    while let Some(header) = content.get(at..at + HEADER) {
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if length > PAYLOAD_MAX {
            break;
        }
        let Some(payload) = content.get(at + HEADER..at + HEADER + length) else {
            break;
        };
        if crc32c::crc32c(payload) != crc {
            break;
        }
        payloads.push(payload.to_vec());
        at += HEADER + length;
    }
    (payloads, at)
}

/// Reads the fields of a payload in order; every read checks the bounds, so a payload that
/// passed its checksum but does not parse (written by another format) is an error, not a panic.
pub(crate) struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    pub(crate) fn new(payload: &'a [u8]) -> Fields<'a> {
        Fields { rest: payload }
    }

    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a journal record is shorter than its fields",
            ));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn i64(&mut self) -> io::Result<i64> {
        let b = self.take(8)?;
        Ok(i64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A length-prefixed byte string.
    pub(crate) fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let b = self.take(4)?;
        let n = u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
        self.take(n)
    }

    /// Whether every field was read.
    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Everything not read yet.
    pub(crate) fn rest(self) -> &'a [u8] {
        self.rest
    }
}

/// Appends a length-prefixed byte string (read back by [`Fields::bytes`]).
pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, old) = Journal::open(&path).unwrap();
        assert!(old.is_empty());
        j.append(b"one").unwrap();
        j.append(b"").unwrap();
        j.append(b"three").unwrap();
        drop(j);

        // A crash in the middle of the fourth write: half a frame at the end.
        let whole = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&frame(b"fourth record")[..10]).unwrap();
        drop(f);

        let (mut j, read) = Journal::open(&path).unwrap();
        assert_eq!(read, vec![b"one".to_vec(), vec![], b"three".to_vec()]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole, "tail cut");
        j.append(b"four").unwrap();
        drop(j);
        let (_, read) = Journal::open(&path).unwrap();
        assert_eq!(read.last().unwrap(), b"four");
        assert_eq!(read.len(), 4);
    }

    #[test]
    fn a_flipped_byte_ends_the_journal_at_the_record_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path).unwrap();
        for r in [&b"aaaa"[..], b"bbbb", b"cccc"] {
            j.append(r).unwrap();
        }
        drop(j);
        let mut content = std::fs::read(&path).unwrap();
        // The second record's payload starts after one whole frame (12 bytes) and its header.
        content[12 + HEADER + 1] ^= 0x40;
        std::fs::write(&path, &content).unwrap();
        let (_, read) = Journal::open(&path).unwrap();
        assert_eq!(read, vec![b"aaaa".to_vec()]);
    }

    #[test]
    fn a_rewrite_replaces_the_content_and_appends_go_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, _) = Journal::open(&path).unwrap();
        for i in 0..100u32 {
            j.append(&i.to_le_bytes()).unwrap();
        }
        j.rewrite([&b"kept"[..]]).unwrap();
        assert_eq!(j.bytes(), (HEADER + 4) as u64);
        j.append(b"after").unwrap();
        drop(j);
        let (_, read) = Journal::open(&path).unwrap();
        assert_eq!(read, vec![b"kept".to_vec(), b"after".to_vec()]);
        assert!(!path.with_extension("rewrite").exists());
    }

    #[test]
    fn fields_out_of_bounds_are_errors() {
        let mut payload = vec![7u8];
        put_bytes(&mut payload, b"key");
        payload.extend_from_slice(&5i64.to_le_bytes());
        let mut f = Fields::new(&payload);
        assert_eq!(f.u8().unwrap(), 7);
        assert_eq!(f.bytes().unwrap(), b"key");
        assert_eq!(f.i64().unwrap(), 5);
        assert!(f.u8().is_err());
        let mut short = Fields::new(&[9, 0, 0, 0, 1]);
        assert!(short.bytes().is_err(), "a length past the end");
    }
}
