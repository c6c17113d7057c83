//! Blocking work (RocksDB calls, file syncs) kept off the runtime's threads: on tokio's blocking
//! pool, or inline on a thread that a deterministic simulation marked.
//!
//! A blocking-pool thread finishes when the operating system lets it, so the moment its result
//! wakes the waiting task, among everything else the simulation's single thread runs, differs
//! from one run to the next, and with it the interleaving. Run inline, the work holds the
//! simulated clock still and every run of a seed takes the same steps. Every binary uses the
//! pool; only [`run_inline_on_this_thread`] changes that, for the thread that calls it.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::task::{JoinError, JoinHandle};

thread_local! {
    static INLINE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` on tokio's blocking pool, or at once on this thread if it was marked with
/// [`run_inline_on_this_thread`]. Awaited, it gives `f`'s result like
/// [`tokio::task::spawn_blocking`]'s handle (inline, a panic in `f` unwinds into the caller).
pub fn spawn<F, R>(f: F) -> Blocking<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    if INLINE.with(Cell::get) {
        Blocking(Inner::Done(Some(f())))
    } else {
        Blocking(Inner::Pool(tokio::task::spawn_blocking(f)))
    }
}

/// Makes [`spawn`] run its work inline on this thread until the guard is dropped. For a
/// simulation that runs every task on one current-thread runtime.
pub fn run_inline_on_this_thread() -> InlineGuard {
    InlineGuard {
        previous: INLINE.with(|inline| inline.replace(true)),
        _not_send: std::marker::PhantomData,
    }
}

/// Restores how [`spawn`] runs work on this thread when dropped.
pub struct InlineGuard {
    previous: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for InlineGuard {
    fn drop(&mut self) {
        INLINE.with(|inline| inline.set(self.previous));
    }
}

/// The result of [`spawn`], ready or on the pool.
pub struct Blocking<R>(Inner<R>);

enum Inner<R> {
    Done(Option<R>),
    Pool(JoinHandle<R>),
}

// Nothing is pinned structurally: a ready result is moved out, and a `JoinHandle` is `Unpin`.
impl<R> Unpin for Blocking<R> {}

impl<R> Future for Blocking<R> {
    type Output = Result<R, JoinError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            Inner::Done(result) => Poll::Ready(Ok(result
                .take()
                .expect("a blocking result is awaited once"))),
            Inner::Pool(handle) => Pin::new(handle).poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_the_pool_unless_this_thread_is_marked() {
        let here = std::thread::current().id();
        let pooled = spawn(move || std::thread::current().id()).await.unwrap();
        assert_ne!(pooled, here, "unmarked work runs on the blocking pool");
        {
            let _inline = run_inline_on_this_thread();
            let ran = spawn(move || std::thread::current().id());
            // Done before it is awaited: nothing else can run in between.
            assert!(matches!(ran.0, Inner::Done(Some(_))));
            assert_eq!(ran.await.unwrap(), here);
        }
        let pooled = spawn(move || std::thread::current().id()).await.unwrap();
        assert_ne!(pooled, here, "the guard restores the pool");
    }
}
