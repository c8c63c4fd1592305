//! The path rules, in one place: every path that comes from a source tree, a manifest,
//! a request or a download URL is a [`RelPath`] before anything uses it.
//!
//! A `RelPath` is UTF-8, relative, `/`-separated, and has no empty, `.` or `..`
//! component, no NUL or other control character, and no backslash (which would be a
//! separator on another system). Length is bounded. Case is preserved and compared
//! byte-wise: two names that differ only in case are two entries (a case-insensitive
//! filesystem on a target would see a collision; Linux targets do not).

use std::fmt;

/// Longest path accepted, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest single component accepted, in bytes (the usual `NAME_MAX`).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Deepest nesting of symlinks used as folders inside another symlink's target that a
/// manifest may hold (Linux gives up after 40 links in one lookup, `MAXSYMLINKS`).
pub const MAX_SYMLINK_NESTING: usize = 40;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path {0:?} is absolute; only paths relative to the package root are allowed")]
    Absolute(String),
    #[error("path {0:?} has a '..' component")]
    ParentComponent(String),
    #[error("path {0:?} has an empty or '.' component")]
    EmptyComponent(String),
    #[error("path {0:?} contains a NUL or control character")]
    ControlCharacter(String),
    #[error("path {0:?} contains a backslash")]
    Backslash(String),
    #[error("path is {len} bytes long; the limit is {MAX_PATH_BYTES}")]
    TooLong { len: usize },
    #[error("path {0:?} has a component longer than {MAX_COMPONENT_BYTES} bytes")]
    ComponentTooLong(String),
    #[error("path is not valid UTF-8: {0:?}")]
    NotUtf8(String),
    #[error("symlink {link:?} points to {target:?}, which is outside the package")]
    SymlinkEscapes { link: String, target: String },
    #[error("symlink {link:?} resolves through more than {MAX_SYMLINK_NESTING} other symlinks")]
    SymlinkChainTooLong { link: String },
}

/// A validated path relative to a package root. Held as a `Box<str>` (exactly its
/// bytes, 16 bytes inline): a manifest holds one per entry.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct RelPath(Box<str>);

impl RelPath {
    /// Validates `s` against the path rules.
    pub fn new(s: impl Into<String>) -> Result<Self, PathError> {
        let s = s.into();
        validate(&s)?;
        Ok(Self(s.into_boxed_str()))
    }

