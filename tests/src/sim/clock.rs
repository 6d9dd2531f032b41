//! The simulator's clock: a queue of events ordered by when they are due.
//!
//! Nothing ticks. Virtual time is the due time of the event being handled, and handling the
//! next event jumps the clock straight to its deadline (as quinn-proto's test `Pair` does), so
//! a quiet second costs nothing and a busy millisecond costs only its events. Events due at the
//! same instant run in the order they were scheduled, which keeps a run deterministic.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::time::Duration;

struct Entry<E> {
    at: Duration,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<E> Eq for Entry<E> {}

impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Virtual time and the events waiting for it.
pub struct Clock<E> {
    now: Duration,
    seq: u64,
    queue: BinaryHeap<Reverse<Entry<E>>>,
}

impl<E> Default for Clock<E> {
    fn default() -> Self {
        Clock {
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
        }
    }
}

impl<E> Clock<E> {
    /// Virtual time now.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Queues `event` to happen `after` from now.
    pub fn schedule(&mut self, after: Duration, event: E) {
        self.seq += 1;
        self.queue.push(Reverse(Entry {
            at: self.now + after,
            seq: self.seq,
            event,
        }));
    }

    /// The next event due no later than `end`, with the clock moved to its deadline; `None`
    /// (and the clock at `end`) when nothing is due by then.
    pub fn next_until(&mut self, end: Duration) -> Option<E> {
        if self.queue.peek().is_some_and(|Reverse(e)| e.at <= end) {
            let Reverse(entry) = self.queue.pop()?;
            self.now = self.now.max(entry.at);
            return Some(entry.event);
        }
        self.now = self.now.max(end);
        None
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no event waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_jumps_to_each_deadline_in_order_and_ties_keep_their_order() {
        let mut clock = Clock::default();
        clock.schedule(Duration::from_secs(5), "late");
        clock.schedule(Duration::from_millis(1), "first");
        clock.schedule(Duration::from_millis(1), "second");
        assert_eq!(clock.next_until(Duration::from_secs(10)), Some("first"));
        assert_eq!(clock.now(), Duration::from_millis(1));
        assert_eq!(clock.next_until(Duration::from_secs(10)), Some("second"));
        assert_eq!(clock.next_until(Duration::from_secs(1)), None);
        assert_eq!(clock.now(), Duration::from_secs(1));
        assert_eq!(clock.next_until(Duration::from_secs(10)), Some("late"));
        assert_eq!(clock.now(), Duration::from_secs(5));
    }
}
