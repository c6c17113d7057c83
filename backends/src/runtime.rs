//! The runtime a binary runs on: tokio's multi-thread scheduler with its I/O and time drivers.

/// A multi-thread runtime of `worker_threads` threads (default: one per core).
pub fn multi_thread(worker_threads: Option<u64>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = worker_threads {
        builder.worker_threads(usize::try_from(threads).unwrap_or(usize::MAX));
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_runtime_has_the_threads_asked_for() {
        let runtime = super::multi_thread(Some(3)).unwrap();
        assert_eq!(runtime.metrics().num_workers(), 3);
        assert_eq!(runtime.block_on(async { 1 + 1 }), 2);
    }
}