    /// Validates raw bytes (e.g. a file name from disk or a wire message).
    pub fn from_bytes(b: &[u8]) -> Result<Self, PathError> {
        match std::str::from_utf8(b) {
            Ok(s) => {
                validate(s)?;
                Ok(Self(s.into()))
            }
            Err(_) => Err(PathError::NotUtf8(String::from_utf8_lossy(b).into_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The components, in order.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The parent directory, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<RelPath> {
        self.0.rfind('/').map(|i| RelPath(self.0[..i].into()))
    }

    /// `self/name`, validated.
    pub fn join(&self, name: &str) -> Result<RelPath, PathError> {
        RelPath::new(format!("{}/{}", self.0, name))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}
impl<'de> serde::Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RelPath::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}
impl AsRef<str> for RelPath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A name or message as it may be shown to a person: control characters (newline, tab,
/// escape, …) and the Unicode characters that reorder text on screen are written as
/// Rust escapes (`\n`, `\t`, `\u{202e}`), so a hostile file name can neither break a
/// one-line message nor disguise itself. Anything else is unchanged (no copy).
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    fn hidden(c: char) -> bool {
        c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !s.chars().any(hidden) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if hidden(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn validate(s: &str) -> Result<(), PathError> {
    if s.is_empty() {
        return Err(PathError::Empty);
    }
    if s.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong { len: s.len() });
    }
    if s.chars().any(char::is_control) {
        return Err(PathError::ControlCharacter(s.to_owned()));
    }
    if s.contains('\\') {
        return Err(PathError::Backslash(s.to_owned()));
    }
    if s.starts_with('/') {
        return Err(PathError::Absolute(s.to_owned()));
    }
    for c in s.split('/') {
        match c {
            "" | "." => return Err(PathError::EmptyComponent(s.to_owned())),
            ".." => return Err(PathError::ParentComponent(s.to_owned())),
            c if c.len() > MAX_COMPONENT_BYTES => {
                return Err(PathError::ComponentTooLong(s.to_owned()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks that a symlink at `link` with target `target` resolves, lexically, to a place
/// inside the package root. Absolute targets are refused. Returns the resolved path
/// (`None` when the target is the root itself).
///
/// This is a lexical check of one link. A `..` that follows another symlink in the
/// target is resolved by the kernel from that symlink's destination, not lexically, so a
/// chain of individually valid links can still climb out (`s -> .` and `t -> s/../x`);
/// the manifest therefore also checks every symlink against the others
/// (`manifest::check_symlink_chains`). Installers and file servers must still never
/// follow a symlink while writing or resolving (the manifest decoder guarantees no entry
/// lives under a symlink).
pub fn resolve_symlink(link: &RelPath, target: &str) -> Result<Option<RelPath>, PathError> {
    let escapes = || PathError::SymlinkEscapes { link: link.to_string(), target: target.to_owned() };
    if target.is_empty()
        || target.starts_with('/')
        || target.contains('\\')
        || target.len() > MAX_PATH_BYTES
        || target.chars().any(char::is_control)
    {
        return Err(escapes());
    }
    let mut stack: Vec<&str> = link.as_str().split('/').collect();
    stack.pop(); // the link's own name
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if stack.pop().is_none() {
                    return Err(escapes());
                }
            }
            c => stack.push(c),
        }
    }
    if stack.is_empty() { Ok(None) } else { RelPath::new(stack.join("/")).map(Some).map_err(|_| escapes()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_controls_keeps_messages_on_one_honest_line() {
        assert!(matches!(escape_controls("dir with space/ü.txt"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(escape_controls("a\nb.txt"), "a\\nb.txt");
        assert_eq!(escape_controls("tab\there\r\u{1b}[31m"), "tab\\there\\r\\u{1b}[31m");
        assert_eq!(escape_controls("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(escape_controls("\u{85}"), "\\u{85}", "C1 controls too");
    }

    #[test]
    fn accepts_ordinary_paths() {
        for p in ["a", "a/b", "dir with space/ü.txt", "x.y/z..w", ".hidden/..x"] {
            assert!(RelPath::new(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn refuses_hostile_paths() {
        let long_component = "a".repeat(256);
        let long_path = "a/".repeat(2100);
        let cases = [
            "",
            "/etc/passwd",
            "..",
            "a/../b",
            "a/..",
            "./a",
            "a//b",
            "a/",
            "a\0b",
            "a\\..\\b",
            "a\nb",
            &long_component,
            &long_path,
        ];
        for p in cases {
            assert!(RelPath::new(p).is_err(), "{p:?} should be refused");
        }
        assert!(matches!(RelPath::from_bytes(b"a\xffb"), Err(PathError::NotUtf8(_))));
    }

    #[test]
    fn symlink_targets_stay_inside() {
        let link = RelPath::new("a/b/link").unwrap();
        assert_eq!(resolve_symlink(&link, "c").unwrap().unwrap().as_str(), "a/b/c");
        assert_eq!(resolve_symlink(&link, "../../x").unwrap().unwrap().as_str(), "x");
        assert_eq!(resolve_symlink(&link, "../..").unwrap(), None);
        assert!(resolve_symlink(&link, "../../..").is_err());
        assert!(resolve_symlink(&link, "/etc").is_err());
        assert!(resolve_symlink(&link, "").is_err());
        assert!(resolve_symlink(&RelPath::new("top").unwrap(), "..").is_err());
    }
}
