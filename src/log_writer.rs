//! Where log lines go: stderr, in batches. A thread that logs (a request's access line) only
//! appends its line to a buffer in memory; a writer thread writes what has gathered a few
//! milliseconds later with one `write`, so that a busy proxy makes a system call and a wakeup
//! per batch rather than per line.
//!
//! Nothing is dropped: a buffer that reaches [`MAX_PENDING`] is written by the thread that filled
//! it, which then waits for stderr as it would without the batching. [`Flusher`]'s `Drop` writes
//! what is left.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a line may wait in memory before it is written.
pub const BATCH_DELAY: Duration = Duration::from_millis(5);

/// Bytes waiting at most; past this the thread that logs writes them itself.
pub const MAX_PENDING: usize = 256 * 1024;

struct State {
    pending: Vec<u8>,
    stopping: bool,
}

/// The buffer and its writer thread's signal, shared by every thread that logs.
pub struct Shared {
    state: Mutex<State>,
    /// Signalled when the buffer gets its first line, and at the stop.
    work: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked while holding the lock left a buffer of whole lines.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Writes the buffer out; called with the lock held, so that batches keep their order.
fn write_out(state: &mut State) {
    if !state.pending.is_empty() {
        // Nowhere to report a failed write to stderr.
        let _ = std::io::stderr().lock().write_all(&state.pending);
        state.pending.clear();
    }
}

/// The `MakeWriter` given to the log subscriber.
#[derive(Clone)]
pub struct BatchedStderr(Arc<Shared>);

/// Keeps the writer thread running; dropped, it writes what is left and stops the thread.
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A writer to stderr in batches and the guard that flushes it. Without a writer thread (the
/// system refuses one) lines are written at once.
pub fn batched_stderr() -> (BatchedStderr, Flusher) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            pending: Vec::with_capacity(64 * 1024),
            stopping: false,
        }),
        work: Condvar::new(),
    });
    let worker = shared.clone();
    let thread = std::thread::Builder::new()
        .name("stickless-log".into())
        .spawn(move || run(&worker))
        .ok();
    if thread.is_none() {
        shared.lock().stopping = true;
    }
    (BatchedStderr(shared.clone()), Flusher { shared, thread })
}

fn run(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        while state.pending.is_empty() && !state.stopping {
            state = shared.work.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.stopping {
            write_out(&mut state);
            return;
        }
        // Let the batch gather; a stop cuts the wait short.
        state = shared
            .work
            .wait_timeout(state, BATCH_DELAY)
            .map_or_else(|e| e.into_inner().0, |(s, _)| s);
        write_out(&mut state);
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.work.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        write_out(&mut self.shared.lock());
    }
}

impl Write for &Shared {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut state = self.lock();
        if state.stopping {
            // No writer thread (any more): written at once.
            write_out(&mut state);
            std::io::stderr().lock().write_all(line)?;
            return Ok(line.len());
        }
        let was_empty = state.pending.is_empty();
        state.pending.extend_from_slice(line);
        if state.pending.len() >= MAX_PENDING {
            write_out(&mut state);
        } else if was_empty {
            self.work.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedStderr {
    type Writer = &'a Shared;

    fn make_writer(&'a self) -> Self::Writer {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_wait_for_the_writer_and_keep_their_order() {
        let (writer, flusher) = batched_stderr();
        let mut w = tracing_subscriber::fmt::MakeWriter::make_writer(&writer);
        w.write_all(b"one\n").unwrap();
        w.write_all(b"two\n").unwrap();
        // Both lines are in memory until the writer thread's batch delay is over.
        let pending = writer.0.lock().pending.clone();
        assert!(pending.is_empty() || pending == b"one\ntwo\n");
        drop(flusher);
        assert!(writer.0.lock().pending.is_empty(), "written at the stop");
    }
}
