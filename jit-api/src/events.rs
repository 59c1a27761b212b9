//! The events a webhook is told about: the one place their names are spelled (configuration
//! `events = [...]`, notification bodies, logs).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! events {
    ($($variant:ident => $name:literal: $doc:literal),+ $(,)?) => {
        /// A notification event.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Event {
            $(#[doc = $doc] $variant),+
        }

        impl Event {
            /// Every event, in order.
            pub const ALL: &[Self] = &[$(Self::$variant),+];

            /// The event's name, e.g. `request.pending`.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name),+
                }
            }
        }
    };
}

events! {
    RequestPending => "request.pending": "A request waits for approvals.",
    RequestGranted => "request.granted": "A request was granted (by policy or by its last approval).",
    RequestDenied => "request.denied": "A request was denied by an approver.",
    GrantBreakGlass => "grant.break_glass": "A break-glass grant was taken.",
    GrantRevoked => "grant.revoked": "A grant was revoked.",
}

/// A name that is no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an event; expected one of {list}", list = Event::names().join(", "))]
pub struct UnknownEvent(pub String);

impl Event {
    /// Every event's name.
    #[must_use]
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|e| e.name()).collect()
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Event {
    type Err = UnknownEvent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|e| e.name() == s)
            .ok_or_else(|| UnknownEvent(s.to_string()))
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_unknown_ones_are_refused() {
        for e in Event::ALL {
            assert_eq!(e.name().parse::<Event>(), Ok(*e));
        }
        let err = "request.lost".parse::<Event>().expect_err("unknown");
        assert!(err.to_string().contains("request.pending"), "{err}");
    }
}
