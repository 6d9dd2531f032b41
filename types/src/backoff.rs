//! Retry pauses: doubling from a minimum up to a cap, then drawn from the upper half of that
//! ceiling, so callers that failed together do not retry together. Pure: the caller brings the
//! failure count and the random source.

use std::time::Duration;

use rand::RngExt;

/// The pause after `failures` failures in a row (1 for the first): `min · 2^(failures-1)`
/// capped at `max`, then uniform in its upper half.
pub fn jittered<R: rand::Rng + ?Sized>(
    min: Duration,
    max: Duration,
    failures: u32,
    rng: &mut R,
) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let ceiling = min.saturating_mul(1 << exponent).min(max);
    let ceiling_ms = ceiling.as_millis().max(1) as u64;
    Duration::from_millis(rng.random_range(ceiling_ms.div_ceil(2)..=ceiling_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn pauses_double_up_to_the_cap_and_stay_in_the_upper_half() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for failures in 1..30 {
            let ceiling = (min * 2u32.pow(failures.min(20) - 1)).min(max);
            let pause = jittered(min, max, failures, &mut rng);
            assert!(
                pause <= ceiling && pause >= ceiling / 2,
                "{failures}: {pause:?}"
            );
        }
    }
}
