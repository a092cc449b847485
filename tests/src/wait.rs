//! Deadline-bounded polling, for conditions that become true eventually
//! (an agent noticing a config change, a counter moving).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

const POLL: Duration = Duration::from_millis(50);

/// Polls `cond` every 50 ms until it returns `Ok(true)`. An `Err` from
/// `cond` is returned at once; running out of time is an error.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    wait_for(timeout, || Ok(cond()?.then_some(())))
}

/// Polls `probe` every 50 ms until it returns `Ok(Some(value))`.
pub fn wait_for<T>(timeout: Duration, mut probe: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_until_true_or_deadline() {
        let mut n = 0;
        wait_until(Duration::from_secs(5), || {
            n += 1;
            Ok(n == 3)
        })
        .unwrap();
        assert_eq!(n, 3);
        let err = wait_until(Duration::from_millis(120), || Ok(false)).unwrap_err();
        assert!(err.to_string().contains("not met"));
        assert!(wait_until(Duration::from_secs(5), || anyhow::bail!("boom")).is_err());
    }
}
