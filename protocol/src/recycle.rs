//! Buffers lent out as [`Bytes`] and given back when the last reference is dropped.
//!
//! The server sends response chunks this way (h2 drops them once written) and the client
//! receives batch-get responses this way (values are slices of a block until the caller drops
//! them). Each side keeps its own pool, with its own limits; this is the shared mechanism.

use std::sync::Arc;

use bytes::Bytes;

/// A pool that takes buffers back.
pub trait Recycle: Send + Sync + 'static {
    /// `buf`, no longer referenced: keep it for reuse, or drop it.
    fn recycle(&self, buf: Vec<u8>);
}

/// `buf` as `Bytes`; when the last clone or slice of it is dropped, `buf` goes to
/// `pool.recycle`.
pub fn lend<P: Recycle>(pool: &Arc<P>, buf: Vec<u8>) -> Bytes {
    Bytes::from_owner(Lent {
        buf,
        pool: Arc::clone(pool),
    })
}

struct Lent<P: Recycle> {
    buf: Vec<u8>,
    pool: Arc<P>,
}

impl<P: Recycle> AsRef<[u8]> for Lent<P> {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl<P: Recycle> Drop for Lent<P> {
    fn drop(&mut self) {
        self.pool.recycle(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Keep(Mutex<Vec<Vec<u8>>>);

    impl Recycle for Keep {
        fn recycle(&self, buf: Vec<u8>) {
            self.0.lock().unwrap().push(buf);
        }
    }

    #[test]
    fn a_buffer_comes_back_when_its_last_slice_is_dropped() {
        let pool = Arc::new(Keep::default());
        let bytes = lend(&pool, b"hello world".to_vec());
        let slice = bytes.slice(6..);
        drop(bytes);
        assert!(pool.0.lock().unwrap().is_empty(), "a slice still holds it");
        assert_eq!(&slice[..], b"world");
        drop(slice);
        let back = pool.0.lock().unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(&back[0][..], b"hello world");
    }
}
