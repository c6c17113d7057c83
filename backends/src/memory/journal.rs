//! Append-only record files: what the memory backends keep on disk to survive a restart.
//!
//! A journal is a sequence of frames `[length: u32 LE][crc32c of payload: u32 LE][payload]`.
//! Every append is one `write` of a whole frame before the change it records is applied, so a
//! process killed at any point leaves every applied change in the file; [`Journal::sync`]
//! forces it to the disk, which the backends do before anything relies on a change (the
//! metadata store before it answers, the broker before a consumer sees a record or a send is
//! acknowledged), so a machine crash loses nothing that was acknowledged. Opening reads every whole frame and cuts the file after the last one: a torn or
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
        let mut payloads = Vec::new();
        let journal = Journal::scan(path, |_, payload| {
            payloads.push(payload.to_vec());
            Ok(())
        })?;
        Ok((journal, payloads))
    }

    /// Opens the journal at `path` (created if missing), calling `each` with the position and
    /// payload of every frame in order (reading the file once, a frame at a time, so a large
    /// journal is never held in memory). A torn or corrupt tail is cut off.
    pub(crate) fn scan(
        path: &Path,
        mut each: impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<Journal> {
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        if created {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                sync_dir(dir)?;
            }
        }
        let length = file.metadata()?.len();
        let mut reader = io::BufReader::with_capacity(1 << 20, &file);
        let mut at = 0u64;
        let mut kept = 0usize;
        let mut payload = Vec::new();
        loop {
            let mut header = [0u8; HEADER];
            if read_full(&mut reader, &mut header)? < HEADER {
                break;
            }
            let (size, crc) = parse_header(&header);
            if size > PAYLOAD_MAX {
                break;
            }
            payload.resize(size, 0);
            if read_full(&mut reader, &mut payload)? < size || crc32c::crc32c(&payload) != crc {
                break;
            }
            each(at, &payload)?;
            at += frame_bytes(size);
            kept += 1;
        }
        drop(reader);
        if at < length {
            tracing::warn!(
                journal = %path.display(),
                dropped_bytes = length - at,
                kept_records = kept,
                "the journal ends in a torn or corrupt record (a crash during a write?): cutting it off"
            );
            file.set_len(at)?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            bytes: at,
        })
    }

    /// Appends one record; returns where its frame starts (for [`Journal::read`]).
    pub(crate) fn append(&mut self, payload: &[u8]) -> io::Result<u64> {
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
        let at = self.bytes;
        self.bytes += frame.len() as u64;
        Ok(at)
    }

    /// Reads back the payload of the frame at `at` holding `size` bytes, checking its length
    /// and checksum again (the disk may have changed since it was written).
    pub(crate) fn read(&self, at: u64, size: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut frame = vec![0u8; HEADER + size];
        self.file.read_exact_at(&mut frame, at)?;
        let (stored_size, crc) = parse_header(&frame[..HEADER]);
        if stored_size != size || crc32c::crc32c(&frame[HEADER..]) != crc {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the record at byte {at} of {} is corrupt (its length or checksum changed on \
                     disk)",
                    self.path.display()
                ),
            ));
        }
        frame.drain(..HEADER); // in place: the payload keeps the buffer
        Ok(frame)
    }

    /// Forces what was appended to the disk (data, and the length that makes it readable).
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// A second handle on the file, to sync it without holding whatever guards the journal.
    pub(crate) fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Bytes in the file.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the journal's content with `payloads`, atomically: a reader (or a restart) sees
    /// either the old content or all of the new.
    pub(crate) fn rewrite<'a>(
        &mut self,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) -> io::Result<()> {
        *self = Journal::create(&self.path, payloads.into_iter().map(Ok))?;
        Ok(())
    }

    /// Writes a new journal at `path` holding `payloads` (frames in order from byte 0, each
    /// [`frame_bytes`] long), replacing any file there atomically. The first error of the
    /// payloads leaves the old file in place.
    pub(crate) fn create<P: AsRef<[u8]>>(
        path: &Path,
        payloads: impl IntoIterator<Item = io::Result<P>>,
    ) -> io::Result<Journal> {
        let temporary = path.with_extension("rewrite");
        let mut out = io::BufWriter::new(File::create(&temporary)?);
        let mut bytes = 0u64;
        for payload in payloads {
            let frame = frame(payload?.as_ref());
            out.write_all(&frame)?;
            bytes += frame.len() as u64;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&temporary, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename itself must reach the disk before the old content is relied on gone.
            sync_dir(dir)?;
        }
        let file = OpenOptions::new().read(true).append(true).open(path)?;
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            bytes,
        })
    }
}

/// Bytes a frame of a `size`-byte payload takes in the file.
pub(crate) fn frame_bytes(size: usize) -> u64 {
    (HEADER + size) as u64
}

fn parse_header(header: &[u8]) -> (usize, u32) {
    let size = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    (size, crc)
}

/// Reads until `buf` is full or the input ends; the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Forces a directory's entries (files created, renamed or removed in it) to the disk.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
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
