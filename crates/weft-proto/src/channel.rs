//! Channel and topic names: immutable, reference-counted UTF-8.
//!
//! Every message carries its channel (point-to-point) or topic (pub/sub). A `String` per message
//! cost an allocation and a copy at the sender and another at the receiver; a [`Channel`] is a
//! [`Bytes`] known to be UTF-8, so cloning one is a reference-count increment, a name decoded
//! from a frame is a slice of the buffer the frame arrived in, and a name made once
//! (`Channel::from_static`, or kept and cloned by the application) is never copied again.
//!
//! The storage is `bytestring::ByteString` (`Bytes` checked for UTF-8 once, when made, so reading
//! the name costs nothing: this crate forbids the `unsafe` that skipping the check needs). The
//! newtype keeps the protocol's own name and conversions, and equality, order and hash exactly
//! those of `str`, so maps keyed by `Channel` can be looked up with a `&str`.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use bytes::Bytes;
use bytestring::ByteString;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The mesh's own channels (their names start with `$`, which application channels may not).
pub mod mesh {
    /// Interest announcements (subscriptions, services, workers) and their confirmations.
    pub const INTEREST: &str = "$weft/interest";
    /// Pub/sub events.
    pub const EVENT: &str = "$weft/ev";
    /// Subscribers' confirmations of events.
    pub const CONFIRM: &str = "$weft/evc";
    /// Requests.
    pub const REQUEST: &str = "$weft/req";
    /// Replies.
    pub const REPLY: &str = "$weft/rep";
    /// Prefix of work queues' channels (the queue's name follows).
    pub const WORK_PREFIX: &str = "$weft/queue/";
}

/// A channel or topic name (see the module doc). Dereferences to `str`.
#[derive(Clone, Default)]
pub struct Channel(ByteString);

impl Channel {
    /// A name from a `'static` string, without copying it.
    pub const fn from_static(name: &'static str) -> Self {
        Self(ByteString::from_static(name))
    }

    /// A name from bytes, if they are UTF-8 (without copying them).
    pub fn from_utf8(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        ByteString::try_from(bytes).map(Self)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name's bytes, shared.
    pub fn as_bytes(&self) -> &Bytes {
        self.0.as_bytes()
    }
}

impl Deref for Channel {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Channel {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Channel {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Channel {
    /// Copies the name (keep the `Channel` and clone it to avoid the copy per message).
    fn from(name: &str) -> Self {
        Self(ByteString::from(name))
    }
}

impl From<&String> for Channel {
    fn from(name: &String) -> Self {
        Self::from(name.as_str())
    }
}

impl From<String> for Channel {
    /// Takes the string's buffer without copying it.
    fn from(name: String) -> Self {
        Self(ByteString::from(name))
    }
}

impl From<ByteString> for Channel {
    fn from(name: ByteString) -> Self {
        Self(name)
    }
}

impl From<&Channel> for Channel {
    fn from(name: &Channel) -> Self {
        name.clone()
    }
}

impl From<Channel> for String {
    fn from(name: Channel) -> Self {
        name.as_str().to_owned()
    }
}

impl PartialEq for Channel {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Channel {}

impl PartialOrd for Channel {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Channel {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for Channel {
    /// As `str` hashes (so a map keyed by `Channel` finds a `&str`).
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialEq<str> for Channel {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Channel {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Channel {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<Channel> for str {
    fn eq(&self, other: &Channel) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Channel> for &str {
    fn eq(&self, other: &Channel) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<Channel> for String {
    fn eq(&self, other: &Channel) -> bool {
        self.as_str() == other.as_str()
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Channel {
    /// As a string: the same bytes a `String` field had.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Channel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn behaves_as_its_str() {
        let made = Channel::from("orders/created");
        let kept = Channel::from_static("orders/created");
        assert_eq!(made, kept);
        assert_eq!(made, "orders/created");
        assert_eq!("orders/created", made);
        assert_eq!(made.to_string(), "orders/created");
        assert_eq!(format!("{made:?}"), "\"orders/created\"");
        assert!(made.starts_with("orders/"));
        let mut hashed = HashMap::new();
        hashed.insert(made.clone(), 1);
        assert_eq!(hashed.get("orders/created"), Some(&1));
        let mut ordered = BTreeMap::new();
        ordered.insert(Channel::from("b"), 2);
        ordered.insert(Channel::from("a"), 1);
        assert_eq!(ordered.get("a"), Some(&1));
        assert_eq!(ordered.keys().next().unwrap(), "a");
    }

    #[test]
    fn clones_share_and_bytes_are_checked() {
        let name = Channel::from(String::from("jobs"));
        let copy = name.clone();
        assert_eq!(name.as_bytes().as_ptr(), copy.as_bytes().as_ptr());
        assert!(Channel::from_utf8(Bytes::from_static(b"\xff\xfe")).is_err());
        let bytes = Bytes::from_static(b"jobs/7");
        let sliced = Channel::from_utf8(bytes.slice(0..4)).unwrap();
        assert_eq!(sliced, "jobs");
    }

    #[test]
    fn serializes_like_a_string() {
        let name = Channel::from("a/b");
        let as_channel = postcard::to_allocvec(&name).unwrap();
        let as_string = postcard::to_allocvec(&String::from("a/b")).unwrap();
        assert_eq!(as_channel, as_string);
        let back: Channel = postcard::from_bytes(&as_channel).unwrap();
        assert_eq!(back, name);
    }
}
