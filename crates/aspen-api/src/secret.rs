//! [`Secret`]: a cluster secret or token that never shows up in `Debug` output, so a
//! configuration or request can be logged with `?` without leaking what guards the cluster.

use serde::{Deserialize, Serialize};

/// What `Debug` prints instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// A secret string (cluster secret, client or admin token). `Debug` prints
/// [`REDACTED`]; there is no `Display`, so the value is only reached through
/// [`Secret::expose`], where a reader sees it being used. Encoded as a plain string.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for comparing, hashing or handing it to the peer it is meant for.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Its length in bytes (safe to show: it is checked against limits).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(REDACTED)
    }
}

impl PartialEq for Secret {
    /// Compares without stopping at the first differing byte, so the time taken does not
    /// tell how much of a guess was right (only whether the lengths differ).
    fn eq(&self, other: &Secret) -> bool {
        let (left, right) = (self.0.as_bytes(), other.0.as_bytes());
        left.len() == right.len() && left.iter().zip(right).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
    }
}

impl Eq for Secret {}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_string())
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Secret(text.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value_even_nested() {
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Holder {
            token: Secret,
            maybe: Option<Secret>,
        }
        let holder = Holder { token: Secret::new("hunter2-token"), maybe: Some("s3cret-value".into()) };
        let text = format!("{holder:?} {holder:#?}");
        assert!(!text.contains("hunter2") && !text.contains("s3cret"), "{text}");
        assert_eq!(text.matches(REDACTED).count(), 4, "{text}");
    }

    #[test]
    fn equality_is_by_value_and_the_encoding_is_a_plain_string() {
        assert_eq!(Secret::new("a"), Secret::from("a"));
        assert_ne!(Secret::new("a"), Secret::new("b"));
        assert_ne!(Secret::new("a"), Secret::new("ab"));
        let encoded = postcard::to_allocvec(&Secret::new("token")).expect("encode");
        assert_eq!(encoded, postcard::to_allocvec("token").expect("encode"));
        let decoded: Secret = postcard::from_bytes(&encoded).expect("decode");
        assert_eq!(decoded.expose(), "token");
    }
}
