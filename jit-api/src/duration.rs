//! The one parser for durations ("15m", "1h30m", "90s"), used by the agent's configuration and API
//! and by jitctl.

use std::time::Duration;

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Nothing given.
    #[error("is empty; give a duration such as 15m or 1h30m")]
    Empty,
    /// A leading minus.
    #[error("{0:?} is negative; give a positive duration such as 15m")]
    Negative(String),
    /// Zero length.
    #[error("{0:?} is zero; give a positive duration such as 15m")]
    Zero(String),
    /// Not a duration.
    #[error("{0:?} is not a duration ({1}); use forms such as 90s, 15m, 1h30m")]
    Unparseable(String, String),
}

/// Parses a positive duration.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(DurationError::Empty);
    }
    if t.starts_with('-') {
        return Err(DurationError::Negative(t.to_string()));
    }
    let d = humantime::parse_duration(t)
        .map_err(|e| DurationError::Unparseable(t.to_string(), e.to_string()))?;
    if d.is_zero() {
        return Err(DurationError::Zero(t.to_string()));
    }
    Ok(d)
}

/// Formats a duration the way [`parse_duration`] reads it, without sub-second noise.
#[must_use]
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 90s "), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert!(matches!(
            parse_duration("-5m"),
            Err(DurationError::Negative(_))
        ));
        assert!(matches!(parse_duration("0s"), Err(DurationError::Zero(_))));
        assert!(matches!(
            parse_duration("soon"),
            Err(DurationError::Unparseable(..))
        ));
        assert!(matches!(
            parse_duration("15"),
            Err(DurationError::Unparseable(..))
        ));
        assert_eq!(format_duration(Duration::from_millis(5_400_500)), "1h 30m");
    }
}
