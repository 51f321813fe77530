//! `del -a` in bounded time: devices are stopped in parallel by a bounded
//! number of workers, under one overall deadline. Each stop has its own
//! timeout as well, so `del -a` ends within [`DEADLINE`] plus one stop's
//! timeout, however many devices there are; the devices not stopped are
//! named, each with its reason.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Devices stopped at once. A stop mostly waits (for a daemon to exit,
/// for the kernel); more workers than this only crowd the CPUs with the
/// daemons' own shutdowns.
pub const WORKERS: usize = 16;

/// No new stop starts after this; one already running ends within its own timeout.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Run `one(state, id)` for every id, on at most `workers` threads, each
/// with a `state` of its own from `make` (a control device, say). An id
/// not started by `deadline` gets an error saying so. Results in id order.
pub fn run<S, E>(
    ids: &[u32],
    workers: usize,
    deadline: Instant,
    make: impl Fn() -> S + Sync,
    one: impl Fn(&mut S, u32) -> Result<(), E> + Sync,
    late: impl Fn(u32) -> E + Sync,
) -> Vec<(u32, Result<(), E>)>
where
    E: Send,
{
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(ids.len()));
    let work = || {
        let mut state = make();
        while let Some(&id) = ids.get(next.fetch_add(1, Ordering::SeqCst)) {
            let r = if Instant::now() >= deadline {
                Err(late(id))
            } else {
                one(&mut state, id)
            };
            results
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((id, r));
        }
    };
    std::thread::scope(|s| {
        let mut spawned = 0;
        for _ in 0..workers.min(ids.len()) {
            // Small stacks: a worker only makes syscalls and waits.
            match std::thread::Builder::new()
                .name("del".into())
                .stack_size(256 << 10)
                .spawn_scoped(s, work)
            {
                Ok(_) => spawned += 1,
                Err(e) => tracing::debug!("del: a worker fewer: {e}"),
            }
        }
        // No thread at all: do the work here.
        if spawned == 0 {
            work();
        }
    });
    let mut results = results.into_inner().unwrap_or_else(PoisonError::into_inner);
    results.sort_by_key(|(id, _)| *id);
    results
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_id_is_done_once_in_parallel_and_late_ones_are_named() {
        let ids: Vec<u32> = (0..40).collect();
        let start = Instant::now();
        let made = AtomicUsize::new(0);
        let results = run(
            &ids,
            8,
            start + Duration::from_secs(30),
            || made.fetch_add(1, Ordering::SeqCst),
            |_, id| {
                std::thread::sleep(Duration::from_millis(50));
                if id == 7 {
                    Err(format!("{id} failed"))
                } else {
                    Ok(())
                }
            },
            |id| format!("{id} late"),
        );
        // 40 stops of 50 ms on 8 workers: about 250 ms, not 2 s.
        assert!(
            start.elapsed() < Duration::from_millis(1500),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(made.load(Ordering::SeqCst), 8);
        let got: Vec<u32> = results.iter().map(|(id, _)| *id).collect();
        assert_eq!(got, ids);
        assert_eq!(results[7].1, Err("7 failed".to_string()));
        assert_eq!(results.iter().filter(|(_, r)| r.is_err()).count(), 1);

        // Past the deadline nothing new starts.
        let results = run(
            &ids,
            4,
            Instant::now(),
            || (),
            |_, _| -> Result<(), String> { panic!("started after the deadline") },
            |id| format!("{id} late"),
        );
        assert!(results
            .iter()
            .all(|(id, r)| r == &Err(format!("{id} late"))));
    }
}
