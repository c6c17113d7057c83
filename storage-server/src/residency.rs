//! How much of a file is in the page cache, measured with `mincore(2)`.
//!
//! An in-memory store serves from its mmapped PlainTable files: its memory is the page cache
//! holding them. Warming reads them in before the replica takes traffic, but the kernel may
//! evict them afterwards (another version's push, a memory-hungry neighbour). The server
//! reports what is actually resident, not what it once read.
//!
//! The file is mapped (shared, read-only) only for the `mincore` call and unmapped at once;
//! `mincore` reports the page cache of the file, whoever mapped or read it. It is asked in
//! windows of [`WINDOW_PAGES`] pages so a large file needs no large vector.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Pages asked about per `mincore` call (256 MiB of file at 4 KiB pages).
const WINDOW_PAGES: usize = 64 * 1024;

/// Bytes of the file at `path` that are in the page cache (whole pages, capped at its length).
pub fn resident_bytes(path: &Path) -> io::Result<u64> {
    let Some(mapping) = Mapping::of_file(path)? else {
        return Ok(0);
    };
    let len = mapping.len;
    let page = page_size();
    let pages = len.div_ceil(page);
    let mut status = vec![0u8; pages.min(WINDOW_PAGES)];
    let mut resident_pages = 0usize;
    let mut first = 0;
    while first < pages {
        let count = (pages - first).min(WINDOW_PAGES);
        let bytes = (count * page).min(len - first * page);
        // SAFETY: the window lies inside the mapping (first * page < len, bytes ≤ len - offset),
        // its start is page-aligned, and `status` holds at least one byte per page of it.
        let rc = unsafe {
            libc::mincore(
                mapping.addr.cast::<u8>().add(first * page).cast(),
                bytes,
                status.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        resident_pages += status[..count].iter().filter(|s| **s & 1 == 1).count();
        first += count;
    }
    // The last page counts only for the part of it the file fills.
    let last_page_resident = status[(pages - 1) % WINDOW_PAGES] & 1 == 1;
    let mut bytes = resident_pages * page;
    if last_page_resident {
        bytes -= pages * page - len;
    }
    Ok(bytes as u64)
}

/// Asks the kernel to drop the file's clean pages from the page cache (`POSIX_FADV_DONTNEED`);
/// pages mapped by a process stay. For tests and benchmarks that need a cold file.
pub fn drop_from_page_cache(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    file.sync_all()?;
    // SAFETY: a plain syscall on a file descriptor we own.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// A whole file mapped and locked in memory (`mlock`): the kernel keeps its pages in the page
/// cache, whatever the memory pressure, until this is dropped (which unmaps and so unlocks it).
/// The pages are shared with every other mapping of the file, such as RocksDB's mmap reads.
pub struct LockedFile {
    mapping: Option<Mapping>,
}

impl std::fmt::Debug for LockedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedFile")
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl LockedFile {
    /// Maps the file at `path` and locks all of it in memory, reading in what is not resident.
    /// Fails with the OS error when the process may not lock that much (`RLIMIT_MEMLOCK`, or
    /// `ENOMEM`/`EAGAIN` when memory is short); then nothing stays locked.
    pub fn lock(path: &Path) -> io::Result<LockedFile> {
        let Some(mapping) = Mapping::of_file(path)? else {
            return Ok(LockedFile { mapping: None });
        };
        // SAFETY: locks exactly the mapping just made; it stays mapped while `self` lives.
        if unsafe { libc::mlock(mapping.addr, mapping.len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(LockedFile {
            mapping: Some(mapping),
        })
    }

    /// Bytes locked.
    pub fn bytes(&self) -> u64 {
        self.mapping.as_ref().map_or(0, |m| m.len as u64)
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as usize
    } else {
        4096
    }
}

/// A shared, read-only mapping of a whole file, unmapped on drop.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: nothing reads or writes through the pointer; it only names the mapping for
// mincore, mlock and munmap, which any thread may call.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// The whole file at `path`, `None` when it is empty (nothing to map).
    fn of_file(path: &Path) -> io::Result<Option<Mapping>> {
        let file = File::open(path)?;
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Ok(None);
        }
        Mapping::new(&file, len).map(Some)
    }

    fn new(file: &File, len: usize) -> io::Result<Mapping> {
        // SAFETY: a new mapping of `len` > 0 bytes of an open file; nothing reads through it
        // (mincore only asks about its pages), so a file truncated meanwhile cannot fault us.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { addr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made, once.
        unsafe {
            libc::munmap(self.addr, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn file_of(len: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let mut f = File::create(&path).unwrap();
        let block: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        f.write_all(&block).unwrap();
        f.sync_all().unwrap();
        (dir, path)
    }

    #[test]
    fn a_read_file_is_resident_and_a_dropped_one_is_not() {
        // Not a multiple of the page size, and more than one window at 4 KiB pages.
        let len = WINDOW_PAGES * 4096 + 3 * 4096 + 123;
        let (_dir, path) = file_of(len);

        drop_from_page_cache(&path).unwrap();
        let cold = resident_bytes(&path).unwrap();
        assert!(cold < len as u64 / 10, "cold: {cold} of {len}");

        let mut buf = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut buf).unwrap();
        // Every page, but on a shared machine the kernel may already have reclaimed a few.
        let warm = resident_bytes(&path).unwrap();
        assert!(
            warm <= len as u64 && warm >= len as u64 / 100 * 99,
            "warm: {warm} of {len}"
        );

        drop_from_page_cache(&path).unwrap();
        let dropped = resident_bytes(&path).unwrap();
        assert!(dropped < len as u64 / 10, "dropped: {dropped} of {len}");
    }

    /// The process's locked memory (`VmLck` in /proc/self/status), in bytes.
    pub(crate) fn locked_bytes_of_this_process() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmLck:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    #[test]
    fn a_locked_file_is_resident_and_stays_locked_until_dropped() {
        // Small enough for the default RLIMIT_MEMLOCK (8 MiB) of an unprivileged process.
        let len = 1024 * 1024 + 123;
        let (_dir, path) = file_of(len);
        drop_from_page_cache(&path).unwrap();
        let before = locked_bytes_of_this_process();

        let locked = LockedFile::lock(&path).unwrap();
        assert_eq!(locked.bytes(), len as u64);
        assert_eq!(
            resident_bytes(&path).unwrap(),
            len as u64,
            "locking reads it in"
        );
        let during = locked_bytes_of_this_process();
        assert!(during >= before + len as u64, "{before} -> {during}");
        // Locked pages are not dropped on request.
        drop_from_page_cache(&path).unwrap();
        assert_eq!(resident_bytes(&path).unwrap(), len as u64);

        drop(locked);
        let after = locked_bytes_of_this_process();
        assert!(after + (len as u64) <= during, "{during} -> {after}");
    }

    #[test]
    fn an_empty_file_has_nothing_resident_and_a_missing_one_is_an_error() {
        let (dir, path) = file_of(0);
        assert_eq!(resident_bytes(&path).unwrap(), 0);
        let missing = resident_bytes(&dir.path().join("missing")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
