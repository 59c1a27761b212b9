//! The names of request and grant states: the one place they are spelled. The API's JSON, the
//! notification bodies, jitctl's tables and the agent's stored records all use these words.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::pb::{GrantState, RequestState};

macro_rules! state_words {
    ($ty:ident { $($variant:ident => $word:literal),+ $(,)? }) => {
        impl $ty {
            /// Every state but `Unspecified`, in order.
            pub const ALL: &[Self] = &[$(Self::$variant),+];

            /// The state's word, as people, JSON and the store see it.
            #[must_use]
            pub const fn word(self) -> &'static str {
                match self {
                    Self::Unspecified => "unspecified",
                    $(Self::$variant => $word),+
                }
            }

            /// The state a word names (`Unspecified` is never named).
            #[must_use]
            pub fn from_word(word: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|s| s.word() == word)
            }

            /// The word of a state as carried in a message (`"unknown"` for a number no state has).
            #[must_use]
            pub fn word_of(value: i32) -> &'static str {
                Self::try_from(value).map_or("unknown", Self::word)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.word())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let word = String::deserialize(d)?;
                Self::from_word(&word).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "{word:?} is not a {}; expected one of {}",
                        stringify!($ty),
                        Self::ALL.iter().map(|s| s.word()).collect::<Vec<_>>().join(", ")
                    ))
                })
            }
        }
    };
}

state_words!(RequestState {
    Pending => "pending",
    Granted => "granted",
    Denied => "denied",
    Expired => "expired",
});

state_words!(GrantState {
    Active => "active",
    Revoked => "revoked",
    Expired => "expired",
});

/// Serde for a message field holding a [`RequestState`] number: written as its word.
pub mod request_state_field {
    use super::*;

    /// Writes the word.
    pub fn serialize<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(RequestState::word_of(*v))
    }

    /// Reads a word.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        RequestState::deserialize(d).map(|s| s as i32)
    }
}

/// Serde for a message field holding a [`GrantState`] number: written as its word.
pub mod grant_state_field {
    use super::*;

    /// Writes the word.
    pub fn serialize<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(GrantState::word_of(*v))
    }

    /// Reads a word.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        GrantState::deserialize(d).map(|s| s as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn words_round_trip_and_messages_carry_them() {
        for s in RequestState::ALL {
            assert_eq!(RequestState::from_word(s.word()), Some(*s));
        }
        for s in GrantState::ALL {
            assert_eq!(GrantState::from_word(s.word()), Some(*s));
        }
        assert_eq!(RequestState::from_word("unspecified"), None);
        assert_eq!(RequestState::word_of(99), "unknown");
        let r = pb::AccessRequest {
            state: RequestState::Denied as i32,
            ..Default::default()
        };
        let v = serde_json::to_value(&r).expect("serialize");
        assert_eq!(v["state"], "denied");
        let back: pb::AccessRequest = serde_json::from_value(v).expect("deserialize");
        assert_eq!(back.state, RequestState::Denied as i32);
        let g = pb::Grant {
            state: GrantState::Revoked as i32,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&g).expect("serialize")["state"],
            "revoked"
        );
        assert!(serde_json::from_str::<GrantState>("\"gone\"").is_err());
    }
}
