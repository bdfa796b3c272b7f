//! Topics and topic patterns.
//!
//! A topic is a `/`-separated path of non-empty segments: `orders/created`, `sensors/7/temp`.
//! A pattern is a topic whose segments may also be wildcards: `*` matches exactly one segment,
//! `**` (only as the last segment) matches zero or more remaining segments, so `orders/**`
//! matches `orders`, `orders/created` and `orders/eu/created`, and `**` matches every topic.
//! Topics starting with `$` are reserved for the mesh's own traffic.

use std::fmt;

use bytestring::ByteString;

use crate::channel::Channel;

/// Longest topic or pattern, in bytes.
pub const TOPIC_BYTES_MAX: usize = 255;

/// Why a string is not a valid topic or pattern.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The empty string.
    #[error("a topic cannot be empty")]
    Empty,
    /// Longer than [`TOPIC_BYTES_MAX`].
    #[error("topic is {0} bytes long; the most is {TOPIC_BYTES_MAX}")]
    TooLong(usize),
    /// Two slashes in a row, or a leading or trailing slash.
    #[error("topic {0:?} has an empty segment (leading, trailing or doubled '/')")]
    EmptySegment(String),
    /// A wildcard in a topic (only patterns may have them), or a `*` inside a segment.
    #[error("{0:?}: '*' and '**' are only allowed as whole segments of a pattern")]
    Wildcard(String),
    /// `**` somewhere else than at the end.
    #[error("{0:?}: '**' is only allowed as the last segment")]
    RecursiveNotLast(String),
    /// A topic of the mesh's own traffic.
    #[error("{0:?}: topics starting with '$' are reserved")]
    Reserved(String),
    /// Whitespace or a control character.
    #[error("{0:?}: whitespace and control characters are not allowed")]
    BadCharacter(String),
}

fn check_common(text: &str) -> Result<(), TopicError> {
    if text.is_empty() {
        return Err(TopicError::Empty);
    }
    if text.len() > TOPIC_BYTES_MAX {
        return Err(TopicError::TooLong(text.len()));
    }
    if text.starts_with('$') {
        return Err(TopicError::Reserved(text.to_owned()));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TopicError::BadCharacter(text.to_owned()));
    }
    if text.split('/').any(str::is_empty) {
        return Err(TopicError::EmptySegment(text.to_owned()));
    }
    Ok(())
}

/// A concrete topic (no wildcards). Shared text: a clone is a reference count, and the topic is
/// a message's [`Channel`] without a copy (an event's topic is cloned on every hand-on).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Topic(ByteString);

impl Topic {
    /// Checks `text` and makes it a topic.
    pub fn new(text: impl Into<String>) -> Result<Self, TopicError> {
        let text = text.into();
        check_common(&text)?;
        if text.contains('*') {
            return Err(TopicError::Wildcard(text));
        }
        Ok(Self(ByteString::from(text)))
    }

    /// The topic as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic as a message's channel name (shared, not copied).
    pub fn channel(&self) -> Channel {
        Channel::from(self.0.clone())
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Topic {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A topic pattern: a topic whose segments may be `*` (one segment) or, last, `**` (the rest).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPattern(String);

impl TopicPattern {
    /// Checks `text` and makes it a pattern.
    pub fn new(text: impl Into<String>) -> Result<Self, TopicError> {
        let text = text.into();
        check_common(&text)?;
        let segments: Vec<&str> = text.split('/').collect();
        for (i, segment) in segments.iter().enumerate() {
            match *segment {
                "*" => {}
                "**" if i + 1 == segments.len() => {}
                "**" => return Err(TopicError::RecursiveNotLast(text)),
                s if s.contains('*') => return Err(TopicError::Wildcard(text)),
                _ => {}
            }
        }
        Ok(Self(text))
    }

    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` is one of the topics this pattern names.
    pub fn matches(&self, topic: &Topic) -> bool {
        matches(&self.0, topic.as_str())
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TopicPattern {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl From<Topic> for TopicPattern {
    fn from(topic: Topic) -> Self {
        Self(String::from(topic.as_str()))
    }
}

/// Matches a valid pattern against a valid topic, segment by segment (no allocation).
fn matches(pattern: &str, topic: &str) -> bool {
    let mut topic_segments = topic.split('/');
    for segment in pattern.split('/') {
        if segment == "**" {
            return true;
        }
        match topic_segments.next() {
            Some(t) if segment == "*" || segment == t => {}
            _ => return false,
        }
    }
    topic_segments.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, topic: &str) -> bool {
        TopicPattern::new(pattern)
            .unwrap()
            .matches(&Topic::new(topic).unwrap())
    }

    #[test]
    fn wildcards_match_one_segment_or_the_rest() {
        assert!(m("orders/created", "orders/created"));
        assert!(!m("orders/created", "orders/deleted"));
        assert!(!m("orders/created", "orders/created/eu"));
        assert!(!m("orders/created/eu", "orders/created"));
        assert!(m("orders/*", "orders/created"));
        assert!(!m("orders/*", "orders"));
        assert!(!m("orders/*", "orders/created/eu"));
        assert!(m("*/created", "orders/created"));
        assert!(m("orders/**", "orders"));
        assert!(m("orders/**", "orders/created"));
        assert!(m("orders/**", "orders/eu/created"));
        assert!(!m("orders/**", "order"));
        assert!(!m("orders/**", "ordersx/created"));
        assert!(m("**", "anything/at/all"));
        assert!(m("*/*/**", "a/b"));
        assert!(!m("*/*/**", "a"));
    }

    #[test]
    fn bad_topics_and_patterns_are_refused_with_a_reason() {
        assert_eq!(Topic::new(""), Err(TopicError::Empty));
        assert!(matches!(
            Topic::new("a//b"),
            Err(TopicError::EmptySegment(_))
        ));
        assert!(matches!(Topic::new("/a"), Err(TopicError::EmptySegment(_))));
        assert!(matches!(Topic::new("a/"), Err(TopicError::EmptySegment(_))));
        assert!(matches!(Topic::new("a/*"), Err(TopicError::Wildcard(_))));
        assert!(matches!(
            Topic::new("$weft/x"),
            Err(TopicError::Reserved(_))
        ));
        assert!(matches!(
            Topic::new("a b"),
            Err(TopicError::BadCharacter(_))
        ));
        assert!(matches!(
            Topic::new("x".repeat(256)),
            Err(TopicError::TooLong(256))
        ));
        assert!(matches!(
            TopicPattern::new("a/**/b"),
            Err(TopicError::RecursiveNotLast(_))
        ));
        assert!(matches!(
            TopicPattern::new("a/b*"),
            Err(TopicError::Wildcard(_))
        ));
        assert!(TopicPattern::new("a/*/c/**").is_ok());
    }

    #[test]
    fn a_topic_is_a_pattern_that_matches_only_itself() {
        let topics = ["a", "a/b", "a/b/c", "b/a"];
        for t in topics {
            let pattern = TopicPattern::from(Topic::new(t).unwrap());
            for u in topics {
                assert_eq!(
                    pattern.matches(&Topic::new(u).unwrap()),
                    t == u,
                    "{t} vs {u}"
                );
            }
        }
    }
}
